"""Readout heads on MooG tokens: dense depth, recurrent point tracks and recurrent boxes.

Every readout consumes ``readout_features(step_out)`` = predicted ++ corrected tokens
``[B, 2K, D]`` of one frame and runs online inside the same step loop as the backbone.

- **Depth** (grid-based readout, official ``DenseReadout``): pixel queries
  ``zeros(D) ++ Fourier(pixel)`` cross-attend into the tokens (``PixelDecoder``, the same module
  as the RGB decoder) and give one log-depth per pixel. Dense maps are decoded on a strided grid
  of integer pixels and upsampled bilinearly, so cost is set by ``query_stride``. That map is
  smooth: 128 tokens through Fourier queries cannot place an object edge. With
  ``DepthReadoutConfig.fusion`` (``with_depth_fusion``) the decoder instead emits a feature
  grid at ``query_stride`` that a small DPT / U-Net style conv head fuses with image feature
  maps (the frozen XFeat maps) at finer strides; the caller passes those maps as ``skips``.
- **Points** and **boxes** (set-based readouts, official ``ConditionalAutoregressiveReadout``):
  each query (a point or a box) is encoded by ``MLP(Fourier(query))`` into an initial latent
  ``q0``; per frame ``c = s + TransformerReadout(s, kv=features)`` (cross-attention only, so
  queries never interact), ``s = LN_eps1e-4(c + MLP(c))``; the outputs are read from ``c``.
  A per-query start frame resets the latent to ``q0`` at that frame, which is how queries on
  any frame (online or batched in training) go through one code path.
- **Anchored outputs** (``anchored``, the CPU presets): positions and boxes are offsets from the
  query point / seed box (kept in the state as the query's anchor) from zero-initialised output
  layers, so training starts from the stay-put tracker instead of from random positions.

Coordinate conventions (``docs/architecture.md``): pixels ``xy`` with centres at integers.
Point positions are in units where 0 / 1 are the first / last pixel *centre*
(``x = p * (W - 1)``, the same normalisation as the Fourier features): a sigmoid for the absolute
readout, the query's own position plus ``tanh(offset)`` when anchored. Boxes are a centre/size in
units of the image *extent* ``[-0.5, W - 0.5]`` (``x = u * W - 0.5``), a sigmoid when absolute,
so a box covering the whole image is representable; ``x_min <= x_max`` holds by construction.
Boxes are not clipped to the image (clipping would cut the gradient of an edge predicted
outside it).

Losses live here too (pure torch, masked means over the entries that carry labels):

- ``depth_loss``: L1 on log-depth by default. Log-depth penalises relative error equally at
  every range (metric L1 is dominated by the far background). Chosen by measurement against
  L1 + 0.5 x the per-frame std of the log error, Eigen's scale-invariant log loss and metric
  L1: frozen 'tiny' MooG on generated clips, 800 steps, 2 seeds, held-out clips, plain L1-log
  gave the best AbsRel / delta1 (0.378 / 0.501 vs 0.396 / 0.487, 0.419 / 0.462 (1 seed) and
  0.382 / 0.492); the other kinds stay available (``DEPTH_LOSSES``).
- ``depth_gradient_loss``: optional multi-scale gradient matching on log-depth (MegaDepth /
  MiDaS): scale-invariant, it rewards depth edges in the right place.
- ``point_track_losses``: TAPIR-style, as the same group's Kauldron tracking readout: Huber on
  the normalised position masked by visibility, BCE on visibility, BCE on certainty with the
  label ``|pred - gt| <= threshold`` computed on a detached prediction.
- ``box_losses``: L1 on the normalised box + generalised IoU on valid frames, BCE on presence.

References:
    google-deepmind/representations4d ``moog/modules.py`` (``DenseReadout``,
    ``ConditionalAutoregressiveReadout``, ``MLP``), ``moog/configs/movi.py`` (readout sizes);
    google-deepmind/scivid ``losses/tap.py`` (tracking losses); DETR / GIoU (box losses).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import math
from typing import Literal

import torch
from torch import nn
import torch.nn.functional as F

from moog_ros.model.config import ConfigBase, ConfigError, TransformerConfig
from moog_ros.model.layers import (
    LayerNorm,
    Mlp,
    PixelDecoder,
    Transformer,
    fourier_features,
    gelu_tanh,
    init_flax_style_,
    pixels_xy_to_unit_yx,
    points_xy_to_unit,
    subsampled_pixels_xy,
    unit_to_points_xy,
)
from moog_ros.model.local_points import LocalEvidenceConfig

__all__ = [
    'BoxReadout',
    'BoxReadoutConfig',
    'DEPTH_LOSSES',
    'DepthFusionConfig',
    'DepthReadout',
    'DepthReadoutConfig',
    'PointReadout',
    'PointReadoutConfig',
    'READOUT_PRESETS',
    'RecurrentQueryReadout',
    'box_losses',
    'boxes_xyxy_to_unit',
    'dense_query_pixels',
    'depth_gradient_loss',
    'depth_loss',
    'generalized_box_iou',
    'get_box_config',
    'get_depth_config',
    'get_point_config',
    'point_track_losses',
    'points_visible',
    'points_xy_to_unit',
    'unit_to_boxes_xyxy',
    'unit_to_points_xy',
    'with_depth_fusion',
]

DEPTH_LOSSES = ('l1_log', 'l1_log_si', 'si_log', 'l1_m')


def _require(config: ConfigBase, condition: bool, message: str) -> None:
    # Same message shape as moog_ros.model.config: from_dict swaps the class name for the path.
    if not condition:
        raise ConfigError(f'{type(config).__name__}: {message}')


# --------------------------------------------------------------------------------------------
# Configs


@dataclasses.dataclass(frozen=True)
class DepthFusionConfig(ConfigBase):
    """DPT / U-Net style refinement of the token-decoded depth with image feature maps.

    The pixel decoder runs on the coarse ``query_stride`` grid and emits ``token_channels``
    features per decoded pixel; each skip map (coarse to fine) is added after a bilinear
    upsample and refined by a 3x3 residual conv, so depth edges can follow image edges that
    the 128 tokens cannot place. Defaults fit the frozen XFeat maps at input scale 2:
    ``XFeatMaps.coarse`` [B, 64, H/4, W/4] and ``XFeatMaps.fine`` [B, 24, H/2, W/2].
    """

    token_channels: int = 32  # decoder outputs per decoded pixel (instead of one log-depth)
    channels: int = 32  # width of the fusion convs
    skip_strides: tuple[int, ...] = (4, 2)  # model-pixel stride of each skip, coarse to fine
    skip_channels: tuple[int, ...] = (64, 24)  # channels of each skip map
    # Full resolution from the finest stride s: 'shuffle' predicts s*s log-depths per cell
    # (pixel shuffle), so an edge can sit on any pixel; 'bilinear' upsamples one log-depth
    # per cell, which blurs every edge over about s pixels.
    output_upsample: Literal['shuffle', 'bilinear'] = 'shuffle'

    def __post_init__(self) -> None:
        for name in ('token_channels', 'channels'):
            _require(self, getattr(self, name) >= 1,
                     f'{name} must be >= 1, got {getattr(self, name)}')
        _require(self, len(self.skip_strides) == len(self.skip_channels),
                 f'skip_strides {list(self.skip_strides)} and skip_channels '
                 f'{list(self.skip_channels)} must have the same length')
        _require(self, all(c >= 1 for c in self.skip_channels),
                 f'skip_channels must all be >= 1, got {list(self.skip_channels)}')
        _require(self, all(s >= 1 for s in self.skip_strides),
                 f'skip_strides must all be >= 1, got {list(self.skip_strides)}')
        for coarse, fine in zip(self.skip_strides, self.skip_strides[1:]):
            _require(self, coarse > fine and coarse % fine == 0,
                     f'skip_strides must go coarse to fine, each dividing the one before, '
                     f'got {list(self.skip_strides)}')


@dataclasses.dataclass(frozen=True)
class DepthReadoutConfig(ConfigBase):
    """Dense depth readout: cross-only pixel decoder over the readout features, one channel
    (or, with ``fusion``, a feature grid refined with image skip maps; see ``with_depth_fusion``).
    """

    transformer: TransformerConfig = TransformerConfig(
        num_layers=3, num_heads=8, qkv_size=512, mlp_size=2048, self_attention=False)
    num_fourier_bands: int = 16
    # Queries = zeros(feature width) ++ Fourier as the official DenseReadout; False = Fourier
    # alone, projected to transformer.hidden_size (a learned projection: narrower, cheaper).
    zero_pad_queries: bool = True
    query_stride: int = 4  # dense maps: decode every 4th pixel per axis, then bilinear upsample
    # (with fusion: the stride of the decoded token grid the skips refine)
    train_factor: int = 8  # training: every 8th pixel per axis with a random phase (as RGB)
    median_depth_m: float = 10.0  # log-depth offset: depth = exp(out + log(median_depth_m))
    # None: depth from the pixel decoder alone (every checkpoint before the field). Set: the
    # decoder runs at query_stride and DepthFusionConfig refines it with image skip maps; the
    # readout then needs the skips (``DepthReadout.dense(features, skips)``).
    fusion: DepthFusionConfig | None = None

    def __post_init__(self) -> None:
        _require(self, not self.transformer.self_attention and self.transformer.cross_attention,
                 'transformer must be cross-attention only '
                 '(self_attention false, cross_attention true)')
        _require(self, self.num_fourier_bands >= 1,
                 f'num_fourier_bands must be >= 1, got {self.num_fourier_bands}')
        _require(self, self.zero_pad_queries or self.transformer.hidden_size is not None,
                 'zero_pad_queries false needs transformer.hidden_size (the query projection)')
        _require(self, self.query_stride >= 1 and self.train_factor >= 1,
                 f'query_stride and train_factor must be >= 1, got {self.query_stride}, '
                 f'{self.train_factor}')
        _require(self, math.isfinite(self.median_depth_m) and self.median_depth_m > 0.0,
                 f'median_depth_m must be a positive number of metres, got {self.median_depth_m}')
        if self.fusion is not None and self.fusion.skip_strides:
            # The image size is checked against query_stride by PerceptionConfig (and by
            # DepthReadout); a skip stride that divides query_stride then divides it too.
            first = self.fusion.skip_strides[0]
            _require(self, self.query_stride >= first and self.query_stride % first == 0,
                     f'query_stride ({self.query_stride}) must be a multiple of '
                     f'fusion.skip_strides[0] ({first}): the token grid is upsampled onto it')


VISIBILITY_RULES = ('visible_and_certain', 'visible')


@dataclasses.dataclass(frozen=True)
class _RecurrentReadoutConfig(ConfigBase):
    """Fields shared by the recurrent (``ConditionalAutoregressiveReadout``) readouts."""

    width: int = 512  # latent width D_r of each query
    num_fourier_bands: int = 16
    query_mlp_size: int = 512  # hidden width of MLP(Fourier(query)) -> q0
    # TransformerReadout: in-Dense to hidden_size, cross-only layers, out-Dense back to width.
    transformer: TransformerConfig = TransformerConfig(
        num_layers=3, num_heads=8, qkv_size=512, mlp_size=2048, self_attention=False,
        hidden_size=512, output_size=512)
    predictor_mlp_size: int = 512  # s = LN(c + MLP(c))
    head_mlp_size: int = 512  # hidden width of each output MLP
    state_norm_eps: float = 1e-4
    # True: the geometric outputs are offsets from the query itself (the query point, the seed
    # box), from zero-initialised output layers, and the visibility / presence logits start
    # at +2; an untrained readout is then the stay-put tracker that calls every query visible,
    # and training learns the motion rather than first learning to copy the query coordinates
    # through the latent. False: absolute sigmoid outputs, as the official readout.
    anchored: bool = False

    def __post_init__(self) -> None:
        _require(self, self.width >= 1, f'width must be >= 1, got {self.width}')
        _require(self, self.num_fourier_bands >= 1,
                 f'num_fourier_bands must be >= 1, got {self.num_fourier_bands}')
        _require(self, not self.transformer.self_attention and self.transformer.cross_attention,
                 'transformer must be cross-attention only (queries must not interact, so '
                 'a query added later gives the same result as one present from the start)')
        out = self.transformer.output_size or self.transformer.hidden_size
        _require(self, out is None or out == self.width,
                 f'transformer output width ({out}) must equal width ({self.width}) because '
                 'it is added to the latent')
        for name in ('query_mlp_size', 'predictor_mlp_size', 'head_mlp_size'):
            _require(self, getattr(self, name) >= 1,
                     f'{name} must be >= 1, got {getattr(self, name)}')
        _require(self, self.state_norm_eps > 0.0,
                 f'state_norm_eps must be > 0, got {self.state_norm_eps}')


@dataclasses.dataclass(frozen=True)
class PointReadoutConfig(_RecurrentReadoutConfig):
    """Recurrent point-track readout: query (x, y) -> position, visibility, certainty."""

    # Local image evidence (template + correlation windows on XFeat maps, a learned residual
    # from the last estimate; ``local_points.py``). None = the token-only readout above.
    local: LocalEvidenceConfig | None = None
    # How a query is called visible (``points_visible``): 'visible_and_certain' is TAPIR's
    # rule (sigmoid(vis) * sigmoid(cert) > 0.5: a point predicted far off is called occluded);
    # 'visible' reads the visibility logit alone and leaves certainty as a confidence.
    visibility_rule: str = 'visible_and_certain'

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self, self.visibility_rule in VISIBILITY_RULES,
                 f'visibility_rule must be one of {list(VISIBILITY_RULES)}, got '
                 f'{self.visibility_rule!r}')


@dataclasses.dataclass(frozen=True)
class BoxReadoutConfig(_RecurrentReadoutConfig):
    """Recurrent box readout: seed box (xyxy) -> box per frame and a presence logit."""

    # MedianFlow-style boxes (``box_fit.py``): member_grid^2 points over the central
    # member_interior of the seed box are tracked by the point readout; each frame the box is
    # refit from them, and the box head's output is a residual on that fit. 0 = no members
    # (the box head alone, anchored on the seed box).
    member_grid: int = 0
    member_interior: float = 0.6

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self, self.member_grid >= 0, f'member_grid must be >= 0, got {self.member_grid}')
        _require(self, 0.0 < self.member_interior <= 1.0,
                 f'member_interior must be in (0, 1], got {self.member_interior}')


def _recurrent_preset(cls: type, width: int, layers: int, heads: int, qkv: int, mlp: int,
                      head_mlp: int, bands: int, anchored: bool) -> _RecurrentReadoutConfig:
    return cls(width=width, num_fourier_bands=bands, query_mlp_size=head_mlp,
               transformer=TransformerConfig(num_layers=layers, num_heads=heads, qkv_size=qkv,
                                             mlp_size=mlp, self_attention=False,
                                             hidden_size=width, output_size=width),
               predictor_mlp_size=head_mlp, head_mlp_size=head_mlp, anchored=anchored)


# 'paper' follows the official config (movi.py); 'small' pairs with the CPU-sized 'small'
# backbone (token width 128); 'tiny' is for tests (milliseconds per step).
_DEPTH_PRESETS = {
    'paper': lambda: DepthReadoutConfig(),
    # Sized for the node's latency budget (all outputs <= 33 ms p50 on 2 CPU cores). One CPU
    # thread, 128x128, machine under load, with 64 points and 8 boxes: the earlier 3 x 128-wide
    # depth decoder (stride 4) with 192-wide recurrent readouts made a full step 387 ms against a
    # 78 ms backbone step; these sizes (depth stride 8 for that run) made it 157 ms against 83 ms.
    'small': lambda: DepthReadoutConfig(
        transformer=TransformerConfig(num_layers=2, num_heads=4, qkv_size=96, mlp_size=256,
                                      self_attention=False, hidden_size=96),
        zero_pad_queries=False),
    'tiny': lambda: DepthReadoutConfig(
        transformer=TransformerConfig(num_layers=1, num_heads=2, qkv_size=32, mlp_size=64,
                                      self_attention=False),
        num_fourier_bands=4, query_stride=2, train_factor=4),
}
# 'paper' keeps the official absolute outputs; the CPU presets are anchored because with a
# few hundred steps an absolute readout did not even learn to copy the query (the first
# shipped model: held-out points delta_avg 0.040, the stay-put tracker's 0.128).
_RECURRENT_SIZES = {  # width, layers, heads, qkv, mlp, head_mlp, Fourier bands, anchored
    'paper': (512, 3, 8, 512, 2048, 512, 16, False),
    'small': (128, 2, 4, 128, 256, 256, 16, True),
    'tiny': (32, 1, 2, 32, 64, 32, 4, True),
}
READOUT_PRESETS = ('paper', 'small', 'tiny')


def _check_preset(name: str) -> None:
    if name not in READOUT_PRESETS:
        raise ValueError(f'unknown readout preset {name!r}; choose one of {READOUT_PRESETS}')


def get_depth_config(name: str) -> DepthReadoutConfig:
    """Depth readout preset: 'paper', 'small' or 'tiny'."""
    _check_preset(name)
    return _DEPTH_PRESETS[name]()


def with_depth_fusion(cfg: DepthReadoutConfig, fusion: DepthFusionConfig | None = None, *,
                      query_stride: int = 8) -> DepthReadoutConfig:
    """``cfg`` with image-skip fusion on (default ``DepthFusionConfig()``, the XFeat maps at
    input scale 2) and the token decode stride set to ``query_stride`` (coarser than the
    plain readout's: the skips supply the detail, and the decoder is most of the cost)."""
    return dataclasses.replace(cfg, fusion=fusion or DepthFusionConfig(),
                               query_stride=query_stride)


def get_point_config(name: str) -> PointReadoutConfig:
    """Point-track readout preset: 'paper', 'small' or 'tiny'."""
    _check_preset(name)
    return _recurrent_preset(PointReadoutConfig, *_RECURRENT_SIZES[name])


def get_box_config(name: str) -> BoxReadoutConfig:
    """Box readout preset: 'paper', 'small' or 'tiny'."""
    _check_preset(name)
    return _recurrent_preset(BoxReadoutConfig, *_RECURRENT_SIZES[name])


# --------------------------------------------------------------------------------------------
# Coordinate helpers (one place for each normalisation)


def boxes_xyxy_to_unit(xyxy: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Pixel ``xyxy`` -> [0, 1] of the image extent (``-0.5`` -> 0, ``W - 0.5`` -> 1)."""
    h, w = image_size
    return (xyxy + 0.5) / xyxy.new_tensor([w, h, w, h])


def unit_to_boxes_xyxy(unit: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Inverse of ``boxes_xyxy_to_unit``."""
    h, w = image_size
    return unit * unit.new_tensor([w, h, w, h]) - 0.5


def points_visible(visible_logit: torch.Tensor, certain_logit: torch.Tensor,
                   rule: str = 'visible_and_certain') -> torch.Tensor:
    """Visibility decision (``PointReadoutConfig.visibility_rule``): TAPIR's
    ``sigmoid(vis) * sigmoid(cert) > 0.5``, or ``'visible'``: ``sigmoid(vis) > 0.5``."""
    if rule == 'visible':
        return visible_logit > 0
    return torch.sigmoid(visible_logit) * torch.sigmoid(certain_logit) > 0.5


def dense_query_pixels(image_size: tuple[int, int], stride: int,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """Integer pixel ``xy`` of the strided dense-depth grid: ``stride * i + stride // 2``.

    Integer pixels only: the high Fourier bands alias between pixel centres, so the readout is
    queried only where it was trained (training decodes integer pixels too).

    Returns:
        ``[h * w, 2]`` row-major, ``h = H / stride``, ``w = W / stride``.
    """
    return subsampled_pixels_xy(1, image_size, stride, random_shift=False, device=device)[0]


def _upsample_matrix(size: int, stride: int, device: torch.device) -> torch.Tensor:
    """``[size, size / stride]`` linear interpolation from grid samples at ``stride*i+stride//2``
    to every pixel, clamped at the borders (so bilinear upsampling is two small matmuls)."""
    n = size // stride
    pos = (torch.arange(size, device=device, dtype=torch.float32) - stride // 2) / stride
    pos = pos.clamp(0, n - 1)  # [size] fractional index into the grid
    lo = pos.floor().long().clamp(max=n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    frac = pos - lo.float()
    mat = torch.zeros(size, n, device=device, dtype=torch.float32)
    rows = torch.arange(size, device=device)
    mat[rows, lo] += 1.0 - frac
    mat[rows, hi] += frac
    return mat


# --------------------------------------------------------------------------------------------
# Depth


def _rms_over_channels(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``[B, C, h, w]`` divided by its per-pixel RMS over channels (no parameters)."""
    return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + eps)


class _DepthFusionHead(nn.Module):
    """Token feature grid + image skip maps -> ``[B, H, W]`` log-depth (before the offset).

    Per skip (coarse to fine): bilinear upsample to its stride, add a 1x1 projection of the
    skip, then ``x + conv3x3(gelu(x))``. Skips are frozen features of unknown scale (XFeat's
    fused descriptors are only meaningful after normalisation), so each is divided by its
    per-pixel RMS over channels before the projection: the head sees the same input range
    whatever the backbone's scale, with no statistics to learn or to go stale.
    """

    def __init__(self, cfg: DepthFusionConfig, query_stride: int,
                 image_size: tuple[int, int]) -> None:
        super().__init__()
        self.config = cfg
        self.query_stride = query_stride
        self.image_size = tuple(image_size)
        h, w = self.image_size
        if h % query_stride or w % query_stride:
            raise ConfigError(f'DepthReadoutConfig: query_stride ({query_stride}) must divide '
                              f'the image size {h}x{w}')
        width = cfg.channels
        self.token_proj = (nn.Identity() if cfg.token_channels == width
                           else nn.Conv2d(cfg.token_channels, width, 1))
        self.skip_proj = nn.ModuleList(nn.Conv2d(c, width, 1) for c in cfg.skip_channels)
        self.blocks = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1)
                                    for _ in cfg.skip_channels)
        self.out_stride = cfg.skip_strides[-1] if cfg.skip_strides else query_stride
        per_cell = self.out_stride ** 2 if cfg.output_upsample == 'shuffle' else 1
        self.out = nn.Conv2d(width, per_cell, 3, padding=1)

    def zero_output_(self) -> None:
        # An untrained head predicts exactly the median depth everywhere (out = 0); the output
        # conv gets gradients at once, the layers below it from the first update on.
        with torch.no_grad():
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, tokens_grid: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        """tokens_grid ``[B, C_t, H/s, W/s]``, skips ``[B, C_i, H/s_i, W/s_i]`` -> ``[B, H, W]``.
        """
        cfg = self.config
        h, w = self.image_size
        if len(skips) != len(cfg.skip_strides):
            raise ValueError(f'depth fusion expects {len(cfg.skip_strides)} skip maps (strides '
                             f'{list(cfg.skip_strides)}), got {len(skips)}')
        B = tokens_grid.shape[0]
        # The token grid sits at integer pixels s*i + s//2 (dense_query_pixels), half a pixel
        # from the cell centre s*i + (s-1)/2 that bilinear (align_corners=False) assumes; the
        # skips carry the fine positions and the 3x3 convs absorb the constant shift.
        x = self.token_proj(tokens_grid)  # [B, C, H/s, W/s]
        prev = self.query_stride
        for i, (stride, skip) in enumerate(zip(cfg.skip_strides, skips)):
            expected = (B, cfg.skip_channels[i], h // stride, w // stride)
            if tuple(skip.shape) != expected:
                raise ValueError(f'depth fusion skip {i} (stride {stride}) must be {expected}, '
                                 f'got {tuple(skip.shape)}')
            if prev != stride:
                x = F.interpolate(x, scale_factor=prev // stride, mode='bilinear',
                                  align_corners=False)  # [B, C, H/stride, W/stride]
            x = x + self.skip_proj[i](_rms_over_channels(skip.to(x.dtype)))
            x = x + self.blocks[i](gelu_tanh(x))
            prev = stride
        out = self.out(gelu_tanh(x))  # [B, 1 or prev^2, H/prev, W/prev]
        if prev > 1:
            if cfg.output_upsample == 'shuffle':
                out = F.pixel_shuffle(out, prev)  # [B, 1, H, W]
            else:
                out = F.interpolate(out, size=(h, w), mode='bilinear', align_corners=False)
        return out[:, 0]  # [B, H, W]


class DepthReadout(nn.Module):
    """Per-frame depth at any pixels; dense maps via a strided grid + bilinear upsampling.

    With ``cfg.fusion`` the strided token grid is refined with image skip maps instead
    (``_DepthFusionHead``), and every output comes from that dense map.

    Args:
        cfg: the depth readout config.
        feature_width: width D of the readout features.
        image_size: (H, W) model resolution the pixel coordinates refer to.
    """

    def __init__(self, cfg: DepthReadoutConfig, feature_width: int,
                 image_size: tuple[int, int]) -> None:
        super().__init__()
        self.config = cfg
        self.image_size = tuple(image_size)
        # Queries are zeros(D) ++ Fourier, as the official DenseReadout (an SRTDecoder), or the
        # Fourier features alone when the transformer's input Dense projects them.
        self.decoder = PixelDecoder(cfg.transformer,
                                    zero_width=feature_width if cfg.zero_pad_queries else 0,
                                    kv_width=feature_width,
                                    num_fourier_bands=cfg.num_fourier_bands,
                                    out_channels=(1 if cfg.fusion is None
                                                  else cfg.fusion.token_channels),
                                    image_size=self.image_size)
        # Built after the decoder so a config without fusion draws exactly the same weights.
        self.fusion = (None if cfg.fusion is None
                       else _DepthFusionHead(cfg.fusion, cfg.query_stride, self.image_size))
        self.log_offset = math.log(cfg.median_depth_m)
        init_flax_style_(self)
        if self.fusion is not None:
            self.fusion.zero_output_()

    def _need_skips(self, skips: Sequence[torch.Tensor] | None) -> Sequence[torch.Tensor]:
        if skips is None:
            raise ValueError('this depth readout fuses image skip maps (config.fusion is set): '
                             f'pass skips, {len(self.config.fusion.skip_strides)} maps at '
                             f'strides {list(self.config.fusion.skip_strides)}')
        return skips

    def log_depth(self, features: torch.Tensor, coords_xy: torch.Tensor,
                  skips: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """features ``[B, N, D]``, coords_xy ``[B, Q, 2]`` pixels -> ``[B, Q]`` log metres.

        With fusion the coordinates are rounded to integer pixels (the dense map is per pixel).
        """
        if self.fusion is None:
            # float32 before the offset and exp: bf16 would quantise depth to ~0.4 % steps.
            return self.decoder(features, coords_xy)[..., 0].float() + self.log_offset
        dense = self.dense_log_depth(features, self._need_skips(skips))  # [B, H, W]
        h, w = self.image_size
        x = coords_xy[..., 0].round().long().clamp(0, w - 1)  # [B, Q]
        y = coords_xy[..., 1].round().long().clamp(0, h - 1)
        return dense.flatten(1).gather(1, y * w + x)  # [B, Q]

    def forward(self, features: torch.Tensor, coords_xy: torch.Tensor,
                skips: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Depth in metres at the given pixels: ``[B, Q]`` (skips: see ``dense``)."""
        return torch.exp(self.log_depth(features, coords_xy, skips))

    def dense_log_depth(self, features: torch.Tensor,
                        skips: Sequence[torch.Tensor] | None = None, *,
                        stride: int | None = None) -> torch.Tensor:
        """``[B, H, W]`` log metres; see ``dense``."""
        stride = stride or self.config.query_stride
        H, W = self.image_size
        if H % stride or W % stride:
            raise ValueError(f'depth query stride {stride} must divide image size {H}x{W}')
        if self.fusion is not None and stride != self.config.query_stride:
            raise ValueError(f'a fused depth readout decodes at its query_stride '
                             f'({self.config.query_stride}), not {stride}')
        B = features.shape[0]
        coords = dense_query_pixels(self.image_size, stride, features.device)  # [Q, 2]
        h, w = H // stride, W // stride
        if self.fusion is not None:
            skips = self._need_skips(skips)
            tokens = self.decoder(features, coords.expand(B, -1, -1))  # [B, h * w, C_t]
            tokens = tokens.transpose(1, 2).reshape(B, -1, h, w)  # [B, C_t, h, w] (row-major)
            return self.fusion(tokens, skips).float() + self.log_offset
        grid = self.log_depth(features, coords.expand(B, -1, -1))  # [B, h * w]
        grid = grid.view(B, h, w)
        if stride > 1:
            rows = _upsample_matrix(H, stride, features.device)  # [H, h]
            cols = _upsample_matrix(W, stride, features.device)  # [W, w]
            grid = rows @ grid @ cols.T  # [B, H, W]
        return grid

    def dense(self, features: torch.Tensor, skips: Sequence[torch.Tensor] | None = None, *,
              stride: int | None = None) -> torch.Tensor:
        """A full ``[B, H, W]`` depth map (metres).

        Without fusion: decoded on a grid at ``stride`` (default config) and upsampled; the
        log-depth is interpolated (then exponentiated), which keeps the map positive and
        interpolates relative depth evenly at every range. With fusion: ``skips`` are the image
        feature maps ``[B, C_i, H / s_i, W / s_i]`` of ``config.fusion`` (coarse to fine;
        required), e.g. ``(XFeatMaps.coarse, XFeatMaps.fine)`` at XFeat input scale 2.
        """
        return torch.exp(self.dense_log_depth(features, skips, stride=stride))


# --------------------------------------------------------------------------------------------
# Recurrent query readouts (points, boxes)


class RecurrentQueryReadout(nn.Module):
    """``ConditionalAutoregressiveReadout``: per-query latents updated frame by frame.

    Args:
        cfg: the readout config.
        query_dims: coordinates per query (2 for a point, 4 for a box), each in [-1, 1].
        feature_width: width D of the readout features.
        heads: output name -> channels; each is ``Mlp(width, head_mlp_size, channels)`` of ``c``.
    """

    def __init__(self, cfg: _RecurrentReadoutConfig, query_dims: int, feature_width: int,
                 heads: dict[str, int]) -> None:
        super().__init__()
        self.config = cfg
        self.query_dims = query_dims
        self.query_mlp = Mlp(2 * query_dims * cfg.num_fourier_bands, cfg.query_mlp_size,
                             cfg.width)
        self.transformer = Transformer(cfg.transformer, cfg.width, kv_width=feature_width)
        self.predictor = Mlp(cfg.width, cfg.predictor_mlp_size, cfg.width)
        self.state_norm = LayerNorm(cfg.width, eps=cfg.state_norm_eps)
        self.heads = nn.ModuleDict(
            {name: Mlp(cfg.width, cfg.head_mlp_size, ch) for name, ch in heads.items()})
        init_flax_style_(self)

    def _init_anchored(self, offset_heads: tuple[str, ...], logit_heads: tuple[str, ...]) -> None:
        # Anchored outputs start as zero offsets from the query with confident "visible" /
        # "present" logits (sigmoid(2)^2 = 0.78 > 0.5 for the TAPIR visibility rule): zero
        # output weights, so every query starts alike. The output weights get gradients at
        # once; the layers below them from the first update on (which makes those non-zero).
        if not self.config.anchored:
            return
        with torch.no_grad():
            for name in offset_heads + logit_heads:
                nn.init.zeros_(self.heads[name].out.weight)
                nn.init.constant_(self.heads[name].out.bias, 2.0 if name in logit_heads else 0.0)

    def initial_latents(self, query_unit: torch.Tensor) -> torch.Tensor:
        """q0 = MLP(Fourier(query)): ``[B, M, query_dims]`` in [-1, 1] -> ``[B, M, width]``."""
        return self.query_mlp(fourier_features(query_unit, self.config.num_fourier_bands))

    def forward(self, latents: torch.Tensor, features: torch.Tensor
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One frame: ``latents [B, M, Dr]``, ``features [B, N, D]``.

        Returns:
            ``(heads, next_latents)``: head name -> ``[B, M, channels]`` read from the corrected
            latents ``c``; ``next_latents = LN(c + MLP(c))`` ``[B, M, Dr]``.
        """
        if latents.shape[1] == 0:  # no queries: nothing to attend with
            empty = {name: latents.new_zeros(*latents.shape[:2], head.out.out_features)
                     for name, head in self.heads.items()}
            return empty, latents
        corrected = latents + self.transformer(latents, features.to(latents.dtype))
        outputs = {name: head(corrected) for name, head in self.heads.items()}
        return outputs, self.state_norm(corrected + self.predictor(corrected))


class PointReadout(RecurrentQueryReadout):
    """Point tracks: query ``xy`` -> per frame position (pixels), visibility and certainty."""

    def __init__(self, cfg: PointReadoutConfig, feature_width: int,
                 image_size: tuple[int, int]) -> None:
        super().__init__(cfg, 2, feature_width, {'position': 2, 'logits': 2})
        self.image_size = tuple(image_size)
        self._init_anchored(('position',), ('logits',))

    def initial_from_xy(self, xy: torch.Tensor) -> torch.Tensor:
        """q0 for query pixels ``[B, M, 2]`` xy -> ``[B, M, width]``."""
        return self.initial_latents(pixels_xy_to_unit_yx(xy, self.image_size))

    def anchor_from_xy(self, xy: torch.Tensor) -> torch.Tensor:
        """The query's anchor: ``[B, M, 2]`` xy pixels -> ``[B, M, 2]`` unit xy (see
        ``points_xy_to_unit``)."""
        return points_xy_to_unit(xy.float(), self.image_size)

    def decode_outputs(self, heads: dict[str, torch.Tensor], anchor: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Heads and anchors ``[B, M, 2]`` -> ``(xy [B, M, 2] pixels, visible_logit [B, M],
        certain_logit [B, M])``."""
        position = heads['position'].float()
        # Anchored: at most one image extent from the query (tanh is the identity near 0).
        unit = anchor + torch.tanh(position) if self.config.anchored else torch.sigmoid(position)
        logits = heads['logits'].float()
        return unit_to_points_xy(unit, self.image_size), logits[..., 0], logits[..., 1]


class BoxReadout(RecurrentQueryReadout):
    """Boxes: seed ``xyxy`` -> per frame box (pixels, ordered) and a presence logit."""

    def __init__(self, cfg: BoxReadoutConfig, feature_width: int,
                 image_size: tuple[int, int]) -> None:
        super().__init__(cfg, 4, feature_width, {'box': 4, 'presence': 1})
        self.image_size = tuple(image_size)
        self._init_anchored(('box',), ('presence',))

    def initial_from_xyxy(self, xyxy: torch.Tensor) -> torch.Tensor:
        """q0 for seed boxes ``[B, M, 4]`` xyxy pixels -> ``[B, M, width]``."""
        # Both corners in the Fourier (y, x) in [-1, 1] normalisation, like the official
        # box head's Fourier embedding of the 4 coordinates.
        corners = pixels_xy_to_unit_yx(xyxy.unflatten(-1, (2, 2)), self.image_size)
        return self.initial_latents(corners.flatten(-2))

    def anchor_from_xyxy(self, xyxy: torch.Tensor) -> torch.Tensor:
        """The seed box's anchor: ``[B, M, 4]`` xyxy pixels -> ``[B, M, 4]`` unit centre x,
        centre y, width, height (of the image extent, see ``boxes_xyxy_to_unit``)."""
        unit = boxes_xyxy_to_unit(xyxy.float(), self.image_size)
        return torch.cat([0.5 * (unit[..., :2] + unit[..., 2:]), unit[..., 2:] - unit[..., :2]],
                         dim=-1)

    def xyxy_from_anchor(self, anchor: torch.Tensor) -> torch.Tensor:
        """Inverse of ``anchor_from_xyxy``: unit centre / size ``[B, M, 4]`` -> xyxy pixels."""
        return self._unit_to_xyxy(anchor[..., :2], anchor[..., 2:])

    def _unit_to_xyxy(self, centre: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
        unit = torch.cat([centre - 0.5 * size, centre + 0.5 * size], dim=-1)
        return unit_to_boxes_xyxy(unit, self.image_size)

    def decode_outputs(self, heads: dict[str, torch.Tensor], anchor: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Heads and anchors ``[B, M, 4]`` -> ``(xyxy [B, M, 4] pixels, presence_logit
        [B, M])``."""
        out = heads['box'].float()
        if self.config.anchored:
            # The centre moves additively (image units, whatever the box size) by at most one
            # image extent; the size scales by at most e^+-4 (exp keeps it positive; the floor
            # lets a zero-size seed box grow). tanh bounds both and is the identity near 0.
            centre = anchor[..., :2] + torch.tanh(out[..., :2])
            size = anchor[..., 2:].clamp(min=1e-3) * torch.exp(4.0 * torch.tanh(out[..., 2:] / 4))
        else:
            params = torch.sigmoid(out)  # centre x, centre y, width, height
            centre, size = params[..., :2], params[..., 2:]
        return self._unit_to_xyxy(centre, size), heads['presence'].float()[..., 0]


# --------------------------------------------------------------------------------------------
# Losses


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # where() rather than a product: a NaN / inf in a masked-out entry must not leak (0 * NaN).
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp(min=1).to(values.dtype)


def depth_loss(pred_m: torch.Tensor, target_m: torch.Tensor, *,
               kind: Literal['l1_log', 'l1_log_si', 'si_log', 'l1_m'] = 'l1_log',
               si_weight: float = 0.5) -> torch.Tensor:
    """Depth loss over the pixels with a finite, positive target.

    Args:
        pred_m: ``[B, ..., Q]`` predicted metres (> 0); the last axis is one frame's pixels.
        target_m: same shape; NaN / inf / <= 0 mark unknown depth.
        kind: 'l1_log' (mean |log pred - log gt|), 'l1_log_si' (that + ``si_weight`` times
            the per-frame std of the log error), 'si_log' (the scale-invariant term alone plus
            0.15 of the squared mean, as Eigen et al.), or 'l1_m' (L1 in metres).
        si_weight: weight of the scale-invariant term for 'l1_log_si'.

    Returns:
        Scalar loss (0 with no valid pixel, still differentiable).
    """
    if pred_m.shape != target_m.shape:
        raise ValueError(f'depth prediction {tuple(pred_m.shape)} and target '
                         f'{tuple(target_m.shape)} must have the same shape')
    if kind not in DEPTH_LOSSES:
        raise ValueError(f'unknown depth loss {kind!r}; choose one of {DEPTH_LOSSES}')
    valid = torch.isfinite(target_m) & (target_m > 0)
    safe_target = torch.where(valid, target_m, torch.ones_like(target_m))
    if kind == 'l1_m':
        return _masked_mean((pred_m - safe_target).abs(), valid)
    diff = torch.log(pred_m.clamp(min=1e-6)) - torch.log(safe_target)  # log error
    diff = torch.where(valid, diff, torch.zeros_like(diff))
    l1 = _masked_mean(diff.abs(), valid)
    if kind == 'l1_log':
        return l1
    # Per-frame moments of the log error over its valid pixels.
    weight = valid.to(diff.dtype)
    count = weight.sum(-1)
    has = count > 1
    mean = (diff * weight).sum(-1) / count.clamp(min=1.0)
    var = ((diff - mean[..., None]) ** 2 * weight).sum(-1) / count.clamp(min=1.0)
    if kind == 'l1_log_si':
        std = torch.sqrt(var + 1e-8)
        return l1 + si_weight * _masked_mean(std, has)
    # Eigen et al. 2014 scale-invariant log loss with lambda = 0.85.
    si = var + 0.15 * mean ** 2
    return _masked_mean(torch.sqrt(si + 1e-8), has)


def depth_gradient_loss(pred_m: torch.Tensor, target_m: torch.Tensor, *,
                        scales: Sequence[int] = (1, 2, 4)) -> torch.Tensor:
    """Multi-scale gradient matching on log-depth (MegaDepth / MiDaS style).

    With ``r = log pred - log gt``, the mean over scales ``k`` of the mean of ``|r[i+1] - r[i]|``
    along x and y over neighbouring pairs (on every k-th pixel) whose targets are both valid.
    A global scale error is a constant ``r`` and costs nothing, so this term only rewards
    shape: edges in the right place and flat where the target is flat. Use it next to
    ``depth_loss``, which fixes the scale.

    Args:
        pred_m: ``[B, ..., H, W]`` predicted metres (> 0) on the full pixel grid.
        target_m: same shape; NaN / inf / <= 0 mark unknown depth.
        scales: pixel strides of the pairs.

    Returns:
        Scalar loss (0 with no valid pair, still differentiable).
    """
    if pred_m.shape != target_m.shape or pred_m.dim() < 2:
        raise ValueError(f'depth prediction {tuple(pred_m.shape)} and target '
                         f'{tuple(target_m.shape)} must have the same [..., H, W] shape')
    if not scales or any(k < 1 for k in scales):
        raise ValueError(f'scales must be a non-empty list of strides >= 1, got {list(scales)}')
    valid = torch.isfinite(target_m) & (target_m > 0)
    safe_target = torch.where(valid, target_m, torch.ones_like(target_m))
    diff = torch.log(pred_m.clamp(min=1e-6)) - torch.log(safe_target)  # [..., H, W]
    diff = torch.where(valid, diff, torch.zeros_like(diff))  # no NaN reaches a difference
    total = diff.new_zeros(())
    for k in scales:
        r, v = diff[..., ::k, ::k], valid[..., ::k, ::k]  # [..., H/k, W/k]
        grad_x = (r[..., :, 1:] - r[..., :, :-1]).abs()
        grad_y = (r[..., 1:, :] - r[..., :-1, :]).abs()
        pairs_x = v[..., :, 1:] & v[..., :, :-1]
        pairs_y = v[..., 1:, :] & v[..., :-1, :]
        total = total + _masked_mean(torch.cat([grad_x.flatten(), grad_y.flatten()]),
                                     torch.cat([pairs_x.flatten(), pairs_y.flatten()]))
    return total / len(scales)


def point_track_losses(pred_xy: torch.Tensor, visible_logit: torch.Tensor,
                       certain_logit: torch.Tensor, target_xy: torch.Tensor,
                       target_visible: torch.Tensor, active: torch.Tensor,
                       image_size: tuple[int, int], *, huber_delta_px: float = 1.0,
                       certainty_threshold_px: float = 6.0, position_weight: float = 100.0,
                       visibility_weight: float = 0.1, certainty_weight: float = 0.1
                       ) -> dict[str, torch.Tensor]:
    """TAPIR-style point-track losses (positions normalised by the image size).

    Args:
        pred_xy: ``[B, T, M, 2]`` predicted pixels.
        visible_logit, certain_logit: ``[B, T, M]``.
        target_xy: ``[B, T, M, 2]`` ground-truth pixels (any value where not visible).
        target_visible: ``[B, T, M]`` bool.
        active: ``[B, T, M]`` bool, True at and after each query's start frame (only those count).
        image_size: (H, W) of the pixel coordinates.
        huber_delta_px: Huber delta in pixels (the official 1 / resolution in normalised units).
        certainty_threshold_px: a prediction within this distance is labelled certain.
        position_weight, visibility_weight, certainty_weight: loss weights (100, 0.1, 0.1).

    Returns:
        ``{'position', 'visibility', 'certainty', 'total'}`` scalars (weights applied to total).
    """
    h, w = image_size
    scale = float(max(h, w) - 1 if max(h, w) > 1 else 1)
    target_xy = torch.where(target_visible[..., None], target_xy, pred_xy.detach())
    error = (pred_xy - target_xy) / scale  # [B, T, M, 2] normalised
    # Huber on the Euclidean distance (isotropic), as TAPIR.
    dist = torch.sqrt((error ** 2).sum(-1) + 1e-12)
    delta = huber_delta_px / scale
    huber = torch.where(dist < delta, 0.5 * dist ** 2, delta * (dist - 0.5 * delta))
    position = _masked_mean(huber, active & target_visible)
    visibility = _masked_mean(F.binary_cross_entropy_with_logits(
        visible_logit, target_visible.to(visible_logit.dtype), reduction='none'), active)
    with torch.no_grad():
        within = (pred_xy - target_xy).norm(dim=-1) <= certainty_threshold_px
    certainty = _masked_mean(F.binary_cross_entropy_with_logits(
        certain_logit, within.to(certain_logit.dtype), reduction='none'), active & target_visible)
    total = (position_weight * position + visibility_weight * visibility
             + certainty_weight * certainty)
    return {'position': position, 'visibility': visibility, 'certainty': certainty,
            'total': total}


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise GIoU of ordered ``xyxy`` boxes ``[..., 4]`` -> ``[...]`` in [-1, 1]."""
    area_a = (a[..., 2] - a[..., 0]).clamp(min=0) * (a[..., 3] - a[..., 1]).clamp(min=0)
    area_b = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    lo = torch.maximum(a[..., :2], b[..., :2])
    hi = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (hi - lo).clamp(min=0).prod(-1)
    union = area_a + area_b - inter
    iou = inter / union.clamp(min=1e-9)
    hull = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2]))
    hull_area = hull.clamp(min=0).prod(-1)
    return iou - (hull_area - union) / hull_area.clamp(min=1e-9)


def box_losses(pred_xyxy: torch.Tensor, presence_logit: torch.Tensor, target_xyxy: torch.Tensor,
               target_valid: torch.Tensor, active: torch.Tensor, image_size: tuple[int, int], *,
               l1_weight: float = 5.0, giou_weight: float = 2.0, presence_weight: float = 1.0
               ) -> dict[str, torch.Tensor]:
    """Box losses: L1 (normalised to the image extent) + GIoU on valid frames, BCE on presence.

    Args:
        pred_xyxy: ``[B, T, M, 4]`` predicted pixels.
        presence_logit: ``[B, T, M]``.
        target_xyxy: ``[B, T, M, 4]`` ground-truth pixels (any value where not valid).
        target_valid: ``[B, T, M]`` bool (object visible in that frame).
        active: ``[B, T, M]`` bool, True at and after each box's seed frame.
        image_size: (H, W).
        l1_weight, giou_weight, presence_weight: loss weights (DETR's 5 and 2 for the box).

    Returns:
        ``{'l1', 'giou', 'presence', 'total'}`` scalars.
    """
    on = active & target_valid
    pred_unit = boxes_xyxy_to_unit(pred_xyxy, image_size)
    target_unit = boxes_xyxy_to_unit(torch.where(on[..., None], target_xyxy,
                                                 pred_xyxy.detach()), image_size)
    l1 = _masked_mean((pred_unit - target_unit).abs().sum(-1), on)
    giou = _masked_mean(1.0 - generalized_box_iou(pred_unit, target_unit), on)
    presence = _masked_mean(F.binary_cross_entropy_with_logits(
        presence_logit, target_valid.to(presence_logit.dtype), reduction='none'), active)
    total = l1_weight * l1 + giou_weight * giou + presence_weight * presence
    return {'l1': l1, 'giou': giou, 'presence': presence, 'total': total}

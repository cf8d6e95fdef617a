"""Point tracking with local image evidence: templates, correlation windows, a learned residual.

A token-only readout (``readouts.PointReadout``) must learn precise localisation from 2K tokens
and the query's coordinates alone; on a CPU budget it did not even beat a tracker that never
moves. Every tracker that trains fast (PIPs, RAFT, CoTracker, TAPIR, LiteTracker) instead
compares a *template* of the query with the image around the current estimate. This readout
does that and keeps MooG's tokens as the recurrent, scene-level context:

1. **Template.** On a query's start frame its feature vector is sampled (bilinearly, sub-pixel)
   from every level of a feature pyramid and kept in the query state.
2. **Prior.** Each later frame starts from ``last estimate + velocity`` (an exponential moving
   average of the displacements; LiteTracker uses the same kind of prior).
3. **Coarse to fine.** From the coarsest search level to the finest, a small correlation window
   around the estimate is soft-argmaxed (temperature ``temperature``) and the estimate moves to
   the expected offset. With no learning at all this is a template tracker.
4. **Learned refinement.** The correlation windows of every level at the estimate, their peak
   and entropy, go through an MLP into the query latent; with ``use_tokens`` the latent then
   cross-attends into MooG's tokens (the paper's readout); heads read a residual step (zero at
   initialisation, so an untrained readout *is* the template tracker of step 3), a visibility
   and a certainty logit (+2 at initialisation: every query visible, like the stay-put tracker).
   ``iterations`` refinement steps per frame, the estimate detached between them (PIPs).

The feature pyramid (``correlation_pyramid``) is built from XFeat's frozen real-image maps: the
stride-4 block (24 channels) and the fused stride-8 descriptors (64) with average-pooled
levels below it, each L2-normalised per pixel. With XFeat's input upsampled x2
(``PerceptionConfig.xfeat_scale``) those are strides 2, 4, 8 and 16 model pixels, so a
radius-3 window reaches +-6 to +-48 px.

Everything is a pure function of tensors so ``perception.py`` keeps the state as a value.
Coordinates are pixels ``xy`` with pixel centres at integers (``docs/architecture.md``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import torch
from torch import nn
import torch.nn.functional as F

from moog_ros.model.config import ConfigBase, ConfigError
from moog_ros.model.layers import (
    LayerNorm,
    Mlp,
    Transformer,
    fourier_features,
    init_flax_style_,
    pixels_xy_to_unit_yx,
    points_xy_to_unit,
    unit_to_points_xy,
)
from moog_ros.model.xfeat import COARSE_CHANNELS, FINE_CHANNELS, XFeatMaps

__all__ = [
    'LocalEvidenceConfig',
    'LocalPointReadout',
    'PointTrack',
    'FramePyramid',
    'PyramidLevel',
    'correlation_pyramid',
    'intensity_pyramid',
    'photometric_refine',
    'sample_patches',
    'sample_features',
    'window_offsets',
]


def _require(config: ConfigBase, condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(f'{type(config).__name__}: {message}')


@dataclasses.dataclass(frozen=True)
class LocalEvidenceConfig(ConfigBase):
    """Local image evidence of the point readout (see the module docstring)."""

    levels: int = 4  # fine block, fused descriptors, then average-pooled x2, x4
    radius: int = 3  # evidence window (2r+1)^2 per level for the learned part (PIPs: 3)
    # The fixed template search (the untrained tracker) uses only the finest search_levels
    # with a (2 search_radius + 1)^2 window. Measured zero-shot on 8 held-out clips (delta_avg;
    # stay-put 0.13): 4 levels radius 3: 0.133; 2 levels radius 2: 0.177; 2 levels radius 1:
    # 0.189. Wider searches find false matches on synthetic textures more often than motion.
    search_levels: int = 2
    search_radius: int = 1
    temperature: float = 0.02  # soft-argmax temperature on cosine correlations
    velocity_momentum: float = 0.2  # v <- m v + (1 - m) displacement (prior = last + v)
    iterations: int = 1  # learned refinement steps per frame
    corr_mlp_size: int = 256  # hidden width of the correlation embedding MLP
    max_step_px: float = 8.0  # a refinement step moves at most this far (tanh-bounded)
    use_tokens: bool = True  # hybrid; False = local evidence only (tokens cut off, ablation)
    # Sub-pixel photometric refinement after the template search (``photometric_refine``):
    # frame-to-frame Lucas-Kanade on the image intensity, (2 r + 1)^2 window per level, on
    # ``photometric_levels`` levels (x1, x1/2, ...). The XFeat search keeps the track on its
    # start-frame template (no drift, robust to large motion) but is only as precise as its
    # stride-2 map; the thresholds the trackers are judged at go down to 0.5 px at 128^2.
    # 0 switches it off.
    photometric_radius: int = 3
    photometric_levels: int = 2
    photometric_iterations: int = 4
    # A refinement that moves farther than this from the template search's estimate, or
    # that runs on a window without texture (min eigenvalue below photometric_min_eig), is
    # not taken.
    photometric_max_px: float = 2.0
    photometric_min_eig: float = 1e-4

    def __post_init__(self) -> None:
        _require(self, 2 <= self.levels <= 6, f'levels must be in [2, 6], got {self.levels}')
        _require(self, self.radius >= 1, f'radius must be >= 1, got {self.radius}')
        _require(self, 1 <= self.search_levels <= self.levels,
                 f'search_levels must be in [1, levels], got {self.search_levels}')
        _require(self, self.search_radius >= 1,
                 f'search_radius must be >= 1, got {self.search_radius}')
        _require(self, self.temperature > 0, f'temperature must be > 0, got {self.temperature}')
        _require(self, 0.0 <= self.velocity_momentum <= 1.0,
                 f'velocity_momentum must be in [0, 1], got {self.velocity_momentum}')
        _require(self, self.iterations >= 1, f'iterations must be >= 1, got {self.iterations}')
        _require(self, self.corr_mlp_size >= 1, 'corr_mlp_size must be >= 1')
        _require(self, self.max_step_px > 0, 'max_step_px must be > 0')
        _require(self, self.photometric_radius >= 0, 'photometric_radius must be >= 0')
        _require(self, self.photometric_levels >= 1, 'photometric_levels must be >= 1')
        _require(self, self.photometric_iterations >= 1, 'photometric_iterations must be >= 1')
        _require(self, self.photometric_max_px > 0, 'photometric_max_px must be > 0')
        _require(self, self.photometric_min_eig >= 0, 'photometric_min_eig must be >= 0')

    @property
    def window(self) -> int:
        """Samples per level, ``(2r+1)^2``."""
        return (2 * self.radius + 1) ** 2

    def level_channels(self) -> tuple[int, ...]:
        """Feature channels of each pyramid level (the template is their concatenation)."""
        return (FINE_CHANNELS,) + (COARSE_CHANNELS,) * (self.levels - 1)

    @property
    def patch_side(self) -> int:
        """Side of one stored intensity patch: the LK window plus a 1-pixel border for the
        template's central-difference gradients."""
        return 2 * self.photometric_radius + 3

    @property
    def patch_channels(self) -> int:
        """Intensity-patch values kept per query (0 when the refinement is off)."""
        if not self.photometric_radius:
            return 0
        return self.photometric_levels * self.patch_side ** 2

    def level_strides(self, input_scale: int) -> tuple[float, ...]:
        """Model-pixel stride of each level for XFeat run at ``input_scale``."""
        fine = 4.0 / input_scale
        return (fine,) + tuple(2.0 * fine * 2 ** i for i in range(self.levels - 1))


class PyramidLevel(NamedTuple):
    """One correlation level: L2-normalised features and their stride in model pixels."""

    features: torch.Tensor  # [B, C, h, w]
    stride_px: float


class FramePyramid(NamedTuple):
    """One frame's evidence for the point readout: feature and intensity pyramids."""

    features: list[PyramidLevel]  # correlation levels, finest first
    intensity: list[PyramidLevel]  # grayscale [B, 1, h, w] at strides 1, 2, ... (may be [])


class PointTrack(NamedTuple):
    """Per-query tracking state of the local readout (all ``[B, M, ...]``)."""

    position: torch.Tensor  # [B, M, 2] last estimate, model pixels
    velocity: torch.Tensor  # [B, M, 2] pixels per frame (EMA of displacements)
    # [B, M, sum(C_l) + P]: query features from its start frame, then (photometric
    # refinement on) the intensity patches around the last estimate, P values
    template: torch.Tensor


def correlation_pyramid(maps: XFeatMaps, levels: int) -> list[PyramidLevel]:
    """XFeat maps -> ``levels`` L2-normalised levels, finest first (see the module docstring)."""
    out = [F.normalize(maps.fine.float(), dim=1)]
    coarse = maps.coarse.float()
    out.append(F.normalize(coarse, dim=1))
    for _ in range(levels - 2):
        coarse = F.avg_pool2d(coarse, 2, ceil_mode=True)
        out.append(F.normalize(coarse, dim=1))
    return out  # strides are attached by the readout (they depend on the input scale)


def intensity_pyramid(frames: torch.Tensor, levels: int) -> list[PyramidLevel]:
    """``frames [B, H, W, 3]`` in [0, 1] -> grayscale levels at strides 1, 2, 4, ... model px."""
    gray = frames.float().mean(dim=-1)[:, None]  # [B, 1, H, W]
    out = [PyramidLevel(gray, 1.0)]
    for i in range(1, levels):
        gray = F.avg_pool2d(gray, 2, ceil_mode=True)
        out.append(PyramidLevel(gray, float(2 ** i)))
    return out


def sample_patches(levels: list[PyramidLevel], xy: torch.Tensor, side: int,
                   image_size: tuple[int, int]) -> torch.Tensor:
    """``[B, M, L * side^2]`` intensity patches (row-major, level-major) centred at ``xy``."""
    B, M = xy.shape[:2]
    offsets = window_offsets((side - 1) // 2, xy.device)  # [side^2, 2]
    out = []
    for level in levels:
        points = xy[:, :, None, :] + offsets * level.stride_px  # [B, M, S, 2]
        values = sample_features(level.features, points.reshape(B, -1, 2), image_size)
        out.append(values.reshape(B, M, -1))
    return torch.cat(out, dim=-1)


def photometric_refine(levels: list[PyramidLevel], patches: torch.Tensor, xy: torch.Tensor,
                       local: LocalEvidenceConfig, image_size: tuple[int, int]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Frame-to-frame Lucas-Kanade from ``xy``: inverse compositional, translation only.

    Each query's template is its patch from the previous frame (``patches``, from
    ``sample_patches`` at the previous estimate); both template and window are made zero-mean,
    so a uniform brightness change does not move the track. Coarse to fine over ``levels``.

    Returns:
        ``(xy [B, M, 2], refined [B, M] bool)``: where a query's window had no texture at
        some level, or the refinement moved it farther than ``photometric_max_px`` from its
        start, it keeps ``xy`` and ``refined`` is False.
    """
    B, M = xy.shape[:2]
    side = local.patch_side
    inner = window_offsets(local.photometric_radius, xy.device)  # [n, 2]
    start = xy
    textured = torch.ones(B, M, dtype=torch.bool, device=xy.device)
    parts = patches.float().split(side * side, dim=-1)
    for level, part in reversed(list(zip(levels, parts))):
        P = part.reshape(B, M, side, side)
        template = P[..., 1:-1, 1:-1].flatten(-2)  # [B, M, n]
        # Gradients per level pixel (the stored patch is sampled at the level's stride).
        gx = (0.5 * (P[..., 1:-1, 2:] - P[..., 1:-1, :-2])).flatten(-2)
        gy = (0.5 * (P[..., 2:, 1:-1] - P[..., :-2, 1:-1])).flatten(-2)
        template = template - template.mean(-1, keepdim=True)
        gx = gx - gx.mean(-1, keepdim=True)
        gy = gy - gy.mean(-1, keepdim=True)
        hxx, hxy, hyy = (gx * gx).mean(-1), (gx * gy).mean(-1), (gy * gy).mean(-1)
        half_trace = 0.5 * (hxx + hyy)
        det = hxx * hyy - hxy * hxy
        min_eig = half_trace - torch.sqrt((half_trace * half_trace - det).clamp(min=0.0))
        ok = min_eig > local.photometric_min_eig
        textured = textured & ok
        det = torch.where(ok, det, torch.ones_like(det))
        for _ in range(local.photometric_iterations):
            points = xy[:, :, None, :] + inner * level.stride_px  # [B, M, n, 2]
            window = sample_features(level.features, points.reshape(B, -1, 2),
                                     image_size).reshape(B, M, -1)
            error = window - window.mean(-1, keepdim=True) - template
            bx, by = (gx * error).mean(-1), (gy * error).mean(-1)
            # T(u + d) ~ I(x + u)  =>  the template centre lies at x - d.
            dx = (hyy * bx - hxy * by) / det
            dy = (hxx * by - hxy * bx) / det
            step = torch.stack([dx, dy], dim=-1) * level.stride_px
            xy = xy - torch.where(ok[..., None], step, torch.zeros_like(step))
    refined = textured & ((xy - start).norm(dim=-1) <= local.photometric_max_px)
    return torch.where(refined[..., None], xy, start), refined


def sample_features(fmap: torch.Tensor, xy: torch.Tensor, image_size: tuple[int, int]
                    ) -> torch.Tensor:
    """Bilinear features at model pixels: ``fmap [B, C, h, w]``, ``xy [B, P, 2]`` -> ``[B, P, C]``.

    A map of any resolution covers the image extent ``[-0.5, W - 0.5]``, so the normalised
    grid coordinate is ``(x + 0.5) / W * 2 - 1`` with ``align_corners=False`` whatever ``w`` is.
    Outside the image the features are zero (no correlation).
    """
    H, W = image_size
    grid = torch.stack([(xy[..., 0] + 0.5) / W * 2 - 1, (xy[..., 1] + 0.5) / H * 2 - 1], dim=-1)
    sampled = F.grid_sample(fmap, grid[:, :, None, :].to(fmap.dtype), mode='bilinear',
                            padding_mode='zeros', align_corners=False)  # [B, C, P, 1]
    return sampled[..., 0].transpose(1, 2)


def window_offsets(radius: int, device: torch.device | None = None) -> torch.Tensor:
    """``[(2r+1)^2, 2]`` integer xy offsets of a correlation window, row-major (y outer)."""
    r = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    dy, dx = torch.meshgrid(r, r, indexing='ij')
    return torch.stack([dx, dy], dim=-1).reshape(-1, 2)


class LocalPointReadout(nn.Module):
    """Hybrid point readout: template correlation + MooG token attention (module docstring).

    Args:
        cfg: the ``PointReadoutConfig`` (its ``local`` field set): latent width, MLP sizes and
            the token transformer come from it, as for the token-only readout.
        feature_width: width D of MooG's readout features.
        image_size: (H, W) model resolution.
        input_scale: XFeat's input upsampling (sets the level strides).
    """

    def __init__(self, cfg: Any, feature_width: int, image_size: tuple[int, int],
                 input_scale: int) -> None:
        super().__init__()
        local: LocalEvidenceConfig = cfg.local
        self.config = cfg
        self.local = local
        self.image_size = tuple(image_size)
        self.num_fourier_bands = cfg.num_fourier_bands
        self.strides = local.level_strides(input_scale)
        L, S, width = local.levels, local.window, cfg.width
        self.query_mlp = Mlp(4 * cfg.num_fourier_bands, cfg.query_mlp_size, width)
        self.template_proj = nn.Linear(self.feature_template_width, width)
        # Correlation windows of every level, their peak and entropy, and the step taken from
        # the prior (in units of the finest stride): what the latent sees of the image.
        self.corr_mlp = Mlp(L * S + 2 * L + 2, local.corr_mlp_size, width)
        self.transformer = (Transformer(cfg.transformer, width, kv_width=feature_width)
                            if local.use_tokens else None)
        self.predictor = Mlp(width, cfg.predictor_mlp_size, width)
        self.state_norm = LayerNorm(width, eps=cfg.state_norm_eps)
        self.heads = nn.ModuleDict({'delta': Mlp(width, cfg.head_mlp_size, 2),
                                    'logits': Mlp(width, cfg.head_mlp_size, 2)})
        self.register_buffer('offsets', window_offsets(local.radius), persistent=False)
        self.register_buffer('search_offsets', window_offsets(local.search_radius),
                             persistent=False)
        init_flax_style_(self)
        self.init_outputs()

    @property
    def feature_template_width(self) -> int:
        """Feature channels of a query's template (all correlation levels)."""
        return sum(self.local.level_channels())

    @property
    def template_width(self) -> int:
        """Values kept per query: the feature template, then its intensity patches."""
        return self.feature_template_width + self.local.patch_channels

    def initial_from_xy(self, xy: torch.Tensor) -> torch.Tensor:
        """``q0`` for query pixels ``[B, M, 2]`` (its appearance is added at the start frame)."""
        unit = pixels_xy_to_unit_yx(xy, self.image_size)
        return self.query_mlp(fourier_features(unit, self.num_fourier_bands))

    def anchor_from_xy(self, xy: torch.Tensor) -> torch.Tensor:
        """The query's anchor in unit xy (as the token readout: 0 / 1 = first / last centre)."""
        return points_xy_to_unit(xy.float(), self.image_size)

    def xy_from_anchor(self, anchor: torch.Tensor) -> torch.Tensor:
        """Inverse of ``anchor_from_xy``: unit xy -> pixels."""
        return unit_to_points_xy(anchor, self.image_size)

    def init_outputs(self) -> None:
        """Zero residual step, confident visibility: the untrained readout is the template
        tracker that calls every query visible. Called after any generic initialisation."""
        with torch.no_grad():
            nn.init.zeros_(self.heads['delta'].out.weight)
            nn.init.zeros_(self.heads['delta'].out.bias)
            nn.init.zeros_(self.heads['logits'].out.weight)
            nn.init.constant_(self.heads['logits'].out.bias, 2.0)

    # ----------------------------------------------------------------------------------------

    def pyramid(self, maps: XFeatMaps, frames: torch.Tensor) -> FramePyramid:
        """One frame's evidence: the correlation pyramid of its XFeat maps (model-pixel
        strides) and, with the photometric refinement on, its intensity pyramid."""
        levels = correlation_pyramid(maps, self.local.levels)
        intensity = (intensity_pyramid(frames, self.local.photometric_levels)
                     if self.local.photometric_radius else [])
        return FramePyramid([PyramidLevel(f, s) for f, s in zip(levels, self.strides)],
                            intensity)

    def sample_template(self, pyramid: list[PyramidLevel], xy: torch.Tensor) -> torch.Tensor:
        """``[B, M, sum(C_l)]`` features of every level at ``xy [B, M, 2]``."""
        return torch.cat([sample_features(level.features, xy, self.image_size)
                          for level in pyramid], dim=-1)

    def _split_template(self, template: torch.Tensor) -> list[torch.Tensor]:
        return list(template.split(self.local.level_channels(), dim=-1))

    def _correlate(self, level: PyramidLevel, template: torch.Tensor, xy: torch.Tensor,
                   offsets: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, M, S]`` cosine correlation of the template with a window around ``xy``."""
        offsets = self.offsets if offsets is None else offsets
        B, M = xy.shape[:2]
        S = offsets.shape[0]
        points = xy[:, :, None, :] + offsets * level.stride_px  # [B, M, S, 2]
        feats = sample_features(level.features, points.reshape(B, M * S, 2), self.image_size)
        feats = feats.reshape(B * M, S, -1)  # [B*M, S, C]
        # A batched mat-vec: far cheaper on CPU than a broadcast multiply and a sum.
        corr = torch.bmm(feats, template.reshape(B * M, -1, 1).to(feats.dtype))  # [B*M, S, 1]
        return corr.reshape(B, M, S)

    def coarse_to_fine(self, pyramid: list[PyramidLevel], template: torch.Tensor,
                       prior_xy: torch.Tensor) -> torch.Tensor:
        """The template tracker: soft-argmax from the coarsest level to the finest.

        Returns:
            ``[B, M, 2]`` estimate (no gradient path to the prior).
        """
        xy = prior_xy
        parts = self._split_template(template)
        levels = list(zip(pyramid, parts))[: self.local.search_levels]
        for level, part in reversed(levels):
            corr = self._correlate(level, part, xy, self.search_offsets)  # [B, M, S']
            weights = torch.softmax(corr / self.local.temperature, dim=-1)
            xy = xy + (weights @ self.search_offsets) * level.stride_px
        return xy

    def evidence(self, pyramid: list[PyramidLevel], template: torch.Tensor, xy: torch.Tensor,
                 prior_xy: torch.Tensor) -> torch.Tensor:
        """``[B, M, L*S + 2L + 2]`` what the latent sees: windows, peaks, entropies, step."""
        parts = self._split_template(template)
        corrs = [self._correlate(level, part, xy) for level, part in zip(pyramid, parts)]
        stacked = torch.stack(corrs, dim=-2)  # [B, M, L, S]
        probs = torch.softmax(stacked / self.local.temperature, dim=-1)
        entropy = -(probs * torch.log(probs.clamp(min=1e-12))).sum(-1) / math.log(
            stacked.shape[-1])  # [B, M, L] in [0, 1]
        peak = stacked.amax(-1)  # [B, M, L]
        step = (xy - prior_xy) / self.strides[0] / self.local.radius  # [B, M, 2] ~ [-1, 1]
        return torch.cat([stacked.flatten(-2), peak, entropy, step], dim=-1)

    def forward(self, latents: torch.Tensor, track: PointTrack, pyramid: FramePyramid,
                tokens: torch.Tensor | None, starting: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, PointTrack]:
        """One frame for every query.

        Args:
            latents: ``[B, M, D_r]`` latents, already reset to ``q0`` where ``starting``.
            track: the tracking state before this frame (``position`` = the query point on a
                query's start frame).
            pyramid: this frame's evidence (``pyramid``).
            tokens: ``[B, N, D]`` readout features (None: local evidence only).
            starting: ``[B, M]`` bool, True on each query's start frame.

        Returns:
            ``(xy [B, M, 2], visible_logit [B, M], certain_logit [B, M], next latents,
            next PointTrack)``. On the start frame a query's position is the query itself.
        """
        if latents.shape[1] == 0:
            empty = latents.new_zeros(*latents.shape[:2])
            return track.position, empty, empty, latents, track
        start = starting[..., None]  # [B, M, 1]
        features = pyramid.features
        F_t = self.feature_template_width
        with torch.no_grad():
            # The template is sampled on the start frame and kept; correlations are constants
            # to the learned part (frozen features, detached positions), so no graph is kept.
            template = track.template[..., :F_t]
            if bool(starting.any()):  # online, most frames start no query: skip the sampling
                sampled = self.sample_template(features, track.position)
                template = torch.where(start, sampled.to(template.dtype), template)
            velocity = torch.where(start, torch.zeros_like(track.velocity), track.velocity)
            prior = track.position + velocity
            xy = self.coarse_to_fine(features, template, prior)
            if pyramid.intensity:
                xy, _ = photometric_refine(pyramid.intensity, track.template[..., F_t:], xy,
                                           self.local, self.image_size)
            xy = torch.where(start, track.position, xy)
            prior = torch.where(start, track.position, prior)
        latents = torch.where(start, latents + self.template_proj(template.to(latents.dtype)),
                              latents)
        visible_logit = certain_logit = None
        for _ in range(self.local.iterations):
            with torch.no_grad():
                seen = self.evidence(features, template, xy, prior)
            corrected = latents + self.corr_mlp(seen.to(latents.dtype))
            if self.transformer is not None and tokens is not None:
                corrected = corrected + self.transformer(corrected, tokens.to(corrected.dtype))
            step = self.local.max_step_px * torch.tanh(self.heads['delta'](corrected).float())
            logits = self.heads['logits'](corrected).float()
            visible_logit, certain_logit = logits[..., 0], logits[..., 1]
            # The query frame's position is given: no step there.
            xy = xy.detach() + torch.where(start, torch.zeros_like(step), step)
        H, W = self.image_size
        lo, hi = xy.new_tensor([-0.5, -0.5]), xy.new_tensor([W - 0.5, H - 0.5])
        xy = torch.maximum(torch.minimum(xy, hi), lo)
        next_latents = self.state_norm(corrected + self.predictor(corrected))
        with torch.no_grad():
            moved = xy.detach() - track.position
            m = self.local.velocity_momentum
            velocity = torch.where(start, torch.zeros_like(velocity),
                                   m * velocity + (1.0 - m) * moved)
            if pyramid.intensity:
                # The next frame's LK template: this frame around the new estimate.
                patches = sample_patches(pyramid.intensity, xy.detach(),
                                         self.local.patch_side, self.image_size)
                template = torch.cat([template, patches.to(template.dtype)], dim=-1)
        next_track = PointTrack(position=xy.detach(), velocity=velocity, template=template)
        return xy, visible_logit, certain_logit, next_latents, next_track

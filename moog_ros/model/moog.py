"""MooG: a recurrent video transformer with off-the-grid latent tokens (arXiv 2411.05927).

Per frame: predict ``s_pred = s + Predictor(s)``; decode ``s_pred`` at pixel coordinates of this
frame (the training target: the prediction has not seen the frame yet); correct
``s_corr = s_pred + Corrector(s_pred, kv=Encoder(frame))``; the new state is ``LN(s_corr)``.
The state is a value: ``out, state = model.step(frame, state)``.

References:
    google-deepmind/representations4d ``moog/modules.py`` (``Moog.frame_step``, ``SRTEncoder``,
    ``SRTDecoder``), ``moog/initializers.py``, ``moog/configs/movi.py``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from moog_ros.model.config import EncoderConfig, MoogConfig
from moog_ros.model.layers import (
    LayerNorm,
    PixelDecoder,
    Transformer,
    fourier_features,
    gelu_tanh,
    grid_coords_yx,
    init_flax_style_,
    subsampled_pixels_xy,
)


class MoogState(NamedTuple):
    """Recurrent state carried between frames."""

    tokens: torch.Tensor  # [B, K, D] after the state LayerNorm


class StepOutput(NamedTuple):
    """Outputs of one ``Moog.step``."""

    tokens_predicted: torch.Tensor  # [B, K, D] after the predictor (what the decoder reads)
    tokens_corrected: torch.Tensor  # [B, K, D] after corrector + state LN (== new state)
    rgb: torch.Tensor | None  # [B, Q, 3] prediction of this frame at the decode coords, or None


class ClipOutput(NamedTuple):
    """Outputs of ``Moog.forward`` over a clip, stacked over time."""

    tokens_predicted: torch.Tensor  # [B, T, K, D]
    tokens_corrected: torch.Tensor  # [B, T, K, D]
    rgb: torch.Tensor | None  # [B, T, Q, 3] (unclamped; targets are video in [0, 1]) or None
    coords_xy: torch.Tensor | None  # [B, T, Q, 2] pixel xy that were decoded, or None


def readout_features(out: StepOutput | ClipOutput) -> torch.Tensor:
    """Predicted ++ corrected tokens along the token axis: what every readout consumes.

    ``[B, 2K, D]`` for a step, ``[B, T, 2K, D]`` for a clip (official ``states_concat``).
    """
    return torch.cat([out.tokens_predicted, out.tokens_corrected], dim=-2)


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    # TF/Flax 'SAME': output ceil(size / stride); the odd pad pixel goes after (bottom/right).
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _cell_fourier_features(size: tuple[int, int], num_bands: int) -> torch.Tensor:
    """``[h * w, 4 * bands]`` Fourier features of a feature grid, row-major.

    Computed on the CPU and moved to the default device: on the meta device (used to build
    models without memory) linspace would pull in torch's decomposition machinery, which takes
    seconds to import.
    """
    pos = fourier_features(grid_coords_yx(*size, device=torch.device('cpu')), num_bands)
    return pos.flatten(0, 1).to(torch.get_default_device())


class SameConv2d(nn.Conv2d):
    """Conv2d with Flax 'SAME' padding for a fixed input size (asymmetric for even strides)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 input_size: tuple[int, int]) -> None:
        top, bottom = _same_padding(input_size[0], kernel_size, stride)
        left, right = _same_padding(input_size[1], kernel_size, stride)
        symmetric = top == bottom and left == right
        super().__init__(in_channels, out_channels, kernel_size, stride,
                         padding=(top, left) if symmetric else 0)
        # Asymmetric padding needs an explicit pad; symmetric padding is done by the conv.
        self.extra_pad = None if symmetric else (left, right, top, bottom)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.extra_pad is not None:
            x = F.pad(x, self.extra_pad)
        return super().forward(x)


class Encoder(nn.Module):
    """``SRTEncoder``: conv net (GELU between layers, final scale-only LN), Fourier positions
    added through a Dense ('project_add'), then Dense(-> width) + LN (the 0-layer transformer).
    """

    def __init__(self, cfg: EncoderConfig, image_size: tuple[int, int]) -> None:
        super().__init__()
        self.image_size = tuple(image_size)
        convs = []
        size, in_ch = self.image_size, 3
        for out_ch, stride in zip(cfg.channels, cfg.strides):
            convs.append(SameConv2d(in_ch, out_ch, cfg.kernel_size, stride, size))
            size = (math.ceil(size[0] / stride), math.ceil(size[1] / stride))
            in_ch = out_ch
        self.convs = nn.ModuleList(convs)
        self.feature_size = size
        self.conv_norm = LayerNorm(in_ch)
        self.pos_proj = nn.Linear(4 * cfg.num_fourier_bands, in_ch)
        self.proj = nn.Linear(in_ch, cfg.width)
        self.norm = LayerNorm(cfg.width)
        # Fixed per config, so computed once; not persistent (rebuilt from the config on load).
        self.register_buffer('pos_features', _cell_fourier_features(size, cfg.num_fourier_bands),
                             persistent=False)  # [N, 4 * bands]

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """frames ``[B, H, W, 3]`` in [0, 1] -> features ``[B, N, width]``, N = h * w row-major."""
        x = frames.permute(0, 3, 1, 2)  # [B, 3, H, W]: conv wants channels first
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i < len(self.convs) - 1:
                x = gelu_tanh(x)
        x = self.conv_norm(x.flatten(2).transpose(1, 2))  # [B, N, C]
        x = x + self.pos_proj(self.pos_features.to(x.dtype))
        return self.norm(self.proj(x))


class Moog(nn.Module):
    """The MooG backbone. See the module docstring for the recurrence.

    Args:
        cfg: a ``MoogConfig`` (``get_config('small')`` etc.).
    """

    def __init__(self, cfg: MoogConfig) -> None:
        super().__init__()
        self.config = cfg
        D = cfg.token_size
        self.encoder = Encoder(cfg.encoder, cfg.image_size)
        self.predictor = Transformer(cfg.predictor, D)
        self.corrector = Transformer(cfg.corrector, D, kv_width=cfg.encoder.width)
        self.decoder = PixelDecoder(
            cfg.decoder.transformer, zero_width=D, kv_width=D,
            num_fourier_bands=cfg.decoder.num_fourier_bands,
            out_channels=cfg.decoder.out_channels, image_size=cfg.image_size)
        self.state_norm = LayerNorm(D, eps=cfg.state_norm_eps)
        if cfg.token_binding == 'grid':
            # 'Grid Rec.': token i starts at cell i's position and only ever reads cell i.
            bands = cfg.encoder.num_fourier_bands
            self.grid_init = nn.Linear(4 * bands, D)
            self.register_buffer('cell_pos_features',
                                 _cell_fourier_features(cfg.feature_size, bands),
                                 persistent=False)  # [K, 4 * bands]
            self.register_buffer('cross_attn_mask', torch.eye(cfg.num_tokens, dtype=torch.bool),
                                 persistent=False)  # [K, N] True = may attend
        else:
            self.grid_init = None
            self.register_buffer('cross_attn_mask', None, persistent=False)
        init_flax_style_(self)

    # ----------------------------------------------------------------------------------------
    # State and coordinates

    def init_state(self, batch_size: int, device: torch.device | str | None = None, *,
                   generator: torch.Generator | None = None,
                   dtype: torch.dtype = torch.float32) -> MoogState:
        """The initial state: ``LN(state_init_scale * N(0, 1))`` of ``[B, K, D]``.

        In 'grid' binding the noise is added to a projection of each cell's Fourier position.

        Args:
            batch_size: B.
            device: defaults to the model's device.
            generator: optional ``torch.Generator`` for the noise (drawn on its own device).
            dtype: state dtype.
        """
        cfg = self.config
        device = device if device is not None else self.state_norm.weight.device
        gen_device = generator.device if generator is not None else device
        noise = torch.randn(batch_size, cfg.num_tokens, cfg.token_size, generator=generator,
                            device=gen_device, dtype=torch.float32).to(device)
        tokens = cfg.state_init_scale * noise  # [B, K, D]
        if self.grid_init is not None:
            tokens = tokens + self.grid_init(self.cell_pos_features.to(device))
        return MoogState(self.state_norm(tokens).to(dtype))

    def decode_coords(self, batch_size: int, mode: str, *,
                      generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> torch.Tensor:
        """Pixel coordinates to decode for one frame: ``[B, Q, 2]`` xy.

        Args:
            batch_size: B.
            mode: 'train' (stride ``decoder.train_factor`` with a random per-example cyclic
                shift), 'eval' (stride ``decoder.eval_factor``, no shift) or 'full' (every pixel).
            generator: optional ``torch.Generator`` for the training shifts.
            device: defaults to the model's device.
        """
        factor = self.config.decode_factor(mode)
        device = device if device is not None else self.state_norm.weight.device
        return subsampled_pixels_xy(batch_size, self.config.image_size, factor,
                                    random_shift=mode == 'train', generator=generator,
                                    device=device)

    # ----------------------------------------------------------------------------------------
    # Recurrence

    def decode(self, tokens_predicted: torch.Tensor, coords_xy: torch.Tensor) -> torch.Tensor:
        """RGB at any pixels: tokens ``[B, K, D]``, coords ``[B, Q, 2]`` -> ``[B, Q, 3]``."""
        return self.decoder(tokens_predicted, coords_xy)

    def _check_frames(self, frames: torch.Tensor, what: str, ndim: int) -> None:
        H, W = self.config.image_size
        if frames.ndim != ndim or tuple(frames.shape[-3:]) != (H, W, 3):
            expected = '[B, H, W, 3]' if ndim == 4 else '[B, T, H, W, 3]'
            raise ValueError(f'{what} must be {expected} with H, W = {H}, {W} (channels-last '
                             f'RGB in [0, 1]); got shape {tuple(frames.shape)}')

    def advance(self, features: torch.Tensor, state: MoogState,
                decode_coords_xy: torch.Tensor | None = None
                ) -> tuple[StepOutput, MoogState]:
        """One step from already-encoded frame features ``[B, N, enc_width]`` (see ``step``)."""
        tokens = state.tokens
        predicted = tokens + self.predictor(tokens)  # [B, K, D]
        rgb = self.decoder(predicted, decode_coords_xy) if decode_coords_xy is not None else None
        corrected = predicted + self.corrector(predicted, features, self.cross_attn_mask)
        corrected = self.state_norm(corrected)
        return StepOutput(predicted, corrected, rgb), MoogState(corrected)

    def step(self, frame: torch.Tensor, state: MoogState,
             decode_coords_xy: torch.Tensor | None = None) -> tuple[StepOutput, MoogState]:
        """Processes one frame: predict, (decode), encode + correct.

        Args:
            frame: ``[B, H, W, 3]`` float in [0, 1] at the model resolution.
            state: from ``init_state`` or the previous step.
            decode_coords_xy: ``[B, Q, 2]`` pixels to decode (prediction of this frame from the
                predicted tokens), or None to skip RGB decoding.

        Returns:
            ``(StepOutput, new MoogState)``.
        """
        self._check_frames(frame, 'frame', 4)
        return self.advance(self.encoder(frame), state, decode_coords_xy)

    def forward(self, video: torch.Tensor, state: MoogState | None = None,
                decode: str | None = 'train', generator: torch.Generator | None = None,
                checkpoint_steps: bool | None = None) -> tuple[ClipOutput, MoogState]:
        """Runs a clip: a Python loop over the frame step.

        Random draws happen in a fixed order, so a ``step`` loop reproduces this call exactly:
        ``init_state(B, generator=g)`` (only if ``state`` is None), then for each frame
        ``decode_coords(B, decode, generator=g)``.

        Args:
            video: ``[B, T, H, W, 3]`` float in [0, 1].
            state: state to continue from; None starts a fresh one.
            decode: 'train' | 'eval' | 'full' decode mode, or None for no RGB decoding.
            generator: optional ``torch.Generator`` for the initial state and training shifts.
            checkpoint_steps: recompute each frame step in backward to save memory (defaults to
                ``config.checkpoint_steps``; only active when gradients are enabled).

        Returns:
            ``(ClipOutput, final MoogState)``.
        """
        self._check_frames(video, 'video', 5)
        B, T = video.shape[:2]
        if state is None:
            state = self.init_state(B, video.device, generator=generator)
        if checkpoint_steps is None:
            checkpoint_steps = self.config.checkpoint_steps
        checkpoint_steps = checkpoint_steps and torch.is_grad_enabled()
        if not checkpoint_steps:
            # Encoding all frames at once is the same computation and batches the convs better.
            features = self.encoder(video.flatten(0, 1)).unflatten(0, (B, T))  # [B, T, N, E]
        outs, coords = [], []
        for t in range(T):
            coords_t = (self.decode_coords(B, decode, generator=generator, device=video.device)
                        if decode is not None else None)
            if checkpoint_steps:
                out, state = checkpoint(self.step, video[:, t], state, coords_t,
                                        use_reentrant=False)
            else:
                out, state = self.advance(features[:, t], state, coords_t)
            outs.append(out)
            coords.append(coords_t)
        clip = ClipOutput(
            tokens_predicted=torch.stack([o.tokens_predicted for o in outs], dim=1),
            tokens_corrected=torch.stack([o.tokens_corrected for o in outs], dim=1),
            rgb=torch.stack([o.rgb for o in outs], dim=1) if decode is not None else None,
            coords_xy=torch.stack(coords, dim=1) if decode is not None else None,
        )
        return clip, state

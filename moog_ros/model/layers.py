"""Reusable MooG building blocks: norms, Fourier features, attention, transformer, pixel decoder.

Everything here is pure torch, channels-last (``[..., D]``) and device-agnostic. Norms compute in
float32 so bf16 autocast keeps them stable. The readouts build on the same classes.

References:
    google-deepmind/representations4d ``moog/attention.py`` (``ImprovedTransformer``),
    ``moog/pos_embeddings.py`` (Fourier features), ``moog/modules.py`` (``SRTDecoder`` and its
    roll + nearest-resize subsampling), ``moog/conv.py``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from moog_ros.model.config import TransformerConfig

# --------------------------------------------------------------------------------------------
# Initialisation (Flax defaults: lecun-normal kernels, zero biases, unit norm scales)


def lecun_normal_(weight: torch.Tensor, fan_in: int) -> torch.Tensor:
    """In-place truncated-normal init with variance 1 / fan_in (Flax ``lecun_normal``).

    Flax truncates at +-2 std and divides the std by 0.8796 (the std of a unit normal truncated
    at +-2), so the truncated samples have exactly variance 1 / fan_in.
    """
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    with torch.no_grad():
        return nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)


def init_flax_style_(module: nn.Module) -> None:
    """Re-initialises every Linear / Conv2d / norm below ``module`` like Flax would."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            lecun_normal_(m.weight, m.in_features)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            lecun_normal_(m.weight, m.weight[0].numel())  # fan_in = in_channels * kh * kw
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (LayerNorm, RMSNorm)):
            nn.init.ones_(m.weight)


# --------------------------------------------------------------------------------------------
# Activation and norms

_SQRT_8_OVER_PI = math.sqrt(8.0 / math.pi)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation (Flax ``nn.gelu`` default).

    For CPU inference it is computed as ``x * sigmoid(sqrt(8 / pi) * (x + 0.044715 x^3))``, the
    same function (``(1 + tanh(z)) / 2 = sigmoid(2 z)``, equal to within 1e-6): on the target
    CPUs ATen's fused tanh-GELU is about 2x slower than this composite, and GELU is ~10 % of a
    small step. Training and GPUs use the fused kernel (fewer saved activations, faster there).
    """
    if x.device.type == 'cpu' and not torch.is_grad_enabled():
        return x * torch.sigmoid(_SQRT_8_OVER_PI * (x + 0.044715 * (x * x * x)))
    return F.gelu(x, approximate='tanh')



class LayerNorm(nn.Module):
    """LayerNorm with a learnable scale and no bias (Flax ``use_bias=False``), computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.float(), self.weight.shape, self.weight.float(), None, self.eps)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f'{self.weight.shape[0]}, eps={self.eps}'


class RMSNorm(nn.Module):
    """RMSNorm with a learnable scale (Flax ``nn.RMSNorm``), computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f'{self.weight.shape[0]}, eps={self.eps}'


# --------------------------------------------------------------------------------------------
# Fourier position features


def fourier_features(coords: torch.Tensor, num_bands: int) -> torch.Tensor:
    """NeRF-style Fourier features of coordinates in [-1, 1], laid out as the official code.

    ``x = pi * coords``; for band i and coordinate axis d the phase is ``2**i * x[d]`` at
    index ``i * n + d``; the output is ``[sin(phases), cos(phases)]`` (cos written as
    ``sin(phase + pi / 2)``, as in the official code, so high bands match it bit for bit).
    Because of the pi scaling, -1 and +1 get the same features (phases differ by a multiple of
    2 pi): first and last pixel row/column alias, exactly as in the official model.

    Args:
        coords: ``[..., n]`` coordinates in [-1, 1]; for images n = 2 in (y, x) order.
        num_bands: number of octaves (frequencies ``2**0 .. 2**(num_bands - 1)``).

    Returns:
        ``[..., 2 * n * num_bands]`` float32 features.
    """
    freqs = 2.0 ** torch.arange(num_bands, device=coords.device, dtype=torch.float32)
    phases = (coords.float() * math.pi)[..., None, :] * freqs[:, None]  # [..., bands, n]
    phases = phases.flatten(-2)  # [..., bands * n], index i * n + d
    return torch.sin(torch.cat([phases, phases + 0.5 * math.pi], dim=-1))


def grid_coords_yx(height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """``[height, width, 2]`` (y, x) coordinates, ``linspace(-1, 1)`` per axis ('ij' indexing)."""
    ys = torch.linspace(-1.0, 1.0, height, device=device)
    xs = torch.linspace(-1.0, 1.0, width, device=device)
    return torch.stack(torch.meshgrid(ys, xs, indexing='ij'), dim=-1)


def pixels_xy_to_unit_yx(coords_xy: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Pixel ``xy`` (centres at integers) -> (y, x) in [-1, 1], -1/+1 = first/last pixel centre.

    Args:
        coords_xy: ``[..., 2]`` pixel coordinates (x right, y down).
        image_size: (H, W) of the image the pixels refer to.

    Returns:
        ``[..., 2]`` float32 (y, x) with ``linspace(-1, 1)`` spacing, matching ``grid_coords_yx``.
    """
    h, w = image_size
    # A 1-pixel axis has a single centre; map it to 0 instead of dividing by zero.
    sy = 2.0 / (h - 1) if h > 1 else 0.0
    sx = 2.0 / (w - 1) if w > 1 else 0.0
    x = coords_xy[..., 0].float() * sx - (1.0 if w > 1 else 0.0)
    y = coords_xy[..., 1].float() * sy - (1.0 if h > 1 else 0.0)
    return torch.stack([y, x], dim=-1)


def points_xy_to_unit(xy: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Pixel ``xy`` -> [0, 1] per axis, 0 / 1 = first / last pixel centre (point positions)."""
    h, w = image_size
    scale = xy.new_tensor([max(w - 1, 1), max(h - 1, 1)])
    return xy / scale


def unit_to_points_xy(unit: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Inverse of ``points_xy_to_unit``."""
    h, w = image_size
    return unit * unit.new_tensor([max(w - 1, 1), max(h - 1, 1)])


def random_decode_shifts(batch_size: int, factor: int, *,
                         generator: torch.Generator | None = None,
                         device: torch.device | str | None = None) -> torch.Tensor:
    """Per-example cyclic shifts ``[B, 2]`` (dy, dx), uniform in ``[0, factor)``.

    Drawn on the generator's device (CPU without one) and moved to ``device``, so a seeded CPU
    generator gives the same shifts whatever device the model runs on.
    """
    gen_device = generator.device if generator is not None else 'cpu'
    shifts = torch.randint(0, factor, (batch_size, 2), generator=generator, device=gen_device)
    return shifts.to(device)


def subsampled_pixels_xy(batch_size: int, image_size: tuple[int, int], factor: int, *,
                         random_shift: bool, generator: torch.Generator | None = None,
                         device: torch.device | str | None = None,
                         shifts_yx: torch.Tensor | None = None) -> torch.Tensor:
    """Pixel coordinates of MooG's subsampled decoding (random cyclic roll + strided grid).

    The official decoder rolls the full coordinate grid by a per-example ``(dy, dx)`` in
    ``[0, factor)`` and nearest-resizes it by ``1 / factor``; nearest resize keeps indices
    ``factor * i + factor // 2``. So output cell ``(i, j)`` decodes pixel
    ``y = (factor * i + factor // 2 - dy) mod H``, ``x = (factor * j + factor // 2 - dx) mod W``.
    Over all ``factor**2`` shifts every pixel is decoded exactly once.

    Args:
        batch_size: B.
        image_size: (H, W); both must be divisible by ``factor``.
        factor: per-axis stride (1 = every pixel).
        random_shift: draw ``(dy, dx)`` per example (training); False = shift 0 (evaluation).
        generator: optional ``torch.Generator`` for the shifts (see ``random_decode_shifts``).
        device: where the result lives.
        shifts_yx: explicit ``[B, 2]`` integer (dy, dx) shifts; overrides ``random_shift``.

    Returns:
        ``[B, Q, 2]`` float32 pixel ``xy`` with ``Q = (H / factor) * (W / factor)``, row-major.
    """
    h, w = image_size
    if factor < 1 or h % factor or w % factor:
        raise ValueError(f'decode factor {factor} must be >= 1 and divide image size {h}x{w}')
    if shifts_yx is not None:
        if tuple(shifts_yx.shape) != (batch_size, 2):
            raise ValueError(f'shifts_yx must be [{batch_size}, 2], got {tuple(shifts_yx.shape)}')
        shifts = shifts_yx.to(device=device, dtype=torch.long)
    elif random_shift:
        shifts = random_decode_shifts(batch_size, factor, generator=generator, device=device)
    else:
        shifts = torch.zeros(batch_size, 2, dtype=torch.long, device=device)
    rows = torch.arange(h // factor, device=device) * factor + factor // 2  # [h']
    cols = torch.arange(w // factor, device=device) * factor + factor // 2  # [w']
    ys = (rows[None, :] - shifts[:, :1]) % h  # [B, h']
    xs = (cols[None, :] - shifts[:, 1:]) % w  # [B, w']
    ys = ys[:, :, None].expand(-1, -1, w // factor)  # [B, h', w']
    xs = xs[:, None, :].expand(-1, h // factor, -1)  # [B, h', w']
    return torch.stack([xs, ys], dim=-1).flatten(1, 2).float()  # [B, Q, 2]


# --------------------------------------------------------------------------------------------
# MLP, attention, transformer


class Mlp(nn.Module):
    """Dense -> tanh-GELU (repeated ``num_hidden_layers`` times) -> Dense."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None,
                 num_hidden_layers: int = 1) -> None:
        super().__init__()
        out_features = out_features or in_features
        sizes = [in_features] + [hidden_features] * num_hidden_layers
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.out = nn.Linear(sizes[-1], out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            x = gelu_tanh(layer(x))
        return self.out(x)


class Attention(nn.Module):
    """Multi-head attention with QK-RMSNorm (``ImprovedMHDPAttention``).

    q/k/v projections have no bias; q and k are RMS-normalised over the head dimension before
    SDPA applies the 1/sqrt(head_dim) scaling; the output projection has a bias and maps back to
    the query width. No dropout.
    """

    def __init__(self, q_width: int, kv_width: int, num_heads: int, qkv_size: int) -> None:
        super().__init__()
        if qkv_size % num_heads:
            raise ValueError(f'num_heads ({num_heads}) must divide qkv_size ({qkv_size})')
        self.num_heads = num_heads
        self.head_dim = qkv_size // num_heads
        self.q = nn.Linear(q_width, qkv_size, bias=False)
        self.k = nn.Linear(kv_width, qkv_size, bias=False)
        self.v = nn.Linear(kv_width, qkv_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.out = nn.Linear(qkv_size, q_width)

    def forward(self, x_q: torch.Tensor, x_kv: torch.Tensor,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x_q ``[B, Lq, Dq]``, x_kv ``[B, Lk, Dkv]``, attn_mask bool ``[Lq, Lk]`` (True = attend).

        Returns ``[B, Lq, Dq]``.
        """
        B, Lq, _ = x_q.shape
        Lk = x_kv.shape[1]
        q = self.q_norm(self.q(x_q).view(B, Lq, self.num_heads, self.head_dim))
        k = self.k_norm(self.k(x_kv).view(B, Lk, self.num_heads, self.head_dim))
        v = self.v(x_kv).view(B, Lk, self.num_heads, self.head_dim)
        # SDPA wants [B, heads, L, head_dim]; it scales by 1/sqrt(head_dim) itself.
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=attn_mask)  # [B, heads, Lq, head_dim]
        return self.out(y.transpose(1, 2).reshape(B, Lq, -1))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + SA(LN x) + CA(LN x, kv)`` then ``x + MLP(LN x)``.

    Self- and cross-attention share one normalised query and run in parallel; kv is not
    normalised here (the caller feeds already-normalised features).
    """

    def __init__(self, width: int, cfg: TransformerConfig, kv_width: int | None) -> None:
        super().__init__()
        if cfg.cross_attention and kv_width is None:
            raise ValueError('a cross-attention block needs kv_width')
        self.norm_q = LayerNorm(width)
        self.self_attn = (Attention(width, width, cfg.num_heads, cfg.qkv_size)
                          if cfg.self_attention else None)
        self.cross_attn = (Attention(width, kv_width, cfg.num_heads, cfg.qkv_size)
                           if cfg.cross_attention else None)
        self.norm_attn = LayerNorm(width)
        self.mlp = Mlp(width, cfg.mlp_size, width)

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None,
                cross_attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        xn = self.norm_q(x)
        if self.self_attn is not None:
            x = x + self.self_attn(xn, xn)
        if self.cross_attn is not None:
            x = x + self.cross_attn(xn, kv, cross_attn_mask)
        return x + self.mlp(self.norm_attn(x))


class Transformer(nn.Module):
    """``ImprovedTransformer``: optional input Dense, blocks, final LayerNorm, optional out Dense.

    Width rules follow the official code: with ``hidden_size`` set the blocks run at that width;
    the output Dense goes to ``output_size`` if given, else back to the input width if
    ``hidden_size`` changed it, else there is none.

    Args:
        cfg: layer counts and sizes; its attention flags decide self / cross / both.
        in_width: query width.
        kv_width: key/value width for cross-attention (None for a self-only stack).
    """

    def __init__(self, cfg: TransformerConfig, in_width: int, kv_width: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        width = cfg.hidden_size or in_width
        self.input = nn.Linear(in_width, width) if cfg.hidden_size is not None else None
        self.layers = nn.ModuleList(
            TransformerBlock(width, cfg, kv_width) for _ in range(cfg.num_layers))
        self.norm = LayerNorm(width)
        out_width = cfg.output_size or (in_width if width != in_width else None)
        self.output = nn.Linear(width, out_width) if out_width is not None else None
        self.out_width = out_width or width

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None,
                cross_attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x ``[B, L, in_width]``, kv ``[B, N, kv_width]`` -> ``[B, L, out_width]``."""
        if self.input is not None:
            x = self.input(x)
        for layer in self.layers:
            x = layer(x, kv, cross_attn_mask)
        x = self.norm(x)
        if self.output is not None:
            x = self.output(x)
        return x


# --------------------------------------------------------------------------------------------
# Pixel decoder (``SRTDecoder``): shared by RGB decoding and dense readouts such as depth


class PixelDecoder(nn.Module):
    """Decodes values at pixel coordinates by cross-attending into a token set.

    Each query is ``zeros(zero_width) ++ Fourier(pixel (y, x) in [-1, 1], bands)``, run through a
    cross-only transformer over the tokens and a final Dense (no activation).

    Args:
        cfg: the (cross-only) transformer.
        zero_width: width of the all-zero part of the query (the official code uses the token
            width; it is part of the residual stream, so it is kept for checkpoint parity).
        kv_width: token width.
        num_fourier_bands: Fourier octaves of the pixel coordinate.
        out_channels: values per pixel (3 for RGB, 1 for depth).
        image_size: (H, W) the pixel coordinates refer to.
    """

    def __init__(self, cfg: TransformerConfig, *, zero_width: int, kv_width: int,
                 num_fourier_bands: int, out_channels: int, image_size: tuple[int, int]) -> None:
        super().__init__()
        if cfg.self_attention or not cfg.cross_attention:
            raise ValueError('PixelDecoder needs a cross-attention-only transformer config')
        self.zero_width = zero_width
        self.num_fourier_bands = num_fourier_bands
        self.image_size = tuple(image_size)
        self.transformer = Transformer(cfg, zero_width + 4 * num_fourier_bands, kv_width)
        self.head = nn.Linear(self.transformer.out_width, out_channels)

    def forward(self, tokens: torch.Tensor, coords_xy: torch.Tensor) -> torch.Tensor:
        """tokens ``[B, K, D]``, coords_xy ``[B, Q, 2]`` pixels -> ``[B, Q, out_channels]``."""
        pos = fourier_features(pixels_xy_to_unit_yx(coords_xy, self.image_size),
                               self.num_fourier_bands).to(tokens.dtype)  # [B, Q, 4 * bands]
        zeros = pos.new_zeros(*pos.shape[:-1], self.zero_width)
        x = self.transformer(torch.cat([zeros, pos], dim=-1), tokens)
        return self.head(x)

"""Frozen configuration dataclasses for the MooG model, with named presets.

Every component has one frozen dataclass. ``to_dict`` / ``from_dict`` give a nested JSON round
trip (the dict is what ``config.json`` of a checkpoint stores), and ``__post_init__`` validates
values, so a bad config fails at construction with a message that names the field.

References:
    google-deepmind/representations4d ``moog/configs/movi.py`` (the ``paper`` preset).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, ClassVar, Literal, TypeVar, Union

TOKEN_BINDINGS = ('free', 'grid')

C = TypeVar('C', bound='ConfigBase')


class ConfigError(ValueError):
    """A config value or a config dict is invalid; the message names the field."""


def _type_name(tp: Any) -> str:
    return getattr(tp, '__name__', None) or str(tp).replace('typing.', '')


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Checks parsed JSON ``value`` against the annotation ``tp``; converts lists to tuples."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, where)
            except ConfigError as err:
                errors.append(str(err))
        if len(errors) == 1:
            raise ConfigError(errors[0])
        raise ConfigError(f'{where}: got {value!r}, expected {tp}')
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f'{where}: got {value!r}, expected one of {typing.get_args(tp)}')
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f'{where}: got {value!r}, expected a list')
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f'{where}[{i}]') for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f'{where}: got {len(value)} items, expected {len(args)}')
        return tuple(_convert(v, a, f'{where}[{i}]') for i, (v, a) in enumerate(zip(value, args)))
    if isinstance(tp, type) and issubclass(tp, ConfigBase):
        return tp.from_dict(value, where=where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f'{where}: got {value!r}, expected true or false')
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f'{where}: got {value!r}, expected an integer')
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f'{where}: got {value!r}, expected a number')
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f'{where}: got {value!r}, expected a string')
        return value
    # Only reachable through a bug in a config class, never through user data.
    raise ConfigError(f'{where}: unsupported annotation {_type_name(tp)}')


def _plain(value: Any) -> Any:
    if isinstance(value, ConfigBase):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


class ConfigBase:
    """Mixin for frozen config dataclasses: nested JSON round trip with type checks.

    Subclasses are ``@dataclasses.dataclass(frozen=True)`` whose fields are annotated with
    bool, int, float, str, Literal, ``X | None``, ``tuple[...]`` or another ``ConfigBase``.
    Readout configs reuse this class.
    """

    # Maps old key names to the current ones when reading JSON written by older code.
    _renamed_keys: ClassVar[dict[str, str]] = {}

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready nested dict (tuples become lists)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], *, where: str | None = None) -> C:
        """Builds the config from a dict as written by ``to_dict``.

        Missing keys take the field default; unknown keys and wrongly typed values raise
        ``ConfigError`` naming the dotted key path (``where`` prefixes it).
        """
        where = where or cls.__name__
        if not isinstance(data, dict):
            raise ConfigError(f'{where}: expected an object, got {type(data).__name__}')
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        data = {cls._renamed_keys.get(k, k): v for k, v in data.items()}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(f'{where}: unknown key(s) {unknown}; known: {sorted(fields)}')
        kwargs = {}
        for name, field in fields.items():
            if name in data:
                kwargs[name] = _convert(data[name], hints[name], f'{where}.{name}')
            elif (field.default is dataclasses.MISSING
                  and field.default_factory is dataclasses.MISSING):
                raise ConfigError(f'{where}: missing required key {name!r}')
        try:
            return cls(**kwargs)
        except ConfigError as err:
            message = str(err).removeprefix(f'{cls.__name__}: ')
            raise ConfigError(f'{where}: {message}') from None


def _require(config: ConfigBase, condition: bool, message: str) -> None:
    # Messages start with the class name; from_dict swaps it for the dotted key path.
    if not condition:
        raise ConfigError(f'{type(config).__name__}: {message}')


@dataclasses.dataclass(frozen=True)
class TransformerConfig(ConfigBase):
    """The shared pre-norm transformer (``ImprovedTransformer`` of the official code).

    Self- and cross-attention run in parallel from one normalised query; set ``self_attention``
    False for a cross-only stack (decoder, readouts) or ``cross_attention`` False for a self-only
    stack (predictor).
    """

    num_layers: int
    num_heads: int
    qkv_size: int  # total q/k/v width over all heads
    mlp_size: int
    self_attention: bool = True
    cross_attention: bool = True
    hidden_size: int | None = None  # Dense on the input to this width (None: keep the width)
    output_size: int | None = None  # Dense after the final norm (None: back to the input width)

    def __post_init__(self) -> None:
        _require(self, self.num_layers >= 0, f'num_layers must be >= 0, got {self.num_layers}')
        _require(self, self.num_heads >= 1, f'num_heads must be >= 1, got {self.num_heads}')
        _require(self, self.qkv_size >= 1 and self.qkv_size % self.num_heads == 0,
                 f'num_heads ({self.num_heads}) must divide qkv_size ({self.qkv_size})')
        _require(self, self.mlp_size >= 1, f'mlp_size must be >= 1, got {self.mlp_size}')
        _require(self, self.self_attention or self.cross_attention,
                 'at least one of self_attention / cross_attention must be true')
        for name in ('hidden_size', 'output_size'):
            value = getattr(self, name)
            _require(self, value is None or value >= 1,
                     f'{name} must be >= 1 or null, got {value}')

    @property
    def head_dim(self) -> int:
        return self.qkv_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class EncoderConfig(ConfigBase):
    """The per-frame encoder: SAME-padded conv net, Fourier positions, Dense + LayerNorm."""

    channels: tuple[int, ...] = (64, 128, 128, 256, 256, 512)
    strides: tuple[int, ...] = (1, 1, 1, 2, 1, 2)
    kernel_size: int = 3
    num_fourier_bands: int = 20  # 2-D Fourier features: 4 * bands wide, added via a Dense
    width: int = 512  # output feature width (the corrector's key/value width)

    def __post_init__(self) -> None:
        _require(self, len(self.channels) >= 1, 'channels must name at least one conv layer')
        _require(self, len(self.channels) == len(self.strides),
                 f'channels ({len(self.channels)} layers) and strides ({len(self.strides)}) '
                 'must have the same length')
        _require(self, all(c >= 1 for c in self.channels),
                 f'channels must be >= 1: {self.channels}')
        _require(self, all(s >= 1 for s in self.strides), f'strides must be >= 1: {self.strides}')
        _require(self, self.kernel_size >= 1, f'kernel_size must be >= 1, got {self.kernel_size}')
        _require(self, self.num_fourier_bands >= 1,
                 f'num_fourier_bands must be >= 1, got {self.num_fourier_bands}')
        _require(self, self.width >= 1, f'width must be >= 1, got {self.width}')

    def feature_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """The (h, w) feature grid for an image: SAME padding gives ceil(n / stride) per layer."""
        h, w = image_size
        for s in self.strides:
            h, w = math.ceil(h / s), math.ceil(w / s)
        return h, w


@dataclasses.dataclass(frozen=True)
class DecoderConfig(ConfigBase):
    """Pixel decoder: queries = zeros(token width) ++ Fourier(pixel); cross-only transformer."""

    transformer: TransformerConfig = TransformerConfig(
        num_layers=6, num_heads=2, qkv_size=128, mlp_size=2048, self_attention=False)
    num_fourier_bands: int = 16
    out_channels: int = 3
    train_factor: int = 8  # decode every 8th pixel per axis (random phase) in training
    eval_factor: int = 4  # every 4th pixel per axis (phase 0) at evaluation

    def __post_init__(self) -> None:
        _require(self, not self.transformer.self_attention and self.transformer.cross_attention,
                 'decoder.transformer must be cross-attention only '
                 '(self_attention false, cross_attention true)')
        _require(self, self.num_fourier_bands >= 1,
                 f'num_fourier_bands must be >= 1, got {self.num_fourier_bands}')
        _require(self, self.out_channels >= 1,
                 f'out_channels must be >= 1, got {self.out_channels}')
        _require(self, self.train_factor >= 1 and self.eval_factor >= 1,
                 f'train_factor and eval_factor must be >= 1, got {self.train_factor}, '
                 f'{self.eval_factor}')


@dataclasses.dataclass(frozen=True)
class MoogConfig(ConfigBase):
    """The whole MooG backbone (encoder, predictor, corrector, decoder, state init)."""

    image_size: tuple[int, int] = (128, 128)  # (H, W) model input in pixels
    num_tokens: int = 1024
    token_size: int = 512
    encoder: EncoderConfig = EncoderConfig()
    corrector: TransformerConfig = TransformerConfig(
        num_layers=2, num_heads=8, qkv_size=512, mlp_size=2048)
    predictor: TransformerConfig = TransformerConfig(
        num_layers=3, num_heads=4, qkv_size=256, mlp_size=2048, cross_attention=False)
    decoder: DecoderConfig = DecoderConfig()
    state_init_scale: float = 1e-4  # std of the Gaussian initial state (before the state norm)
    state_norm_eps: float = 1e-4  # eps of the state LayerNorm (official: 1e-4, not 1e-6)
    token_binding: Literal['free', 'grid'] = 'free'  # 'grid': token i bound to feature cell i
    checkpoint_steps: bool = False  # gradient checkpointing per frame step in forward()

    def __post_init__(self) -> None:
        h, w = self.image_size
        _require(self, h >= 1 and w >= 1, f'image_size must be positive, got {self.image_size}')
        _require(self, self.num_tokens >= 1, f'num_tokens must be >= 1, got {self.num_tokens}')
        _require(self, self.token_size >= 1, f'token_size must be >= 1, got {self.token_size}')
        _require(self, self.state_init_scale >= 0.0,
                 f'state_init_scale must be >= 0, got {self.state_init_scale}')
        _require(self, self.state_norm_eps > 0.0,
                 f'state_norm_eps must be > 0, got {self.state_norm_eps}')
        _require(self, self.token_binding in TOKEN_BINDINGS,
                 f'token_binding must be one of {TOKEN_BINDINGS}, got {self.token_binding!r}')
        _require(self, self.corrector.cross_attention,
                 'corrector must use cross-attention (it reads the frame features)')
        _require(self, not self.predictor.cross_attention,
                 'predictor must be self-attention only (it has no frame to attend to)')
        # The predictor and corrector are residual updates of the tokens.
        for name in ('corrector', 'predictor'):
            out = getattr(self, name).output_size
            _require(self, out is None or out == self.token_size,
                     f'{name}.output_size ({out}) must be null or token_size ({self.token_size}) '
                     'because its output is added to the tokens')
        for name in ('train_factor', 'eval_factor'):
            factor = getattr(self.decoder, name)
            _require(self, h % factor == 0 and w % factor == 0,
                     f'decoder.{name} ({factor}) must divide image_size {self.image_size}')
        if self.token_binding == 'grid':
            fh, fw = self.feature_size
            _require(self, self.num_tokens == fh * fw,
                     f"token_binding 'grid' needs num_tokens == encoder feature cells "
                     f'({fh}x{fw} = {fh * fw} at image_size {self.image_size}), '
                     f'got num_tokens={self.num_tokens}')

    @property
    def feature_size(self) -> tuple[int, int]:
        """(h, w) of the encoder feature grid."""
        return self.encoder.feature_size(self.image_size)

    @property
    def num_features(self) -> int:
        """Encoder features per frame (h * w)."""
        fh, fw = self.feature_size
        return fh * fw

    @property
    def decoder_query_width(self) -> int:
        """Decoder query width: token_size zeros ++ 2 * 2 * bands Fourier features."""
        return self.token_size + 4 * self.decoder.num_fourier_bands

    def decode_factor(self, mode: str) -> int:
        """The per-axis pixel stride of a decode mode ('train' | 'eval' | 'full')."""
        factors = {'train': self.decoder.train_factor, 'eval': self.decoder.eval_factor,
                   'full': 1}
        if mode not in factors:
            raise ValueError(f'decode mode must be one of {sorted(factors)}, got {mode!r}')
        return factors[mode]


def _paper() -> MoogConfig:
    # Official MOVi config: 128x128, 1024 tokens x 512, conv strides (1,1,1,2,1,2) -> 32x32 cells.
    return MoogConfig()


def _small() -> MoogConfig:
    # Sized by measurement on the 2-core CPU (bench/bench_model.py): the step without RGB decode
    # must stay under ~18 ms so that depth/points/boxes readouts still fit in 33 ms. Four
    # stride-2 convs give 16x16 = 256 cells; 128 tokens x 128 wide; 2 + 2 narrow layers.
    width = 128
    return MoogConfig(
        image_size=(128, 128),
        num_tokens=128,
        token_size=width,
        encoder=EncoderConfig(channels=(32, 48, 96, 128), strides=(2, 2, 2, 1), width=width),
        corrector=TransformerConfig(num_layers=2, num_heads=4, qkv_size=width, mlp_size=512),
        predictor=TransformerConfig(num_layers=2, num_heads=4, qkv_size=width, mlp_size=512,
                                    cross_attention=False),
        decoder=DecoderConfig(transformer=TransformerConfig(
            num_layers=2, num_heads=2, qkv_size=128, mlp_size=512, self_attention=False)),
    )


def _small_grid() -> MoogConfig:
    # 'Grid Rec.' baseline at small's compute: one token per encoder cell. A fifth (stride-2)
    # conv gives 8x8 = 64 cells = 64 tokens; width 224 brings the step to small's cost
    # (0.43 vs 0.45 GFLOP and about the same CPU time per step).
    width = 224
    small = _small()
    return dataclasses.replace(
        small,
        num_tokens=64,
        token_size=width,
        encoder=EncoderConfig(channels=(32, 48, 96, 128, 128), strides=(2, 2, 2, 1, 2),
                              width=width),
        corrector=dataclasses.replace(small.corrector, qkv_size=width),
        predictor=dataclasses.replace(small.predictor, qkv_size=width),
        token_binding='grid',
    )


def _tiny() -> MoogConfig:
    # For tests: a step takes milliseconds on one CPU thread.
    width = 32
    return MoogConfig(
        image_size=(32, 32),
        num_tokens=16,
        token_size=width,
        encoder=EncoderConfig(channels=(8, 16), strides=(2, 2), num_fourier_bands=6,
                              width=width),
        corrector=TransformerConfig(num_layers=1, num_heads=2, qkv_size=width, mlp_size=64),
        predictor=TransformerConfig(num_layers=1, num_heads=2, qkv_size=width, mlp_size=64,
                                    cross_attention=False),
        decoder=DecoderConfig(
            transformer=TransformerConfig(num_layers=1, num_heads=2, qkv_size=width,
                                          mlp_size=64, self_attention=False),
            num_fourier_bands=4),
    )


def _tiny_grid() -> MoogConfig:
    # 32x32 input, strides (2, 2) -> 8x8 = 64 cells = 64 tokens.
    return dataclasses.replace(_tiny(), num_tokens=64, token_binding='grid')


PRESETS = {
    'paper': _paper,
    'small': _small,
    'small_grid': _small_grid,
    'tiny': _tiny,
    'tiny_grid': _tiny_grid,
}


def get_config(name: str) -> MoogConfig:
    """Returns a named preset: 'paper', 'small' (CPU default), 'small_grid', 'tiny', 'tiny_grid'.

    Raises:
        ValueError: for an unknown name (the message lists the presets).
    """
    if name not in PRESETS:
        raise ValueError(f'unknown MooG preset {name!r}; choose one of {sorted(PRESETS)}')
    return PRESETS[name]()

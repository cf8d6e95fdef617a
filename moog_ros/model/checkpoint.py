"""Checkpoints: a directory with ``config.json`` (format tag, kind, configs, meta) and
``model.safetensors`` (tensors only). Nothing is ever unpickled.

The model is rebuilt from ``config.json`` alone through ``MODEL_KINDS``: each kind (``'moog'``
here; readouts register their own) names its module type and a builder from the ``configs``
dict. Every problem raises ``CheckpointError`` naming the file and what is wrong.

Writes are atomic per file (temp file + ``os.replace``, tensors first, ``config.json`` last) and
both files carry the same ``save_id``, so a save torn by a crash is detected on load. Other files
in the directory (a training run's ``trainer_state.pt``) are left alone.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import json
import os
from pathlib import Path
import tempfile
from typing import Any
import uuid

from safetensors import safe_open
from safetensors.torch import save_file
import torch
from torch import nn

from moog_ros.model.config import ConfigError, MoogConfig
from moog_ros.model.moog import Moog

FORMAT_TAG = 'moog_ros.checkpoint.v1'
CONFIG_FILE = 'config.json'
TENSORS_FILE = 'model.safetensors'


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable or does not match its config; names the file."""


@dataclasses.dataclass(frozen=True)
class ModelKind:
    """How to rebuild one kind of checkpointed module.

    Attributes:
        name: the ``kind`` written to ``config.json``.
        model_type: the module class (used to infer the kind when saving).
        build: ``configs`` dict of ``config.json`` -> a freshly initialised module.
        configs_of: module -> the ``configs`` dict to save (must round-trip through ``build``).
    """

    name: str
    model_type: type[nn.Module]
    build: Callable[[dict[str, Any]], nn.Module]
    configs_of: Callable[[nn.Module], dict[str, Any]]


MODEL_KINDS: dict[str, ModelKind] = {}


def register_model_kind(name: str, model_type: type[nn.Module],
                        build: Callable[[dict[str, Any]], nn.Module],
                        configs_of: Callable[[nn.Module], dict[str, Any]]) -> None:
    """Registers a checkpointable module kind (call once at import of the defining module)."""
    MODEL_KINDS[name] = ModelKind(name, model_type, build, configs_of)


register_model_kind(
    'moog', Moog,
    build=lambda configs: Moog(MoogConfig.from_dict(configs['model'], where='configs.model')),
    configs_of=lambda model: {'model': model.config.to_dict()},
)


@dataclasses.dataclass(frozen=True)
class LoadedCheckpoint:
    """What ``load_checkpoint`` returns."""

    model: nn.Module  # rebuilt from config.json, weights loaded, in eval mode
    kind: str
    configs: dict[str, Any]  # every component config as saved (JSON dicts)
    meta: dict[str, Any]  # provenance (step, data, git, ...) as saved
    path: Path


def _unwrap(model: nn.Module) -> nn.Module:
    # (Distributed)DataParallel keeps the model in .module, torch.compile in ._orig_mod.
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, '_orig_mod', None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _kind_of(model: nn.Module) -> ModelKind:
    for kind in MODEL_KINDS.values():
        if type(model) is kind.model_type:
            return kind
    raise CheckpointError(f'no checkpoint kind is registered for {type(model).__name__}; '
                          f'known kinds: {sorted(MODEL_KINDS)}')


def _names(keys: list[str] | set[str], limit: int = 5) -> str:
    keys = sorted(keys)
    more = f' (+{len(keys) - limit} more)' if len(keys) > limit else ''
    return ', '.join(keys[:limit]) + more


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported on every platform; the renames are still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, 'rb+') as f:
            os.fsync(f.fileno())
        # mkstemp creates 0600; checkpoints are shared (installed models, run folders).
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_tensors(expected: dict[str, torch.Size], found: dict[str, list[int]],
                   file: Path) -> None:
    """Raises CheckpointError listing missing, unexpected and mis-shaped tensors."""
    missing = set(expected) - set(found)
    unexpected = set(found) - set(expected)
    misshaped = {k: (list(expected[k]), found[k]) for k in set(expected) & set(found)
                 if list(expected[k]) != list(found[k])}
    problems = []
    if missing:
        problems.append(f'{len(missing)} tensor(s) missing: {_names(missing)}')
    if unexpected:
        problems.append(f'{len(unexpected)} unexpected tensor(s): {_names(unexpected)}')
    if misshaped:
        shown = [f'{k} (file {v[1]}, config {v[0]})' for k, v in sorted(misshaped.items())[:5]]
        more = f' (+{len(misshaped) - 5} more)' if len(misshaped) > 5 else ''
        problems.append(f'{len(misshaped)} shape mismatch(es): ' + ', '.join(shown) + more)
    if problems:
        raise CheckpointError(f'{file}: does not match the model that {CONFIG_FILE} describes: '
                              + '; '.join(problems))


def save_checkpoint(path: str | os.PathLike, model: nn.Module, *,
                    configs: dict[str, Any] | None = None, meta: dict[str, Any] | None = None,
                    kind: str | None = None) -> Path:
    """Writes ``path/config.json`` and ``path/model.safetensors`` atomically.

    Args:
        path: checkpoint directory (created if needed; other files in it are kept).
        model: a registered module (DDP / torch.compile wrappers are unwrapped).
        configs: component configs as JSON dicts; defaults to the kind's ``configs_of(model)``.
            Extra entries (e.g. 'train', 'data') are stored as given. Entries that differ from
            ``configs_of(model)`` must still rebuild a module with exactly this model's tensor
            names and shapes (checked here).
        meta: JSON-serialisable provenance (step, metrics, data, git revision, ...).
        kind: registered kind; inferred from the module type if None.

    Returns:
        The checkpoint directory.
    """
    path = Path(path)
    model = _unwrap(model)
    model_kind = MODEL_KINDS[kind] if kind is not None else _kind_of(model)
    own_configs = model_kind.configs_of(model)
    configs = dict(configs) if configs is not None else own_configs
    state = {k: v.detach().to('cpu').contiguous() for k, v in model.state_dict().items()}
    if any(configs.get(key) != value for key, value in own_configs.items()):
        # Configs other than the model's own: catch one that would not rebuild this model now,
        # not at load time. Build it on the meta device (no memory, no init) and compare.
        try:
            with torch.device('meta'):
                rebuilt = model_kind.build(configs)
        except (ConfigError, KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f'{path / CONFIG_FILE}: configs do not build a '
                                  f'{model_kind.name!r} model: {err}') from err
        _check_tensors({k: v.shape for k, v in rebuilt.state_dict().items()},
                       {k: list(v.shape) for k, v in state.items()}, path / TENSORS_FILE)
    save_id = uuid.uuid4().hex
    document = {
        'format': FORMAT_TAG,
        'kind': model_kind.name,
        'configs': configs,
        'meta': meta or {},
        'tensors': {'file': TENSORS_FILE, 'count': len(state), 'save_id': save_id},
    }
    try:
        text = json.dumps(document, indent=2, sort_keys=True, allow_nan=False) + '\n'
    except (TypeError, ValueError) as err:
        raise CheckpointError(f'{path / CONFIG_FILE}: configs/meta are not JSON: {err}') from err
    path.mkdir(parents=True, exist_ok=True)
    _atomic_write(path / TENSORS_FILE,
                  lambda tmp: save_file(state, tmp, metadata={'format': FORMAT_TAG,
                                                              'save_id': save_id}))

    def write_json(tmp: str) -> None:
        Path(tmp).write_text(text)

    _atomic_write(path / CONFIG_FILE, write_json)
    _fsync_dir(path)
    return path


def read_checkpoint_config(path: str | os.PathLike) -> dict[str, Any]:
    """Reads and validates ``path/config.json`` (format tag, kind, configs, meta, tensors)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f'{path}: not a checkpoint directory (expected a directory with '
                              f'{CONFIG_FILE} and {TENSORS_FILE})')
    file = path / CONFIG_FILE
    try:
        document = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f'{file}: missing') from None
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f'{file}: unreadable: {err}') from err
    except json.JSONDecodeError as err:
        raise CheckpointError(f'{file}: corrupt JSON: {err}') from err
    if not isinstance(document, dict):
        raise CheckpointError(f'{file}: expected a JSON object, got {type(document).__name__}')
    if document.get('format') != FORMAT_TAG:
        raise CheckpointError(f'{file}: format tag is {document.get("format")!r}, expected '
                              f'{FORMAT_TAG!r}')
    kind = document.get('kind')
    if kind not in MODEL_KINDS:
        raise CheckpointError(f'{file}: unknown kind {kind!r}; registered kinds: '
                              f'{sorted(MODEL_KINDS)} (import the module that registers it)')
    for key in ('configs', 'meta', 'tensors'):
        if not isinstance(document.get(key), dict):
            raise CheckpointError(f'{file}: key {key!r} must be an object')
    if not isinstance(document['tensors'].get('save_id'), str):
        raise CheckpointError(f"{file}: key 'tensors.save_id' is missing")
    return document


def load_checkpoint(path: str | os.PathLike, map_location: torch.device | str = 'cpu', *,
                    expected_kind: str | None = None) -> LoadedCheckpoint:
    """Rebuilds the model from ``config.json`` and loads ``model.safetensors`` strictly.

    Args:
        path: checkpoint directory.
        map_location: device for the model.
        expected_kind: if given, a checkpoint of another kind is an error.

    Returns:
        ``LoadedCheckpoint`` with the model in eval mode on ``map_location``.

    Raises:
        CheckpointError: naming the file, for a missing/corrupt file, bad format tag, unknown or
            unexpected kind, invalid config, torn save, or missing/unexpected/mis-shaped tensors.
    """
    path = Path(path)
    document = read_checkpoint_config(path)
    config_file, tensor_file = path / CONFIG_FILE, path / TENSORS_FILE
    kind = document['kind']
    if expected_kind is not None and kind != expected_kind:
        raise CheckpointError(f'{config_file}: checkpoint kind is {kind!r}, expected '
                              f'{expected_kind!r}')
    try:
        model = MODEL_KINDS[kind].build(document['configs'])
    except KeyError as err:
        raise CheckpointError(f'{config_file}: configs has no {err.args[0]!r} entry') from None
    except (ConfigError, TypeError, ValueError) as err:
        raise CheckpointError(f'{config_file}: invalid config: {err}') from err
    if not tensor_file.is_file():
        raise CheckpointError(f'{tensor_file}: missing')
    try:
        with safe_open(tensor_file, framework='pt', device='cpu') as f:
            file_meta = f.metadata() or {}
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
            if file_meta.get('save_id') != document['tensors']['save_id']:
                raise CheckpointError(
                    f'{tensor_file}: save_id {file_meta.get("save_id")!r} does not match '
                    f'{config_file} ({document["tensors"]["save_id"]!r}); the two files come '
                    'from different saves (an interrupted save?)')
            expected = {k: v.shape for k, v in model.state_dict().items()}
            _check_tensors(expected, shapes, tensor_file)
            state = {k: f.get_tensor(k) for k in expected}
    except CheckpointError:
        raise
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f'{tensor_file}: unreadable safetensors file: {err}') from err
    model.load_state_dict(state, strict=True)
    model.to(map_location).eval()
    return LoadedCheckpoint(model=model, kind=kind, configs=document['configs'],
                            meta=document['meta'], path=path)


def save_state_dict_file(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Atomically ``torch.save``s a dict of tensors / plain values (e.g. ``trainer_state.pt``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state_dict_file(path: str | os.PathLike,
                         map_location: torch.device | str = 'cpu') -> dict[str, Any]:
    """Loads a ``torch.save``d dict with ``weights_only=True`` (never unpickles code).

    Raises:
        CheckpointError: naming the file if it is missing, corrupt, holds disallowed objects or
            is not a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'{path}: missing')
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # unpickling errors, truncated zip archives, disallowed globals
        raise CheckpointError(f'{path}: cannot be loaded with weights_only=True: {err}') from err
    if not isinstance(state, dict):
        raise CheckpointError(f'{path}: expected a dict, got {type(state).__name__}')
    return state

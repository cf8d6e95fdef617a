"""Pieces every training script shares: config merge, run folder, metrics, optimiser, checkpoints.

Used by ``pretrain.py`` and ``fit_readouts.py`` so both have the same conventions:

- **Config**: a frozen dataclass (nested sections allowed) built from defaults, then a YAML file,
  then ``--set a.b=c`` overrides (:func:`build_config`). Values are coerced to the field's type;
  unknown keys are an error naming the file or flag. The resolved config is written to the run
  folder as ``config.yaml`` and ``config.json`` (:func:`write_resolved_config`).
- **Run folder** (:func:`prepare_run_dir`): ``metrics.jsonl`` (one JSON object per line, see
  :class:`MetricsLogger`), ``checkpoints/latest/`` and ``checkpoints/step_XXXXXX/``.
- **Optimisation**: :func:`build_adamw` and :class:`WarmupCosine` (linear warm-up, cosine decay)
  behind a ``LambdaLR`` (:func:`build_scheduler`).
- **Checkpoints of the training state** (:func:`save_training_checkpoint`,
  :func:`load_trainer_state`, :func:`restore_trainer_state`): the model checkpoint directory
  (``config.json`` + ``model.safetensors``, written by a callback) plus ``trainer_state.pt``
  (optimiser, scheduler, step, data position, RNG states), written to a temporary directory and
  swapped in with ``os.replace``; read back with ``torch.load(weights_only=True)``. Problems
  raise ``moog_ros.model.CheckpointError`` naming the file.
- **Interruption**: :class:`StopSignal` turns SIGINT/SIGTERM into a flag checked between steps.
- **The run itself**: the shared flags (:func:`add_config_arguments`, :func:`add_data_arguments`,
  :func:`add_run_dir_arguments`), sources and loaders (:func:`open_train_val`,
  :func:`make_loaders`), resuming (:func:`resume_training`), the checkpoints of a step
  (:func:`checkpoint_names`, :func:`save_run_checkpoints`) and the wrap-up (:func:`finish_run`).

Only rank 0 should call the writing functions; they do not check ranks themselves.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Mapping, Sequence
import contextlib
import ctypes
import dataclasses
import errno
import hashlib
import json
import math
import os
from pathlib import Path
import random
import shutil
import signal
import sys
import tempfile
import types
import typing
from typing import Any

import numpy as np
import torch
from torch import nn
import yaml

from moog_ros.model.checkpoint import CheckpointError, load_state_dict_file
from moog_ros.training import data
from moog_ros.training.distributed import (
    DistInfo,
    all_gather_objects,
    any_rank,
    barrier,
    print0,
)

TRAINER_STATE_FILE = 'trainer_state.pt'
TRAINER_STATE_FORMAT = 'moog_ros.trainer_state/1'
CHECKPOINTS_DIR = 'checkpoints'
LATEST = 'latest'


class ConfigError(ValueError):
    """A training config file or ``--set`` override is invalid; the message names which."""


# ----------------------------------------------------------------------------------------------
# Config: dataclass defaults <- YAML <- --set overrides

def config_to_dict(config: Any) -> dict[str, Any]:
    """A (nested) config dataclass as plain JSON/YAML types (tuples become lists)."""
    def plain(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value
    return plain(dataclasses.asdict(config))


def _field_types(cls: type) -> dict[str, Any]:
    # get_type_hints resolves the string annotations of `from __future__ import annotations`.
    hints = typing.get_type_hints(cls)
    return {field.name: hints[field.name] for field in dataclasses.fields(cls)}


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert a YAML/CLI value to ``annotation``; raise ConfigError naming ``where``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f'{where}: {value!r} fits none of '
                          f'{annotation}')
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, Mapping):
            raise ConfigError(f'{where}: expected a mapping (section), got {value!r}')
        return _from_mapping(annotation, value, where)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ('true', 'false', 'yes', 'no', '1', '0'):
            return value.lower() in ('true', 'yes', '1')
        raise ConfigError(f'{where}: expected true/false, got {value!r}')
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f'{where}: expected an integer, got {value!r}')
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value.replace('_', ''))
            except ValueError:
                number = math.nan
            if number.is_integer():
                return int(number)
        raise ConfigError(f'{where}: expected an integer, got {value!r}')
    if annotation is float:
        # YAML 1.1 reads '1e-4' (no dot) as a string, so strings that parse as numbers are fine.
        if isinstance(value, bool):
            raise ConfigError(f'{where}: expected a number, got {value!r}')
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f'{where}: expected a number, got {value!r}')
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f'{where}: expected a string, got {value!r}')
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f'{where}: expected a list, got {value!r}')
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f'{where}[{i}]') for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f'{where}: expected {len(args)} values, got {len(value)}')
        return tuple(_coerce(v, a, f'{where}[{i}]') for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict or annotation is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f'{where}: expected a mapping, got {value!r}')
        return {str(k): v for k, v in value.items()}   # free-form; validated by its consumer
    raise ConfigError(f'{where}: unsupported config type {annotation!r}')


def _from_mapping(cls: type, data: Mapping[str, Any], where: str) -> Any:
    types_by_name = _field_types(cls)
    unknown = sorted(set(data) - set(types_by_name))
    if unknown:
        raise ConfigError(f'{where or "top level"}: unknown key(s) '
                          f'{", ".join(map(repr, unknown))}; known keys: '
                          f'{", ".join(sorted(types_by_name))}')
    kwargs = {name: _coerce(value, types_by_name[name], f'{where}.{name}'.lstrip('.'))
              for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigError(f'{where or cls.__name__}: {error}') from error


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _is_mapping_type(annotation: Any) -> bool:
    if annotation is dict or typing.get_origin(annotation) is dict:
        return True
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and any(
        _is_mapping_type(option) for option in typing.get_args(annotation))


def _apply_set(cls: type, tree: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b=c`` override to ``tree`` (a dict shaped like ``cls``)."""
    if '=' not in assignment:
        raise ConfigError(f'--set {assignment!r}: expected KEY=VALUE (e.g. train.steps=1000)')
    key, text = assignment.split('=', 1)
    key = key.strip()
    parts = key.split('.')
    if not all(parts):
        raise ConfigError(f'--set {assignment!r}: empty key component')
    try:
        value = yaml.safe_load(text) if text.strip() else ''
    except yaml.YAMLError as error:
        raise ConfigError(f'--set {key}: cannot parse value {text!r}: {error}') from error
    node, node_cls = tree, cls   # node_cls None = inside a free-form mapping field
    for depth, part in enumerate(parts):
        path = '.'.join(parts[:depth + 1])
        next_cls = None
        if node_cls is not None:
            types_by_name = _field_types(node_cls)
            if part not in types_by_name:
                raise ConfigError(f'--set {key}: unknown key {part!r} in '
                                  f'{".".join(parts[:depth]) or "the config"}; known keys: '
                                  f'{", ".join(sorted(types_by_name))}')
            annotation = types_by_name[part]
            if dataclasses.is_dataclass(annotation):
                next_cls = annotation
            elif depth < len(parts) - 1 and not _is_mapping_type(annotation):
                raise ConfigError(f'--set {key}: {path} is a single value, not a section')
        if depth == len(parts) - 1:
            node[part] = value
            return
        child = node.get(part)
        if child is None:
            child = {}
        if not isinstance(child, Mapping):
            raise ConfigError(f'--set {key}: {path} holds {child!r}, not a mapping')
        node[part] = child = dict(child)
        node, node_cls = child, next_cls


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; errors name the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f'config file {path}: cannot read: {error}') from error
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f'config file {path}: invalid YAML: {error}') from error
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f'config file {path}: expected a mapping at the top level')
    return dict(data)


def build_config(cls: type, yaml_path: str | Path | None = None,
                 overrides: Sequence[str] = ()) -> Any:
    """Build a frozen config dataclass: defaults, then a YAML file, then ``--set`` overrides.

    Args:
        cls: the (nested) config dataclass; every field must have a default.
        yaml_path: optional YAML file whose keys mirror the dataclass (sections = nested dicts).
        overrides: ``'a.b=c'`` strings; the value is parsed as YAML and coerced to the field type.

    Returns:
        An instance of ``cls``.

    Raises:
        ConfigError: unknown key, wrong type or invalid value, naming the file or the flag.
    """
    tree = config_to_dict(cls())
    if yaml_path is not None:
        data = load_yaml(yaml_path)
        try:
            _from_mapping(cls, _deep_merge(tree, data), '')   # validate the file on its own
        except ConfigError as error:
            raise ConfigError(f'config file {yaml_path}: {error}') from error
        tree = _deep_merge(tree, data)
    for assignment in overrides:
        _apply_set(cls, tree, assignment)
    try:
        return _from_mapping(cls, tree, '')
    except ConfigError as error:
        raise ConfigError(f'after --set overrides: {error}') from error


# ----------------------------------------------------------------------------------------------
# Run folder and metrics

def prepare_run_dir(out: str | Path, *, resume: bool) -> Path:
    """Create the run folder and check it fits the resume choice (safe to call on every rank).

    A fresh run refuses a folder that already holds checkpoints (so a finished run is never
    overwritten by accident); ``resume=True`` needs one.

    Raises:
        FileExistsError / FileNotFoundError: with the folder and what to do.
    """
    run_dir = Path(out)
    has_checkpoint = (run_dir / CHECKPOINTS_DIR).is_dir() and any(
        (run_dir / CHECKPOINTS_DIR).iterdir())
    if has_checkpoint and not resume:
        raise FileExistsError(f'run folder {run_dir} already holds checkpoints; pass --resume to '
                              'continue it or choose another --out')
    (run_dir / CHECKPOINTS_DIR).mkdir(parents=True, exist_ok=True)
    return run_dir


def _atomic_write_text(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile('w', dir=path.parent, prefix=f'.{path.name}.',
                                     delete=False) as handle:
        handle.write(text)
        temp_name = handle.name
    os.chmod(temp_name, 0o644)   # NamedTemporaryFile creates 0600; run folders are shared
    os.replace(temp_name, path)


def write_resolved_config(run_dir: str | Path, config: Any, *,
                          extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``config.yaml`` and ``config.json`` (the resolved config, plus ``extra`` sections).

    Returns:
        The dict that was written.
    """
    run_dir = Path(run_dir)
    data = config_to_dict(config) if dataclasses.is_dataclass(config) else dict(config)
    if extra:
        data.update(extra)
    _atomic_write_text(run_dir / 'config.json', json.dumps(data, indent=2) + '\n')
    _atomic_write_text(run_dir / 'config.yaml', yaml.safe_dump(data, sort_keys=False))
    return data


class MetricsLogger:
    """Appends one JSON object per line to ``metrics.jsonl``.

    On resume from step ``k`` the rows the interrupted run logged after ``k`` are dropped first,
    so the file reads as one uninterrupted run. A disabled logger (ranks other than 0) does
    nothing.
    """

    def __init__(self, path: str | Path, *, enabled: bool = True,
                 resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self._handle = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue   # a line cut short by the interruption
                if int(row.get('step', 0)) <= resume_step:
                    kept.append(line)
            _atomic_write_text(self.path, ''.join(f'{line}\n' for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()   # a fresh run starts a fresh log
        self._handle = self.path.open('a')

    def log(self, row: Mapping[str, Any]) -> None:
        """Write one row. Floats keep full precision (resume checks compare them exactly)."""
        if self._handle is None:
            return
        self._handle.write(json.dumps(dict(row)) + '\n')
        self._handle.flush()

    def close(self) -> None:
        """Close the file (safe to call twice)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a ``metrics.jsonl`` file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------
# Optimiser and schedule

class WarmupCosine:
    """LR multiplier: linear warm-up to 1, then cosine decay to ``final_ratio``.

    ``factor(step)`` is the multiplier for the (0-based) optimisation step ``step``. Warm-up starts
    at ``1/warmup_steps`` rather than 0 so the first step is not wasted. A class (not a lambda)
    so ``LambdaLR.state_dict()`` records its numbers.
    """

    def __init__(self, warmup_steps: int, total_steps: int, final_ratio: float) -> None:
        if total_steps < 1 or warmup_steps < 0 or not 0.0 <= final_ratio <= 1.0:
            raise ValueError(f'bad schedule: warmup {warmup_steps}, total {total_steps}, '
                             f'final ratio {final_ratio}')
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.final_ratio = final_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.final_ratio + (1.0 - self.final_ratio) * 0.5 * (1.0 + math.cos(math.pi *
                                                                                    progress))


def build_adamw(params: Iterable[nn.Parameter] | Iterable[dict], *, lr: float,
                weight_decay: float, betas: tuple[float, float], eps: float = 1e-8,
                device: torch.device | None = None) -> torch.optim.AdamW:
    """AdamW with decoupled weight decay on every parameter (as the official MooG optax chain).

    The fused CUDA kernel is used on GPU; on CPU the default (deterministic) implementation.
    """
    fused = device is not None and device.type == 'cuda'
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                             fused=fused or None)


def build_scheduler(optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                    final_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` over :class:`WarmupCosine`; call ``scheduler.step()`` after each step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(warmup_steps, total_steps, final_ratio))


# ----------------------------------------------------------------------------------------------
# RNG capture / restore (all types weights_only-loadable: tensors, ints, tuples, dicts)

def seed_all(seed: int) -> None:
    """Seed Python, numpy and torch (all devices) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """This process's global RNG states: Python, numpy, torch CPU and CUDA."""
    numpy_state = np.random.get_state(legacy=False)
    state = {
        'python': random.getstate(),
        'numpy': {
            'bit_generator': numpy_state['bit_generator'],
            'key': torch.from_numpy(numpy_state['state']['key'].astype(np.int64)),
            'pos': int(numpy_state['state']['pos']),
            'has_gauss': int(numpy_state['has_gauss']),
            'gauss': float(numpy_state['gauss']),
        },
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    version, internal, gauss_next = state['python']
    random.setstate((version, tuple(internal), gauss_next))
    numpy_state = state['numpy']
    np.random.set_state({
        'bit_generator': numpy_state['bit_generator'],
        'state': {'key': numpy_state['key'].numpy().astype(np.uint32), 'pos': numpy_state['pos']},
        'has_gauss': numpy_state['has_gauss'],
        'gauss': numpy_state['gauss'],
    })
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


# ----------------------------------------------------------------------------------------------
# Training checkpoints: model checkpoint dir + trainer_state.pt, swapped in atomically

def save_training_checkpoint(dest: str | Path, *, write_model: Callable[[Path], None],
                             trainer_state: Mapping[str, Any]) -> Path:
    """Write a checkpoint directory atomically (rank 0 only).

    Args:
        dest: the final directory, e.g. ``run/checkpoints/latest``; replaced if it exists.
        write_model: writes the model checkpoint (``config.json`` + ``model.safetensors``) into
            the directory it is given, which does not exist yet (e.g. a partial of
            ``moog_ros.model.checkpoint.save_checkpoint``).
        trainer_state: saved as ``trainer_state.pt`` with a format tag added; tensors,
            numbers, strings and containers of those only (it is loaded with
            ``weights_only=True``).

    Returns:
        ``dest``.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Staging folders of a writer killed earlier (kill -9, power loss) are never finished.
    for stale in dest.parent.glob(f'.{dest.name}.tmp-*'):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f'.{dest.name}.tmp-', dir=dest.parent))
    try:
        fresh = staging / 'checkpoint'
        write_model(fresh)
        if not (fresh / 'config.json').is_file():
            raise RuntimeError(f'write_model did not write {fresh / "config.json"}')
        state = {'format': TRAINER_STATE_FORMAT, **trainer_state}
        with (fresh / TRAINER_STATE_FILE).open('wb') as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        _fsync_tree(fresh)
        if dest.exists() and _exchange_dirs(fresh, dest):
            # One atomic step: dest is the new checkpoint, fresh the old one (removed below).
            # A kill at any moment leaves dest complete, old or new.
            pass
        else:
            # No atomic exchange here (not Linux, or a filesystem without it): a directory
            # cannot be renamed over a non-empty one, so the old one moves aside first; if we
            # die between the two renames, find_checkpoint() recovers the aside copy.
            aside = None
            if dest.exists():
                aside = dest.parent / f'.{dest.name}.old-{os.getpid()}'
                if aside.exists():
                    shutil.rmtree(aside)
                os.replace(dest, aside)
            os.replace(fresh, dest)
            if aside is not None:
                shutil.rmtree(aside, ignore_errors=True)
        _fsync_dir(dest.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange_dirs(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or filesystem cannot (the caller then falls back to two renames)."""
    if not sys.platform.startswith('linux'):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # glibc < 2.28 or another libc
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(error, f'renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(error)}')


def _fsync_dir(path: Path) -> None:
    """Makes the renames in ``path`` durable (a crash of the machine, not only the process)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(path: Path) -> None:
    """fsync every file of a freshly written checkpoint and the folder itself."""
    for child in path.iterdir():
        if child.is_file():
            with contextlib.suppress(OSError), child.open('rb') as handle:
                os.fsync(handle.fileno())
    _fsync_dir(path)


def find_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint to resume a run from: ``checkpoints/latest``, else the newest complete
    ``step_*`` (or a ``latest`` left aside by an interrupted swap); None if there is none."""
    ckpt_root = Path(run_dir) / CHECKPOINTS_DIR
    latest = ckpt_root / LATEST
    if (latest / TRAINER_STATE_FILE).is_file():
        return latest
    candidates = [p for p in ckpt_root.glob('step_*') if (p / TRAINER_STATE_FILE).is_file()]
    candidates += [p for p in ckpt_root.glob(f'.{LATEST}.old-*')
                   if (p / TRAINER_STATE_FILE).is_file()]
    if not candidates:
        return None
    return max(candidates, key=lambda p: p.stat().st_mtime)


def step_checkpoint_name(step: int) -> str:
    """``step_000123`` for periodic checkpoints."""
    return f'step_{step:06d}'


_REQUIRED_STATE_KEYS = ('format', 'step', 'optimizer', 'scheduler', 'data_position')


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    """Read ``trainer_state.pt`` (a checkpoint directory or the file itself) safely.

    Raises:
        CheckpointError: missing, unreadable (corrupt / truncated / not weights-only) or
            incomplete, naming the file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / TRAINER_STATE_FILE
    state = load_state_dict_file(path)   # weights_only=True; CheckpointError names the file
    missing = [key for key in _REQUIRED_STATE_KEYS if key not in state]
    if missing:
        raise CheckpointError(f'{path}: not a complete trainer state: missing key(s) '
                              f'{", ".join(missing)}')
    if state['format'] != TRAINER_STATE_FORMAT:
        raise CheckpointError(f'{path}: unknown trainer state format {state["format"]!r}; '
                              f'expected {TRAINER_STATE_FORMAT!r}')
    return state


def restore_trainer_state(state: Mapping[str, Any], *, optimizer: torch.optim.Optimizer,
                          scheduler: torch.optim.lr_scheduler.LambdaLR | None,
                          source: str | Path) -> None:
    """Load optimiser moments and the schedule position; errors name ``source``.

    The *current* config keeps the say on hyperparameters: the optimiser's lr, betas, eps and
    weight decay and the scheduler's peak lr and schedule (warm-up, total steps) are the ones
    ``optimizer``/``scheduler`` were built with, so a resumed run can be extended
    (``train.steps``) or re-tuned. Only the moments, step counts and schedule position come from
    the checkpoint. With an unchanged config the next learning rate is bit-identical to the one
    the interrupted run would have used.
    """
    configured = [{k: v for k, v in group.items() if k != 'params'}
                  for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(state['optimizer'])
        if scheduler is not None:
            saved = {k: v for k, v in state['scheduler'].items() if k != 'base_lrs'}
            saved['lr_lambdas'] = [None] * len(scheduler.lr_lambdas)   # None = keep ours
            scheduler.load_state_dict(saved)
    except (ValueError, KeyError, RuntimeError) as error:
        raise CheckpointError(f'{source}: optimizer/scheduler state does not fit this model '
                              f'and config: {error}') from error
    for group, settings in zip(optimizer.param_groups, configured):
        group.update(settings)
    if scheduler is not None:
        # The same expression LambdaLR.step() evaluates, at the restored position.
        lrs = [base_lr * schedule(scheduler.last_epoch)
               for schedule, base_lr in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
        for group, lr in zip(optimizer.param_groups, lrs):
            group['lr'] = lr
        scheduler._last_lr = lrs   # what get_last_lr() reports


def parameter_digest(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer (name, dtype, shape, bytes): equal iff identical."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f'{name}:{data.dtype}:{tuple(data.shape)}'.encode())
        # reshape(-1): 0-d buffers (batch-norm counters) cannot be viewed as bytes directly.
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes()
                      if data.numel() else b'')
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Interruption

class StopSignal:
    """Context manager: SIGINT/SIGTERM set ``requested`` instead of killing the process.

    The training loop checks the flag between steps, writes a checkpoint and exits cleanly. A
    second signal raises ``KeyboardInterrupt`` for an immediate stop.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> StopSignal:
        for signum in (signal.SIGINT, signal.SIGTERM):
            # signal.signal raises ValueError off the main thread: keep default handling there.
            with contextlib.suppress(ValueError):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


# ----------------------------------------------------------------------------------------------
# The parts of a training script's run that pretraining and readout fitting share

def add_config_arguments(parser: argparse.ArgumentParser, sections: str) -> None:
    """Add ``--config`` (a YAML file with the given ``sections``, e.g. 'model/data/optim/train')
    and the repeatable ``--set KEY=VALUE``."""
    parser.add_argument('--config', type=Path, default=None,
                        help=f'YAML config (sections {sections}); on --resume the run '
                             "folder's config.yaml is used when omitted")
    parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                        help='override one config value, e.g. --set train.steps=1000 '
                             '(repeatable; applied after --config)')


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``--data`` / ``--val-data`` shortcuts for ``--set data.train|data.val=SPEC``."""
    parser.add_argument('--data', default=None,
                        help='shortcut for --set data.train=SPEC (DIR, clips:DIR, '
                             'bag:PATH[,PATH], movi:PATH; comma-separated list)')
    parser.add_argument('--val-data', default=None, help='shortcut for --set data.val=SPEC')


def add_run_dir_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--out`` (the run folder) and ``--resume``."""
    parser.add_argument('--out', type=Path, required=True, help='run folder (created)')
    parser.add_argument('--resume', action='store_true',
                        help='continue the run in --out from its latest checkpoint')


def config_file_for(args: argparse.Namespace) -> Path | None:
    """``--config``, or on ``--resume`` without it the run folder's ``config.yaml`` if any."""
    if args.config is None and args.resume and (args.out / 'config.yaml').is_file():
        return args.out / 'config.yaml'
    return args.config


def init_process(train: Any, device: torch.device, rank: int) -> contextlib.AbstractContextManager:
    """Apply ``train.threads`` and seed this rank; returns the autocast context for the steps
    (bf16 on CUDA when ``train.bf16``; on the CPU only with ``train.cpu_bf16`` as well, where
    AMX makes bf16 matmuls 2-5x faster but the accuracy cost must be measured per recipe)."""
    if train.threads:
        torch.set_num_threads(train.threads)
    seed_all(train.seed + rank)
    if train.bf16 and device.type == 'cuda':
        return torch.autocast('cuda', dtype=torch.bfloat16)
    if train.bf16 and device.type == 'cpu' and getattr(train, 'cpu_bf16', False):
        return torch.autocast('cpu', dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resume_training(trainer_state: Mapping[str, Any] | None, *,
                    optimizer: torch.optim.Optimizer, scheduler: Any,
                    resume_dir: str | Path | None, dist_info: DistInfo) -> int:
    """Restore optimiser, scheduler and (same world size only) this rank's RNG state from a
    loaded trainer state; returns the step to continue from (0 without a state)."""
    if trainer_state is None:
        return 0
    restore_trainer_state(trainer_state, optimizer=optimizer, scheduler=scheduler,
                          source=Path(resume_dir) / TRAINER_STATE_FILE)
    rng_states = trainer_state.get('rng', [])
    if len(rng_states) == dist_info.world_size:
        restore_rng_state(rng_states[dist_info.rank])
    return int(trainer_state['step'])


def save_run_checkpoints(run_dir: Path, names: Sequence[str], *, step: int,
                         optimizer: torch.optim.Optimizer, scheduler: Any, global_batch: int,
                         seed: int, write_model: Callable[[Path], None],
                         dist_info: DistInfo) -> None:
    """Write ``checkpoints/<name>`` for each of ``names``: the model (``write_model``) plus the
    trainer state of ``step`` with every rank's RNG state. Collective: every rank calls it;
    rank 0 writes and all wait."""
    rng_states = all_gather_objects(capture_rng_state(), dist_info)
    if dist_info.is_main:
        state = {'step': step, 'optimizer': optimizer.state_dict(),
                 'scheduler': scheduler.state_dict(), 'rng': rng_states,
                 'data_position': {'samples_seen': step * global_batch,
                                   'global_batch': global_batch,
                                   'world_size': dist_info.world_size, 'seed': seed}}
        for name in names:
            save_training_checkpoint(run_dir / CHECKPOINTS_DIR / name, write_model=write_model,
                                     trainer_state=state)
    barrier(dist_info)


def checkpoint_names(step: int, train: Any, stop: StopSignal, dist_info: DistInfo, *,
                     start_step: int = 0, stop_after: int = 0) -> tuple[list[str], bool]:
    """The checkpoints to write after ``step`` and whether the run stops there.

    ``latest`` every ``train.checkpoint_interval`` steps and at ``train.steps``,
    ``step_XXXXXX`` every ``train.keep_interval`` (0 = never), and ``latest`` whenever any rank
    got a stop signal or ``stop_after`` steps of this invocation (counted from ``start_step``;
    0 = no limit) are done before ``train.steps`` (then ``stop.signal_name`` says so).
    Collective: every rank calls it.
    """
    names = []
    if step % train.checkpoint_interval == 0 or step == train.steps:
        names.append(LATEST)
    if train.keep_interval and step % train.keep_interval == 0:
        names.append(step_checkpoint_name(step))
    interrupted = any_rank(stop.requested, dist_info)
    if stop_after and step - start_step >= stop_after and step < train.steps:
        interrupted = True
        stop.signal_name = stop.signal_name or f'train.stop_after={stop_after}'
    if interrupted and LATEST not in names:
        names.append(LATEST)
    return names, interrupted


def finish_run(prog: str, model: nn.Module, logger: MetricsLogger, dist_info: DistInfo, *,
               step: int, interrupted: bool, diverged: bool, stop: StopSignal, run_dir: Path,
               final: Mapping[str, Any] | None = None, checkpoint: str = 'checkpoint') -> int:
    """Log the 'final' metrics row (``final`` adds fields before the parameter digests), close
    the logger and say how the run ended; returns the exit code.

    1 when the loss diverged or the DDP replicas' parameters differ, else 0 (finished or stopped
    with a checkpoint; ``checkpoint`` names what ``latest`` holds in the message).
    """
    digests = all_gather_objects(parameter_digest(model), dist_info)
    logger.log({'kind': 'final', 'step': step, 'interrupted': interrupted, **(final or {}),
                'param_digests': digests})
    logger.close()
    if diverged:
        return 1
    if len(set(digests)) != 1:
        print0(dist_info, f'{prog}: DDP replicas diverged: parameter digests {digests}',
               file=sys.stderr)
        return 1
    if interrupted:
        cause = stop.signal_name or 'a signal to another rank'
        print0(dist_info, f'{prog}: stopped by {cause} at step {step}; checkpoint written. '
               f'Continue with: --out {run_dir} --resume')
    else:
        print0(dist_info, f'{prog}: done, {step} steps; {checkpoint} in '
               f'{run_dir / CHECKPOINTS_DIR / LATEST}')
    return 0


def check(condition: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition`` (config-section validation)."""
    if not condition:
        raise ValueError(message)


def check_data_section(section: Any) -> None:
    """Validate the window fields every ``data`` config section has."""
    check(0.0 <= section.val_fraction < 1.0,
          f'data.val_fraction must be in [0, 1), got {section.val_fraction}')
    check(section.num_frames >= 1 and section.frame_step >= 1 and section.window_stride >= 1,
          'data.num_frames, data.frame_step and data.window_stride must be >= 1')
    check(section.val_windows >= 1, f'data.val_windows must be >= 1, got {section.val_windows}')
    check(section.workers >= 0, f'data.workers must be >= 0, got {section.workers}')


def check_train_section(section: Any) -> None:
    """Validate the schedule fields every ``train`` config section has."""
    check(section.steps >= 1, f'train.steps must be >= 1, got {section.steps}')
    check(section.batch_size >= 1, f'train.batch_size must be >= 1, got {section.batch_size}')
    for name in ('log_interval', 'eval_interval', 'checkpoint_interval'):
        check(getattr(section, name) >= 1, f'train.{name} must be >= 1')
    check(section.keep_interval >= 0, 'train.keep_interval must be >= 0')


def open_train_val(section: Any, **source_options: Any
                   ) -> tuple[data.WindowSource, data.WindowSource | None]:
    """The training and validation sources of a ``data`` config section: ``data.val`` when
    given, else ``data.val_fraction`` held out of ``data.train`` (0 = no validation)."""
    train_source = data.open_sources(section.train, **source_options)
    val_source = None
    if section.val:
        val_source = data.open_sources(section.val, **source_options)
    elif section.val_fraction > 0:
        train_source, val_source = data.holdout_split(train_source, section.val_fraction)
    return train_source, val_source


def make_loaders(train_source: data.WindowSource, val_source: data.WindowSource | None, *,
                 data_section: Any, train: Any, image_size: Any, start_step: int,
                 dist_info: DistInfo) -> tuple[Any, Any, int]:
    """This rank's loaders: random training windows for steps ``start_step`` .. ``train.steps``
    and its shard of up to ``data_section.val_windows`` validation windows (None without a
    validation source). Returns (train loader, val loader, number of validation windows)."""
    rank, world, device = dist_info.rank, dist_info.world_size, dist_info.device
    window_args = {'num_frames': data_section.num_frames, 'frame_step': data_section.frame_step,
                   'image_size': image_size}
    train_set = data.TrainWindows(train_source, seed=train.seed,
                                  crop_scale=data_section.crop_scale, flip=data_section.flip,
                                  **window_args)
    sampler = data.StepBatchSampler(train.batch_size, rank=rank, world_size=world,
                                    start_step=start_step,
                                    num_steps=max(0, train.steps - start_step))
    train_loader = data.make_loader(train_set, batch_sampler=sampler,
                                    num_workers=data_section.workers, device=device)
    if val_source is None:
        return train_loader, None, 0
    val_set = data.EvalWindows(val_source, max_windows=data_section.val_windows, **window_args)
    shard = torch.utils.data.Subset(val_set, range(rank, len(val_set), world))
    val_loader = data.make_loader(shard, batch_size=train.batch_size,
                                  num_workers=data_section.workers, device=device)
    return train_loader, val_loader, len(val_set)

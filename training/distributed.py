"""torchrun environment -> process group, rank-0-only I/O and cross-rank reductions.

One process is the default. Under ``torchrun`` (which sets ``RANK``, ``LOCAL_RANK`` and
``WORLD_SIZE``) :func:`init_distributed` joins the process group: gloo on CPU, nccl on CUDA, each
rank on its own GPU. Everything else here works in both cases, so training scripts call the same
functions whether or not they were launched by torchrun::

    dist_info = init_distributed('auto')
    try:
        ...
        metrics = all_reduce_mean({'loss': loss.item()}, dist_info)
        if dist_info.is_main:
            write(metrics)
    finally:
        cleanup_distributed(dist_info)
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
import datetime
import os

import torch
from torch import nn
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the (possibly one-process) job."""

    rank: int                  # global rank, 0 .. world_size-1
    local_rank: int            # rank on this machine (selects the GPU)
    world_size: int            # number of processes in the job
    device: torch.device       # the device this rank computes on
    backend: str | None        # 'gloo' | 'nccl' when a process group is up, None when single

    @property
    def is_main(self) -> bool:
        """True on the one rank that logs and writes files."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """True when a process group is initialised (even a one-rank torchrun job)."""
        return self.backend is not None


def launched_by_torchrun() -> bool:
    """True when the torchrun rank variables are present in the environment."""
    return all(key in os.environ for key in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """Turn a device spec into a device.

    Args:
        spec: 'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'.
        local_rank: the GPU index used for a bare 'cuda' (and for 'auto') under torchrun.

    Returns:
        The device.

    Raises:
        ValueError: for an unknown spec or CUDA requested where none is available.
    """
    if spec == 'auto':
        spec = 'cuda' if torch.cuda.is_available() else 'cpu'
    if spec == 'cpu':
        return torch.device('cpu')
    if spec == 'cuda' or spec.startswith('cuda:'):
        if not torch.cuda.is_available():
            raise ValueError(f'device {spec!r} requested but CUDA is not available')
        index = local_rank if spec == 'cuda' else int(spec.split(':', 1)[1])
        if index >= torch.cuda.device_count():
            raise ValueError(
                f'device cuda:{index} requested but only {torch.cuda.device_count()} GPU(s) exist')
        return torch.device('cuda', index)
    raise ValueError(f"unknown device {spec!r}; expected 'auto', 'cpu', 'cuda' or 'cuda:N'")


def _int_env(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f'environment variable {name}={value!r} is not an integer') from None


def init_distributed(device: str = 'auto', timeout_s: float = 1800.0) -> DistInfo:
    """Join the torchrun process group if launched by torchrun, else describe a single process.

    Args:
        device: device spec (see :func:`resolve_device`); under torchrun a bare 'cuda' or 'auto'
            picks the GPU of ``LOCAL_RANK``.
        timeout_s: collective timeout; long enough for a checkpoint write on a slow disk.

    Returns:
        The rank/world/device description of this process.
    """
    if not launched_by_torchrun():
        return DistInfo(rank=0, local_rank=0, world_size=1, device=resolve_device(device),
                        backend=None)
    rank, local_rank, world_size = (_int_env('RANK'), _int_env('LOCAL_RANK'),
                                    _int_env('WORLD_SIZE'))
    torch_device = resolve_device(device, local_rank)
    backend = 'nccl' if torch_device.type == 'cuda' else 'gloo'
    if torch_device.type == 'cuda':
        torch.cuda.set_device(torch_device)
    elif os.environ.get('MASTER_ADDR') in ('localhost', '127.0.0.1') \
            and 'GLOO_SOCKET_IFNAME' not in os.environ:
        # gloo otherwise binds to the interface of the machine's host name, which in containers
        # is often not routable (and would send a single-machine job's traffic off loopback).
        os.environ['GLOO_SOCKET_IFNAME'] = 'lo'
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=torch_device if backend == 'nccl' else None)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=torch_device,
                    backend=backend)


def cleanup_distributed(info: DistInfo) -> None:
    """Leave the process group (no-op for a single process)."""
    if info.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op for a single process)."""
    if info.is_distributed:
        if info.backend == 'nccl':
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def all_reduce_mean(values: Mapping[str, float], info: DistInfo) -> dict[str, float]:
    """Average scalar metrics over ranks (identity for a single process).

    Args:
        values: name -> this rank's value. Every rank must pass the same names in the same order.
        info: the job description.

    Returns:
        name -> mean over ranks, as Python floats.
    """
    names = list(values)
    if not info.is_distributed:
        return {name: float(values[name]) for name in names}
    packed = torch.tensor([float(values[name]) for name in names], dtype=torch.float64,
                          device=info.device)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    packed /= info.world_size
    return dict(zip(names, packed.tolist()))


def all_reduce_sum(values: Mapping[str, float], info: DistInfo) -> dict[str, float]:
    """Sum scalar values over ranks (identity for a single process); same contract as the mean."""
    names = list(values)
    if not info.is_distributed:
        return {name: float(values[name]) for name in names}
    packed = torch.tensor([float(values[name]) for name in names], dtype=torch.float64,
                          device=info.device)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    return dict(zip(names, packed.tolist()))


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when ``flag`` is true on at least one (e.g. a stop request)."""
    if not info.is_distributed:
        return flag
    packed = torch.tensor([1 if flag else 0], dtype=torch.int32, device=info.device)
    dist.all_reduce(packed, op=dist.ReduceOp.MAX)
    return bool(packed.item())


def all_gather_objects(obj: object, info: DistInfo) -> list:
    """Collect one small picklable object from every rank, in rank order, on every rank."""
    if not info.is_distributed:
        return [obj]
    gathered: list = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def print0(info: DistInfo, *args: object, **kwargs: object) -> None:
    """``print`` on rank 0 only."""
    if info.is_main:
        print(*args, **kwargs, flush=True)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under a DDP and/or torch.compile wrapper."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, '_orig_mod'):   # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model

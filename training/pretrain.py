"""MooG next-frame pretraining: predict every frame from the tokens of the frames before it.

    python -m moog_ros.training.pretrain --config config/pretrain_small.yaml --out runs/small
    python -m moog_ros.training.pretrain --config config/pretrain_small.yaml --out runs/small \\
        --set data.train=data/clips --set train.steps=50000 --set optim.lr=5e-4
    torchrun --nproc_per_node=2 -m moog_ros.training.pretrain --config ... --out runs/ddp
    python -m moog_ros.training.pretrain --out runs/small --resume        # continue exactly

The loss is the official one: MSE between the decoded *prediction* of each frame (from the
predicted tokens, before the frame is seen) and the frame's pixels, at a random strided subset
of pixels (``decoder.train_factor``), over all T frames including frame 0 (predicted from the
initial noise state).

The run folder holds ``config.yaml``/``config.json`` (resolved config), ``metrics.jsonl`` (rows
with ``kind`` 'train' | 'val' | 'final') and ``checkpoints/{latest,step_XXXXXX}/`` (model
checkpoint + ``trainer_state.pt``). Every random draw is a function of (seed, step, rank), so
``--resume`` continues bit-for-bit (on CPU) where the run stopped; SIGINT/SIGTERM write a
checkpoint first.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
from dataclasses import dataclass, field
import math
from pathlib import Path
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from moog_ros.clips import ClipFormatError
from moog_ros.model import (
    CheckpointError,
    Moog,
    MoogConfig,
    get_config,
    load_checkpoint,
    save_checkpoint,
)
from moog_ros.training import common
from moog_ros.training.distributed import (
    DistInfo,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    cleanup_distributed,
    init_distributed,
    print0,
)

# ----------------------------------------------------------------------------------------------
# Config (YAML sections mirror these dataclasses; see config/pretrain_*.yaml)

def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class ModelSection:
    preset: str = 'small'   # moog_ros.model.get_config preset
    # Nested MoogConfig keys to change, e.g. {num_tokens: 64, decoder: {train_factor: 4}}.
    overrides: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DataSection:
    train: str = 'data/clips'   # --data spec(s): DIR | clips:DIR | bag:PATH[,PATH] | movi:PATH
    val: str = ''               # validation spec; '' = hold out val_fraction of train
    val_fraction: float = 0.1   # used when val is ''; 0 = no validation
    val_windows: int = 64       # at most this many validation windows (evenly spread)
    num_frames: int = 8         # T frames per training window (official: 8)
    frame_step: int = 1         # take every n-th frame (frame-rate subsampling)
    window_stride: int = 1      # frames between window starts inside a clip
    crop_scale: tuple[float, float] = (0.6, 1.0)   # random crop side range (of the largest)
    flip: bool = True           # random horizontal flips
    workers: int = 0            # DataLoader worker processes per rank
    topic: str = ''             # bag sources: colour image topic ('' = the only one)

    def __post_init__(self) -> None:
        common.check_data_section(self)


@dataclass(frozen=True)
class OptimSection:
    lr: float = 3e-4            # peak learning rate (official paper run: 1e-4 at batch 128)
    warmup_steps: int = 500     # linear warm-up (official: 1000)
    final_lr_ratio: float = 1e-3   # cosine decays to lr * this (official: 1e-7 / 1e-4)
    weight_decay: float = 1e-4  # AdamW decoupled decay on all parameters
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0      # global gradient-norm clip (0 = off)

    def __post_init__(self) -> None:
        _check(self.lr > 0, f'optim.lr must be > 0, got {self.lr}')
        _check(self.warmup_steps >= 0, 'optim.warmup_steps must be >= 0')
        _check(0.0 <= self.final_lr_ratio <= 1.0, 'optim.final_lr_ratio must be in [0, 1]')
        _check(self.grad_clip >= 0, 'optim.grad_clip must be >= 0')


@dataclass(frozen=True)
class TrainSection:
    steps: int = 20000          # total optimisation steps
    batch_size: int = 8         # windows per step *per rank*
    seed: int = 0
    device: str = 'auto'        # auto | cpu | cuda | cuda:N
    bf16: bool = True           # bf16 autocast on CUDA (ignored on CPU)
    compile: bool = False       # torch.compile the model
    checkpoint_steps: bool = False   # gradient checkpointing per frame step (saves memory)
    threads: int = 0            # torch.set_num_threads per rank (0 = leave the default)
    log_interval: int = 10      # steps between metrics rows
    eval_interval: int = 500    # steps between validations (and at the end)
    checkpoint_interval: int = 500   # steps between writes of checkpoints/latest
    keep_interval: int = 5000   # steps between kept checkpoints/step_XXXXXX (0 = none)
    # Stop (checkpoint and exit, as on SIGINT) after this many steps of *this* invocation;
    # 0 = run to train.steps. For time-sliced jobs: resume later with --resume.
    stop_after: int = 0

    def __post_init__(self) -> None:
        common.check_train_section(self)
        _check(self.stop_after >= 0, 'train.stop_after must be >= 0')
        _check(self.threads >= 0, 'train.threads must be >= 0')


@dataclass(frozen=True)
class PretrainConfig:
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    optim: OptimSection = OptimSection()
    train: TrainSection = TrainSection()

    def moog_config(self) -> MoogConfig:
        """The model config: the preset with ``model.overrides`` merged in (validated)."""
        base = get_config(self.model.preset).to_dict()
        merged = _merge_overrides(base, self.model.overrides, 'model.overrides')
        return MoogConfig.from_dict(merged, where='model')


def _merge_overrides(base: dict, overrides: dict, where: str) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        if key not in base:
            raise ValueError(f'{where}.{key}: not a MoogConfig key; known: {sorted(base)}')
        if isinstance(value, dict) and isinstance(base[key], dict):
            out[key] = _merge_overrides(base[key], value, f'{where}.{key}')
        else:
            out[key] = value
    return out


# ----------------------------------------------------------------------------------------------
# Loss and evaluation

def gather_pixels(video: torch.Tensor, coords_xy: torch.Tensor) -> torch.Tensor:
    """Pixels of ``video [B, T, H, W, C]`` at integer ``coords_xy [B, T, Q, 2]``: [B, T, Q, C]."""
    B, T, H, W, C = video.shape
    index = coords_xy[..., 1].long() * W + coords_xy[..., 0].long()   # [B, T, Q]
    return video.flatten(2, 3).gather(2, index[..., None].expand(-1, -1, -1, C))


def psnr(mse: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of images in [0, 1] from their MSE (floored at 1e-10)."""
    return -10.0 * torch.log10(mse.clamp_min(1e-10))


@torch.no_grad()
def evaluate(model: Moog, loader: torch.utils.data.DataLoader, dist_info: DistInfo,
             seed: int, autocast: contextlib.AbstractContextManager) -> dict[str, float]:
    """Validation metrics over this rank's shard, summed over ranks.

    Decodes at ``decoder.eval_factor`` (no random shift) with a fixed initial-state seed, so the
    numbers are comparable across evaluations. PSNRs are per-window (frames 1..T-1, predictions
    clamped to [0, 1]) averaged over windows; the copy-last-frame baseline predicts frame t with
    frame t-1 at the same pixels.

    Returns:
        ``val_loss`` (MSE of all T frames, as the training loss), ``val_psnr``,
        ``val_psnr_copy_last``, ``val_windows``.
    """
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    sums = {'loss': 0.0, 'psnr': 0.0, 'psnr_copy_last': 0.0, 'windows': 0.0}
    for batch in loader:
        video = batch['video'].to(dist_info.device, non_blocking=True)   # [B, T, H, W, 3]
        with autocast:
            clip, _ = model(video, decode='eval', generator=generator)
        rgb = clip.rgb.float()                                  # [B, T, Q, 3]
        target = gather_pixels(video, clip.coords_xy)           # [B, T, Q, 3]
        previous = gather_pixels(video[:, :-1], clip.coords_xy[:, 1:])   # [B, T-1, Q, 3]
        loss = (rgb - target).square().mean(dim=(1, 2, 3))      # [B]
        mse_model = (rgb[:, 1:].clamp(0, 1) - target[:, 1:]).square().mean(dim=(1, 2, 3))
        mse_copy = (previous - target[:, 1:]).square().mean(dim=(1, 2, 3))
        sums['loss'] += loss.sum().item()
        sums['psnr'] += psnr(mse_model).sum().item()
        sums['psnr_copy_last'] += psnr(mse_copy).sum().item()
        sums['windows'] += video.shape[0]
    model.train()
    sums = all_reduce_sum(sums, dist_info)
    count = max(sums['windows'], 1.0)
    return {'val_loss': sums['loss'] / count, 'val_psnr': sums['psnr'] / count,
            'val_psnr_copy_last': sums['psnr_copy_last'] / count,
            'val_windows': int(sums['windows'])}


# ----------------------------------------------------------------------------------------------
# Command line

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog='moog_pretrain', description='MooG next-frame pretraining (single process or '
        'torchrun DDP).', formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_config_arguments(parser, 'model/data/optim/train')
    common.add_data_arguments(parser)
    common.add_run_dir_arguments(parser)
    parser.add_argument('--resume-from', type=Path, default=None,
                        help='start --out from this training checkpoint directory (a '
                             'checkpoints/step_XXXXXX of another run) and continue exactly')
    args = parser.parse_args(argv)
    if args.resume and args.resume_from is not None:
        parser.error('use either --resume or --resume-from, not both')
    return args


def main(argv: list[str] | None = None) -> int:
    """Run pretraining; returns the process exit code."""
    args = parse_args(argv)

    # ---- resolve the config: defaults <- YAML <- --set ---------------------------------------
    config_file = common.config_file_for(args)
    overrides = list(args.set)
    if args.data is not None:
        overrides.append(f'data.train={args.data}')
    if args.val_data is not None:
        overrides.append(f'data.val={args.val_data}')
    try:
        cfg = common.build_config(PretrainConfig, config_file, overrides)
        moog_cfg = cfg.moog_config()
    except ValueError as error:   # ConfigError is a ValueError; so is MoogConfig's
        print(f'moog_pretrain: config error: {error}', file=sys.stderr)
        return 2

    # ---- processes, device, seeds ------------------------------------------------------------
    dist_info = init_distributed(cfg.train.device)
    try:
        code = _train(args, cfg, moog_cfg, dist_info)
        # Every rank finishes its last collective before any tears the group down: a
        # gloo peer that leaves early aborts a rank still in flight ("terminate called").
        barrier(dist_info)
        return code
    except (CheckpointError, ClipFormatError, common.ConfigError, FileExistsError,
            FileNotFoundError) as error:
        # Bad input (files, folders, checkpoints): the message names it; no traceback needed.
        print(f'moog_pretrain: error: {error}', file=sys.stderr)
        return 2
    finally:
        cleanup_distributed(dist_info)


def _train(args: argparse.Namespace, cfg: PretrainConfig, moog_cfg: MoogConfig,
           dist_info: DistInfo) -> int:
    device, rank, world = dist_info.device, dist_info.rank, dist_info.world_size
    autocast = common.init_process(cfg.train, device, rank)
    global_batch = cfg.train.batch_size * world

    # ---- where to start from -----------------------------------------------------------------
    resume_dir = None
    if args.resume:
        resume_dir = common.find_checkpoint(args.out)
        if resume_dir is None:
            print0(dist_info, f'moog_pretrain: --resume: no checkpoint in {args.out}/checkpoints',
                   file=sys.stderr)
            return 2
    elif args.resume_from is not None:
        resume_dir = args.resume_from
    run_dir = args.out
    # Every rank checks the folder (read-only, identical outcome), so a refusal stops all ranks
    # instead of leaving the others waiting at the barrier.
    common.prepare_run_dir(run_dir, resume=args.resume)
    barrier(dist_info)
    if dist_info.is_main:
        # Pin the whole model config, not just the preset name: a later change to the preset in
        # code must not change (or refuse) the resume of this run.
        pinned = dataclasses.replace(cfg.model, overrides=moog_cfg.to_dict())
        common.write_resolved_config(run_dir, dataclasses.replace(cfg, model=pinned))

    # ---- model, optimiser, schedule ----------------------------------------------------------
    if resume_dir is not None:
        loaded = load_checkpoint(resume_dir, map_location=device, expected_kind='moog')
        model = loaded.model
        if model.config != moog_cfg:
            raise CheckpointError(f'{resume_dir}/config.json: its model config differs from the '
                                  'requested one (model.preset / model.overrides); resume with '
                                  'the same model config')
        trainer_state = common.load_trainer_state(resume_dir)
    else:
        torch.manual_seed(cfg.train.seed)   # identical initial weights on every rank
        model = Moog(moog_cfg).to(device)
        trainer_state = None
    model.train()
    optimizer = common.build_adamw(model.parameters(), lr=cfg.optim.lr,
                                   weight_decay=cfg.optim.weight_decay,
                                   betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
                                   device=device)
    scheduler = common.build_scheduler(optimizer, warmup_steps=cfg.optim.warmup_steps,
                                       total_steps=cfg.train.steps,
                                       final_ratio=cfg.optim.final_lr_ratio)
    start_step = common.resume_training(trainer_state, optimizer=optimizer, scheduler=scheduler,
                                        resume_dir=resume_dir, dist_info=dist_info)
    train_model: torch.nn.Module = model
    if dist_info.is_distributed:
        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None)
    if cfg.train.compile:
        train_model = torch.compile(train_model)

    # ---- data --------------------------------------------------------------------------------
    source_options = {'num_frames': cfg.data.num_frames, 'frame_step': cfg.data.frame_step,
                      'window_stride': cfg.data.window_stride, 'labels': False,
                      'topic': cfg.data.topic or None, 'progress': dist_info.is_main}
    train_source, val_source = common.open_train_val(cfg.data, **source_options)
    train_loader, val_loader, num_val_windows = common.make_loaders(
        train_source, val_source, data_section=cfg.data, train=cfg.train,
        image_size=moog_cfg.image_size, start_step=start_step, dist_info=dist_info)
    num_params = sum(p.numel() for p in model.parameters())
    print0(dist_info, f'moog_pretrain: {num_params / 1e6:.2f}M parameters ({cfg.model.preset}), '
           f'{len(train_source)} training windows from {train_source.name}, '
           f'{num_val_windows} validation windows, {world} rank(s) on {device}, '
           f'global batch {global_batch}, steps {start_step} -> {cfg.train.steps}')

    # ---- checkpoint writer (rank 0 writes; everyone waits) -----------------------------------
    logger = common.MetricsLogger(run_dir / 'metrics.jsonl', enabled=dist_info.is_main,
                                  resume_step=start_step if resume_dir is not None else None)
    last_val: dict[str, Any] = {}

    def save(step: int, names: list[str]) -> None:
        def write_model(path: Path) -> None:
            meta = {'step': step, 'run': str(run_dir), 'data': cfg.data.train,
                    'samples_seen': step * global_batch, **last_val}
            configs = {'model': moog_cfg.to_dict(), 'pretrain': common.config_to_dict(cfg)}
            save_checkpoint(path, model, configs=configs, meta=meta)

        common.save_run_checkpoints(run_dir, names, step=step, optimizer=optimizer,
                                    scheduler=scheduler, global_batch=global_batch,
                                    seed=cfg.train.seed, write_model=write_model,
                                    dist_info=dist_info)

    # ---- the loop ----------------------------------------------------------------------------
    progress = tqdm(total=cfg.train.steps, initial=start_step, disable=not dist_info.is_main,
                    dynamic_ncols=True, mininterval=1.0, desc='pretrain')
    step = start_step
    interrupted = diverged = False
    tick, tick_step = time.perf_counter(), step
    with common.StopSignal() as stop:
        for batch in train_loader:
            video = batch['video'].to(device, non_blocking=True)   # [B, T, H, W, 3] in [0, 1]
            # Initial-state noise and decode shifts: a function of (seed, step, rank) only.
            generator = torch.Generator().manual_seed(
                (cfg.train.seed * 1_000_003 + step) * 1009 + rank)
            with autocast:
                clip, _ = train_model(video, decode='train', generator=generator,
                                      checkpoint_steps=cfg.train.checkpoint_steps or None)
            target = gather_pixels(video, clip.coords_xy)           # [B, T, Q, 3]
            loss = F.mse_loss(clip.rgb.float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            lr = optimizer.param_groups[0]['lr']
            optimizer.step()
            scheduler.step()
            step += 1
            progress.update(1)

            if step % cfg.train.log_interval == 0 or step == cfg.train.steps:
                now = time.perf_counter()
                metrics = all_reduce_mean({'loss': loss.item(), 'grad_norm': grad_norm.item()},
                                          dist_info)
                row = {'kind': 'train', 'step': step, 'loss': metrics['loss'],
                       'psnr': psnr(torch.tensor(metrics['loss'])).item(), 'lr': lr,
                       'grad_norm': metrics['grad_norm'],
                       'samples_per_s': (step - tick_step) * global_batch / (now - tick)}
                logger.log(row)
                progress.set_postfix(loss=f'{row["loss"]:.4f}', psnr=f'{row["psnr"]:.2f}')
                tick, tick_step = now, step
                if not math.isfinite(row['loss']):   # every rank sees the same mean
                    print0(dist_info, f'moog_pretrain: loss is {row["loss"]} at step {step}; '
                           'stopping (lower optim.lr or check the data)', file=sys.stderr)
                    diverged = True
                    break

            if val_loader is not None and (step % cfg.train.eval_interval == 0
                                           or step == cfg.train.steps):
                last_val = evaluate(model, val_loader, dist_info, cfg.train.seed, autocast)
                logger.log({'kind': 'val', 'step': step, **last_val})
                if dist_info.is_main:
                    progress.write(f'step {step}: val loss {last_val["val_loss"]:.5f}, PSNR '
                                   f'{last_val["val_psnr"]:.2f} dB (copy-last-frame '
                                   f'{last_val["val_psnr_copy_last"]:.2f} dB)')
                tick = time.perf_counter()   # do not count evaluation in samples/s

            names, interrupted = common.checkpoint_names(step, cfg.train, stop, dist_info,
                                                         start_step=start_step,
                                                         stop_after=cfg.train.stop_after)
            if names:
                save(step, names)
                tick = time.perf_counter()
            if interrupted:
                break
    progress.close()

    # ---- wrap up -----------------------------------------------------------------------------
    return common.finish_run('moog_pretrain', model, logger, dist_info, step=step,
                             interrupted=interrupted, diverged=diverged, stop=stop,
                             run_dir=run_dir)


if __name__ == '__main__':
    sys.exit(main())

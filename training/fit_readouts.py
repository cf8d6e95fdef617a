"""Fit the depth, point-track and box readouts on a pretrained MooG (frozen or end to end).

    python -m moog_ros.training.fit_readouts --pretrained runs/small/checkpoints/latest \\
        --data data/clips --config config/readouts_small.yaml --out runs/readouts_small
    python -m moog_ros.training.fit_readouts ... --end-to-end       # also train MooG (+ RGB loss)
    python -m moog_ros.training.fit_readouts --out runs/readouts_small --resume
    torchrun --nproc_per_node=2 -m moog_ros.training.fit_readouts --pretrained ... --data ...

By default the backbone is frozen, as the paper's readouts on stop-gradient features: MooG runs
in eval mode without gradients and only the readouts train. ``--end-to-end`` trains everything
and adds MooG's own next-frame RGB loss. Per-head losses apply only where the window carries
that label: RGB-D bag windows (depth, no tracks or boxes) train the depth readout alone.

Queries are sampled MOVi-style from the labels of each window: up to ``data.points_per_clip``
tracks that are visible at least once, queried at their first visible frame (``query_mode:
first``) or a random visible one (``random``); up to ``data.boxes_per_clip`` boxes, seeded at
their first valid frame. Every query is batched with its own start frame (the perception model
resets its latent there) and only frames at or after it are scored.

Depth loss: L1 on log-depth (``loss.depth: l1_log``) at pixels subsampled like MooG's RGB
targets. It was chosen by measurement against L1-log + 0.5 x the per-frame std of the log error
(``l1_log_si``), Eigen's scale-invariant log loss (``si_log``) and metric L1 (``l1_m``); see
``moog_ros/model/readouts.py`` and ``config/readouts_small.yaml`` for the figures.

The run folder has the layout of pretraining: ``config.yaml``/``config.json``, ``metrics.jsonl``
(rows of kind 'train' | 'val' | 'final') and ``checkpoints/{latest,step_XXXXXX}/``. Each
checkpoint is one combined perception checkpoint (MooG + readouts + configs, kind
'perception') that the node loads, plus ``trainer_state.pt``. Every random draw is a function of
(seed, step, rank), so ``--resume`` continues exactly.
"""
from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass, field
import math
from pathlib import Path
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from moog_ros import metrics as metrics_lib
from moog_ros.model import (
    CheckpointError,
    Moog,
    MoogPerception,
    PerceptionConfig,
    box_losses,
    depth_loss,
    load_checkpoint,
    perception_config_for,
    point_track_losses,
    points_visible,
    query_active,
    save_checkpoint,
    subsampled_pixels_xy,
)
from moog_ros.model.perception import READOUT_DESIGNS
from moog_ros.model.readouts import DEPTH_LOSSES, READOUT_PRESETS
from moog_ros.training import common, data
from moog_ros.training.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_mean,
    any_rank,
    barrier,
    cleanup_distributed,
    init_distributed,
    print0,
)
from moog_ros.training.pretrain import gather_pixels

PROG = 'moog_fit_readouts'
QUERY_MODES = ('first', 'random')

# ----------------------------------------------------------------------------------------------
# Config (YAML sections mirror these dataclasses; see config/readouts_*.yaml)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class ModelSection:
    pretrained: str = ''        # 'moog' (or 'perception') checkpoint directory; --pretrained
    readouts: str = 'small'     # readout preset for fresh readouts: paper | small | tiny
    # tokens (the paper's readouts) | hybrid (XFeat local evidence + tokens) | local (ablation:
    # local evidence, tokens cut off); see moog_ros.model.perception.READOUT_DESIGNS
    design: str = 'tokens'
    depth_median_m: float = 0.0   # log-depth offset in metres; 0 = median of the training data
    # Nested readout config keys to change, e.g. {points: {width: 128}, depth: {query_stride: 8}}.
    overrides: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self.readouts in READOUT_PRESETS,
               f'model.readouts must be one of {READOUT_PRESETS}, got {self.readouts!r}')
        _check(self.design in READOUT_DESIGNS,
               f'model.design must be one of {READOUT_DESIGNS}, got {self.design!r}')
        _check(self.depth_median_m >= 0, 'model.depth_median_m must be >= 0 (0 = estimate)')
        unknown = sorted(set(self.overrides) - {'depth', 'points', 'boxes'})
        _check(not unknown, f'model.overrides: unknown readout(s) {unknown}; the backbone comes '
                            "from the pretrained checkpoint, so only 'depth', 'points' and "
                            "'boxes' can be overridden")


@dataclass(frozen=True)
class DataSection:
    train: str = 'data/clips'   # --data spec(s): DIR | clips:DIR | bag:PATH[,PATH] | movi:PATH
    val: str = ''               # validation spec; '' = hold out val_fraction of train
    val_fraction: float = 0.1   # used when val is ''; 0 = no validation
    val_windows: int = 64       # at most this many validation windows (evenly spread)
    num_frames: int = 8         # T frames per window
    frame_step: int = 1         # take every n-th frame
    window_stride: int = 1      # frames between window starts inside a clip
    crop_scale: tuple[float, float] = (0.6, 1.0)   # random crop side range (of the largest)
    flip: bool = True           # random horizontal flips
    workers: int = 0            # DataLoader worker processes per rank
    topic: str = ''             # bag sources: colour image topic ('' = the only one)
    depth_topic: str = ''       # bag sources: aligned depth image topic ('' = none)
    points_per_clip: int = 64   # point queries sampled per training window
    query_mode: str = 'first'   # first | random: query frame of each sampled track
    boxes_per_clip: int = 16    # box queries per training window (first valid frame)
    val_points_per_clip: int = 256   # validation: first-visible queries per window

    def __post_init__(self) -> None:
        common.check_data_section(self)
        _check(self.query_mode in QUERY_MODES,
               f'data.query_mode must be one of {QUERY_MODES}, got {self.query_mode!r}')
        for name in ('points_per_clip', 'boxes_per_clip', 'val_points_per_clip'):
            _check(getattr(self, name) >= 0, f'data.{name} must be >= 0')


@dataclass(frozen=True)
class OptimSection:
    lr: float = 3e-4            # peak learning rate of the readouts
    backbone_lr: float = 1e-4   # peak learning rate of MooG with --end-to-end
    warmup_steps: int = 500
    final_lr_ratio: float = 1e-3
    weight_decay: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0      # global gradient-norm clip (0 = off)

    def __post_init__(self) -> None:
        _check(self.lr > 0 and self.backbone_lr > 0, 'optim.lr and optim.backbone_lr must be > 0')
        _check(self.warmup_steps >= 0, 'optim.warmup_steps must be >= 0')
        _check(0.0 <= self.final_lr_ratio <= 1.0, 'optim.final_lr_ratio must be in [0, 1]')
        _check(self.grad_clip >= 0, 'optim.grad_clip must be >= 0')


@dataclass(frozen=True)
class LossSection:
    depth: str = 'l1_log'       # l1_log | l1_log_si | si_log | l1_m (see readouts.depth_loss)
    depth_si_weight: float = 0.5   # weight of the per-frame std term of l1_log_si
    depth_weight: float = 1.0
    points_weight: float = 1.0
    point_position_weight: float = 100.0   # Huber on normalised positions (TAPIR / Kauldron)
    point_visibility_weight: float = 0.1
    point_certainty_weight: float = 0.1
    point_huber_delta_px: float = 1.0
    point_certainty_threshold_px: float = 6.0
    boxes_weight: float = 1.0
    box_l1_weight: float = 5.0
    box_giou_weight: float = 2.0
    box_presence_weight: float = 1.0
    rgb_weight: float = 1.0     # MooG's next-frame MSE, --end-to-end only

    def __post_init__(self) -> None:
        _check(self.depth in DEPTH_LOSSES,
               f'loss.depth must be one of {DEPTH_LOSSES}, got {self.depth!r}')
        for name, value in vars(self).items():
            if name != 'depth':
                _check(value >= 0, f'loss.{name} must be >= 0, got {value}')


@dataclass(frozen=True)
class TrainSection:
    steps: int = 20000
    batch_size: int = 8         # windows per step *per rank*
    seed: int = 0
    end_to_end: bool = False    # train MooG too (--end-to-end); default: frozen backbone
    device: str = 'auto'        # auto | cpu | cuda | cuda:N
    bf16: bool = True           # bf16 autocast on CUDA (on the CPU only with cpu_bf16)
    cpu_bf16: bool = False      # bf16 autocast on the CPU too (AMX; measure accuracy first)
    threads: int = 0            # torch.set_num_threads per rank (0 = leave the default)
    log_interval: int = 10
    eval_interval: int = 500
    checkpoint_interval: int = 500
    keep_interval: int = 5000   # steps between kept checkpoints/step_XXXXXX (0 = none)

    def __post_init__(self) -> None:
        common.check_train_section(self)
        _check(self.threads >= 0, 'train.threads must be >= 0')


@dataclass(frozen=True)
class FitConfig:
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    optim: OptimSection = OptimSection()
    loss: LossSection = LossSection()
    train: TrainSection = TrainSection()


def _merge_overrides(base: dict, overrides: dict, where: str) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        if key not in base:
            raise ValueError(f'{where}.{key}: unknown key; known: {sorted(base)}')
        if isinstance(value, dict) and isinstance(base[key], dict):
            out[key] = _merge_overrides(base[key], value, f'{where}.{key}')
        else:
            out[key] = value
    return out


def readout_config(cfg: FitConfig, moog: Any, depth_median_m: float | None) -> PerceptionConfig:
    """The perception config for fresh readouts: preset + ``model.overrides`` (validated)."""
    base = perception_config_for(moog, cfg.model.readouts, depth_median_m,
                                 cfg.model.design).to_dict()
    merged = _merge_overrides(base, cfg.model.overrides, 'model.overrides')
    return PerceptionConfig.from_dict(merged, where='model')


# ----------------------------------------------------------------------------------------------
# Query sampling and targets


@dataclass
class Queries:
    """Queries of one batch and their targets, time-major like the model outputs."""

    xy: torch.Tensor             # [B, M, 2] points: pixels on the start frame
    start: torch.Tensor          # [B, M] int64 start frame
    valid: torch.Tensor          # [B, M] bool (False = padding)
    target: torch.Tensor         # [B, T, M, C] ground truth (xy or xyxy)
    flag: torch.Tensor           # [B, T, M] bool (visible / valid)

    def active(self) -> torch.Tensor:
        """``[B, T, M]``: scored entries (real query, at/after its start frame)."""
        T = self.target.shape[1]
        return query_active(self.start, T) & self.valid[:, None, :]


def sample_queries(coords: torch.Tensor, flags: torch.Tensor, mask: torch.Tensor, count: int,
                   mode: str, generator: torch.Generator | None) -> Queries:
    """MOVi-style query sampling from padded track/box labels.

    Args:
        coords: ``[B, N, T, C]`` labels (``tracks_xy`` or ``boxes_xyxy``, collated).
        flags: ``[B, N, T]`` bool visible / valid.
        mask: ``[B, N]`` bool, True for real (unpadded) entries.
        count: at most this many queries per window; fewer if fewer entries ever show up.
        mode: 'first' (start at the first flagged frame) or 'random' (a random flagged frame).
        generator: CPU generator for the choice of entries and random start frames; None
            takes entries in order (deterministic evaluation).

    Returns:
        ``Queries`` with ``M = min(count, max candidates)`` per window (padding marked invalid).
    """
    B, N, T, C = coords.shape
    candidate = mask & flags.any(dim=2)  # [B, N]
    M = min(count, int(candidate.sum(1).max()) if N else 0)
    if generator is not None:
        priority = torch.rand(B, N, generator=generator).to(coords.device)
    else:
        priority = -torch.arange(N, device=coords.device, dtype=torch.float32).expand(B, N)
    priority = torch.where(candidate, priority, torch.full_like(priority, -math.inf))
    index = priority.topk(M, dim=1).indices if M else priority.new_zeros(B, 0).long()  # [B, M]
    valid = torch.gather(candidate, 1, index)
    chosen_flags = torch.gather(flags, 1, index[..., None].expand(-1, -1, T))  # [B, M, T]
    if mode == 'first' or generator is None:
        # argmax of a bool row is its first True.
        start = chosen_flags.to(torch.uint8).argmax(dim=2)
    else:
        scores = torch.rand(B, M, T, generator=generator).to(coords.device)
        start = torch.where(chosen_flags, scores, torch.full_like(scores, -1.0)).argmax(dim=2)
    chosen = torch.gather(coords, 1, index[..., None, None].expand(-1, -1, T, C))  # [B,M,T,C]
    xy = torch.gather(chosen, 2, start[..., None, None].expand(-1, -1, 1, C))[:, :, 0]
    xy = torch.where(valid[..., None], xy, torch.zeros_like(xy))
    if C == 4:  # padding boxes must still be ordered for add_boxes
        xy = torch.where(valid[..., None], xy, xy.new_tensor([0.0, 0.0, 1.0, 1.0]))
    return Queries(xy=xy, start=torch.where(valid, start, torch.zeros_like(start)), valid=valid,
                   target=chosen.transpose(1, 2), flag=chosen_flags.transpose(1, 2))


def gather_depth(depth: torch.Tensor, coords_xy: torch.Tensor) -> torch.Tensor:
    """Depth ``[B, T, H, W]`` at integer pixels ``coords_xy [B, T, Q, 2]`` -> ``[B, T, Q]``."""
    return gather_pixels(depth[..., None], coords_xy)[..., 0]


# ----------------------------------------------------------------------------------------------
# Loss


def compute_losses(clip: Any, batch: dict[str, torch.Tensor], points: Queries | None,
                   boxes: Queries | None, depth_coords: torch.Tensor | None,
                   rgb_coords: torch.Tensor | None, cfg: FitConfig,
                   image_size: tuple[int, int]) -> tuple[torch.Tensor | None, dict[str, float]]:
    """Weighted sum of the heads that have labels in this batch, and per-head values.

    Returns:
        ``(total, values)``: total is None when nothing in the batch carries a label.
    """
    lc = cfg.loss
    terms: list[torch.Tensor] = []
    values: dict[str, float] = {}
    if depth_coords is not None:
        target = gather_depth(batch['depth'], depth_coords)
        loss = depth_loss(clip.depth_sampled_m, target, kind=lc.depth,
                          si_weight=lc.depth_si_weight)
        terms.append(lc.depth_weight * loss)
        values['depth'] = loss.item()
    if points is not None and bool(points.active().any()):
        parts = point_track_losses(
            clip.points_xy, clip.points_visible_logit, clip.points_certain_logit,
            points.target, points.flag, points.active(), image_size,
            huber_delta_px=lc.point_huber_delta_px,
            certainty_threshold_px=lc.point_certainty_threshold_px,
            position_weight=lc.point_position_weight,
            visibility_weight=lc.point_visibility_weight,
            certainty_weight=lc.point_certainty_weight)
        terms.append(lc.points_weight * parts['total'])
        values.update({f'points_{k}': v.item() for k, v in parts.items()})
    if boxes is not None and bool(boxes.active().any()):
        parts = box_losses(clip.boxes_xyxy, clip.boxes_presence_logit, boxes.target, boxes.flag,
                           boxes.active(), image_size, l1_weight=lc.box_l1_weight,
                           giou_weight=lc.box_giou_weight,
                           presence_weight=lc.box_presence_weight)
        terms.append(lc.boxes_weight * parts['total'])
        values.update({f'boxes_{k}': v.item() for k, v in parts.items()})
    if rgb_coords is not None:
        loss = F.mse_loss(clip.rgb.float(), gather_pixels(batch['video'], rgb_coords))
        terms.append(lc.rgb_weight * loss)
        values['rgb'] = loss.item()
    if not terms:
        return None, values
    total = torch.stack(terms).sum()
    values['loss'] = total.item()
    return total, values


def _labels(batch: dict[str, torch.Tensor], data_cfg: DataSection,
            generator: torch.Generator | None, train: bool
            ) -> tuple[Queries | None, Queries | None]:
    points = boxes = None
    n_points = data_cfg.points_per_clip if train else data_cfg.val_points_per_clip
    if 'tracks_xy' in batch and n_points:
        points = sample_queries(batch['tracks_xy'], batch['tracks_visible'],
                                batch['tracks_mask'], n_points,
                                data_cfg.query_mode if train else 'first', generator)
    if 'boxes_xyxy' in batch and (data_cfg.boxes_per_clip or not train):
        count = data_cfg.boxes_per_clip if train else batch['boxes_xyxy'].shape[1]
        boxes = sample_queries(batch['boxes_xyxy'], batch['boxes_valid'], batch['boxes_mask'],
                               count, 'first', generator)
    return points, boxes


def _has_depth(batch: dict[str, torch.Tensor]) -> bool:
    return 'depth' in batch and bool(torch.isfinite(batch['depth']).any())


# ----------------------------------------------------------------------------------------------
# Validation


@torch.no_grad()
def evaluate(model: MoogPerception, loader: torch.utils.data.DataLoader, dist_info: DistInfo,
             cfg: FitConfig, autocast: contextlib.AbstractContextManager) -> dict[str, float]:
    """Readout metrics on the validation windows (all ranks' shards, mean over windows).

    Points: TAP-Vid 'first' queries (up to ``data.val_points_per_clip``), AJ, <delta_avg, OA.
    Depth: dense maps at ``depth.query_stride``, AbsRel and delta1. Boxes: seeded on their first
    valid frame, mean IoU of the later frames (present = presence logit > 0).
    """
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(cfg.train.seed)
    image_size = model.image_size
    rows: list[dict[str, float]] = []
    for batch in loader:
        batch = {k: v.to(dist_info.device) for k, v in batch.items()}
        points, boxes = _labels(batch, cfg.data, None, train=False)
        has_depth = _has_depth(batch)
        with autocast:
            clip, _ = model(batch['video'], generator=generator, dense_depth=has_depth,
                            points_xy=points.xy if points is not None else None,
                            points_start_frame=points.start if points is not None else None,
                            boxes_xyxy=boxes.xy if boxes is not None else None,
                            boxes_start_frame=boxes.start if boxes is not None else None)
        for b in range(batch['video'].shape[0]):
            averager = metrics_lib.ClipAverager()
            if has_depth and bool(torch.isfinite(batch['depth'][b]).any()):
                averager.add(metrics_lib.depth_metrics(batch['depth'][b].cpu().numpy(),
                                                       clip.depth_m[b].float().cpu().numpy()),
                             'depth_')
            if points is not None and bool(points.valid[b].any()):
                keep = points.valid[b].cpu().numpy()
                visible = points_visible(clip.points_visible_logit[b],
                                         clip.points_certain_logit[b],
                                         model.config.points.visibility_rule)
                averager.add(metrics_lib.tapvid_point_metrics(
                    points.target[b].transpose(0, 1).cpu().numpy()[keep],
                    points.flag[b].T.cpu().numpy()[keep],
                    clip.points_xy[b].transpose(0, 1).cpu().numpy()[keep],
                    visible.T.cpu().numpy()[keep], points.start[b].cpu().numpy()[keep],
                    image_size), 'points_')
            if boxes is not None and bool(boxes.valid[b].any()):
                keep = boxes.valid[b].cpu().numpy()
                averager.add(metrics_lib.box_metrics(
                    boxes.target[b].transpose(0, 1).cpu().numpy()[keep],
                    boxes.flag[b].T.cpu().numpy()[keep],
                    clip.boxes_xyxy[b].transpose(0, 1).cpu().numpy()[keep],
                    (clip.boxes_presence_logit[b] > 0).T.cpu().numpy()[keep],
                    boxes.start[b].cpu().numpy()[keep]), 'boxes_')
            rows.append(averager.mean())
    model.train(was_training)
    every = metrics_lib.ClipAverager()
    for rank_rows in all_gather_objects(rows, dist_info):
        for row in rank_rows:
            every.add(row)
    means = every.mean()
    wanted = {'points_average_jaccard': 'val_aj',
              'points_average_pts_within_thresh': 'val_delta_avg',
              'points_occlusion_accuracy': 'val_oa', 'depth_absrel': 'val_absrel',
              'depth_delta1': 'val_delta1',
              'depth_absrel_median_scaled': 'val_absrel_median_scaled',
              'boxes_miou': 'val_miou'}
    out = {name: means[key] for key, name in wanted.items() if key in means}
    out['val_windows'] = sum(len(r) for r in all_gather_objects(rows, dist_info))
    return out


# ----------------------------------------------------------------------------------------------
# Model construction


def _estimate_median_depth(source: data.WindowSource, cfg: FitConfig,
                           max_windows: int = 32) -> float | None:
    """Median valid depth (metres) over up to ``max_windows`` evenly spread windows."""
    indices = np.unique(np.linspace(0, len(source) - 1, min(len(source), max_windows))
                        .round().astype(int))
    samples = []
    for index in indices:
        window = source.window(int(index), cfg.data.num_frames, cfg.data.frame_step)
        depth = window.get('depth')
        if depth is None:
            continue
        values = depth[np.isfinite(depth) & (depth > 0)]
        if values.size:
            samples.append(values[:: max(1, values.size // 4096)])  # bounded memory
    if not samples:
        return None
    return float(np.median(np.concatenate(samples)))


def readout_design(model: MoogPerception) -> str:
    """The readout design of a perception model ('tokens', 'hybrid' or 'local')."""
    local = model.config.points.local
    if local is None:
        return 'tokens'
    return 'hybrid' if local.use_tokens else 'local'


def build_model(cfg: FitConfig, source: data.WindowSource, dist_info: DistInfo
                ) -> MoogPerception:
    """The model to fit: a perception checkpoint of the same design as is (its readouts go on
    training), else its (or a pretraining checkpoint's) MooG weights + fresh readouts."""
    path = Path(cfg.model.pretrained)
    loaded = load_checkpoint(path, map_location='cpu')
    backbone = loaded.model
    if isinstance(loaded.model, MoogPerception):
        if readout_design(loaded.model) == cfg.model.design:
            print0(dist_info, f'{PROG}: continuing the readouts of perception checkpoint {path}')
            return loaded.model
        # Another design: only the backbone carries over.
        print0(dist_info, f'{PROG}: {path} has {readout_design(loaded.model)!r} readouts; '
               f'fitting fresh {cfg.model.design!r} readouts on its MooG backbone')
        backbone = loaded.model.moog
    elif not isinstance(loaded.model, Moog):
        raise CheckpointError(f'{path / "config.json"}: kind {loaded.kind!r} has no MooG '
                              "backbone; --pretrained needs a 'moog' or 'perception' checkpoint")
    median = cfg.model.depth_median_m or None
    if median is None:
        median = _estimate_median_depth(source, cfg)
        print0(dist_info, f'{PROG}: depth offset = median training depth '
               + (f'{median:.3f} m' if median is not None else 'unknown (no depth labels); '
                  'keeping the preset'))
    perception_cfg = readout_config(cfg, backbone.config, median)
    torch.manual_seed(cfg.train.seed)  # identical fresh readouts on every rank
    model = MoogPerception(perception_cfg)
    model.moog.load_state_dict(backbone.state_dict(), strict=True)
    model.load_pretrained_features()  # XFeat from its wheel (hybrid / local designs)
    return model


# ----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog=PROG, description='Fit the depth, point-track and box readouts of MooG (frozen '
        'backbone by default; single process or torchrun DDP).',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--pretrained', default=None,
                        help="pretrained 'moog' checkpoint directory (or a 'perception' one to "
                             'continue its readouts); shortcut for --set model.pretrained=DIR')
    common.add_data_arguments(parser)
    common.add_config_arguments(parser, 'model/data/optim/loss/train')
    parser.add_argument('--end-to-end', action='store_true',
                        help='train MooG as well (adds its RGB loss); shortcut for '
                             '--set train.end_to_end=true')
    common.add_run_dir_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Fit the readouts; returns the process exit code."""
    args = parse_args(argv)
    config_file = common.config_file_for(args)
    overrides = list(args.set)
    for flag, key in ((args.pretrained, 'model.pretrained'), (args.data, 'data.train'),
                      (args.val_data, 'data.val')):
        if flag is not None:
            overrides.append(f'{key}={flag}')
    if args.end_to_end:
        overrides.append('train.end_to_end=true')
    try:
        cfg = common.build_config(FitConfig, config_file, overrides)
    except ValueError as error:
        print(f'{PROG}: config error: {error}', file=sys.stderr)
        return 2
    if not cfg.model.pretrained and not args.resume:
        print(f'{PROG}: --pretrained CKPT is required (a pretraining checkpoint directory)',
              file=sys.stderr)
        return 2
    dist_info = init_distributed(cfg.train.device)
    try:
        code = _train(args, cfg, dist_info)
        # Every rank finishes its last collective before any tears the group down: a
        # gloo peer that leaves early aborts a rank still in flight ("terminate called").
        barrier(dist_info)
        return code
    except (CheckpointError, ValueError, FileExistsError, FileNotFoundError) as error:
        print0(dist_info, f'{PROG}: {error}', file=sys.stderr)
        return 2
    finally:
        cleanup_distributed(dist_info)


def _train(args: argparse.Namespace, cfg: FitConfig, dist_info: DistInfo) -> int:
    device, rank, world = dist_info.device, dist_info.rank, dist_info.world_size
    autocast = common.init_process(cfg.train, device, rank)
    global_batch = cfg.train.batch_size * world
    end_to_end = cfg.train.end_to_end

    # ---- data --------------------------------------------------------------------------------
    source_options = {'num_frames': cfg.data.num_frames, 'frame_step': cfg.data.frame_step,
                      'window_stride': cfg.data.window_stride, 'labels': True,
                      'topic': cfg.data.topic or None,
                      'depth_topic': cfg.data.depth_topic or None,
                      'progress': dist_info.is_main}
    train_source, val_source = common.open_train_val(cfg.data, **source_options)

    # ---- where to start from -----------------------------------------------------------------
    resume_dir = None
    if args.resume:
        resume_dir = common.find_checkpoint(args.out)
        if resume_dir is None:
            print0(dist_info, f'{PROG}: --resume: no checkpoint in {args.out}/checkpoints',
                   file=sys.stderr)
            return 2
    run_dir = args.out
    # Every rank checks the folder (same outcome everywhere), so a refused folder stops all ranks
    # instead of leaving the others waiting at the barrier.
    common.prepare_run_dir(run_dir, resume=args.resume)
    barrier(dist_info)
    if dist_info.is_main:
        common.write_resolved_config(run_dir, cfg)
    if resume_dir is not None:
        model = load_checkpoint(resume_dir, expected_kind='perception').model
        trainer_state = common.load_trainer_state(resume_dir)
    else:
        model = build_model(cfg, train_source, dist_info)
        trainer_state = None
    model.to(device)
    perception_cfg = model.config
    image_size = perception_cfg.moog.image_size

    # ---- what trains -------------------------------------------------------------------------
    model.train()
    if end_to_end:
        groups = [{'params': model.readout_parameters(), 'lr': cfg.optim.lr},
                  {'params': list(model.moog.parameters()), 'lr': cfg.optim.backbone_lr}]
    else:
        # Frozen backbone: no gradients, eval mode, features are constants for the readouts.
        model.moog.requires_grad_(False)
        model.moog.eval()
        groups = [{'params': model.readout_parameters(), 'lr': cfg.optim.lr}]
    trainable = [p for group in groups for p in group['params']]
    optimizer = common.build_adamw(groups, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                   betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
                                   device=device)
    scheduler = common.build_scheduler(optimizer, warmup_steps=cfg.optim.warmup_steps,
                                       total_steps=cfg.train.steps,
                                       final_ratio=cfg.optim.final_lr_ratio)
    start_step = common.resume_training(trainer_state, optimizer=optimizer, scheduler=scheduler,
                                        resume_dir=resume_dir, dist_info=dist_info)
    train_model: torch.nn.Module = model
    if dist_info.is_distributed:
        # Heads without labels in a batch (e.g. boxes on RGB-D bags) leave parameters unused.
        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None,
            find_unused_parameters=True)

    train_loader, val_loader, _ = common.make_loaders(
        train_source, val_source, data_section=cfg.data, train=cfg.train,
        image_size=image_size, start_step=start_step, dist_info=dist_info)
    num_trainable = sum(p.numel() for p in trainable)
    print0(dist_info, f'{PROG}: {num_trainable / 1e6:.2f}M trainable parameters '
           f'({"end to end" if end_to_end else "frozen MooG"}), {len(train_source)} training '
           f'windows from {train_source.name}, {world} rank(s) on {device}, global batch '
           f'{global_batch}, steps {start_step} -> {cfg.train.steps}')

    # ---- checkpoint writer (rank 0 writes; everyone waits) -----------------------------------
    logger = common.MetricsLogger(run_dir / 'metrics.jsonl', enabled=dist_info.is_main,
                                  resume_step=start_step if resume_dir is not None else None)
    last_val: dict[str, Any] = {}

    def save(step: int, names: list[str]) -> None:
        def write_model(path: Path) -> None:
            meta = {'step': step, 'run': str(run_dir), 'data': cfg.data.train,
                    'pretrained': cfg.model.pretrained, 'end_to_end': end_to_end,
                    'samples_seen': step * global_batch, **last_val}
            configs = {'model': perception_cfg.to_dict(),
                       'fit_readouts': common.config_to_dict(cfg)}
            save_checkpoint(path, model, configs=configs, meta=meta)

        common.save_run_checkpoints(run_dir, names, step=step, optimizer=optimizer,
                                    scheduler=scheduler, global_batch=global_batch,
                                    seed=cfg.train.seed, write_model=write_model,
                                    dist_info=dist_info)

    # ---- the loop ----------------------------------------------------------------------------
    progress = tqdm(total=cfg.train.steps, initial=start_step, disable=not dist_info.is_main,
                    dynamic_ncols=True, desc='fit_readouts')
    step = start_step
    interrupted = diverged = False
    skipped = 0
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    tick, tick_step = time.perf_counter(), step
    with common.StopSignal() as stop:
        for batch in train_loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            video = batch['video']  # [B, T, H, W, 3] in [0, 1]
            B, T = video.shape[:2]
            # Queries, pixel subsets and the initial state: a function of (seed, step, rank).
            generator = torch.Generator().manual_seed(
                (cfg.train.seed * 1_000_003 + step) * 1009 + rank)
            points, boxes = _labels(batch, cfg.data, generator, train=True)
            depth_coords = None
            if _has_depth(batch):
                depth_coords = torch.stack([subsampled_pixels_xy(
                    B, image_size, perception_cfg.depth.train_factor, random_shift=True,
                    generator=generator, device=device) for _ in range(T)], dim=1)
            rgb_coords = None
            if end_to_end:
                rgb_coords = torch.stack([model.moog.decode_coords(B, 'train', generator=generator,
                                                                   device=device)
                                          for _ in range(T)], dim=1)
            with autocast:
                clip, _ = train_model(
                    video, generator=generator, finetune_backbone=end_to_end,
                    points_xy=points.xy if points is not None else None,
                    points_start_frame=points.start if points is not None else None,
                    boxes_xyxy=boxes.xy if boxes is not None else None,
                    boxes_start_frame=boxes.start if boxes is not None else None,
                    depth_coords_xy=depth_coords, decode_coords_xy=rgb_coords)
            total, values = compute_losses(clip, batch, points, boxes, depth_coords, rgb_coords,
                                           cfg, image_size)
            # Every rank must take part in the backward pass under DDP: skip together.
            optimizer.zero_grad(set_to_none=True)
            if any_rank(total is None, dist_info):
                skipped += 1
                grad_norm = torch.zeros(())
            else:
                total.backward()
                max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm)
            # With no gradients (a skipped step) AdamW leaves every parameter as it is; stepping
            # anyway keeps the LR schedule tied to the step count.
            optimizer.step()
            lr = optimizer.param_groups[0]['lr']
            scheduler.step()
            step += 1
            progress.update(1)
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + value
                counts[key] = counts.get(key, 0) + 1

            if step % cfg.train.log_interval == 0 or step == cfg.train.steps:
                now = time.perf_counter()
                # Means since the last row; every rank reports every key (0 where it had none).
                names = sorted(set().union(*all_gather_objects(sorted(sums), dist_info)))
                local = {k: sums.get(k, 0.0) / max(counts.get(k, 0), 1) for k in names}
                local['grad_norm'] = float(grad_norm)
                reduced = all_reduce_mean(local, dist_info)
                row = {'kind': 'train', 'step': step, **reduced, 'lr': lr, 'skipped': skipped,
                       'samples_per_s': (step - tick_step) * global_batch / (now - tick)}
                logger.log(row)
                if 'loss' in row:
                    progress.set_postfix(loss=f'{row["loss"]:.4f}')
                sums, counts = {}, {}
                tick, tick_step = now, step
                if not all(math.isfinite(v) for v in reduced.values()):
                    print0(dist_info, f'{PROG}: non-finite loss at step {step}: {reduced}; '
                           'stopping (lower optim.lr or check the data)', file=sys.stderr)
                    diverged = True
                    break

            if val_loader is not None and (step % cfg.train.eval_interval == 0
                                           or step == cfg.train.steps):
                last_val = evaluate(model, val_loader, dist_info, cfg, autocast)
                if not end_to_end:
                    model.moog.eval()
                logger.log({'kind': 'val', 'step': step, **last_val})
                if dist_info.is_main:
                    shown = ', '.join(f'{k} {v:.4f}' for k, v in last_val.items()
                                      if k != 'val_windows')
                    progress.write(f'step {step}: {shown}')
                tick = time.perf_counter()

            names, interrupted = common.checkpoint_names(step, cfg.train, stop, dist_info)
            if names:
                save(step, names)
                tick = time.perf_counter()
            if interrupted:
                break
    progress.close()

    # ---- wrap up -----------------------------------------------------------------------------
    return common.finish_run(PROG, model, logger, dist_info, step=step, interrupted=interrupted,
                             diverged=diverged, stop=stop, run_dir=run_dir,
                             final={'skipped': skipped}, checkpoint='perception checkpoint')


if __name__ == '__main__':
    sys.exit(main())

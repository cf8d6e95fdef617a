"""Evaluate MooG against classical peers on a clip directory: points, depth, boxes, speed.

::

    python -m moog_ros.training.evaluate --data DIR --checkpoint CKPT \\
        [--grid-checkpoint CKPT] [--train-data DIR | --median-depth M] [--max-clips N] \\
        [--json OUT.json] [--device auto]

Methods (each on the same clips, the same queries and the same seed boxes):

- ``moog``: a ``MoogPerception`` checkpoint, online through ``step`` one frame at a time.
- ``grid``: the same protocol for an on-the-grid checkpoint (``--grid-checkpoint``).
- ``lk``: OpenCV pyramidal Lucas–Kanade with a forward–backward check (points).
- ``box_tracker``: one OpenCV single-object tracker per box, CSRT if available (boxes).
- ``median_depth``: the training set's median depth everywhere (depth; needs ``--train-data``
  or ``--median-depth``).
- ``stay_put``: every query stays at its pixel and every box at its seed, all visible: the
  floor any tracker must clear (points, boxes).
- any ``--extra-checkpoint NAME=DIR``: another perception checkpoint (an ablation), as ``moog``.

Protocol. Every clip is resized (stretched per axis) to the model resolution and all methods run
on that; ground-truth tracks and boxes are mapped with the same affine map, depth is resampled
nearest-neighbour (no mixing across depth edges). Points use TAP-Vid query mode "first": each
track is queried at its first visible frame, added to the tracker right before that frame is
stepped, and scored on later frames only; never-visible tracks are dropped. Boxes are seeded with
the ground truth at their first valid frame and scored on later valid frames (absent = IoU 0).
Every figure is a per-clip value averaged over clips (see ``moog_ros.metrics``);
``frames_per_s`` is frames over the seconds spent inside the method's per-frame calls.
Runs are deterministic: the MooG state of clip ``i`` is drawn from ``seed + i``.

The JSON report::

    {"clips": N, "resolution": [H, W],
     "methods": {"moog": {"points_aj", "points_delta_avg", "points_oa", "depth_absrel",
                          "depth_delta1", "depth_absrel_median_scaled",
                          "depth_delta1_median_scaled", "depth_absrel_floor",
                          "depth_absrel_objects", "boxes_miou", "frames_per_s"},
                 "grid": {...same...},
                 "lk": {"points_aj", "points_delta_avg", "points_oa", "frames_per_s"},
                 "box_tracker": {"name", "boxes_miou", "frames_per_s"},
                 "median_depth": {"median_depth_m", "depth_absrel", "depth_delta1",
                                  "depth_absrel_median_scaled", "depth_delta1_median_scaled",
                                  "depth_absrel_floor", "depth_absrel_objects",
                                  "frames_per_s"}}}

``depth_absrel_floor`` / ``depth_absrel_objects`` are the raw AbsRel over the background
(segmentation id 0: floor and backdrop) / object pixels only, so a scale error (both high, like
the median baseline) is told apart from a shape error (floor fine, objects wrong: no object
edges). They need the clips' optional ``segmentation`` (resampled nearest-neighbour like
depth); a clip without it does not count towards them.

A figure that no clip defines (e.g. no visible track anywhere) is ``null``.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
import json
import math
import os
from pathlib import Path
import sys
import time
from typing import Any

import cv2
import numpy as np
import torch
from tqdm import tqdm

from moog_ros import clips, metrics, runtime
from moog_ros.imaging import FrameGeometry
from moog_ros.model import CheckpointError, MoogPerception, load_checkpoint
from moog_ros.training import peers
from moog_ros.training.distributed import resolve_device

# method -> the JSON keys it reports, in table order (its name and constants come first).
METHOD_KEYS = {
    'moog': ('points_aj', 'points_delta_avg', 'points_oa', 'depth_absrel', 'depth_delta1',
             'depth_absrel_median_scaled', 'depth_delta1_median_scaled', 'depth_absrel_floor',
             'depth_absrel_objects', 'boxes_miou', 'frames_per_s'),
    'grid': ('points_aj', 'points_delta_avg', 'points_oa', 'depth_absrel', 'depth_delta1',
             'depth_absrel_median_scaled', 'depth_delta1_median_scaled', 'depth_absrel_floor',
             'depth_absrel_objects', 'boxes_miou', 'frames_per_s'),
    'lk': ('points_aj', 'points_delta_avg', 'points_oa', 'frames_per_s'),
    'box_tracker': ('name', 'boxes_miou', 'frames_per_s'),
    'stay_put': ('points_aj', 'points_delta_avg', 'points_oa', 'boxes_miou'),
    'median_depth': ('median_depth_m', 'depth_absrel', 'depth_delta1',
                     'depth_absrel_median_scaled', 'depth_delta1_median_scaled',
                     'depth_absrel_floor', 'depth_absrel_objects', 'frames_per_s'),
}
# moog_ros.metrics key -> report key.
_POINT_KEYS = {'average_jaccard': 'points_aj', 'average_pts_within_thresh': 'points_delta_avg',
               'occlusion_accuracy': 'points_oa'}
_DEPTH_KEYS = {'absrel': 'depth_absrel', 'delta1': 'depth_delta1',
               'absrel_median_scaled': 'depth_absrel_median_scaled',
               'delta1_median_scaled': 'depth_delta1_median_scaled'}
_BOX_KEYS = {'miou': 'boxes_miou'}


# --------------------------------------------------------------------------------------------
# The evaluation clip: one clip at model resolution with its queries and seeds
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EvalClip:
    """One clip at evaluation resolution, with the queries every method receives.

    Attributes:
        name: file stem of the clip.
        video: uint8 ``[T, H, W, 3]``.
        depth_m: float32 ``[T, H, W]`` metres, NaN unknown.
        tracks_xy: float32 ``[N, T, 2]`` (only tracks with a query).
        tracks_visible: bool ``[N, T]``.
        query_frame: int64 ``[N]`` first visible frame of each track.
        boxes_xyxy: float32 ``[K, T, 4]`` (only boxes valid somewhere).
        boxes_valid: bool ``[K, T]``.
        box_start: int64 ``[K]`` first valid frame of each box (the seed frame).
        segmentation: uint16 ``[T, H, W]`` (0 background, k + 1 object k) or None if the clip
            has none.
    """

    name: str
    video: np.ndarray
    depth_m: np.ndarray
    tracks_xy: np.ndarray
    tracks_visible: np.ndarray
    query_frame: np.ndarray
    boxes_xyxy: np.ndarray
    boxes_valid: np.ndarray
    box_start: np.ndarray
    segmentation: np.ndarray | None = None

    @property
    def num_frames(self) -> int:
        return int(self.video.shape[0])

    @property
    def image_hw(self) -> tuple[int, int]:
        return int(self.video.shape[1]), int(self.video.shape[2])


def prepare_clip(clip: clips.Clip, resolution_hw: tuple[int, int], name: str) -> EvalClip:
    """Resizes ``clip`` to ``resolution_hw`` (per-axis stretch) and derives queries and seeds."""
    height, width = resolution_hw
    geometry = FrameGeometry.fit((clip.width, clip.height), (width, height), 'stretch')
    segmentation = clip.segmentation
    if (clip.height, clip.width) == (height, width):
        video, depth = clip.video, clip.depth
        tracks_xy, boxes_xyxy = clip.tracks_xy, clip.boxes_xyxy
    else:
        video = np.stack([geometry.warp(frame) for frame in clip.video])
        # Nearest (pixel-centre exact) keeps depth edges sharp: averaging foreground and
        # background depth would invent surfaces that exist in neither.
        depth = np.stack([cv2.resize(d, (width, height), interpolation=cv2.INTER_NEAREST_EXACT)
                          for d in clip.depth])
        if segmentation is not None:  # ids must not blend either: nearest, like depth
            segmentation = np.stack([
                cv2.resize(s, (width, height), interpolation=cv2.INTER_NEAREST_EXACT)
                for s in segmentation])
        tracks_xy = geometry.to_model_xy(clip.tracks_xy)
        boxes_xyxy = geometry.to_model_xyxy(clip.boxes_xyxy)
    query_frame, has_query = metrics.first_visible_queries(clip.tracks_visible)
    box_start, has_box = metrics.first_visible_queries(clip.boxes_valid)
    return EvalClip(
        name=name, video=np.ascontiguousarray(video), depth_m=depth.astype(np.float32),
        tracks_xy=tracks_xy[has_query].astype(np.float32),
        tracks_visible=clip.tracks_visible[has_query],
        query_frame=query_frame[has_query],
        boxes_xyxy=boxes_xyxy[has_box].astype(np.float32),
        boxes_valid=clip.boxes_valid[has_box],
        box_start=box_start[has_box],
        segmentation=None if segmentation is None else np.ascontiguousarray(segmentation))


# --------------------------------------------------------------------------------------------
# Predictions: every method fills the same arrays, online, one frame at a time
# --------------------------------------------------------------------------------------------

@dataclass
class Predictions:
    """What one method predicted for one clip (``None`` for tasks it does not do)."""

    points_xy: np.ndarray | None = None       # [N, T, 2]
    points_visible: np.ndarray | None = None  # [N, T] bool
    depth_m: np.ndarray | None = None         # [T, H, W]
    boxes_xyxy: np.ndarray | None = None      # [K, T, 4]
    boxes_present: np.ndarray | None = None   # [K, T] bool
    seconds: float = 0.0                      # inside the per-frame calls


def _empty_points(clip: EvalClip) -> tuple[np.ndarray, np.ndarray]:
    num_tracks = len(clip.query_frame)
    return (np.full((num_tracks, clip.num_frames, 2), np.nan, np.float32),
            np.zeros((num_tracks, clip.num_frames), bool))


def _empty_boxes(clip: EvalClip) -> tuple[np.ndarray, np.ndarray]:
    num_boxes = len(clip.box_start)
    return (np.full((num_boxes, clip.num_frames, 4), np.nan, np.float32),
            np.zeros((num_boxes, clip.num_frames), bool))


def run_perception(model: MoogPerception, clip: EvalClip, device: torch.device,
                   seed: int) -> Predictions:
    """Runs ``model`` online over ``clip``: points and boxes added right before their frame."""
    points_xy, points_visible = _empty_points(clip)
    boxes_xyxy, boxes_present = _empty_boxes(clip)
    depth = np.empty(clip.video.shape[:3], np.float32)
    # Model slot j holds track point_order[j] (queries are appended in order of adding).
    point_order: list[int] = []
    box_order: list[int] = []
    generator = torch.Generator(device=device).manual_seed(seed)
    seconds = 0.0
    with torch.inference_mode():
        state = model.init_state(1, device, generator=generator)
        for t in range(clip.num_frames):
            start = time.perf_counter()
            new_points = np.flatnonzero(clip.query_frame == t)
            if len(new_points):
                xy = torch.from_numpy(clip.tracks_xy[new_points, t]).to(device)
                state = model.add_points(state, xy[None])
                point_order.extend(new_points.tolist())
            new_boxes = np.flatnonzero(clip.box_start == t)
            if len(new_boxes):
                xyxy = torch.from_numpy(clip.boxes_xyxy[new_boxes, t]).to(device)
                state = model.add_boxes(state, xyxy[None])
                box_order.extend(new_boxes.tolist())
            frame = torch.from_numpy(clip.video[t]).to(device)[None].float() / 255.0
            out, state = model.step(frame, state)
            out_depth = out.depth_m[0].cpu().numpy()
            out_points = out.points_xy[0].cpu().numpy()
            out_visible = out.points_visible[0].cpu().numpy()
            # Reported boxes are the part in view, as the node publishes them.
            out_boxes = runtime.clip_to_extent(out.boxes_xyxy[0].float().cpu().numpy(),
                                               (clip.image_hw[1], clip.image_hw[0]))
            out_present = (out.boxes_presence_logit[0] > 0).cpu().numpy()
            seconds += time.perf_counter() - start
            depth[t] = out_depth
            points_xy[point_order, t] = out_points
            points_visible[point_order, t] = out_visible
            boxes_xyxy[box_order, t] = out_boxes
            boxes_present[box_order, t] = out_present
    return Predictions(points_xy, points_visible, depth, boxes_xyxy, boxes_present, seconds)


def run_point_tracker(tracker: peers.LucasKanadeTracker, clip: EvalClip) -> Predictions:
    """Runs a point peer online over ``clip`` (same queries as MooG)."""
    points_xy, points_visible = _empty_points(clip)
    tracker.reset()
    order: list[int] = []
    seconds = 0.0
    for t in range(clip.num_frames):
        start = time.perf_counter()
        new_points = np.flatnonzero(clip.query_frame == t)
        if len(new_points):
            tracker.add_points(clip.tracks_xy[new_points, t])
            order.extend(new_points.tolist())
        result = tracker.step(clip.video[t])
        seconds += time.perf_counter() - start
        points_xy[order, t] = result.xy
        points_visible[order, t] = result.visible
    return Predictions(points_xy=points_xy, points_visible=points_visible, seconds=seconds)


def run_box_tracker(tracker: peers.OpenCvBoxTracker, clip: EvalClip) -> Predictions:
    """Runs a box peer online over ``clip`` (same seed boxes as MooG)."""
    boxes_xyxy, boxes_present = _empty_boxes(clip)
    tracker.reset()
    order: list[int] = []
    seconds = 0.0
    for t in range(clip.num_frames):
        start = time.perf_counter()
        new_boxes = np.flatnonzero(clip.box_start == t)
        if len(new_boxes):
            tracker.add_boxes(clip.boxes_xyxy[new_boxes, t])
            order.extend(new_boxes.tolist())
        result = tracker.step(clip.video[t])
        seconds += time.perf_counter() - start
        # Cut to the view like MooG's (OpenCV's rectangles may leave the image).
        boxes_xyxy[order, t] = runtime.clip_to_extent(np.asarray(result.xyxy, np.float32),
                                                      (clip.image_hw[1], clip.image_hw[0]))
        boxes_present[order, t] = result.present
    return Predictions(boxes_xyxy=boxes_xyxy, boxes_present=boxes_present, seconds=seconds)


def run_stay_put(clip: EvalClip) -> Predictions:
    """The tracker that never moves: each query at its own pixel, every box at its seed, all
    visible / present on every frame. The floor any tracker must clear."""
    num_tracks, num_frames = clip.tracks_visible.shape
    start_xy = clip.tracks_xy[np.arange(num_tracks), clip.query_frame]  # [N, 2]
    seed_xyxy = clip.boxes_xyxy[np.arange(len(clip.box_start)), clip.box_start]  # [K, 4]
    return Predictions(
        points_xy=np.repeat(start_xy[:, None], num_frames, axis=1),
        points_visible=np.ones((num_tracks, num_frames), bool),
        boxes_xyxy=np.repeat(seed_xyxy[:, None], num_frames, axis=1),
        boxes_present=np.ones((len(clip.box_start), num_frames), bool))


def run_depth_baseline(baseline: peers.MedianDepthBaseline, clip: EvalClip) -> Predictions:
    """Runs the constant-depth peer over ``clip``."""
    depth = np.empty(clip.video.shape[:3], np.float32)
    seconds = 0.0
    for t in range(clip.num_frames):
        start = time.perf_counter()
        depth[t] = baseline.step(clip.video[t])
        seconds += time.perf_counter() - start
    return Predictions(depth_m=depth, seconds=seconds)


def _depth_region_absrel(gt_m: np.ndarray, segmentation: np.ndarray,
                         pred_m: np.ndarray) -> dict[str, float]:
    """Raw AbsRel over background (id 0) and over object pixels: NaN ground truth outside
    the region makes ``depth_metrics`` skip those pixels (NaN if the region is empty)."""
    background = segmentation == 0  # [T, H, W]
    floor = metrics.depth_metrics(np.where(background, gt_m, np.nan), pred_m)
    objects = metrics.depth_metrics(np.where(background, np.nan, gt_m), pred_m)
    return {'depth_absrel_floor': floor['absrel'], 'depth_absrel_objects': objects['absrel']}


def score(clip: EvalClip, pred: Predictions) -> dict[str, float]:
    """Report-keyed metrics of one method on one clip (only the tasks it predicted)."""
    out: dict[str, float] = {}
    if pred.points_xy is not None:
        point = metrics.tapvid_point_metrics(clip.tracks_xy, clip.tracks_visible, pred.points_xy,
                                             pred.points_visible, clip.query_frame,
                                             clip.image_hw)
        out.update({report: point[key] for key, report in _POINT_KEYS.items()})
    if pred.depth_m is not None:
        depth = metrics.depth_metrics(clip.depth_m, pred.depth_m)
        out.update({report: depth[key] for key, report in _DEPTH_KEYS.items()})
        if clip.segmentation is not None:
            out.update(_depth_region_absrel(clip.depth_m, clip.segmentation, pred.depth_m))
    if pred.boxes_xyxy is not None:
        box = metrics.box_metrics(clip.boxes_xyxy, clip.boxes_valid, pred.boxes_xyxy,
                                  pred.boxes_present, start_frame=clip.box_start)
        out.update({report: box[key] for key, report in _BOX_KEYS.items()})
    return out


# --------------------------------------------------------------------------------------------
# The harness
# --------------------------------------------------------------------------------------------

def load_perception(path: str | os.PathLike, device: torch.device, flag: str) -> MoogPerception:
    """Loads a ``'perception'`` checkpoint; errors name the flag and the file."""
    try:
        loaded = load_checkpoint(path, map_location=device, expected_kind='perception')
    except CheckpointError as err:
        raise CheckpointError(f'{flag}: {err}') from err
    return loaded.model


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def evaluate(
    data: str | os.PathLike,
    checkpoint: str | os.PathLike,
    *,
    grid_checkpoint: str | os.PathLike | None = None,
    extra_checkpoints: dict[str, str | os.PathLike] | None = None,
    train_data: str | os.PathLike | None = None,
    median_depth_m: float | None = None,
    max_clips: int | None = None,
    device: str = 'auto',
    seed: int = 0,
    lk_config: peers.LucasKanadeConfig = peers.LK_PRESETS['default'],
    box_config: peers.BoxTrackerConfig = peers.BOX_TRACKER_PRESETS['default'],
    progress: bool = True,
) -> dict[str, Any]:
    """Runs every method over the clips of ``data`` and returns the report (see module doc).

    Args:
        data: clip directory (``*.npz`` in the clip format).
        checkpoint: MooG perception checkpoint directory.
        grid_checkpoint: optional on-the-grid perception checkpoint (method ``'grid'``).
        extra_checkpoints: more perception checkpoints by method name (ablations), scored
            like ``'moog'`` in the same run.
        train_data: clip directory whose median depth feeds ``'median_depth'``.
        median_depth_m: the median depth directly (exclusive with ``train_data``).
        max_clips: evaluate only the first N clips (sorted by file name).
        device: 'auto', 'cpu', 'cuda' or 'cuda:N' for the MooG models.
        seed: base seed of the MooG initial states.
        lk_config: Lucas–Kanade settings.
        box_config: box tracker settings.
        progress: show a tqdm bar over clips.

    Returns:
        The JSON-ready report dict; undefined figures are None.

    Raises:
        ValueError: both or invalid median-depth sources, or checkpoints at different
            resolutions.
        CheckpointError / clips.ClipFormatError / FileNotFoundError: naming the file.
    """
    if train_data is not None and median_depth_m is not None:
        raise ValueError('give --train-data or --median-depth, not both')
    if max_clips is not None and max_clips < 1:
        raise ValueError(f'--max-clips: expected >= 1, got {max_clips}')
    torch_device = resolve_device(device)
    paths = clips.list_clips(data)[:max_clips]

    models: dict[str, MoogPerception] = {
        'moog': load_perception(checkpoint, torch_device, '--checkpoint')}
    if grid_checkpoint is not None:
        models['grid'] = load_perception(grid_checkpoint, torch_device, '--grid-checkpoint')
    for name, path in (extra_checkpoints or {}).items():
        if name in models or name in METHOD_KEYS:
            raise ValueError(f'--extra-checkpoint name {name!r} is taken by another method')
        models[name] = load_perception(path, torch_device, f'--extra-checkpoint {name}')
    resolution = tuple(models['moog'].image_size)
    for name, model in models.items():
        if tuple(model.image_size) != resolution:
            raise ValueError(f'{name} checkpoint runs at {list(model.image_size)} but moog at '
                             f'{list(resolution)}; both must share one evaluation resolution')

    if train_data is not None:
        median_depth_m = peers.training_median_depth(train_data)
    point_peer = peers.LucasKanadeTracker(lk_config)
    box_peer = peers.OpenCvBoxTracker(box_config)
    depth_peer = peers.MedianDepthBaseline(median_depth_m) if median_depth_m is not None else None

    runners: dict[str, Callable[[EvalClip, int], Predictions]] = {}
    for name, model in models.items():
        runners[name] = (lambda c, i, m=model: run_perception(m, c, torch_device, seed + i))
    runners['lk'] = lambda c, i: run_point_tracker(point_peer, c)
    runners['box_tracker'] = lambda c, i: run_box_tracker(box_peer, c)
    runners['stay_put'] = lambda c, i: run_stay_put(c)
    if depth_peer is not None:
        runners['median_depth'] = lambda c, i: run_depth_baseline(depth_peer, c)

    averagers = {name: metrics.ClipAverager() for name in runners}
    frames = 0
    seconds = dict.fromkeys(runners, 0.0)
    for index, path in enumerate(tqdm(paths, desc='evaluate', unit='clip', disable=not progress)):
        clip = prepare_clip(clips.load_clip(path), resolution, path.stem)
        frames += clip.num_frames
        for name, run in runners.items():
            pred = run(clip, index)
            seconds[name] += pred.seconds
            averagers[name].add(score(clip, pred))

    methods: dict[str, dict[str, Any]] = {}
    for name, averager in averagers.items():
        means = averager.mean()
        entry: dict[str, Any] = {}
        if name == 'box_tracker':
            entry['name'] = box_peer.name
        if name == 'median_depth':
            entry['median_depth_m'] = median_depth_m
        for key in METHOD_KEYS.get(name, METHOD_KEYS['moog']):
            if key in means:
                entry[key] = _finite_or_none(means[key])
        if name != 'stay_put':  # computes nothing per frame
            entry['frames_per_s'] = (frames / seconds[name]) if seconds[name] > 0 else None
        methods[name] = entry
    return {'clips': len(paths), 'resolution': list(resolution), 'methods': methods}


_TABLE_COLUMNS = (('AJ', 'points_aj'), ('<δavg', 'points_delta_avg'), ('OA', 'points_oa'),
                  ('AbsRel', 'depth_absrel'), ('δ1', 'depth_delta1'),
                  ('AbsRel(ms)', 'depth_absrel_median_scaled'), ('mIoU', 'boxes_miou'),
                  ('frames/s', 'frames_per_s'))


def format_table(report: dict[str, Any]) -> str:
    """One row per method; '-' where a method does not do a task, 'n/a' where undefined."""
    header = f'{"method":<22}' + ''.join(f'{title:>11}' for title, _ in _TABLE_COLUMNS)
    lines = [f'{report["clips"]} clips at {report["resolution"][0]}x{report["resolution"][1]} '
             '(HxW); AbsRel(ms) = median-scaled', header, '-' * len(header)]
    for name, entry in report['methods'].items():
        label = f'{name} ({entry["name"]})' if 'name' in entry else name
        cells = []
        for _, key in _TABLE_COLUMNS:
            if key not in entry:
                cells.append(f'{"-":>11}')
            elif entry[key] is None:
                cells.append(f'{"n/a":>11}')
            elif key == 'frames_per_s':
                cells.append(f'{entry[key]:>11.1f}')
            else:
                cells.append(f'{entry[key]:>11.3f}')
        lines.append(f'{label:<22}' + ''.join(cells))
    return '\n'.join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The ``moog_evaluate`` command line."""
    parser = argparse.ArgumentParser(
        prog='moog_evaluate', description=__doc__.split('\n\n')[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--data', required=True,
                        help='directory of evaluation clips (*.npz, clip format)')
    parser.add_argument('--checkpoint', required=True,
                        help='MooG perception checkpoint directory (method "moog")')
    parser.add_argument('--grid-checkpoint', default=None,
                        help='on-the-grid perception checkpoint (method "grid"); optional')
    parser.add_argument('--extra-checkpoint', action='append', default=[], metavar='NAME=DIR',
                        help='another perception checkpoint scored as method NAME (ablations); '
                             'repeatable')
    depth = parser.add_mutually_exclusive_group()
    depth.add_argument('--train-data', default=None,
                       help='training clip directory; its median depth is the "median_depth" '
                            'baseline')
    depth.add_argument('--median-depth', type=float, default=None,
                       help='the "median_depth" baseline in metres (instead of --train-data)')
    parser.add_argument('--max-clips', type=int, default=None,
                        help='evaluate only the first N clips (sorted by name)')
    parser.add_argument('--json', default=None, help='write the report to this JSON file')
    parser.add_argument('--device', default='auto',
                        help="device of the MooG models: 'auto', 'cpu', 'cuda' or 'cuda:N'")
    parser.add_argument('--seed', type=int, default=0,
                        help='base seed of the MooG initial states (clip i uses seed + i)')
    parser.add_argument('--lk-preset', default='default', choices=sorted(peers.LK_PRESETS),
                        help='Lucas-Kanade settings preset')
    parser.add_argument('--box-tracker', default='auto',
                        choices=('auto', *peers.BOX_TRACKER_ALGORITHMS),
                        help='OpenCV box tracker (auto: CSRT, else KCF, else MIL)')
    parser.add_argument('--quiet', action='store_true', help='no progress bar')
    return parser


def write_report(path: str | os.PathLike, report: dict[str, Any]) -> None:
    """Writes the report as strict JSON (no NaN), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.tmp')
    tmp.write_text(json.dumps(report, indent=2, allow_nan=False) + '\n')
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``moog_evaluate``."""
    args = build_parser().parse_args(argv)
    extra = {}
    for item in args.extra_checkpoint:
        name, sep, path = item.partition('=')
        if not sep or not name or not path:
            print(f'moog_evaluate: error: --extra-checkpoint wants NAME=DIR, got {item!r}',
                  file=sys.stderr)
            return 2
        extra[name] = path
    try:
        report = evaluate(
            args.data, args.checkpoint, grid_checkpoint=args.grid_checkpoint,
            extra_checkpoints=extra,
            train_data=args.train_data, median_depth_m=args.median_depth,
            max_clips=args.max_clips, device=args.device, seed=args.seed,
            lk_config=peers.LK_PRESETS[args.lk_preset],
            box_config=peers.BoxTrackerConfig(algorithm=args.box_tracker),
            progress=not args.quiet)
    except (CheckpointError, clips.ClipFormatError, FileNotFoundError, ValueError) as err:
        print(f'moog_evaluate: error: {err}', file=sys.stderr)
        return 2
    print(format_table(report))
    if 'median_depth' not in report['methods']:
        print('(median_depth skipped: pass --train-data or --median-depth)')
    if args.json:
        write_report(args.json, report)
        print(f'wrote {args.json}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

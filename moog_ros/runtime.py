"""The one per-frame pipeline shared by the node, ``moog_infer`` and the demo (numpy in and out).

``MoogRuntime.process(rgb, stamp_ns)`` takes a camera frame at any resolution and returns a
:class:`FrameResult` in *input* pixels::

    rgb uint8 [H, W, 3] --FrameGeometry.warp--> [Hm, Wm, 3] --/255--> MoogPerception.step
        --> depth (NaN outside range / pad bars), points and boxes in model pixels
        --FrameGeometry.to_input_*--> FrameResult (track ids, visibility, box ids, depths)

Around the model it owns everything that makes a live stream usable:

- **Track ids.** Every point and box query has a uint32 id, unique for the runtime's lifetime
  (one counter for points and boxes; never reused, also not after a reset). Ids live in arrays
  parallel to the model's query order, updated exactly when ``add_*``/``keep_*`` change it.
- **Seeding.** A grid of query points (``grid_points``) is seeded on the first frame, and every
  frame each grid cell that no live track occupies gets a new query, up to ``max_points``.
  Point tracks end after ``max_invisible_frames`` consecutive invisible frames.
- **Boxes.** ``add_boxes`` matches each new box to the live box tracks by IoU; a match keeps the
  track's id and re-seeds its query from the new box (a detector corrects drift), others start
  new tracks. Box tracks end after ``max_absent_frames`` frames below the presence threshold.
- **Resets.** The recurrent state resets when the stamp jumps backwards (a bag loop), after a
  stamp gap longer than ``reset_gap_s``, when the input resolution changes, and on request.
  The first result after a reset carries the reason.

Threading: ``process`` runs on one thread at a time; ``add_points``, ``add_boxes``,
``clear_points`` and ``reset`` may be called from any thread. They only queue a request under a
lock (and return the new ids at once); the request takes effect at the start of the next
``process``, so the model state is never touched concurrently.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
import dataclasses
from dataclasses import dataclass
import math
import os
from pathlib import Path
import threading
import time

import numpy as np
import torch

from moog_ros.imaging import RESIZE_MODES, FrameGeometry, sample_bilinear
from moog_ros.logtext import short_list
from moog_ros.model.checkpoint import load_checkpoint
from moog_ros.model.perception import MoogPerception, PerceptionState

# ------------------------------------------------------------------------------------------------
# Config.
# ------------------------------------------------------------------------------------------------

PRECISIONS = ('auto', 'fp32', 'bf16')


@dataclass(frozen=True)
class RuntimeConfig:
    """Per-frame policy around the model (the model resolution comes from the model).

    Attributes:
        resize_mode: aspect policy, one of ``imaging.RESIZE_MODES``.
        depth_resolution: ``'model'`` (the model canvas) or ``'input'`` (the camera image).
        reset_gap_s: a stamp gap longer than this resets the state (0 disables).
        grid_points: about this many grid cells are kept seeded with a query point (the
            nearest ``gx * gy`` grid to the model aspect); 0 disables automatic seeding.
        max_points: most live point tracks (grid seeds stop at the cap; added points past it
            are rejected).
        visible_threshold: a point is visible when ``p(visible) * p(certain)`` exceeds this
            (``p(visible)`` alone for a model whose ``visibility_rule`` is ``'visible'``).
        max_invisible_frames: a point track ends after this many consecutive invisible frames.
        trail_length: frames of (u, v, depth) history kept for trails.
        max_boxes: most live box tracks.
        box_match_iou: IoU at which an added box continues a live box track.
        box_presence_threshold: a box is reported while ``p(present)`` is at least this.
        max_absent_frames: a box track ends after this many consecutive absent frames.
        depth_range_m: depth outside ``[min, max]`` metres is NaN (REP 117: invalid).
        seed: seed of the initial token noise, so a replay gives the same outputs.
        precision: arithmetic of the model step, one of :data:`PRECISIONS`: ``'fp32'``,
            ``'bf16'`` (``torch.autocast``; fast on CUDA and on CPUs with bf16 matrix units)
            or ``'auto'`` (:func:`resolve_precision`: bf16 where it is known to be faster).
            fp32 by default, so offline results do not depend on the machine; the live node
            asks for ``'auto'`` (its ``precision`` parameter).
    """

    resize_mode: str = 'crop'
    depth_resolution: str = 'model'
    reset_gap_s: float = 2.0
    grid_points: int = 64
    max_points: int = 256
    visible_threshold: float = 0.5
    max_invisible_frames: int = 15
    trail_length: int = 12
    max_boxes: int = 32
    box_match_iou: float = 0.5
    box_presence_threshold: float = 0.5
    max_absent_frames: int = 5
    depth_range_m: tuple[float, float] = (0.05, 100.0)
    seed: int = 0
    precision: str = 'fp32'

    def __post_init__(self) -> None:
        problems = []
        if self.resize_mode not in RESIZE_MODES:
            problems.append(f'resize_mode {self.resize_mode!r} is not one of {RESIZE_MODES}')
        if self.precision not in PRECISIONS:
            problems.append(f'precision {self.precision!r} is not one of {PRECISIONS}')
        if self.depth_resolution not in ('model', 'input'):
            problems.append(f"depth_resolution {self.depth_resolution!r} is not 'model' or "
                            "'input'")
        for name in ('grid_points', 'trail_length', 'seed'):
            if getattr(self, name) < 0:
                problems.append(f'{name} must be >= 0, got {getattr(self, name)}')
        for name in ('max_points', 'max_invisible_frames', 'max_boxes', 'max_absent_frames'):
            if getattr(self, name) < 1:
                problems.append(f'{name} must be >= 1, got {getattr(self, name)}')
        for name in ('visible_threshold', 'box_match_iou', 'box_presence_threshold'):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f'{name} must be in [0, 1], got {getattr(self, name)}')
        if not (math.isfinite(self.reset_gap_s) and self.reset_gap_s >= 0):
            problems.append(f'reset_gap_s must be >= 0, got {self.reset_gap_s}')
        low, high = self.depth_range_m
        if not 0.0 <= low < high:
            problems.append(f'depth_range_m must satisfy 0 <= min < max, got {(low, high)}')
        if problems:
            raise ValueError('RuntimeConfig: ' + '; '.join(problems))

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> RuntimeConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f'RuntimeConfig: unknown keys {sorted(unknown)}')
        data = dict(data)
        if 'depth_range_m' in data:
            data['depth_range_m'] = tuple(data['depth_range_m'])
        return cls(**data)


RUNTIME_PRESETS = {
    'default': RuntimeConfig(),
    # Denser automatic tracking for offline runs (moog_infer), where latency does not matter.
    'dense': RuntimeConfig(grid_points=256, max_points=512),
    # Boxes only: no automatic points (points come from add_points, if any).
    'boxes': RuntimeConfig(grid_points=0),
}


def get_runtime_config(name: str) -> RuntimeConfig:
    """Named preset: 'default', 'dense' or 'boxes'."""
    if name not in RUNTIME_PRESETS:
        raise ValueError(f'unknown runtime preset {name!r}; choose one of '
                         f'{sorted(RUNTIME_PRESETS)}')
    return RUNTIME_PRESETS[name]


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX512-BF16 or AMX; Linux flags)."""
    try:
        text = Path('/proc/cpuinfo').read_text()
    except OSError:
        return False
    flags = next((line.split(':', 1)[1].split() for line in text.splitlines()
                  if line.startswith('flags')), [])
    return 'avx512_bf16' in flags or 'amx_bf16' in flags


def resolve_precision(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of the model step on ``device``, or None for plain fp32.

    ``'auto'`` picks bf16 where it is faster: a CUDA device with bf16 support. On CPUs it
    stays fp32: with the shipped hybrid model (XFeat convolutions, small per-query ops) the
    node's step on this project's AMX CPU took 33-35 ms p50 in fp32 against 41 ms in bf16
    (``bench/bench_node.py --quick --num-threads 1 --precision fp32 bf16``; the earlier
    tokens-only model was the other way round, 28 against 35 ms); ``bf16`` still opts in.
    """
    if precision not in PRECISIONS:
        raise ValueError(f'precision {precision!r} is not one of {PRECISIONS}')
    device = torch.device(device)
    if precision == 'auto':
        wins = device.type == 'cuda' and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if wins else None
    return torch.bfloat16 if precision == 'bf16' else None


def resolve_device(name: str) -> torch.device:
    """``'auto'`` -> cuda if available, else cpu; other names are checked to exist.

    Raises:
        RuntimeError: a CUDA/MPS device was asked for and is not available.
    """
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    device = torch.device(name)
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise RuntimeError(f'device {name!r}: CUDA is not available to this torch build')
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(f'device {name!r}: only {torch.cuda.device_count()} CUDA '
                               'devices are visible')
    if device.type == 'mps' and not torch.backends.mps.is_available():
        raise RuntimeError(f'device {name!r}: MPS is not available')
    return device


# ------------------------------------------------------------------------------------------------
# Results.
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameResult:
    """Everything one frame produced, in input pixels (see ``docs/architecture.md``).

    Attributes:
        stamp_ns: the frame's stamp.
        frame_index: frames since the last reset (0 = the first frame of a new state).
        geometry: how the input mapped onto the model canvas.
        depth_m: float32 ``[h, w]`` metres along z, NaN invalid; model or input resolution
            (``depth_resolution``).
        track_ids: uint32 ``[N]`` live point tracks.
        tracks_xy: float32 ``[N, 2]`` input pixels.
        tracks_visible: bool ``[N]``.
        tracks_confidence: float32 ``[N]`` p(certain): how sure the position is.
        tracks_depth_m: float32 ``[N]`` depth at each track (NaN where unknown).
        ended_track_ids: uint32 ``[E]`` point tracks that ended at this frame.
        box_ids: uint32 ``[M]`` box tracks present in this frame.
        boxes_xyxy: float32 ``[M, 4]`` input pixels.
        boxes_score: float32 ``[M]`` p(present).
        boxes_depth_m: float32 ``[M]`` median depth inside each box (NaN where unknown).
        box_labels: class label per box ('' when seeded without one).
        ended_box_ids: uint32 ``[E]`` box tracks that ended at this frame.
        reset_reason: why the state was reset before this frame, else None.
        notes: requests that could not be honoured (e.g. points outside the view), to log.
        step_ms: model step including the device-to-host copy of its outputs.
        total_ms: the whole ``process`` call.
    """

    stamp_ns: int
    frame_index: int
    geometry: FrameGeometry
    depth_m: np.ndarray
    track_ids: np.ndarray
    tracks_xy: np.ndarray
    tracks_visible: np.ndarray
    tracks_confidence: np.ndarray
    tracks_depth_m: np.ndarray
    ended_track_ids: np.ndarray
    box_ids: np.ndarray
    boxes_xyxy: np.ndarray
    boxes_score: np.ndarray
    boxes_depth_m: np.ndarray
    box_labels: tuple[str, ...]
    ended_box_ids: np.ndarray
    reset_reason: str | None
    notes: tuple[str, ...]
    step_ms: float
    total_ms: float


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix ``[N, M]`` of xyxy boxes ``a [N, 4]`` and ``b [M, 4]`` (areas as extents)."""
    a = np.asarray(a, np.float64).reshape(-1, 1, 4)
    b = np.asarray(b, np.float64).reshape(1, -1, 4)
    w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = w * h
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def clip_to_extent(xyxy: np.ndarray, image_wh: tuple[int, int]) -> np.ndarray:
    """Boxes ``[..., 4]`` cut to the image extent ``[-0.5, W - 0.5] x [-0.5, H - 0.5]``.

    The model keeps a box that leaves the image whole (its fit and state need the full
    extent), but what is reported is the part in view, as ground-truth boxes and detectors
    give it (measured on the held-out clips with ground-truth member tracks: +0.008 mIoU,
    ``bench/box_fit_oracle.py``).
    """
    W, H = image_wh
    lo = np.array([-0.5, -0.5, -0.5, -0.5], np.float32)
    hi = np.array([W - 0.5, H - 0.5, W - 0.5, H - 0.5], np.float32)
    return np.clip(xyxy, lo, hi).astype(np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


_NO_IDS = np.zeros(0, dtype=np.uint32)
_QUEUED_BOX_FACTOR = 4  # boxes queued between two frames: at most this times max_boxes
# Coordinates further out than this are no camera's pixels; 1e308 would overflow the geometry.
MAX_COORDINATE = 1e6


@dataclass
class _Requests:
    """Requests queued by other threads; applied at the start of the next frame."""

    reset: str | None = None
    clear_points: bool = False
    points: list[tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=list)
    boxes: list[tuple[np.ndarray, np.ndarray, list[str]]] = dataclasses.field(
        default_factory=list)


# ------------------------------------------------------------------------------------------------
# The runtime.
# ------------------------------------------------------------------------------------------------


class MoogRuntime:
    """Runs a :class:`MoogPerception` frame by frame on a stream (see the module docstring).

    Args:
        model: the perception model (moved to ``device``, put in eval mode).
        config: the per-frame policy.
        device: torch device for the model, its state and the readout state.
    """

    def __init__(self, model: MoogPerception, config: RuntimeConfig,
                 device: torch.device | str) -> None:
        self.device = torch.device(device)
        # Channels-last conv weights: oneDNN's (and cuDNN's) fast layout for the XFeat, encoder
        # and depth-fusion convolutions (the same results up to float summation order; about
        # 10 % of a CPU step measured interleaved with the default layout).
        self.model = model.to(self.device, memory_format=torch.channels_last).eval()
        # On a CPU with a core to spare, a second thread computes the XFeat maps while MooG
        # steps and the depth map while the point and box readouts run
        # (``MoogPerception.step(executor=)``; identical outputs, 31 -> 24 ms for the shipped
        # model's step on 1 torch thread each). A GPU already overlaps its kernels.
        self._features_pool = (
            ThreadPoolExecutor(1, thread_name_prefix='moog_step')
            if self.device.type == 'cpu' and (os.cpu_count() or 1) >= 2 else None)
        self.config = config
        self.autocast_dtype = resolve_precision(config.precision, self.device)
        H, W = model.image_size
        self.model_wh = (int(W), int(H))
        self._lock = threading.Lock()
        self._requests = _Requests()
        self._next_id = 1
        self._geometry: FrameGeometry | None = None
        # Box positions of the last frame (input pixels, every live track, present or not) for
        # matching added boxes; replaced as a whole under the lock.
        self._match_ids = _NO_IDS
        self._match_xyxy = np.zeros((0, 4), np.float32)
        self._clear_state()

    # -------------------------------------------------------------------------------- requests

    def _new_ids(self, count: int) -> np.ndarray:
        ids = np.arange(self._next_id, self._next_id + count, dtype=np.uint32)
        self._next_id += count
        return ids

    def add_points(self, xy_input: np.ndarray) -> np.ndarray:
        """Queues query points (input pixels ``[N, 2]``); they start on the next frame.

        Returns:
            uint32 ``[N]`` the ids the new tracks will have.

        Raises:
            ValueError: wrong shape, non-finite values, (once a frame has been seen) a point
                outside the part of the image the model sees, or more than ``max_points``
                points queued before the next frame.
        """
        xy = np.asarray(xy_input, dtype=np.float64)
        if xy.ndim != 2 or xy.shape[1] != 2:
            raise ValueError(f'add_points: expected [N, 2] input pixels, got {list(xy.shape)}')
        if not np.isfinite(xy).all() or (xy.size and np.abs(xy).max() > MAX_COORDINATE):
            raise ValueError(f'add_points: coordinates must be finite and within '
                             f'+-{MAX_COORDINATE:g} pixels')
        with self._lock:
            geometry = self._geometry
            if geometry is not None:
                outside = ~geometry.input_in_view(xy)
                if outside.any():
                    raise ValueError(
                        f'add_points: {short_list(xy[outside].round(1).tolist(), 4)} outside '
                        'the model view '
                        f'(input {geometry.input_wh[0]}x{geometry.input_wh[1]}, crop x, y, w, h '
                        f'= {geometry.crop_xywh}, resize_mode {geometry.mode!r})')
            # Queued points beyond max_points could never all start: refusing them here keeps
            # a flood of clicks between two frames from growing the queue (and the next
            # frame's work) without bound.
            queued = sum(len(q) for q, _ in self._requests.points)
            if queued + len(xy) > self.config.max_points:
                raise ValueError(f'add_points: {len(xy)} more points would queue '
                                 f'{queued + len(xy)} before the next frame, over max_points '
                                 f'({self.config.max_points})')
            ids = self._new_ids(len(xy))
            self._requests.points.append((ids, xy))
        return ids

    def add_boxes(self, xyxy_input: np.ndarray, labels: Sequence[str] | None = None
                  ) -> np.ndarray:
        """Queues boxes (xyxy input pixels ``[N, 4]``): matched ones keep their track's id.

        Each box is matched greedily, highest IoU first, to the live box tracks of the last
        frame; at ``box_match_iou`` or more it continues that track (same id, query re-seeded
        from this box), otherwise it starts a new track.

        Args:
            xyxy_input: ``[N, 4]`` boxes.
            labels: optional class label per box (kept with the track).

        Returns:
            uint32 ``[N]`` the id each box's track has.

        Raises:
            ValueError: wrong shape, non-finite values, a box without positive size, or more
                than 4 x ``max_boxes`` boxes queued before the next frame.
        """
        xyxy = np.asarray(xyxy_input, dtype=np.float64).reshape(-1, 4)
        if np.asarray(xyxy_input).ndim not in (1, 2) or np.asarray(xyxy_input).shape[-1] != 4:
            raise ValueError(f'add_boxes: expected [N, 4] xyxy, got '
                             f'{list(np.asarray(xyxy_input).shape)}')
        if not np.isfinite(xyxy).all() or (xyxy.size and np.abs(xyxy).max() > MAX_COORDINATE):
            raise ValueError(f'add_boxes: coordinates must be finite and within '
                             f'+-{MAX_COORDINATE:g} pixels')
        bad = (xyxy[:, 2] <= xyxy[:, 0]) | (xyxy[:, 3] <= xyxy[:, 1])
        if bad.any():
            raise ValueError(f'add_boxes: boxes need x_max > x_min and y_max > y_min: '
                             f'{short_list(xyxy[bad].round(1).tolist(), 4)}')
        labels = list(labels) if labels is not None else [''] * len(xyxy)
        if len(labels) != len(xyxy):
            raise ValueError(f'add_boxes: {len(labels)} labels for {len(xyxy)} boxes')
        with self._lock:
            # A detector faster than the model queues several batches per frame (each box
            # replacing its match), so the bound is a few frames' worth, not max_boxes.
            queued = sum(len(q) for q, _, _ in self._requests.boxes)
            if queued + len(xyxy) > _QUEUED_BOX_FACTOR * self.config.max_boxes:
                raise ValueError(f'add_boxes: {len(xyxy)} more boxes would queue '
                                 f'{queued + len(xyxy)} before the next frame, over '
                                 f'{_QUEUED_BOX_FACTOR} x max_boxes ({self.config.max_boxes})')
            ids = np.zeros(len(xyxy), dtype=np.uint32)
            iou = box_iou(xyxy, self._match_xyxy)  # [N, L]
            while iou.size and iou.max() >= max(self.config.box_match_iou, 1e-9):
                n, m = np.unravel_index(np.argmax(iou), iou.shape)
                ids[n] = self._match_ids[m]
                iou[n, :] = -1.0
                iou[:, m] = -1.0
            new = ids == 0
            ids[new] = self._new_ids(int(new.sum()))
            self._requests.boxes.append((ids, xyxy, labels))
        return ids

    def clear_points(self) -> None:
        """Ends every point track at the next frame (grid seeding then starts afresh)."""
        with self._lock:
            self._requests.clear_points = True
            self._requests.points.clear()

    def reset(self, reason: str) -> None:
        """Resets the recurrent state and every track at the next frame (ids keep counting)."""
        with self._lock:
            self._requests.reset = reason

    # ------------------------------------------------------------------------------ internals

    def _clear_state(self) -> None:
        """Forgets the model state, every track and the history (not the id counter)."""
        self._state: PerceptionState | None = None
        self._frame_index = 0
        self._last_stamp_ns: int | None = None
        self._point_ids = _NO_IDS
        self._point_misses = np.zeros(0, np.int64)
        self._points_model_xy = np.zeros((0, 2), np.float32)  # last positions (for the grid)
        self._box_ids = _NO_IDS
        self._box_absent = np.zeros(0, np.int64)
        self._box_labels: list[str] = []
        self._history: deque[tuple[np.ndarray, np.ndarray]] = deque(
            maxlen=max(1, self.config.trail_length))
        with self._lock:
            self._match_ids = _NO_IDS
            self._match_xyxy = np.zeros((0, 4), np.float32)

    def _fresh_state(self) -> PerceptionState:
        generator = torch.Generator().manual_seed(self.config.seed)
        return self.model.init_state(1, self.device, generator=generator)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(array, np.float32), device=self.device)[None]

    def _keep_points(self, keep: np.ndarray) -> None:
        if keep.all():
            return
        self._state = self.model.keep_points(
            self._state, torch.as_tensor(keep, device=self.device)[None])
        self._point_ids = self._point_ids[keep]
        self._point_misses = self._point_misses[keep]
        self._points_model_xy = self._points_model_xy[keep]

    def _append_points(self, ids: np.ndarray, xy_model: np.ndarray) -> None:
        self._state = self.model.add_points(self._state, self._to_device(xy_model))
        self._point_ids = np.concatenate([self._point_ids, ids.astype(np.uint32)])
        self._point_misses = np.concatenate([self._point_misses, np.zeros(len(ids), np.int64)])
        self._points_model_xy = np.concatenate([self._points_model_xy,
                                                xy_model.astype(np.float32)])

    def _keep_boxes(self, keep: np.ndarray) -> None:
        if keep.all():
            return
        self._state = self.model.keep_boxes(
            self._state, torch.as_tensor(keep, device=self.device)[None])
        self._box_ids = self._box_ids[keep]
        self._box_absent = self._box_absent[keep]
        self._box_labels = [label for label, k in zip(self._box_labels, keep) if k]

    def _apply_requests(self, requests: _Requests, geometry: FrameGeometry,
                        notes: list[str], ended_points: list[np.ndarray],
                        ended_boxes: list[np.ndarray]) -> None:
        if requests.clear_points and len(self._point_ids):
            ended_points.append(self._point_ids)
            self._keep_points(np.zeros(len(self._point_ids), bool))
        valid_x0, valid_y0, valid_w, valid_h = geometry.place_xywh
        # Boxes: a match replaces the live query (same id); the rest are new tracks.
        for ids, xyxy, labels in requests.boxes:
            replace = np.isin(self._box_ids, ids)
            replaced_ids = self._box_ids[replace]
            old_labels = dict(zip(self._box_ids.tolist(), self._box_labels))
            self._keep_boxes(~replace)
            xyxy_model = geometry.to_model_xyxy(xyxy).astype(np.float64)
            # Clip to the part of the canvas with image content; a box wholly outside it
            # cannot be tracked.
            xyxy_model[:, [0, 2]] = np.clip(xyxy_model[:, [0, 2]], valid_x0 - 0.5,
                                            valid_x0 + valid_w - 0.5)
            xyxy_model[:, [1, 3]] = np.clip(xyxy_model[:, [1, 3]], valid_y0 - 0.5,
                                            valid_y0 + valid_h - 0.5)
            inside = ((xyxy_model[:, 2] > xyxy_model[:, 0])
                      & (xyxy_model[:, 3] > xyxy_model[:, 1]))
            if not inside.all():
                notes.append(f'dropped boxes {short_list(ids[~inside].tolist())}: outside the '
                             'model view')
            take = _within_cap(np.flatnonzero(inside), ids, len(self._box_ids),
                               self.config.max_boxes, 'boxes', notes)
            if len(take):
                self._state = self.model.add_boxes(self._state, self._to_device(xyxy_model[take]))
                self._box_ids = np.concatenate([self._box_ids, ids[take]])
                self._box_absent = np.concatenate([self._box_absent,
                                                   np.zeros(len(take), np.int64)])
                self._box_labels += [labels[k] or old_labels.get(int(ids[k]), '') for k in take]
            # A live track whose replacement box was dropped has ended.
            lost = np.setdiff1d(replaced_ids, ids[take])
            if len(lost):
                ended_boxes.append(lost.astype(np.uint32))
        # Points added by the user.
        for ids, xy in requests.points:
            inside = geometry.input_in_view(xy)
            if not inside.all():
                notes.append(f'dropped points {short_list(ids[~inside].tolist())}: outside the '
                             'model view')
            take = _within_cap(np.flatnonzero(inside), ids, len(self._point_ids),
                               self.config.max_points, 'points', notes)
            if len(take):
                self._append_points(ids[take], geometry.to_model_xy(xy[take]))

    def _seed_grid(self, geometry: FrameGeometry) -> None:
        """Seeds a query at the centre of every grid cell that no live track occupies."""
        cfg = self.config
        room = cfg.max_points - len(self._point_ids)
        if cfg.grid_points <= 0 or room <= 0:
            return
        x0, y0, w, h = geometry.place_xywh
        gx = max(1, round(math.sqrt(cfg.grid_points * w / h)))
        gy = max(1, round(cfg.grid_points / gx))
        occupied = np.zeros((gy, gx), bool)
        if len(self._points_model_xy):
            # Pixel-centre coordinates -> cell index over the image extent [x0 - 0.5, ...).
            cx = np.floor((self._points_model_xy[:, 0] + 0.5 - x0) * gx / w).astype(np.int64)
            cy = np.floor((self._points_model_xy[:, 1] + 0.5 - y0) * gy / h).astype(np.int64)
            inside = (cx >= 0) & (cx < gx) & (cy >= 0) & (cy < gy)
            occupied[cy[inside], cx[inside]] = True
        free_y, free_x = np.nonzero(~occupied)
        if not len(free_x):
            return
        free_x, free_y = free_x[:room], free_y[:room]
        seeds = np.stack([x0 + (free_x + 0.5) * w / gx - 0.5,
                          y0 + (free_y + 0.5) * h / gy - 0.5], axis=1)
        self._append_points(self._new_ids_locked(len(seeds)), seeds.astype(np.float32))

    def _new_ids_locked(self, count: int) -> np.ndarray:
        with self._lock:
            return self._new_ids(count)

    # -------------------------------------------------------------------------------- process

    def process(self, rgb: np.ndarray, stamp_ns: int) -> FrameResult:
        """Runs one frame.

        Args:
            rgb: uint8 ``[H, W, 3]`` RGB camera frame (any resolution).
            stamp_ns: capture time in nanoseconds (drives the gap/backwards reset policy).

        Returns:
            The frame's :class:`FrameResult` (input pixels).

        Raises:
            ValueError: ``rgb`` is not uint8 ``[H, W, 3]`` with H, W > 0.
        """
        start = time.perf_counter()
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
            raise ValueError(f'process: expected uint8 [H, W, 3] RGB, got {rgb.dtype} '
                             f'{list(rgb.shape)}')
        cfg = self.config
        stamp_ns = int(stamp_ns)
        H, W = rgb.shape[:2]
        with self._lock:
            requests, self._requests = self._requests, _Requests()
        reason = requests.reset
        last = self._last_stamp_ns
        if reason is None and last is not None and stamp_ns < last:
            reason = f'stamp jumped backwards by {(last - stamp_ns) / 1e9:.3f} s'
        if (reason is None and last is not None and cfg.reset_gap_s > 0
                and stamp_ns - last > cfg.reset_gap_s * 1e9):
            reason = (f'{(stamp_ns - last) / 1e9:.3f} s gap between frames '
                      f'(reset_gap {cfg.reset_gap_s:g} s)')
        geometry = self._geometry
        if geometry is None or geometry.input_wh != (W, H):
            if geometry is not None and reason is None:
                reason = (f'input resolution changed from {geometry.input_wh[0]}x'
                          f'{geometry.input_wh[1]} to {W}x{H}')
            geometry = FrameGeometry.fit((W, H), self.model_wh, cfg.resize_mode)
            with self._lock:
                self._geometry = geometry
        notes: list[str] = []
        ended_points: list[np.ndarray] = []
        ended_boxes: list[np.ndarray] = []
        if reason is not None and self._state is not None:
            ended_points.append(self._point_ids)
            ended_boxes.append(self._box_ids)
            self._clear_state()
        elif reason is not None:
            self._clear_state()
        if self._state is None:
            self._state = self._fresh_state()

        with torch.inference_mode():
            self._apply_requests(requests, geometry, notes, ended_points, ended_boxes)
            self._seed_grid(geometry)
            model_rgb = geometry.warp(rgb)
            if not model_rgb.flags.writeable:  # an identity warp of a read-only message buffer
                model_rgb = model_rgb.copy()
            frame = torch.from_numpy(model_rgb).to(self.device, non_blocking=True)
            frame = frame.float().div_(255.0)[None]  # [1, Hm, Wm, 3]
            step_start = time.perf_counter()
            dtype = self.autocast_dtype
            with torch.autocast(self.device.type, dtype=dtype or torch.bfloat16,
                                enabled=dtype is not None):
                out, self._state = self.model.step(frame, self._state, dense_depth=True,
                                                   executor=self._features_pool)
            # One host copy per output family (each .cpu() waits for the device); float32 on
            # the host whatever the step computed in.
            depth_model = out.depth_m[0].float().cpu().numpy()  # [Hm, Wm]
            points = torch.cat([out.points_xy[0], out.points_visible_logit[0, :, None],
                                out.points_certain_logit[0, :, None]], 1).float().cpu().numpy()
            boxes = torch.cat([out.boxes_xyxy[0], out.boxes_presence_logit[0, :, None]],
                              1).float().cpu().numpy()
            step_ms = (time.perf_counter() - step_start) * 1e3

            # Depth: REP 117 -- NaN outside the valid range and on pad bars.
            low, high = cfg.depth_range_m
            with np.errstate(invalid='ignore'):
                depth_model[~((depth_model >= low) & (depth_model <= high))] = np.nan
            if geometry.place_xywh[2:] != tuple(self.model_wh):
                depth_model[~geometry.model_valid_mask()] = np.nan

            # Points.
            points_xy_model = points[:, :2].astype(np.float32)
            p_visible = _sigmoid(points[:, 2])
            p_certain = _sigmoid(points[:, 3])
            # The model's visibility rule, at the runtime's threshold.
            visible = (p_visible if out.visibility_rule == 'visible'
                       else p_visible * p_certain) > cfg.visible_threshold
            x0, y0, w, h = geometry.place_xywh
            # A point predicted on a pad bar is not on the image.
            px, py = points_xy_model[:, 0], points_xy_model[:, 1]
            visible &= ((px >= x0 - 0.5) & (px <= x0 + w - 0.5)
                        & (py >= y0 - 0.5) & (py <= y0 + h - 0.5))
            self._points_model_xy = points_xy_model
            self._point_misses = np.where(visible, 0, self._point_misses + 1)
            keep = self._point_misses < cfg.max_invisible_frames
            if not keep.all():
                ended_points.append(self._point_ids[~keep])
            track_ids = self._point_ids[keep]
            tracks_xy = geometry.to_input_xy(points_xy_model[keep])
            tracks_depth = sample_bilinear(depth_model, points_xy_model[keep])
            tracks_visible = visible[keep]
            tracks_confidence = p_certain[keep].astype(np.float32)
            self._keep_points(keep)

            # Boxes.
            boxes_xyxy_input = geometry.to_input_xyxy(boxes[:, :4])
            presence = _sigmoid(boxes[:, 4]).astype(np.float32)
            present = presence >= cfg.box_presence_threshold
            self._box_absent = np.where(present, 0, self._box_absent + 1)
            keep = self._box_absent < cfg.max_absent_frames
            if not keep.all():
                ended_boxes.append(self._box_ids[~keep])
            shown = present & keep
            box_ids = self._box_ids[shown]
            box_labels = tuple(label for label, s in zip(self._box_labels, shown) if s)
            boxes_depth = np.array([self._median_depth(depth_model, b)
                                    for b in boxes[shown, :4]], np.float32)
            with self._lock:
                self._match_ids = self._box_ids[keep]
                self._match_xyxy = boxes_xyxy_input[keep]
            self._keep_boxes(keep)

        depth_out = depth_model if cfg.depth_resolution == 'model' else geometry.unwarp(
            depth_model)
        self._history.append((track_ids, np.concatenate([tracks_xy, tracks_depth[:, None]], 1)))
        result = FrameResult(
            stamp_ns=stamp_ns, frame_index=self._frame_index, geometry=geometry,
            depth_m=depth_out, track_ids=track_ids, tracks_xy=tracks_xy,
            tracks_visible=tracks_visible, tracks_confidence=tracks_confidence,
            tracks_depth_m=tracks_depth,
            ended_track_ids=np.setdiff1d(_concat_ids(ended_points), track_ids),
            box_ids=box_ids,
            boxes_xyxy=clip_to_extent(boxes_xyxy_input[shown], geometry.input_wh),
            boxes_score=presence[shown],
            boxes_depth_m=boxes_depth, box_labels=box_labels,
            # An id ended by a reset but re-seeded by a queued request in the same frame is live.
            ended_box_ids=np.setdiff1d(_concat_ids(ended_boxes), self._box_ids),
            reset_reason=reason, notes=tuple(notes),
            step_ms=step_ms, total_ms=(time.perf_counter() - start) * 1e3)
        self._frame_index += 1
        self._last_stamp_ns = stamp_ns
        return result

    @staticmethod
    def _median_depth(depth_model: np.ndarray, xyxy_model: np.ndarray) -> float:
        """NaN-aware median depth of the model pixels whose centres lie inside the box."""
        H, W = depth_model.shape
        x0, y0 = max(0, math.ceil(xyxy_model[0])), max(0, math.ceil(xyxy_model[1]))
        x1, y1 = min(W - 1, math.floor(xyxy_model[2])), min(H - 1, math.floor(xyxy_model[3]))
        if x1 < x0 or y1 < y0:
            return math.nan
        patch = depth_model[y0:y1 + 1, x0:x1 + 1]
        finite = patch[np.isfinite(patch)]
        return float(np.median(finite)) if finite.size else math.nan

    # ------------------------------------------------------------------------------- queries

    def trails(self, track_ids: np.ndarray) -> np.ndarray:
        """Recent ``(u, v, depth_m)`` of each track, oldest first: float32 ``[N, L, 3]``.

        ``L = trail_length``; frames where a track did not exist yet are NaN.
        """
        track_ids = np.asarray(track_ids, dtype=np.uint32)
        L = self.config.trail_length
        out = np.full((len(track_ids), L, 3), np.nan, dtype=np.float32)
        if L == 0:
            return out
        frames = list(self._history)[-L:]
        offset = L - len(frames)
        for t, (ids, uvz) in enumerate(frames):
            if not len(ids):
                continue
            order = np.argsort(ids)
            pos = np.searchsorted(ids, track_ids, sorter=order)
            pos = np.minimum(pos, len(ids) - 1)
            found = ids[order[pos]] == track_ids
            out[found, offset + t] = uvz[order[pos[found]]]
        return out

    def update_config(self, config: RuntimeConfig) -> None:
        """Switches to a new policy (e.g. a runtime parameter change) from the next frame.

        Thresholds and counts apply to the live tracks; a new ``resize_mode`` or
        ``depth_resolution`` resets the state, since the model's view of the image changes.
        """
        old, self.config = self.config, config
        if old.trail_length != config.trail_length:
            self._history = deque(self._history, maxlen=max(1, config.trail_length))
        if old.resize_mode != config.resize_mode:
            with self._lock:
                self._geometry = None
            self.reset(f'resize_mode changed from {old.resize_mode!r} to '
                       f'{config.resize_mode!r}')
        elif old.depth_resolution != config.depth_resolution or old.seed != config.seed:
            self.reset('depth_resolution or seed changed')
        if old.precision != config.precision:
            self.autocast_dtype = resolve_precision(config.precision, self.device)

    @property
    def geometry(self) -> FrameGeometry | None:
        """The geometry of the current input resolution (None before the first frame)."""
        return self._geometry

    @property
    def queued_requests(self) -> int:
        """Point and box batches queued by ``add_*`` and not applied yet."""
        with self._lock:
            return len(self._requests.points) + len(self._requests.boxes)

    @property
    def num_points(self) -> int:
        return len(self._point_ids)

    @property
    def num_boxes(self) -> int:
        return len(self._box_ids)

    def warmup(self, steps: int) -> None:
        """Runs ``steps`` frames of black at model resolution with a few points and boxes, then
        forgets everything (state, ids, geometry) so the first real frame starts clean."""
        if steps <= 0:
            return
        W, H = self.model_wh
        black = np.zeros((H, W, 3), np.uint8)
        self.add_points(np.array([[W / 4, H / 4], [3 * W / 4, 3 * H / 4]]))
        self.add_boxes(np.array([[W / 4, H / 4, 3 * W / 4, 3 * H / 4]]))
        for k in range(steps):
            self.process(black, k)
        self._clear_state()
        with self._lock:
            self._requests = _Requests()
            self._geometry = None
            self._next_id = 1

    def close(self) -> None:
        """Drops the model state (frees its device memory once nothing else refers to it)
        and stops the feature thread."""
        self._clear_state()
        if self._features_pool is not None:
            self._features_pool.shutdown(wait=True)
            self._features_pool = None


def _concat_ids(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.uint32) if parts else _NO_IDS


def _within_cap(take: np.ndarray, ids: np.ndarray, live: int, limit: int, what: str,
                notes: list[str]) -> np.ndarray:
    """The first entries of ``take`` that fit beside ``live`` tracks under ``limit``; the
    dropped ones are noted (``what`` is 'points' or 'boxes', naming the max_* parameter)."""
    room = max(0, limit - live)
    if len(take) > room:
        notes.append(f'dropped {what} {short_list(ids[take[room:]].tolist())}: max_{what} '
                     f'({limit}) reached')
        take = take[:room]
    return take


def load_runtime(checkpoint: str | Path, config: RuntimeConfig, device: torch.device | str
                 ) -> MoogRuntime:
    """Loads a ``'perception'`` checkpoint directory onto ``device`` and wraps it.

    Raises:
        moog_ros.model.checkpoint.CheckpointError: naming the file, for any checkpoint problem.
    """
    loaded = load_checkpoint(checkpoint, map_location=device, expected_kind='perception')
    return MoogRuntime(loaded.model, config, device)

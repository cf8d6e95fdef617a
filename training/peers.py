"""Classical peers that MooG is evaluated against, each online and per frame like MooG.

- :class:`LucasKanadeTracker` (points): OpenCV pyramidal Lucas–Kanade, frame to frame, with a
  forward–backward check for visibility.
- :class:`OpenCvBoxTracker` (boxes): one OpenCV single-object tracker per box (CSRT if the
  installed OpenCV has it, else KCF, else MIL); presence is the tracker's ok flag.
- :class:`MedianDepthBaseline` (depth): a constant, the training set's median depth.

Every peer works in the pixel convention of ``docs/architecture.md`` (pixel centres at integer
coordinates, ``xy`` and ``xyxy``), takes uint8 RGB frames ``[H, W, 3]`` and follows MooG's online
protocol: things to track are added *before* the step of the frame they are given in, and the
step of that frame returns them unchanged.
"""
from collections.abc import Callable
from dataclasses import dataclass
import math
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
from tqdm import tqdm


def _check_frame(frame_rgb: np.ndarray, expected_hw: tuple[int, int] | None) -> None:
    if frame_rgb.dtype != np.uint8 or frame_rgb.ndim != 3 or frame_rgb.shape[2] != 3:
        raise ValueError(f'frame_rgb: expected uint8 [H, W, 3], got {frame_rgb.dtype} '
                         f'{list(frame_rgb.shape)}')
    if expected_hw is not None and frame_rgb.shape[:2] != expected_hw:
        raise ValueError(f'frame_rgb: size changed from {list(expected_hw)} to '
                         f'{list(frame_rgb.shape[:2])}; call reset() between clips')


# --------------------------------------------------------------------------------------------
# Points: pyramidal Lucas–Kanade
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LucasKanadeConfig:
    """Lucas–Kanade point tracker settings.

    Attributes:
        win_size_px: side of the square search window at every pyramid level.
        pyramid_levels: number of pyramid levels including full resolution (OpenCV's
            ``maxLevel`` is this minus one).
        max_iterations: iteration cap of the per-level Gauss–Newton solve.
        epsilon_px: stop when an update moves the point less than this.
        fb_max_error_px: a point whose forward–backward round trip misses its start by more than
            this is flagged not visible for the frame (and not moved).
    """

    win_size_px: int = 21
    pyramid_levels: int = 3
    max_iterations: int = 30
    epsilon_px: float = 0.01
    fb_max_error_px: float = 1.5

    def __post_init__(self) -> None:
        if self.win_size_px < 3 or self.win_size_px % 2 == 0:
            raise ValueError(f'win_size_px: expected an odd size >= 3, got {self.win_size_px}')
        if self.pyramid_levels < 1:
            raise ValueError(f'pyramid_levels: expected >= 1, got {self.pyramid_levels}')
        if not self.fb_max_error_px > 0:
            raise ValueError(f'fb_max_error_px: expected > 0, got {self.fb_max_error_px}')


LK_PRESETS = {
    'default': LucasKanadeConfig(),
    # Smaller window for low-resolution clips (<= 128 px) where a 21 px window blurs motions.
    'small': LucasKanadeConfig(win_size_px=15, pyramid_levels=3),
}


class PointTrackResult(NamedTuple):
    """Per-frame output of a point tracker.

    Attributes:
        xy: float32 ``[N, 2]`` pixels, every point added so far (in order of adding).
        visible: bool ``[N]``.
    """

    xy: np.ndarray
    visible: np.ndarray


class LucasKanadeTracker:
    """Online pyramidal Lucas–Kanade tracker (OpenCV), frame to frame.

    Each step flows every point from the previous frame into the current one and back. A point is
    visible when both passes converge, the round trip error is at most ``fb_max_error_px`` and
    the forward position lies inside the image. A point that fails keeps its last position (it is
    tracked on from there, so it can be re-acquired when it reappears nearby).

    Example::

        lk = LucasKanadeTracker()
        lk.add_points(xy0)                 # [M, 2] pixels of frame 0
        result = lk.step(frame0)           # result.xy == xy0, all visible
        result = lk.step(frame1)           # tracked into frame 1
    """

    name = 'lk'

    def __init__(self, config: LucasKanadeConfig = LK_PRESETS['default']) -> None:
        self.config = config
        self._criteria = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS,
                          config.max_iterations, config.epsilon_px)
        self.reset()

    def reset(self) -> None:
        """Forgets every point and the previous frame."""
        self._prev_gray: np.ndarray | None = None
        self._xy = np.zeros((0, 2), np.float32)  # [N, 2] tracked points
        self._visible = np.zeros((0,), bool)     # [N]
        self._pending = np.zeros((0, 2), np.float32)  # [M, 2] added, start at the next step

    @property
    def num_points(self) -> int:
        """Points added so far, including those that start at the next step."""
        return len(self._xy) + len(self._pending)

    def add_points(self, xy: np.ndarray) -> np.ndarray:
        """Adds points given in the pixels of the frame that the next :meth:`step` receives.

        Args:
            xy: ``[M, 2]`` pixels.

        Returns:
            int64 ``[M]`` indices of the new points in every later result.
        """
        xy = np.asarray(xy, dtype=np.float32).reshape(-1, 2)
        if not np.all(np.isfinite(xy)):
            raise ValueError('xy: points to add must be finite')
        first = self.num_points
        self._pending = np.concatenate([self._pending, xy])
        return np.arange(first, first + len(xy), dtype=np.int64)

    def _flow(self, src: np.ndarray, dst: np.ndarray, xy: np.ndarray) -> tuple[np.ndarray, ...]:
        cfg = self.config
        out, status, _ = cv2.calcOpticalFlowPyrLK(
            src, dst, xy.reshape(-1, 1, 2), None,
            winSize=(cfg.win_size_px, cfg.win_size_px), maxLevel=cfg.pyramid_levels - 1,
            criteria=self._criteria)
        return out.reshape(-1, 2), status.reshape(-1).astype(bool)

    def step(self, frame_rgb: np.ndarray) -> PointTrackResult:
        """Tracks every point into ``frame_rgb`` (uint8 ``[H, W, 3]``)."""
        expected = None if self._prev_gray is None else self._prev_gray.shape[:2]
        _check_frame(frame_rgb, expected)
        gray = cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2GRAY)
        height, width = gray.shape
        if self._prev_gray is not None and len(self._xy):
            fwd, ok_fwd = self._flow(self._prev_gray, gray, self._xy)
            back, ok_back = self._flow(gray, self._prev_gray, fwd)
            fb_error = np.linalg.norm(back - self._xy, axis=-1)  # [N]
            inside = ((fwd[:, 0] >= -0.5) & (fwd[:, 0] <= width - 0.5)
                      & (fwd[:, 1] >= -0.5) & (fwd[:, 1] <= height - 0.5))
            ok = (ok_fwd & ok_back & inside & np.isfinite(fwd).all(axis=-1)
                  & (fb_error <= self.config.fb_max_error_px))
            self._xy = np.where(ok[:, None], fwd, self._xy).astype(np.float32)
            self._visible = ok
        if len(self._pending):
            self._xy = np.concatenate([self._xy, self._pending])
            self._visible = np.concatenate([self._visible, np.ones(len(self._pending), bool)])
            self._pending = np.zeros((0, 2), np.float32)
        self._prev_gray = gray
        return PointTrackResult(self._xy.copy(), self._visible.copy())


# --------------------------------------------------------------------------------------------
# Boxes: OpenCV single-object trackers
# --------------------------------------------------------------------------------------------

# Preference order for 'auto': CSRT is the most accurate classical tracker OpenCV ships without
# network weights (DaSiamRPN / Nano / Vit need ONNX models); KCF and MIL are the fallbacks.
BOX_TRACKER_ALGORITHMS = ('csrt', 'kcf', 'mil')


def _tracker_factory(algorithm: str) -> Callable[[], object] | None:
    """The OpenCV constructor of ``algorithm`` in whichever API this OpenCV build has."""
    cls_name = 'Tracker' + algorithm.upper()
    candidates = [
        getattr(getattr(cv2, cls_name, None), 'create', None),   # OpenCV >= 4.5.1
        getattr(cv2, cls_name + '_create', None),                # older top-level API
        getattr(getattr(cv2, 'legacy', None), cls_name + '_create', None),
    ]
    return next((c for c in candidates if callable(c)), None)


def resolve_box_tracker(algorithm: str = 'auto') -> tuple[str, Callable[[], object]]:
    """Picks the box tracker: ``'auto'`` takes the first available of CSRT, KCF, MIL.

    Returns:
        ``(name, factory)``, e.g. ``('csrt', cv2.TrackerCSRT.create)``.

    Raises:
        ValueError: unknown algorithm, or none available in the installed OpenCV.
    """
    if algorithm != 'auto' and algorithm not in BOX_TRACKER_ALGORITHMS:
        raise ValueError(f"algorithm: expected 'auto' or one of {BOX_TRACKER_ALGORITHMS}, "
                         f'got {algorithm!r}')
    wanted = BOX_TRACKER_ALGORITHMS if algorithm == 'auto' else (algorithm,)
    for name in wanted:
        factory = _tracker_factory(name)
        if factory is not None:
            return name, factory
    raise ValueError(f'algorithm: none of {wanted} is available in OpenCV {cv2.__version__} '
                     '(install opencv-contrib-python-headless)')


def xyxy_to_cv_rect(xyxy: np.ndarray) -> tuple[int, int, int, int]:
    """``xyxy`` (continuous, pixel centres at integers) -> OpenCV ``(x, y, w, h)`` pixel rect.

    An OpenCV rect covers pixel columns x .. x+w-1, i.e. the continuous span [x-0.5, x+w-0.5];
    the rect is the set of pixels whose centres the box covers (rounded to nearest).
    """
    x0, y0, x1, y1 = (float(v) for v in xyxy)
    left, top = round(x0 + 0.5), round(y0 + 0.5)
    right, bottom = round(x1 + 0.5), round(y1 + 0.5)  # exclusive pixel index
    return left, top, right - left, bottom - top


def cv_rect_to_xyxy(rect: tuple[float, float, float, float]) -> np.ndarray:
    """OpenCV ``(x, y, w, h)`` pixel rect -> float32 ``xyxy`` (inverse of xyxy_to_cv_rect)."""
    x, y, w, h = (float(v) for v in rect)
    return np.array([x - 0.5, y - 0.5, x + w - 0.5, y + h - 0.5], np.float32)


@dataclass(frozen=True)
class BoxTrackerConfig:
    """OpenCV box tracker settings.

    Attributes:
        algorithm: ``'auto'`` (CSRT, else KCF, else MIL) or one of ``'csrt'``, ``'kcf'``,
            ``'mil'``.
        min_size_px: boxes are enlarged about their centre to at least this side for the
            tracker (OpenCV trackers fail on tiny patches); the reported box is shrunk back by
            the same factor.
    """

    algorithm: str = 'auto'
    min_size_px: int = 8

    def __post_init__(self) -> None:
        if self.min_size_px < 2:
            raise ValueError(f'min_size_px: expected >= 2, got {self.min_size_px}')


BOX_TRACKER_PRESETS = {
    'default': BoxTrackerConfig(),
    'kcf': BoxTrackerConfig(algorithm='kcf'),
}


class BoxTrackResult(NamedTuple):
    """Per-frame output of a box tracker.

    Attributes:
        xyxy: float32 ``[M, 4]`` pixels (last known box where not present).
        present: bool ``[M]``, the tracker's ok flag this frame.
    """

    xyxy: np.ndarray
    present: np.ndarray


class _TrackedBox:
    """One OpenCV tracker plus the scale between the tracked and the reported box."""

    def __init__(self, tracker: object | None, xyxy: np.ndarray, size_scale: np.ndarray,
                 centre_offset: np.ndarray) -> None:
        self.tracker = tracker              # None when initialisation failed
        self.xyxy = xyxy                    # float32 [4], last reported box
        self.size_scale = size_scale        # [2] reported size / tracked size
        self.centre_offset = centre_offset  # [2] (reported - tracked centre) / tracked size


class OpenCvBoxTracker:
    """One OpenCV single-object tracker per box, initialised on the frame it is added for.

    Example::

        boxes = OpenCvBoxTracker()
        print(boxes.name)                  # 'csrt' with opencv-contrib
        boxes.add_boxes(xyxy0)             # [M, 4] pixels of the next frame
        result = boxes.step(frame0)        # the given boxes, present
        result = boxes.step(frame1)        # tracked
    """

    def __init__(self, config: BoxTrackerConfig = BOX_TRACKER_PRESETS['default']) -> None:
        self.config = config
        self.name, self._factory = resolve_box_tracker(config.algorithm)
        self.reset()

    def reset(self) -> None:
        """Forgets every box and the frame size."""
        self._boxes: list[_TrackedBox] = []
        self._pending: list[np.ndarray] = []
        self._frame_hw: tuple[int, int] | None = None
        self.num_init_failures = 0

    @property
    def num_boxes(self) -> int:
        """Boxes added so far, including those that start at the next step."""
        return len(self._boxes) + len(self._pending)

    def add_boxes(self, xyxy: np.ndarray) -> np.ndarray:
        """Adds boxes given in the pixels of the frame that the next :meth:`step` receives.

        Args:
            xyxy: ``[M, 4]`` pixels.

        Returns:
            int64 ``[M]`` indices of the new boxes in every later result.
        """
        xyxy = np.asarray(xyxy, dtype=np.float32).reshape(-1, 4)
        if not np.all(np.isfinite(xyxy)):
            raise ValueError('xyxy: boxes to add must be finite')
        if np.any(xyxy[:, 2:] < xyxy[:, :2]):
            raise ValueError('xyxy: expected x_min <= x_max and y_min <= y_max')
        first = self.num_boxes
        self._pending.extend(xyxy)
        return np.arange(first, first + len(xyxy), dtype=np.int64)

    def _start(self, frame_bgr: np.ndarray, xyxy: np.ndarray) -> _TrackedBox:
        height, width = frame_bgr.shape[:2]
        centre = (xyxy[:2] + xyxy[2:]) / 2
        size = xyxy[2:] - xyxy[:2]
        half = np.minimum(np.maximum(size, self.config.min_size_px), [width, height]) / 2
        # Keep the enlarged box inside the image so its rect is never empty.
        track_centre = np.clip(centre, -0.5 + half,
                               [width - 0.5 - half[0], height - 0.5 - half[1]])
        rect = xyxy_to_cv_rect(np.concatenate([track_centre - half, track_centre + half]))
        tracker = self._factory()
        try:
            tracker.init(frame_bgr, rect)
        except cv2.error:
            # A degenerate patch (e.g. a box outside the image): the box is reported absent.
            self.num_init_failures += 1
            tracker = None
        # Map the tracked rect back to the given box: same relative size and centre offset.
        tracked = cv_rect_to_xyxy(rect)
        tracked_size = np.maximum(tracked[2:] - tracked[:2], 1.0)
        size_scale = size / tracked_size
        centre_offset = (centre - (tracked[:2] + tracked[2:]) / 2) / tracked_size
        return _TrackedBox(tracker, xyxy.astype(np.float32), size_scale.astype(np.float32),
                           centre_offset.astype(np.float32))

    def step(self, frame_rgb: np.ndarray) -> BoxTrackResult:
        """Tracks every box into ``frame_rgb`` (uint8 ``[H, W, 3]``)."""
        _check_frame(frame_rgb, self._frame_hw)
        self._frame_hw = frame_rgb.shape[:2]
        frame_bgr = np.ascontiguousarray(frame_rgb[..., ::-1])  # OpenCV trackers expect BGR
        present = []
        for box in self._boxes:
            ok = False
            if box.tracker is not None:
                try:
                    ok, rect = box.tracker.update(frame_bgr)
                except cv2.error:
                    ok = False
            if ok:
                tracked = cv_rect_to_xyxy(rect)
                tracked_size = tracked[2:] - tracked[:2]
                centre = (tracked[:2] + tracked[2:]) / 2 + box.centre_offset * tracked_size
                size = tracked_size * box.size_scale
                box.xyxy = np.concatenate([centre - size / 2, centre + size / 2]).astype(
                    np.float32)
            present.append(bool(ok))
        for xyxy in self._pending:
            self._boxes.append(self._start(frame_bgr, xyxy))
            present.append(self._boxes[-1].tracker is not None)
        self._pending = []
        xyxy_all = (np.stack([b.xyxy for b in self._boxes]) if self._boxes
                    else np.zeros((0, 4), np.float32))
        return BoxTrackResult(xyxy_all, np.asarray(present, dtype=bool))


# --------------------------------------------------------------------------------------------
# Depth: the training-set median
# --------------------------------------------------------------------------------------------

class MedianDepthBaseline:
    """Predicts one constant depth everywhere: the training set's median depth (metres)."""

    name = 'median_depth'

    def __init__(self, median_depth_m: float) -> None:
        if not (math.isfinite(median_depth_m) and median_depth_m > 0):
            raise ValueError(f'median_depth_m: expected a finite depth > 0, got {median_depth_m}')
        self.median_depth_m = float(median_depth_m)

    def step(self, frame_rgb: np.ndarray) -> np.ndarray:
        """float32 ``[H, W]`` metres, the constant, at ``frame_rgb``'s size."""
        _check_frame(frame_rgb, None)
        return np.full(frame_rgb.shape[:2], self.median_depth_m, np.float32)


def training_median_depth(directory: str | Path, max_clips: int | None = None,
                          pixel_stride: int = 4) -> float:
    """Median of every valid depth pixel (finite, > 0) over the clips in ``directory``.

    Pixels are subsampled on a regular ``pixel_stride`` grid in x and y (every frame) so memory
    stays small; the result is deterministic.

    Raises:
        ValueError: no valid depth pixel in the clips read (names the directory).
    """
    from moog_ros import clips  # the clip format (numpy only)

    paths = clips.list_clips(directory)
    if max_clips is not None:
        paths = paths[:max_clips]
    samples = []
    for path in tqdm(paths, desc='median depth', unit='clip', leave=False):
        depth = clips.load_clip(path).depth[:, ::pixel_stride, ::pixel_stride]  # [T, h, w]
        with np.errstate(invalid='ignore'):
            valid = np.isfinite(depth) & (depth > 0)
        samples.append(depth[valid].astype(np.float32))
    values = np.concatenate(samples) if samples else np.zeros(0, np.float32)
    if values.size == 0:
        raise ValueError(f'{directory}: no valid depth pixel (finite, > 0) in {len(paths)} clips')
    return float(np.median(values))

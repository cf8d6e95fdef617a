"""Evaluation metrics for points (TAP-Vid), depth and boxes. numpy only, pure functions.

Points follow the TAP-Vid definitions of ``compute_tapvid_metrics`` (Doersch et al., 2022):
occlusion accuracy, fraction of visible points within δ ∈ {1, 2, 4, 8, 16} px (``<δ_avg``) and
Jaccard at the same thresholds (Average Jaccard, AJ). Every number is computed per clip (sums over
all points and evaluated frames of the clip); a benchmark figure is the plain mean over clips
(:class:`ClipAverager`), exactly as TAP-Vid reports it.

The thresholds are defined on 256×256 images. Clips at another resolution are compared in that
frame: x is scaled by 256/W and y by 256/H before thresholding, which is what TAP-Vid does when it
resizes a video to 256×256. For square images this equals thresholding at δ·W/256 in the
evaluated pixels; for non-square images the pass region is an axis-aligned ellipse with
half-axes δ·W/256 (x) and δ·H/256 (y).

Depth: AbsRel and δ<1.25 over valid pixels (finite ground truth > 0), in metres, plus a variant
where each frame's prediction is first scaled by median(gt) / median(pred) (reported separately;
it removes the global scale ambiguity of monocular depth).

Boxes: mean IoU over the (box, frame) pairs where the ground-truth box is valid; a prediction that
is absent (not present, or non-finite) counts as IoU 0 there, so a tracker cannot gain by
dropping hard frames.
"""
from collections.abc import Mapping
import math

import numpy as np

TAPVID_THRESHOLDS_PX = (1, 2, 4, 8, 16)
TAPVID_RESOLUTION_PX = 256
DEPTH_DELTA1_RATIO = 1.25
# Predictions are clamped to this before AbsRel/δ1: a zero or negative depth has no ratio.
MIN_PRED_DEPTH_M = 1e-3


def _check_shape(name: str, array: np.ndarray, shape: tuple) -> None:
    """Raises ValueError unless ``array.shape`` matches ``shape`` (None = any size)."""
    ok = array.ndim == len(shape) and all(
        want is None or want == got for want, got in zip(shape, array.shape))
    if not ok:
        want = '[' + ', '.join('*' if s is None else str(s) for s in shape) + ']'
        raise ValueError(f'{name}: expected shape {want}, got {list(array.shape)}')


def first_visible_queries(gt_visible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Query frames of TAP-Vid query mode "first": each track's first visible frame.

    Args:
        gt_visible: bool ``[N, T]`` ground-truth visibility.

    Returns:
        ``(query_frame, has_query)``: int64 ``[N]`` first visible frame (0 where the track is never
        visible) and bool ``[N]``, False for tracks that are never visible. TAP-Vid drops those
        tracks (they have no query), so callers should too.
    """
    gt_visible = np.asarray(gt_visible, dtype=bool)
    _check_shape('gt_visible', gt_visible, (None, None))
    has_query = gt_visible.any(axis=1)  # [N]
    query_frame = np.argmax(gt_visible, axis=1).astype(np.int64)  # first True; 0 if none
    return query_frame, has_query


def _evaluation_mask(query_frame: np.ndarray, num_frames: int, query_mode: str) -> np.ndarray:
    """bool ``[N, T]``: which frames of each track are scored."""
    frames = np.arange(num_frames)[None, :]  # [1, T]
    query = np.asarray(query_frame).astype(np.int64)[:, None]  # [N, 1]
    if query_mode == 'first':
        # Everything before the query is known to be occluded (prior knowledge) and the query
        # frame itself is given, so only later frames are scored.
        return frames > query
    if query_mode == 'strided':
        return frames != query
    raise ValueError(f"query_mode: expected 'first' or 'strided', got {query_mode!r}")


def tapvid_point_metrics(
    gt_xy: np.ndarray,
    gt_visible: np.ndarray,
    pred_xy: np.ndarray,
    pred_visible: np.ndarray,
    query_frame: np.ndarray,
    image_hw: tuple[int, int],
    query_mode: str = 'first',
) -> dict[str, float]:
    """TAP-Vid point metrics of one clip.

    Args:
        gt_xy: ``[N, T, 2]`` ground-truth positions, pixels of an ``image_hw`` image.
        gt_visible: bool ``[N, T]``.
        pred_xy: ``[N, T, 2]`` predicted positions, same pixels (NaN counts as a miss).
        pred_visible: bool ``[N, T]``.
        query_frame: int ``[N]`` the frame each track was queried at (see
            :func:`first_visible_queries`; drop never-visible tracks before calling).
        image_hw: ``(H, W)`` of the image the coordinates live in; coordinates are rescaled to
            256×256 before thresholding (see the module docstring for non-square images).
        query_mode: ``'first'`` (score frames after the query) or ``'strided'`` (all but it).

    Returns:
        ``occlusion_accuracy``, ``pts_within_{d}`` and ``jaccard_{d}`` for d in 1, 2, 4, 8, 16,
        ``average_pts_within_thresh`` (<δ_avg), ``average_jaccard`` (AJ), all in [0, 1] and NaN
        where undefined (no scored frames, or no visible ground truth), plus
        ``num_eval_points`` (scored (track, frame) pairs).
    """
    gt_xy = np.asarray(gt_xy, dtype=np.float64)
    pred_xy = np.asarray(pred_xy, dtype=np.float64)
    _check_shape('gt_xy', gt_xy, (None, None, 2))
    num_tracks, num_frames = gt_xy.shape[:2]
    _check_shape('pred_xy', pred_xy, (num_tracks, num_frames, 2))
    gt_visible = np.asarray(gt_visible)
    pred_visible = np.asarray(pred_visible)
    _check_shape('gt_visible', gt_visible, (num_tracks, num_frames))
    _check_shape('pred_visible', pred_visible, (num_tracks, num_frames))
    gt_visible = gt_visible.astype(bool)
    pred_visible = pred_visible.astype(bool)
    query_frame = np.asarray(query_frame)
    _check_shape('query_frame', query_frame, (num_tracks,))
    if num_tracks and (query_frame.min() < 0 or query_frame.max() >= num_frames):
        raise ValueError(f'query_frame: values must lie in [0, {num_frames - 1}], '
                         f'got [{query_frame.min()}, {query_frame.max()}]')
    height, width = image_hw
    if height <= 0 or width <= 0:
        raise ValueError(f'image_hw: expected positive (H, W), got {image_hw}')

    evaluated = _evaluation_mask(query_frame, num_frames, query_mode)  # [N, T]
    num_eval = int(evaluated.sum())
    metrics: dict[str, float] = {'num_eval_points': float(num_eval)}

    def ratio(num: int, den: int) -> float:
        return float(num) / float(den) if den > 0 else math.nan

    metrics['occlusion_accuracy'] = ratio(
        int(((pred_visible == gt_visible) & evaluated).sum()), num_eval)

    # Compare in the 256×256 frame: scale each axis separately (TAP-Vid resizes anisotropically).
    to_256 = np.array([TAPVID_RESOLUTION_PX / width, TAPVID_RESOLUTION_PX / height])
    diff_256 = (pred_xy - gt_xy) * to_256  # [N, T, 2]
    sq_dist_256 = np.sum(np.square(diff_256), axis=-1)  # [N, T]; NaN for missing predictions
    with np.errstate(invalid='ignore'):
        sq_dist_256 = np.where(np.isfinite(sq_dist_256), sq_dist_256, np.inf)

    gt_positives = int((gt_visible & evaluated).sum())
    within_fracs, jaccards = [], []
    for thresh in TAPVID_THRESHOLDS_PX:
        within = sq_dist_256 < thresh * thresh  # strict, as in TAP-Vid
        correct = within & gt_visible
        frac = ratio(int((correct & evaluated).sum()), gt_positives)
        true_pos = int((correct & pred_visible & evaluated).sum())
        # A predicted-visible point is a false positive if the ground truth is occluded or the
        # prediction is too far; TP + FN is simply the number of visible ground-truth points.
        false_pos = int((pred_visible & (~gt_visible | ~within) & evaluated).sum())
        jac = ratio(true_pos, gt_positives + false_pos)
        metrics[f'pts_within_{thresh}'] = frac
        metrics[f'jaccard_{thresh}'] = jac
        within_fracs.append(frac)
        jaccards.append(jac)
    metrics['average_pts_within_thresh'] = float(np.mean(within_fracs))
    metrics['average_jaccard'] = float(np.mean(jaccards))
    return metrics


def _valid_depth(gt_depth_m: np.ndarray) -> np.ndarray:
    with np.errstate(invalid='ignore'):
        return np.isfinite(gt_depth_m) & (gt_depth_m > 0)


def depth_metrics(gt_depth_m: np.ndarray, pred_depth_m: np.ndarray) -> dict[str, float]:
    """AbsRel and δ<1.25 of one clip, metric and per-frame median-scaled.

    Valid pixels are those with finite ground truth > 0. Predictions must be finite there; they
    are clamped to ``MIN_PRED_DEPTH_M`` so the ratios exist. Both figures are means over every
    valid pixel of the clip.

    Args:
        gt_depth_m: ``[T, H, W]`` (or ``[H, W]``) metres, NaN / 0 / inf where unknown.
        pred_depth_m: same shape, metres.

    Returns:
        ``absrel`` (mean |pred − gt| / gt), ``delta1`` (fraction with max(pred/gt, gt/pred) <
        1.25), ``absrel_median_scaled`` and ``delta1_median_scaled`` (each frame's prediction
        scaled by median(gt) / median(pred) over its valid pixels first), ``num_valid`` (pixels);
        NaN metrics when no pixel is valid.
    """
    gt = np.asarray(gt_depth_m, dtype=np.float64)
    pred = np.asarray(pred_depth_m, dtype=np.float64)
    if gt.ndim == 2:
        gt, pred = gt[None], pred[None]
    _check_shape('gt_depth_m', gt, (None, None, None))
    _check_shape('pred_depth_m', pred, gt.shape)
    valid = _valid_depth(gt)  # [T, H, W]
    num_valid = int(valid.sum())
    nan = math.nan
    if num_valid == 0:
        return {'absrel': nan, 'delta1': nan, 'absrel_median_scaled': nan,
                'delta1_median_scaled': nan, 'num_valid': 0.0}
    if not np.all(np.isfinite(pred[valid])):
        raise ValueError('pred_depth_m: non-finite prediction at a pixel with valid ground truth')
    pred = np.maximum(pred, MIN_PRED_DEPTH_M)

    def absrel_delta1(p: np.ndarray, g: np.ndarray) -> tuple[float, float]:
        absrel = float(np.mean(np.abs(p - g) / g))
        delta1 = float(np.mean(np.maximum(p / g, g / p) < DEPTH_DELTA1_RATIO))
        return absrel, delta1

    absrel, delta1 = absrel_delta1(pred[valid], gt[valid])

    scaled = pred.copy()
    for t in range(gt.shape[0]):
        frame_valid = valid[t]
        if frame_valid.any():
            scale = np.median(gt[t][frame_valid]) / np.median(pred[t][frame_valid])
            scaled[t] = pred[t] * scale
    absrel_ms, delta1_ms = absrel_delta1(scaled[valid], gt[valid])
    return {'absrel': absrel, 'delta1': delta1, 'absrel_median_scaled': absrel_ms,
            'delta1_median_scaled': delta1_ms, 'num_valid': float(num_valid)}


def box_iou(boxes_a_xyxy: np.ndarray, boxes_b_xyxy: np.ndarray) -> np.ndarray:
    """Elementwise IoU of two broadcastable arrays of ``xyxy`` boxes ``[..., 4]``.

    Boxes are continuous extents (x_min, y_min, x_max, y_max) in pixels, so a box's area is
    (x_max − x_min)·(y_max − y_min) (no +1). Degenerate boxes have zero area; non-finite boxes
    give IoU 0.
    """
    a = np.asarray(boxes_a_xyxy, dtype=np.float64)
    b = np.asarray(boxes_b_xyxy, dtype=np.float64)
    if a.shape[-1] != 4 or b.shape[-1] != 4:
        raise ValueError(f'box_iou: expected [..., 4] boxes, got {list(a.shape)} and '
                         f'{list(b.shape)}')

    def area(box: np.ndarray) -> np.ndarray:
        return (np.clip(box[..., 2] - box[..., 0], 0, None)
                * np.clip(box[..., 3] - box[..., 1], 0, None))

    inter_w = np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0])
    inter_h = np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1])
    inter = np.clip(inter_w, 0, None) * np.clip(inter_h, 0, None)
    union = area(a) + area(b) - inter
    with np.errstate(invalid='ignore', divide='ignore'):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    return np.where(np.isfinite(iou), iou, 0.0)


def box_metrics(
    gt_xyxy: np.ndarray,
    gt_valid: np.ndarray,
    pred_xyxy: np.ndarray,
    pred_present: np.ndarray,
    start_frame: np.ndarray | None = None,
) -> dict[str, float]:
    """Mean IoU of tracked boxes over one clip.

    Scored pairs are (box k, frame t) with ``gt_valid[k, t]`` and, if ``start_frame`` is given,
    ``t > start_frame[k]`` (the seed frame, where the tracker is handed the ground truth, is not
    scored). A prediction that is not present or not finite scores IoU 0 on a scored pair.

    Args:
        gt_xyxy: ``[K, T, 4]`` pixels.
        gt_valid: bool ``[K, T]``.
        pred_xyxy: ``[K, T, 4]`` pixels (anything where absent).
        pred_present: bool ``[K, T]``.
        start_frame: optional int ``[K]`` seed frame of each box.

    Returns:
        ``miou`` (NaN if nothing is scored) and ``num_eval_boxes`` (scored pairs).
    """
    gt_xyxy = np.asarray(gt_xyxy, dtype=np.float64)
    _check_shape('gt_xyxy', gt_xyxy, (None, None, 4))
    num_boxes, num_frames = gt_xyxy.shape[:2]
    pred_xyxy = np.asarray(pred_xyxy, dtype=np.float64)
    _check_shape('pred_xyxy', pred_xyxy, (num_boxes, num_frames, 4))
    gt_valid = np.asarray(gt_valid)
    pred_present = np.asarray(pred_present)
    _check_shape('gt_valid', gt_valid, (num_boxes, num_frames))
    _check_shape('pred_present', pred_present, (num_boxes, num_frames))
    scored = gt_valid.astype(bool)  # [K, T]
    if start_frame is not None:
        start_frame = np.asarray(start_frame)
        _check_shape('start_frame', start_frame, (num_boxes,))
        scored = scored & (np.arange(num_frames)[None, :] > start_frame[:, None])
    iou = box_iou(gt_xyxy, pred_xyxy)  # [K, T]
    iou = np.where(pred_present.astype(bool), iou, 0.0)
    num_eval = int(scored.sum())
    miou = float(iou[scored].mean()) if num_eval else math.nan
    return {'miou': miou, 'num_eval_boxes': float(num_eval)}


class ClipAverager:
    """Per-clip metric dicts in, benchmark means out (TAP-Vid style: a plain mean over clips).

    A clip whose value is NaN for a key (e.g. no visible track) does not count towards that key's
    mean; :meth:`counts` says how many clips did.
    """

    def __init__(self) -> None:
        self._values: dict[str, list[float]] = {}

    def add(self, metrics: Mapping[str, float], prefix: str = '') -> None:
        """Records one clip's metrics (keys optionally prefixed, e.g. ``'points_'``)."""
        for key, value in metrics.items():
            self._values.setdefault(prefix + key, []).append(float(value))

    def counts(self) -> dict[str, int]:
        """Number of clips with a finite value, per key."""
        return {k: int(np.isfinite(v).sum()) for k, v in self._values.items()}

    def mean(self) -> dict[str, float]:
        """Mean over clips per key, ignoring NaN; NaN if no clip had a value."""
        out = {}
        for key, values in self._values.items():
            finite = np.asarray(values)[np.isfinite(values)]
            out[key] = float(finite.mean()) if finite.size else math.nan
        return out

"""Forward-backward cycle check: a point-tracking figure for video without labels.

Track a grid of points ``window`` frames forward, then track the end points back over the same
frames in reverse; a tracker that follows the scene brings each point home. The figures are the
median return error (pixels) and the fraction of tracks back within 2 px. A tracker that never
moves returns perfectly, so the check is reported next to how far the forward tracks moved
(``median_forward_px``): a small return error counts only with motion to follow.

Both trackers see the same frames at the model's resolution (stretched, as ``moog_evaluate``
does), so their pixels are the same pixels::

    report = cycle_check(cut_windows(segments, 8, 8), model)   # {'moog': {...}, 'lk': {...}}
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch

from moog_ros.model import MoogPerception
from moog_ros.training.peers import LucasKanadeTracker

__all__ = ['RETURN_THRESHOLD_PX', 'cut_windows', 'cycle_check', 'grid_points', 'return_figures']

RETURN_THRESHOLD_PX = 2.0


def grid_points(width: int, height: int, per_side: int, margin: float = 0.1) -> np.ndarray:
    """``[per_side^2, 2]`` float32 xy pixels on a regular grid inside a ``margin`` border."""
    xs = np.linspace(margin * (width - 1), (1 - margin) * (width - 1), per_side)
    ys = np.linspace(margin * (height - 1), (1 - margin) * (height - 1), per_side)
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx.ravel(), gy.ravel()], axis=-1).astype(np.float32)


def _track_moog(model: MoogPerception, frames: np.ndarray, xy0: np.ndarray,
                device: torch.device) -> np.ndarray:
    """``[M, 2]`` positions on the last of ``frames [T, H, W, 3]`` of points ``xy0`` on the
    first, from a fresh state (as after a node reset)."""
    with torch.inference_mode():
        state = model.init_state(1, device, generator=torch.Generator(device=device)
                                 .manual_seed(0))
        state = model.add_points(state, torch.from_numpy(xy0).to(device)[None])
        out = None
        for frame in frames:
            tensor = torch.from_numpy(frame).to(device)[None].float() / 255.0
            out, state = model.step(tensor, state, dense_depth=False)
        return out.points_xy[0].float().cpu().numpy()


def _track_lk(frames: np.ndarray, xy0: np.ndarray) -> np.ndarray:
    tracker = LucasKanadeTracker()
    tracker.add_points(xy0)
    result = None
    for frame in frames:
        result = tracker.step(frame)
    return np.asarray(result.xy, np.float32)


def return_figures(start_xy: np.ndarray, end_xy: np.ndarray, back_xy: np.ndarray
                   ) -> dict[str, float]:
    """Figures of one tracker from ``[M, 2]`` start, forward end and returned positions."""
    error = np.linalg.norm(back_xy - start_xy, axis=-1)
    moved = np.linalg.norm(end_xy - start_xy, axis=-1)
    error = np.where(np.isfinite(error), error, np.inf)  # a lost track never returns
    return {'median_return_px': float(np.median(error)),
            'within_2px': float(np.mean(error <= RETURN_THRESHOLD_PX)),
            'median_forward_px': float(np.nanmedian(moved)) if np.isfinite(moved).any()
            else float('nan')}


def cut_windows(segments: Sequence[Sequence[np.ndarray]], window: int, max_windows: int
                ) -> list[list[np.ndarray]]:
    """Non-overlapping ``window``-frame windows from continuous ``segments`` (lists of frames;
    a window never spans two), spread evenly over them when there are more than
    ``max_windows``."""
    windows = [list(segment[k * window:(k + 1) * window])
               for segment in segments for k in range(len(segment) // window)]
    if len(windows) <= max_windows:
        return windows
    picks = np.unique(np.linspace(0, len(windows) - 1, max_windows).round().astype(int))
    return [windows[i] for i in picks]


def cycle_check(windows: Sequence[Sequence[np.ndarray]], model: MoogPerception, *,
                per_side: int = 8, device: torch.device | str = 'cpu') -> dict[str, Any]:
    """Forward-backward check of MooG and Lucas-Kanade on the same frames.

    Args:
        windows: consecutive uint8 ``[H, W, 3]`` frames each (any size; resized to the
            model's input), e.g. from :func:`cut_windows`. Each is tracked forward from its
            first frame to its last, then back.
        model: the perception model (its point readout is checked).
        per_side: the query grid is ``per_side x per_side`` per window.

    Returns:
        ``{'moog': figures, 'lk': figures, 'windows': n, 'tracks': n, 'frames': [lengths],
        'resolution_wh': [W, H]}``; figures as :func:`return_figures` (over all tracks of all
        windows); no figures when ``windows`` is empty.
    """
    device = torch.device(device)
    H, W = model.image_size
    report: dict[str, Any] = {'windows': len(windows), 'tracks': 0,
                              'frames': sorted({len(w) for w in windows}),
                              'resolution_wh': [W, H]}
    if not windows:
        return report
    xy0 = grid_points(W, H, per_side)
    rows: dict[str, list[np.ndarray]] = {'moog': [], 'lk': []}
    for frames in windows:
        clip = np.stack([cv2.resize(f, (W, H), interpolation=cv2.INTER_AREA) for f in frames])
        for name in rows:
            def track(f: np.ndarray, p: np.ndarray, name: str = name) -> np.ndarray:
                return _track_moog(model, f, p, device) if name == 'moog' else _track_lk(f, p)

            end = track(clip, xy0)
            # Lost tracks (NaN) go back from nowhere: they count as not returned.
            back = track(clip[::-1].copy(), np.nan_to_num(end, nan=0.0))
            back[~np.isfinite(end).all(-1)] = np.nan
            rows[name].append(np.stack([np.broadcast_to(xy0, end.shape), end, back]))
    for name, parts in rows.items():
        start, end, back = np.concatenate(parts, axis=1)
        report[name] = return_figures(start, end, back)
    report['tracks'] = len(windows) * len(xy0)
    return report

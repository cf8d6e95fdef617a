"""The forward-backward cycle check of the demo (label-free point-tracking figure)."""
import cv2
import numpy as np
import pytest
import torch

from moog_ros.model import MoogPerception, get_perception_config
from moog_ros.tools.cycle_check import cut_windows, cycle_check, grid_points, return_figures


def _translating(frames: int, dx: int, dy: int, size: int = 64) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    texture = cv2.GaussianBlur((rng.random((size + 3 * frames * 4, size + 3 * frames * 4, 3))
                                * 255).astype(np.uint8), (0, 0), 2.0)
    return [texture[8 + dy * t:8 + dy * t + size, 8 + dx * t:8 + dx * t + size].copy()
            for t in range(frames)]


def test_grid_points_stay_inside_the_margin():
    xy = grid_points(128, 96, 8)
    assert xy.shape == (64, 2) and xy.dtype == np.float32
    assert xy[:, 0].min() == pytest.approx(12.7) and xy[:, 0].max() == pytest.approx(114.3)
    assert xy[:, 1].max() <= 0.9 * 95 + 1e-4


def test_return_figures_count_lost_tracks_as_not_returned():
    start = np.zeros((4, 2), np.float32)
    end = np.array([[5, 0], [5, 0], [5, 0], [np.nan, np.nan]], np.float32)
    back = np.array([[0, 1], [0, 3], [0, 0.5], [np.nan, np.nan]], np.float32)
    figures = return_figures(start, end, back)
    assert figures['within_2px'] == 0.5
    assert figures['median_return_px'] == pytest.approx(2.0)  # of 0.5, 1, 3, inf
    assert figures['median_forward_px'] == pytest.approx(5.0)


def test_cut_windows_never_span_two_scenes_and_spread_evenly():
    a, b = list(range(20)), list(range(100, 109))
    windows = cut_windows([a, b], 8, 8)
    assert windows == [a[:8], a[8:16], b[:8]]
    spread = cut_windows([list(range(80))], 8, 3)
    assert [w[0] for w in spread] == [0, 32, 72]


def test_lk_comes_back_on_a_translating_texture_and_the_report_has_both_trackers():
    torch.manual_seed(0)
    model = MoogPerception(get_perception_config('tiny')).eval()
    H, W = model.image_size
    frames = _translating(8, 1, 0, size=W)
    report = cycle_check([frames], model, per_side=4)
    assert report['windows'] == 1 and report['tracks'] == 16 and report['frames'] == [8]
    lk = report['lk']
    # The texture moves 1 px/frame left: 7 px over the window, which takes the first grid
    # column (of 4) out of the 32 px view; the other tracks come back.
    assert lk['median_forward_px'] > 5 and lk['within_2px'] >= 0.7
    assert lk['median_return_px'] < 0.5
    assert np.isfinite(report['moog']['median_return_px'])
    assert cycle_check([], model)['windows'] == 0

"""Hand-computed cases for moog_ros.metrics (TAP-Vid points, depth, boxes)."""
import math

import numpy as np
import pytest

from moog_ros import metrics


def _straight_tracks(num_tracks: int, num_frames: int, size: float = 256.0) -> np.ndarray:
    """[N, T, 2] points drifting right by 1 px per frame, spread over the image."""
    rng = np.random.default_rng(0)
    start = rng.uniform(20, size - 40, size=(num_tracks, 1, 2))
    step = np.stack([np.arange(num_frames), np.zeros(num_frames)], axis=-1)[None]
    return start + step  # [N, T, 2]


def test_perfect_tracks_score_one():
    gt = _straight_tracks(5, 6)
    visible = np.ones((5, 6), bool)
    visible[0, :2] = False  # query of track 0 is frame 2
    visible[1, 4] = False   # occluded mid-clip
    query, has_query = metrics.first_visible_queries(visible)
    assert has_query.all()
    np.testing.assert_array_equal(query, [2, 0, 0, 0, 0])
    out = metrics.tapvid_point_metrics(gt, visible, gt, visible, query, (256, 256))
    assert out['average_jaccard'] == 1.0
    assert out['average_pts_within_thresh'] == 1.0
    assert out['occlusion_accuracy'] == 1.0
    # 'first' mode scores frames after the query: 3 for track 0, 5 for the others.
    assert out['num_eval_points'] == 3 + 4 * 5


def test_constant_offset_three_px():
    gt = _straight_tracks(4, 5)
    visible = np.ones((4, 5), bool)
    pred = gt + np.array([3.0, 0.0])
    query = np.zeros(4, np.int64)
    out = metrics.tapvid_point_metrics(gt, visible, pred, visible, query, (256, 256))
    # 3 px fails δ = 1 and 2, passes 4, 8 and 16.
    assert out['average_pts_within_thresh'] == pytest.approx(0.6)
    for d, want in zip((1, 2, 4, 8, 16), (0, 0, 1, 1, 1)):
        assert out[f'pts_within_{d}'] == want
        # All predicted visible: a miss is a false positive *and* a false negative, J = 0.
        assert out[f'jaccard_{d}'] == want
    assert out['average_jaccard'] == pytest.approx(0.6)
    assert out['occlusion_accuracy'] == 1.0


def test_threshold_is_strict_like_tapvid():
    gt = np.zeros((1, 2, 2))
    pred = gt + np.array([4.0, 0.0])  # exactly 4 px: not within 4 (strict <)
    vis = np.ones((1, 2), bool)
    out = metrics.tapvid_point_metrics(gt, vis, pred, vis, np.array([0]), (256, 256))
    assert out['pts_within_4'] == 0.0
    assert out['pts_within_8'] == 1.0


def test_occlusion_flips():
    # One track, 5 frames, query at 0: frames 1..4 are scored.
    gt = np.zeros((1, 5, 2)) + 100.0
    gt_vis = np.array([[True, True, True, False, False]])
    pred_vis = np.array([[True, False, True, True, False]])  # frame 1 and 3 flipped
    out = metrics.tapvid_point_metrics(gt, gt_vis, gt, pred_vis, np.array([0]), (256, 256))
    # Scored frames 1..4: agreement on 2 and 4 only.
    assert out['occlusion_accuracy'] == pytest.approx(2 / 4)
    # Positions are exact, so <δ counts visible gt frames (1, 2) regardless of pred_vis: 1.0.
    assert out['average_pts_within_thresh'] == 1.0
    # TP = frame 2; GT positives = frames 1, 2; FP = frame 3 (pred visible, gt occluded).
    assert out['average_jaccard'] == pytest.approx(1 / 3)


def test_nan_prediction_is_a_miss_and_undefined_is_nan():
    gt = np.zeros((1, 3, 2))
    pred = gt.copy()
    pred[0, 2] = np.nan
    vis = np.ones((1, 3), bool)
    out = metrics.tapvid_point_metrics(gt, vis, pred, vis, np.array([0]), (64, 64))
    assert out['pts_within_16'] == 0.5
    # Query at the last frame: nothing is scored.
    out = metrics.tapvid_point_metrics(gt, vis, gt, vis, np.array([2]), (64, 64))
    assert math.isnan(out['average_jaccard']) and math.isnan(out['occlusion_accuracy'])


def test_never_visible_tracks_have_no_query():
    _, has_query = metrics.first_visible_queries(np.array([[False, False], [False, True]]))
    np.testing.assert_array_equal(has_query, [False, True])


def test_thresholds_scale_with_resolution_and_non_square():
    # 128 x 512 image (H x W): x is compared at 256/512, y at 256/128.
    gt = np.zeros((2, 2, 2)) + 50.0
    pred = gt.copy()
    pred[0, :, 0] += 7.0   # x off by 7 px -> 3.5 px at 256: fails 1, 2; passes 4, 8, 16
    pred[1, :, 1] += 7.0   # y off by 7 px -> 14 px at 256: passes only 16
    vis = np.ones((2, 2), bool)
    q = np.zeros(2, np.int64)
    out = metrics.tapvid_point_metrics(gt[:1], vis[:1], pred[:1], vis[:1], q[:1], (128, 512))
    assert out['average_pts_within_thresh'] == pytest.approx(0.6)
    out = metrics.tapvid_point_metrics(gt[1:], vis[1:], pred[1:], vis[1:], q[1:], (128, 512))
    assert out['average_pts_within_thresh'] == pytest.approx(0.2)
    # Square 512: δ scales by 2, so a 7 px error is 3.5 px at 256 in both axes.
    out = metrics.tapvid_point_metrics(gt, vis, pred, vis, q, (512, 512))
    assert out['average_pts_within_thresh'] == pytest.approx(0.6)


def test_point_metrics_reject_bad_shapes():
    with pytest.raises(ValueError, match='pred_xy'):
        metrics.tapvid_point_metrics(np.zeros((2, 3, 2)), np.ones((2, 3), bool),
                                     np.zeros((2, 4, 2)), np.ones((2, 3), bool),
                                     np.zeros(2, int), (8, 8))
    with pytest.raises(ValueError, match='query_frame'):
        metrics.tapvid_point_metrics(np.zeros((1, 3, 2)), np.ones((1, 3), bool),
                                     np.zeros((1, 3, 2)), np.ones((1, 3), bool),
                                     np.array([3]), (8, 8))


def test_depth_absrel_delta1_by_hand():
    gt = np.array([[[1.0, 2.0], [4.0, np.nan]]])     # [1, 2, 2]; NaN pixel is invalid
    pred = np.array([[[1.1, 3.0], [4.0, 123.0]]])
    out = metrics.depth_metrics(gt, pred)
    assert out['num_valid'] == 3
    # |1.1-1|/1 = 0.1, |3-2|/2 = 0.5, 0 -> mean 0.2
    assert out['absrel'] == pytest.approx(0.2)
    # ratios 1.1 (ok), 1.5 (no), 1.0 (ok)
    assert out['delta1'] == pytest.approx(2 / 3)


def test_depth_median_scaling_removes_global_scale():
    rng = np.random.default_rng(1)
    gt = rng.uniform(1, 5, size=(3, 4, 5))
    gt[0, 0, 0] = 0.0  # invalid (not > 0)
    pred = gt * np.array([2.0, 0.5, 3.0])[:, None, None]  # a different wrong scale per frame
    out = metrics.depth_metrics(gt, pred)
    assert out['absrel'] > 0.4
    assert out['absrel_median_scaled'] == pytest.approx(0.0, abs=1e-12)
    assert out['delta1_median_scaled'] == 1.0


def test_depth_rejects_nonfinite_prediction_and_handles_empty():
    with pytest.raises(ValueError, match='pred_depth_m'):
        metrics.depth_metrics(np.ones((2, 2)), np.full((2, 2), np.nan))
    assert math.isnan(metrics.depth_metrics(np.zeros((2, 2)), np.ones((2, 2)))['absrel'])


def test_box_iou_known_boxes():
    a = np.array([0.0, 0.0, 10.0, 10.0])
    assert metrics.box_iou(a, a) == pytest.approx(1.0)
    # Shifted by half the width: intersection 50, union 150.
    assert metrics.box_iou(a, np.array([5.0, 0.0, 15.0, 10.0])) == pytest.approx(1 / 3)
    assert metrics.box_iou(a, np.array([20.0, 20.0, 30.0, 30.0])) == 0.0
    # Contained: 4x4 inside 10x10.
    assert metrics.box_iou(a, np.array([2.0, 2.0, 6.0, 6.0])) == pytest.approx(16 / 100)
    assert metrics.box_iou(a, np.full(4, np.nan)) == 0.0


def test_box_metrics_absent_counts_zero_and_seed_frame_skipped():
    gt = np.tile(np.array([0.0, 0.0, 10.0, 10.0]), (1, 4, 1))       # [1, 4, 4]
    gt_valid = np.array([[True, True, True, False]])
    pred = gt.copy()
    pred[0, 2] = [5.0, 0.0, 15.0, 10.0]
    present = np.array([[True, False, True, True]])
    out = metrics.box_metrics(gt, gt_valid, pred, present)
    # frames 0, 1, 2 scored: 1, 0 (absent), 1/3
    assert out['miou'] == pytest.approx((1 + 0 + 1 / 3) / 3)
    out = metrics.box_metrics(gt, gt_valid, pred, present, start_frame=np.array([0]))
    assert out['miou'] == pytest.approx((0 + 1 / 3) / 2)
    assert out['num_eval_boxes'] == 2


def test_clip_averager_ignores_nan():
    avg = metrics.ClipAverager()
    avg.add({'aj': 0.5, 'oa': math.nan}, prefix='points_')
    avg.add({'aj': 1.0, 'oa': 0.25}, prefix='points_')
    mean = avg.mean()
    assert mean['points_aj'] == pytest.approx(0.75)
    assert mean['points_oa'] == pytest.approx(0.25)
    assert avg.counts() == {'points_aj': 2, 'points_oa': 1}

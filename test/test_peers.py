"""Classical peers: Lucas–Kanade points, OpenCV box tracker, median depth."""
import cv2
import numpy as np
import pytest

from moog_ros import metrics
from moog_ros.training import peers


def _texture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 [H, W, 3] smooth random texture (blurred noise: trackable at any point)."""
    rng = np.random.default_rng(seed)
    noise = rng.uniform(0, 255, size=(height, width, 3)).astype(np.float32)
    return np.clip(cv2.GaussianBlur(noise, (0, 0), 2.0) * 3 - 255, 0, 255).astype(np.uint8)


def _translated(canvas: np.ndarray, shift_xy: tuple[float, float], hw: tuple[int, int]):
    """Crop of ``canvas`` with its content moved by ``shift_xy`` pixels (bilinear)."""
    warp = np.array([[1, 0, shift_xy[0]], [0, 1, shift_xy[1]]], np.float32)
    moved = cv2.warpAffine(canvas, warp, (canvas.shape[1], canvas.shape[0]),
                           flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return np.ascontiguousarray(moved[:hw[0], :hw[1]])


def test_lk_tracks_translation_and_flags_point_leaving_frame():
    height, width, num_frames = 64, 80, 10
    velocity = np.array([1.5, 0.75])  # px per frame, sub-pixel on purpose
    canvas = _texture(2 * height, 2 * width)
    frames = [_translated(canvas, tuple(t * velocity), (height, width))
              for t in range(num_frames)]
    start = np.array([[20.0, 20.0], [40.0, 30.0], [30.0, 12.0], [width - 6.0, 30.0]])

    lk = peers.LucasKanadeTracker(peers.LK_PRESETS['small'])
    np.testing.assert_array_equal(lk.add_points(start), [0, 1, 2, 3])
    for t, frame in enumerate(frames):
        result = lk.step(frame)
        truth = start + t * velocity  # [4, 2]
        if t == 0:
            np.testing.assert_array_equal(result.xy, start.astype(np.float32))
            assert result.visible.all()
        # Interior points stay within half a pixel and visible.
        err = np.linalg.norm(result.xy[:3] - truth[:3], axis=-1)
        assert err.max() < 0.5, (t, err)
        assert result.visible[:3].all()
        if truth[3, 0] > width - 0.5:
            assert not result.visible[3], t  # left the image: never reported visible
    assert truth[3, 0] > width - 0.5  # the test really moved it out


def test_lk_points_added_later_start_at_their_frame():
    canvas = _texture(80, 80, seed=3)
    frames = [_translated(canvas, (t, 0.0), (40, 40)) for t in range(4)]
    lk = peers.LucasKanadeTracker()
    lk.step(frames[0])  # no points yet
    lk.add_points(np.array([[10.0, 20.0]]))
    assert lk.step(frames[1]).xy[0, 0] == 10.0
    result = lk.step(frames[2])
    assert abs(result.xy[0, 0] - 11.0) < 0.5 and result.visible[0]
    with pytest.raises(ValueError, match='size changed'):
        lk.step(frames[3][:20])


def test_lk_config_validation():
    with pytest.raises(ValueError, match='win_size_px'):
        peers.LucasKanadeConfig(win_size_px=16)


def test_rect_conversion_round_trip():
    # Box covering pixel centres 3..6 (x) and 5..9 (y): continuous [2.5, 6.5] x [4.5, 9.5].
    xyxy = np.array([2.5, 4.5, 6.5, 9.5])
    assert peers.xyxy_to_cv_rect(xyxy) == (3, 5, 4, 5)
    np.testing.assert_array_equal(peers.cv_rect_to_xyxy((3, 5, 4, 5)), xyxy)


def test_box_tracker_follows_translating_square():
    height, width, num_frames, side = 96, 96, 15, 24
    background = (_texture(height, width, seed=1) // 4 + 96).astype(np.uint8)  # low contrast
    patch = _texture(side, side, seed=2)
    frames, truth = [], []
    for t in range(num_frames):
        x0, y0 = 10 + 3 * t, 20 + 2 * t
        frame = background.copy()
        frame[y0:y0 + side, x0:x0 + side] = patch
        frames.append(frame)
        truth.append([x0 - 0.5, y0 - 0.5, x0 + side - 0.5, y0 + side - 0.5])
    truth = np.asarray(truth, np.float32)  # [T, 4]

    tracker = peers.OpenCvBoxTracker()
    assert tracker.name in peers.BOX_TRACKER_ALGORITHMS
    tracker.add_boxes(truth[:1])
    ious = []
    for t, frame in enumerate(frames):
        result = tracker.step(frame)
        if t == 0:
            np.testing.assert_allclose(result.xyxy[0], truth[0], atol=1e-5)
        assert result.present[0], t
        ious.append(metrics.box_iou(result.xyxy[0], truth[t]))
    assert min(ious) > 0.7, ious


def test_box_tracker_small_box_reported_at_its_own_size():
    frame = _texture(48, 48, seed=4)
    tracker = peers.OpenCvBoxTracker()
    box = np.array([[20.5, 20.5, 23.5, 22.5]], np.float32)  # 3 x 2 px, below min_size_px
    tracker.add_boxes(box)
    np.testing.assert_allclose(tracker.step(frame).xyxy, box, atol=1e-5)
    result = tracker.step(frame)  # static scene: stays put, same size
    assert result.present[0]
    assert metrics.box_iou(result.xyxy[0], box[0]) > 0.7


def test_box_tracker_rejects_unknown_algorithm():
    with pytest.raises(ValueError, match='algorithm'):
        peers.OpenCvBoxTracker(peers.BoxTrackerConfig(algorithm='yolo'))


def test_median_depth_baseline_is_constant():
    baseline = peers.MedianDepthBaseline(2.5)
    depth = baseline.step(np.zeros((4, 6, 3), np.uint8))
    assert depth.shape == (4, 6) and depth.dtype == np.float32
    assert np.all(depth == 2.5)
    with pytest.raises(ValueError, match='median_depth_m'):
        peers.MedianDepthBaseline(float('nan'))

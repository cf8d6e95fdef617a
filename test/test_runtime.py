"""MoogRuntime on the real tiny MoogPerception (random weights): ids, seeding, boxes, resets."""
import numpy as np
import pytest
import torch

from moog_ros.model import MoogPerception, get_perception_config, save_checkpoint
from moog_ros.model.checkpoint import CheckpointError
from moog_ros.runtime import (
    MoogRuntime,
    RuntimeConfig,
    box_iou,
    clip_to_extent,
    get_runtime_config,
    load_runtime,
    resolve_device,
    resolve_precision,
)

FRAME_NS = 33_000_000  # ~30 fps stamps


@pytest.fixture(scope='module')
def model() -> MoogPerception:
    torch.manual_seed(0)
    return MoogPerception(get_perception_config('tiny')).eval()  # 32x32 model canvas


def _frames(count: int, width: int = 64, height: int = 48, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]


def _runtime(model: MoogPerception, **overrides) -> MoogRuntime:
    settings = {'grid_points': 16, 'max_invisible_frames': 1000, 'box_presence_threshold': 0.0}
    settings.update(overrides)
    return MoogRuntime(model, RuntimeConfig(**settings), 'cpu')


def test_grid_seeding_and_stable_unique_ids(model):
    rt = _runtime(model)
    results = [rt.process(frame, k * FRAME_NS) for k, frame in enumerate(_frames(4))]
    first = results[0]
    assert first.frame_index == 0 and first.reset_reason is None
    assert first.track_ids.dtype == np.uint32
    assert first.track_ids.tolist() == list(range(1, 17))  # a 4x4 grid on the square canvas
    for previous, result in zip(results, results[1:]):
        assert len(np.unique(result.track_ids)) == len(result.track_ids)
        # No track ended (max_invisible_frames is large): every id carries over, in order.
        assert result.track_ids[:len(previous.track_ids)].tolist() == previous.track_ids.tolist()
        assert len(result.ended_track_ids) == 0
    for result in results:
        N = len(result.track_ids)
        assert result.tracks_xy.shape == (N, 2) and result.tracks_xy.dtype == np.float32
        assert result.tracks_visible.shape == (N,) and result.tracks_visible.dtype == bool
        assert ((result.tracks_confidence >= 0) & (result.tracks_confidence <= 1)).all()
        # Input pixels: inside the centre crop the model sees (x in [8, 56) for 64x48 -> 32x32).
        assert result.geometry.crop_xywh == (8, 0, 48, 48)
        assert result.geometry.input_in_view(result.tracks_xy).all()
        assert result.step_ms > 0 and result.total_ms >= result.step_ms


def test_points_are_reseeded_where_tracks_end(model):
    # Nothing is ever visible at threshold 1.0, so tracks end after 2 frames and the grid
    # re-seeds the freed cells with new ids.
    rt = _runtime(model, visible_threshold=1.0, max_invisible_frames=2)
    results = [rt.process(frame, k * FRAME_NS) for k, frame in enumerate(_frames(3))]
    assert not results[0].tracks_visible.any()
    first_ids = set(results[0].track_ids.tolist())
    assert first_ids <= set(results[1].ended_track_ids.tolist())
    assert not first_ids & set(results[1].track_ids.tolist())
    assert min(results[2].track_ids) > max(first_ids)  # ids are never reused


def test_added_points_get_ids_and_are_validated(model):
    rt = _runtime(model, grid_points=0, max_points=3)
    ids = rt.add_points(np.array([[20.0, 10.0], [40.0, 30.0]]))
    assert ids.tolist() == [1, 2]
    result = rt.process(_frames(1)[0], 0)
    assert result.track_ids.tolist() == [1, 2]
    with pytest.raises(ValueError, match='outside the model view'):
        rt.add_points(np.array([[2.0, 10.0]]))  # in the cropped-away border
    with pytest.raises(ValueError, match=r'\[N, 2\]'):
        rt.add_points(np.zeros((2, 3)))
    with pytest.raises(ValueError, match='finite'):
        rt.add_points(np.array([[np.nan, 1.0]]))
    more = rt.add_points(np.array([[30.0, 20.0], [31.0, 21.0]]))  # one over max_points
    result = rt.process(_frames(1)[0], FRAME_NS)
    assert result.track_ids.tolist() == [1, 2, int(more[0])]
    assert any('max_points' in note and str(more[1]) in note for note in result.notes)


def test_points_before_the_first_frame_are_checked_when_it_arrives(model):
    rt = _runtime(model, grid_points=0)
    inside, outside = rt.add_points(np.array([[30.0, 20.0], [1.0, 1.0]]))
    result = rt.process(_frames(1)[0], 0)
    assert result.track_ids.tolist() == [inside]
    assert any('outside the model view' in note for note in result.notes)


def test_boxes_keep_ids_on_match_and_carry_labels(model):
    rt = _runtime(model, grid_points=0)
    (box_id,) = rt.add_boxes(np.array([[16.0, 8.0, 40.0, 30.0]]), ['cup'])
    frames = _frames(3)
    result = rt.process(frames[0], 0)
    assert result.box_ids.tolist() == [box_id] and result.box_labels == ('cup',)
    assert result.boxes_xyxy.shape == (1, 4) and 0 <= result.boxes_score[0] <= 1
    assert (result.boxes_xyxy[:, 2:] >= result.boxes_xyxy[:, :2]).all()
    # A detector box on the tracked box continues the track; a disjoint one starts a new one.
    predicted = result.boxes_xyxy[0]
    far = np.array([50.0, 40.0, 55.0, 47.0]) if predicted[0] < 40 else np.array(
        [9.0, 1.0, 14.0, 6.0])
    ids = rt.add_boxes(np.stack([predicted, far]), ['', 'car'])
    assert ids[0] == box_id and ids[1] != box_id
    result = rt.process(frames[1], FRAME_NS)
    assert sorted(result.box_ids.tolist()) == sorted(ids.tolist())
    labels = dict(zip(result.box_ids.tolist(), result.box_labels))
    assert labels == {int(box_id): 'cup', int(ids[1]): 'car'}  # an empty label keeps the old
    with pytest.raises(ValueError, match='x_max > x_min'):
        rt.add_boxes(np.array([[10.0, 10.0, 5.0, 20.0]]))


def test_absent_boxes_end(model):
    rt = _runtime(model, grid_points=0, box_presence_threshold=1.0, max_absent_frames=2)
    (box_id,) = rt.add_boxes(np.array([[16.0, 8.0, 40.0, 30.0]]))
    first, second = (rt.process(frame, k * FRAME_NS) for k, frame in enumerate(_frames(2)))
    assert len(first.box_ids) == 0 and len(first.ended_box_ids) == 0  # absent, still alive
    assert second.ended_box_ids.tolist() == [box_id] and rt.num_boxes == 0


def test_reported_boxes_are_cut_to_the_image(model):
    boxes = np.array([[-5.0, 3.0, 20.0, 60.0], [10.0, -2.0, 70.0, 10.0]])
    np.testing.assert_allclose(clip_to_extent(boxes, (64, 48)),
                               [[-0.5, 3.0, 20.0, 47.5], [10.0, -0.5, 63.5, 10.0]])
    rt = _runtime(model, grid_points=0)
    rt.add_boxes(np.array([[0.0, 0.0, 63.0, 47.0]]))  # the whole image: any growth is cut
    for k, frame in enumerate(_frames(3)):
        result = rt.process(frame, k * FRAME_NS)
        assert (result.boxes_xyxy[:, :2] >= -0.5).all()
        assert (result.boxes_xyxy[:, 2] <= 63.5).all() and (result.boxes_xyxy[:, 3] <= 47.5).all()


def test_box_iou():
    a = np.array([[0, 0, 10, 10]])
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]])
    np.testing.assert_allclose(box_iou(a, b), [[1.0, 1 / 3, 0.0]])


@pytest.mark.parametrize('case', ['backwards', 'gap', 'resolution', 'request'])
def test_resets(model, case):
    rt = _runtime(model, reset_gap_s=1.0)
    frames = _frames(2)
    before = [rt.process(frames[0], k * FRAME_NS + 5_000_000_000) for k in range(2)][-1]
    frame, stamp = frames[1], 2 * FRAME_NS + 5_000_000_000
    if case == 'backwards':
        stamp = 4_000_000_000
    elif case == 'gap':
        stamp += 2_000_000_000
    elif case == 'resolution':
        frame = _frames(1, width=40, height=40)[0]
    else:
        rt.reset('requested by the test')
    after = rt.process(frame, stamp)
    expected = {'backwards': 'backwards', 'gap': 'gap', 'resolution': 'resolution changed',
                'request': 'requested by the test'}[case]
    assert expected in after.reset_reason
    assert after.frame_index == 0
    assert set(before.track_ids.tolist()) == set(after.ended_track_ids.tolist())
    assert min(after.track_ids) > max(before.track_ids)  # fresh tracks, new ids
    follow = rt.process(frame, stamp + FRAME_NS)
    assert follow.reset_reason is None and follow.frame_index == 1


def test_clear_points(model):
    rt = _runtime(model, grid_points=0)
    rt.add_points(np.array([[30.0, 20.0], [32.0, 22.0]]))
    frames = _frames(2)
    first = rt.process(frames[0], 0)
    rt.clear_points()
    second = rt.process(frames[1], FRAME_NS)
    assert len(second.track_ids) == 0
    assert sorted(second.ended_track_ids.tolist()) == first.track_ids.tolist()


def test_depth_resolution_range_and_pad_bars(model):
    frame = _frames(1)[0]
    result = _runtime(model).process(frame, 0)
    assert result.depth_m.shape == (32, 32) and result.depth_m.dtype == np.float32
    finite = result.depth_m[np.isfinite(result.depth_m)]
    assert ((finite >= 0.05) & (finite <= 100.0)).all()
    assert result.tracks_depth_m.shape == result.track_ids.shape
    result = _runtime(model, depth_resolution='input').process(frame, 0)
    assert result.depth_m.shape == (48, 64)
    assert np.isnan(result.depth_m[:, :8]).all() and np.isnan(result.depth_m[:, 56:]).all()
    result = _runtime(model, resize_mode='pad').process(frame, 0)
    assert np.isnan(result.depth_m[:4]).all() and np.isnan(result.depth_m[-4:]).all()  # bars
    nothing = _runtime(model, depth_range_m=(1000.0, 1001.0)).process(frame, 0)
    assert np.isnan(nothing.depth_m).all() and np.isnan(nothing.tracks_depth_m).all()


def test_trails(model):
    rt = _runtime(model, trail_length=4)
    frames = _frames(3)
    results = [rt.process(frame, k * FRAME_NS) for k, frame in enumerate(frames)]
    ids = results[-1].track_ids
    trails = rt.trails(ids)
    assert trails.shape == (len(ids), 4, 3)
    np.testing.assert_array_equal(trails[:, -1, :2], results[-1].tracks_xy)
    np.testing.assert_array_equal(trails[:16, 1, :2], results[0].tracks_xy)
    assert np.isnan(trails[:, 0]).all()  # only 3 frames so far
    late = ~np.isin(ids, results[0].track_ids)  # seeded after the first frame
    assert np.isnan(trails[late, 1]).all()


def test_warmup_leaves_a_clean_state_and_replays_are_deterministic(model):
    frames = _frames(3)
    runs = []
    for warm in (0, 2):
        rt = _runtime(model)
        rt.warmup(warm)
        runs.append([rt.process(frame, k * FRAME_NS) for k, frame in enumerate(frames)])
    for a, b in zip(*runs):
        assert b.frame_index == a.frame_index and b.reset_reason is None
        np.testing.assert_array_equal(a.track_ids, b.track_ids)
        np.testing.assert_allclose(a.tracks_xy, b.tracks_xy, atol=1e-4)
        np.testing.assert_allclose(a.depth_m, b.depth_m, atol=1e-4)
        assert len(b.box_ids) == 0


def test_update_config_applies_to_live_tracks(model):
    rt = _runtime(model)
    frames = _frames(2)
    rt.process(frames[0], 0)
    rt.update_config(RuntimeConfig(grid_points=16, visible_threshold=1.0,
                                   max_invisible_frames=1))
    result = rt.process(frames[1], FRAME_NS)
    assert not result.tracks_visible.any() and len(result.ended_track_ids) >= 16


def test_bad_frames_and_configs(model):
    rt = _runtime(model)
    with pytest.raises(ValueError, match='uint8'):
        rt.process(np.zeros((8, 8, 3), np.float32), 0)
    with pytest.raises(ValueError, match=r'\[H, W, 3\]'):
        rt.process(np.zeros((8, 8), np.uint8), 0)
    with pytest.raises(ValueError, match='resize_mode'):
        RuntimeConfig(resize_mode='zoom')
    with pytest.raises(ValueError, match='depth_range_m'):
        RuntimeConfig(depth_range_m=(2.0, 1.0))
    config = get_runtime_config('dense')
    assert RuntimeConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match='unknown keys'):
        RuntimeConfig.from_dict({'grid': 3})
    with pytest.raises(ValueError, match='unknown runtime preset'):
        get_runtime_config('fast')


def test_bf16_precision_runs_the_step_in_bf16_and_returns_float32(model):
    assert resolve_precision('fp32', 'cpu') is None
    assert resolve_precision('bf16', 'cpu') is torch.bfloat16
    # bf16 where the CPU has bf16 instructions (it won there in bench/bench_node.py).
    assert resolve_precision('auto', 'cpu') is None  # measured slower in bf16 on CPUs
    with pytest.raises(ValueError, match='precision'):
        RuntimeConfig(precision='fp16')
    frames = _frames(3)
    runs = {}
    for precision in ('fp32', 'bf16'):
        rt = _runtime(model, precision=precision)
        runs[precision] = [rt.process(frame, k * FRAME_NS) for k, frame in enumerate(frames)]
    for a, b in zip(runs['fp32'], runs['bf16']):
        assert b.depth_m.dtype == np.float32 and b.tracks_xy.dtype == np.float32
        np.testing.assert_array_equal(a.track_ids, b.track_ids)
        # The same model in lower precision: close, but not bit-identical (it did run in bf16).
        assert not np.array_equal(a.depth_m, b.depth_m)
        np.testing.assert_allclose(a.tracks_xy, b.tracks_xy, atol=2.0)
    rt = _runtime(model)
    assert rt.autocast_dtype is None  # fp32 unless asked: offline results are portable
    rt.update_config(RuntimeConfig(grid_points=16, precision='bf16'))
    assert rt.autocast_dtype is torch.bfloat16


@pytest.mark.slow  # save_checkpoint fsyncs, which takes seconds on slow disks
def test_devices_and_checkpoints(model, tmp_path):
    assert resolve_device('cpu').type == 'cpu'
    assert resolve_device('auto').type == ('cuda' if torch.cuda.is_available() else 'cpu')
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match='CUDA is not available'):
            resolve_device('cuda:0')
    save_checkpoint(tmp_path / 'tiny', model)
    rt = load_runtime(tmp_path / 'tiny', RuntimeConfig(), 'cpu')
    assert rt.model_wh == (32, 32)
    (tmp_path / 'tiny' / 'model.safetensors').write_bytes(b'not a safetensors file')
    with pytest.raises(CheckpointError, match='model.safetensors'):
        load_runtime(tmp_path / 'tiny', RuntimeConfig(), 'cpu')

"""Training data pipeline: clip-directory windows, the geometric transform, sampling, collation."""
from __future__ import annotations

from pathlib import Path

import fixtures_movi
import numpy as np
import pytest
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore
import torch

from moog_ros import clips
from moog_ros.training import data


def _project(K: np.ndarray, points_cam: np.ndarray) -> np.ndarray:
    """Pinhole projection of camera-frame points [..., 3] -> pixels [..., 2]."""
    uvw = points_cam @ K.T
    return uvw[..., :2] / uvw[..., 2:3]


def make_scene_window(T: int = 3, H: int = 60, W: int = 80, seed: int = 0) -> dict:
    """A window whose labels are geometrically consistent: tracks = projections of 3-D points.

    Returns the window plus 'points_world' [N, T, 3] for the test.
    """
    rng = np.random.default_rng(seed)
    K = np.array([[70.0, 0.0, 39.3], [0.0, 72.0, 30.6], [0.0, 0.0, 1.0]])
    # Camera-to-world poses: a small translation per frame and a rotation about y.
    poses = np.tile(np.eye(4), (T, 1, 1))
    for t in range(T):
        angle = 0.05 * t
        poses[t, :3, :3] = [[np.cos(angle), 0, np.sin(angle)], [0, 1, 0],
                            [-np.sin(angle), 0, np.cos(angle)]]
        poses[t, :3, 3] = [0.1 * t, -0.05 * t, 0.0]
    N = 40
    points_world = np.stack([rng.uniform(-1.5, 1.5, N), rng.uniform(-1.0, 1.0, N),
                             rng.uniform(2.0, 5.0, N)], axis=-1)            # [N, 3], static
    points_world = np.repeat(points_world[:, None], T, axis=1)              # [N, T, 3]
    cam = np.einsum('tij,ntj->nti', np.linalg.inv(poses)[:, :3, :3], points_world) \
        + np.linalg.inv(poses)[None, :, :3, 3]                              # [N, T, 3]
    tracks = _project(K, cam).astype(np.float32)                            # [N, T, 2]
    visible = np.ones((N, T), bool)
    # Boxes: around groups of points.
    boxes = np.stack([np.concatenate([tracks[k::4].min(0), tracks[k::4].max(0)], -1)
                      for k in range(4)]).astype(np.float32)                # [K, T, 4]
    # Depth and segmentation encode the source pixel index so nearest resizing can be checked.
    yy, xx = np.mgrid[0:H, 0:W]
    ids = (yy * W + xx).astype(np.float32)
    window = {
        'video': rng.integers(0, 255, (T, H, W, 3), dtype=np.uint8),
        'depth': np.repeat(ids[None], T, 0) + 1.0,
        'segmentation': np.repeat((ids % 7).astype(np.uint16)[None], T, 0),
        'intrinsics': K.astype(np.float32),
        'tracks_xy': tracks,
        'tracks_visible': visible,
        'boxes_xyxy': boxes,
        'boxes_valid': np.ones(boxes.shape[:2], bool),
        'camera_pose': poses.astype(np.float32),
        'stamps_ns': np.arange(T, dtype=np.int64) * 83_333_333,
    }
    return window, points_world


@pytest.mark.parametrize('flip', [False, True])
@pytest.mark.parametrize('crop', [(7, 3, 50, 50), (0, 0, 60, 60), (25, 10, 31, 31)])
def test_transform_keeps_labels_consistent_with_the_camera(crop, flip):
    window, points_world = make_scene_window()
    out_hw = (32, 32)
    out = data.crop_resize_flip(window, crop, out_hw, flip)
    K2 = out['intrinsics'].astype(np.float64)
    assert K2[0, 0] > 0 and K2[1, 1] > 0, 'focal lengths stay positive under the flip'
    # Project the (mirrored, if flipped) world points with the transformed pose and K.
    mirror = np.diag([-1.0, 1.0, 1.0]) if flip else np.eye(3)
    pw = points_world @ mirror.T
    world_to_cam = np.linalg.inv(out['camera_pose'].astype(np.float64))     # [T, 4, 4]
    cam = np.einsum('tij,ntj->nti', world_to_cam[:, :3, :3], pw) + world_to_cam[None, :, :3, 3]
    expected = _project(K2, cam)
    np.testing.assert_allclose(out['tracks_xy'], expected, atol=2e-3)
    assert np.all(np.linalg.det(out['camera_pose'][:, :3, :3]) > 0.99), 'a proper rotation'
    # Visibility: exactly the points inside the output image.
    inside = ((expected[..., 0] >= -0.5) & (expected[..., 0] <= out_hw[1] - 0.5)
              & (expected[..., 1] >= -0.5) & (expected[..., 1] <= out_hw[0] - 0.5))
    np.testing.assert_array_equal(out['tracks_visible'], inside)
    assert out['video'].shape == (3, 32, 32, 3) and out['video'].dtype == np.uint8


@pytest.mark.parametrize('flip', [False, True])
def test_depth_and_segmentation_are_sampled_at_the_nearest_source_pixel(flip):
    window, _ = make_scene_window()
    H, W = window['depth'].shape[1:]
    x0, y0, w, h = crop = (9, 4, 45, 45)
    out = data.crop_resize_flip(window, crop, (30, 30), flip)
    ids = out['depth'][0] - 1.0                                  # source pixel ids [30, 30]
    src_y, src_x = np.divmod(ids.astype(np.int64), W)
    v, u = np.mgrid[0:30, 0:30].astype(np.float64)
    if flip:
        u = 29 - u
    # The source coordinate each output pixel centre maps back to.
    back_x = (u + 0.5) * w / 30 - 0.5 + x0
    back_y = (v + 0.5) * h / 30 - 0.5 + y0
    assert np.all(np.abs(src_x - back_x) <= 0.5 + 1e-6)
    assert np.all(np.abs(src_y - back_y) <= 0.5 + 1e-6)
    np.testing.assert_array_equal(out['segmentation'][0], (ids.astype(np.int64) % 7))


def test_boxes_follow_the_flip_and_are_clipped_or_invalidated():
    window, _ = make_scene_window()
    window['boxes_xyxy'] = np.array([[[10.5, 20.5, 30.5, 40.5]] * 3,      # inside the crop
                                     [[0.0, 0.0, 8.0, 8.0]] * 3,          # left of the crop
                                     [[55.0, 20.0, 75.0, 30.0]] * 3],     # half outside
                                    np.float32)
    window['boxes_valid'] = np.ones((3, 3), bool)
    crop = (10, 5, 50, 50)                                             # x in [9.5, 59.5]
    plain = data.crop_resize_flip(window, crop, (50, 50), flip=False)
    flipped = data.crop_resize_flip(window, crop, (50, 50), flip=True)
    np.testing.assert_allclose(plain['boxes_xyxy'][0, 0], [0.5, 15.5, 20.5, 35.5], atol=1e-5)
    np.testing.assert_allclose(flipped['boxes_xyxy'][0, 0], [28.5, 15.5, 48.5, 35.5], atol=1e-5)
    assert flipped['boxes_xyxy'][0, 0, 0] <= flipped['boxes_xyxy'][0, 0, 2]
    np.testing.assert_array_equal(plain['boxes_valid'][:, 0], [True, False, True])
    np.testing.assert_allclose(plain['boxes_xyxy'][2, 0], [45.0, 15.0, 49.5, 25.0], atol=1e-5)


def test_crop_sampler_keeps_aspect_and_scale_range():
    rng = np.random.default_rng(0)
    for _ in range(200):
        x0, y0, w, h = data.sample_crop_xywh(rng, (120, 200), (64, 128), (0.6, 1.0))
        assert x0 >= 0 and x0 + w <= 200 and y0 >= 0 and y0 + h <= 120
        assert abs(w / h - 2.0) < 0.05
        assert 0.6 * 200 - 1 <= w <= 200
    assert data.centre_crop_xywh((120, 200), (64, 64)) == (40, 0, 120, 120)


# ----------------------------------------------------------------------------------------------
# Clip directories

def write_clip(path: Path, T: int, H: int = 24, W: int = 32, seed: int = 0, N: int = 3,
               K: int = 2, fps: float | None = 12.0) -> clips.Clip:
    rng = np.random.default_rng(seed)
    video = rng.integers(0, 255, (T, H, W, 3), dtype=np.uint8)
    video[:, 0, 0, 0] = np.arange(T)    # frame index in pixel (0, 0), for slicing checks
    boxes = np.tile(np.array([2.0, 3.0, 10.0, 12.0], np.float32), (K, T, 1))
    clip = clips.Clip(
        video=video, depth=rng.uniform(1, 5, (T, H, W)).astype(np.float32),
        intrinsics=np.array([[30, 0, W / 2], [0, 30, H / 2], [0, 0, 1]], np.float32),
        tracks_xy=rng.uniform(0, 20, (N, T, 2)).astype(np.float32),
        tracks_visible=np.ones((N, T), bool), boxes_xyxy=boxes,
        boxes_valid=np.ones((K, T), bool), fps=fps)
    clips.save_clip(path, clip)
    return clip


@pytest.fixture
def clip_dir(tmp_path: Path) -> Path:
    for i, T in enumerate([10, 6, 3, 12]):
        write_clip(tmp_path / f'clip_{i:03d}.npz', T, seed=i, N=i + 1)
    return tmp_path


def test_clip_dir_source_counts_and_slices_windows(clip_dir):
    source = data.ClipDirSource(clip_dir, num_frames=4, frame_step=2)
    # span 7: 10 -> 4 windows, 6 -> 0, 3 -> 0, 12 -> 6.
    assert source.clip_lengths == [10, 6, 3, 12]
    assert len(source) == 10
    first = source.window(0, 4, 2)
    assert first['video'].shape == (4, 24, 32, 3)
    np.testing.assert_array_equal(first['video'][:, 0, 0, 0], [0, 2, 4, 6])
    np.testing.assert_array_equal(first['stamps_ns'], np.round(np.array([0, 2, 4, 6]) / 12.0
                                                                 * 1e9).astype(np.int64))
    last = source.window(9, 4, 2)
    assert source.locate(9, 4, 2) == (clip_dir / 'clip_003.npz', 5)
    np.testing.assert_array_equal(last['video'][:, 0, 0, 0], [5, 7, 9, 11])
    assert last['tracks_xy'].shape == (4, 4, 2) and last['boxes_valid'].shape == (2, 4)
    with pytest.raises(IndexError, match='window 10 out of range'):
        source.window(10, 4, 2)
    video_only = data.ClipDirSource(clip_dir, num_frames=4, frame_step=2, labels=False)
    assert set(video_only.window(0, 4, 2)) == {'video', 'stamps_ns'}


def test_clip_dir_holdout_splits_by_whole_clips(clip_dir):
    source = data.ClipDirSource(clip_dir, num_frames=2)
    train, val = data.holdout_split(source, 0.25)
    assert not set(train.files) & set(val.files)
    assert sorted(train.files + val.files) == source.files
    assert len(val.files) == 1


def test_corrupt_clip_is_skipped_with_a_line_naming_the_file(clip_dir, capfd):
    bad = clip_dir / 'clip_999.npz'
    bad.write_bytes(b'not a zip file')
    try:
        source = data.ClipDirSource(clip_dir)
    finally:
        bad.unlink()  # the directory is shared with other tests
    assert bad not in source.files and len(source.files) > 0
    (line,) = [x for x in capfd.readouterr().err.splitlines() if 'clip_999.npz' in x]
    assert line.startswith('[data] skipping') and 'not a valid npz' in line


def test_open_source_dispatch_and_options(clip_dir):
    assert isinstance(data.open_source(str(clip_dir), num_frames=2), data.ClipDirSource)
    assert len(data.open_source(f'clips:{clip_dir}', num_frames=2, topic=None)) > 0
    with pytest.raises(ValueError, match='unknown source option'):
        data.open_source(str(clip_dir), colour='red')
    both = data.open_sources(f'{clip_dir},clips:{clip_dir}', num_frames=2)
    assert isinstance(both, data.ConcatSource) and len(both) == 2 * len(
        data.open_source(str(clip_dir), num_frames=2))
    assert data.split_data_specs('bag:a.mcap,b.mcap,clips:c,d') == ['bag:a.mcap,b.mcap',
                                                                    'clips:c', 'd']


# ----------------------------------------------------------------------------------------------
# Sampling: (seed, slot) -> sample, shards, resume

def test_train_windows_are_a_pure_function_of_seed_and_slot(clip_dir):
    source = data.ClipDirSource(clip_dir, num_frames=3)
    make = lambda seed: data.TrainWindows(source, num_frames=3, frame_step=1,  # noqa: E731
                                          image_size=(16, 16), seed=seed)
    a, b, c = make(0), make(0), make(1)
    for slot in (0, 5, 31):
        sa, sb = a[slot], b[slot]
        assert torch.equal(sa['video'], sb['video'])
        assert torch.equal(sa['tracks_xy'], sb['tracks_xy'])
    assert not all(torch.equal(a[s]['video'], c[s]['video']) for s in range(4))
    # One epoch of slots visits every window exactly once.
    n = len(a)
    assert sorted(a.window_index(s) for s in range(n)) == list(range(n))
    sample = a[0]
    assert sample['video'].dtype == torch.float32 and sample['video'].shape == (3, 16, 16, 3)
    assert sample['video'].min() >= 0.0 and sample['video'].max() <= 1.0


def test_step_sampler_shards_are_disjoint_and_resume_continues_the_sequence():
    ranks = [list(data.StepBatchSampler(3, rank=r, world_size=2, num_steps=5)) for r in (0, 1)]
    slots = [s for batches in ranks for batch in batches for s in batch]
    assert sorted(slots) == list(range(30))
    full = list(data.StepBatchSampler(4, num_steps=6))
    resumed = list(data.StepBatchSampler(4, start_step=2, num_steps=4))
    assert resumed == full[2:]


def test_collate_pads_tracks_and_fills_missing_labels(clip_dir):
    source = data.ClipDirSource(clip_dir, num_frames=3)
    dataset = data.TrainWindows(source, num_frames=3, frame_step=1, image_size=(16, 16),
                                seed=0)
    samples = [dataset[s] for s in range(4)]
    del samples[1]['depth'], samples[1]['tracks_xy'], samples[1]['tracks_visible']
    batch = data.collate_windows(samples)
    counts = [s['tracks_xy'].shape[0] if 'tracks_xy' in s else 0 for s in samples]
    assert batch['tracks_xy'].shape == (4, max(counts), 3, 2)
    np.testing.assert_array_equal(batch['tracks_mask'].sum(1).numpy(), counts)
    assert not batch['tracks_visible'][~batch['tracks_mask']].any()
    assert torch.isnan(batch['depth'][1]).all() and not torch.isnan(batch['depth'][0]).any()
    assert batch['video'].shape == (4, 3, 16, 16, 3)


def test_eval_windows_are_fixed_centre_crops(clip_dir):
    source = data.ClipDirSource(clip_dir, num_frames=3)
    evals = data.EvalWindows(source, num_frames=3, frame_step=1, image_size=(24, 24),
                             max_windows=5)
    assert len(evals) == 5 and evals.indices[0] == 0 and evals.indices[-1] == len(source) - 1
    window = source.window(int(evals.indices[2]), 3, 1)
    # 32x24 frame -> centre 24x24 crop at x0 = 4, no resize: pixels are copied.
    expected = torch.from_numpy(window['video'][:, :, 4:28]).float() / 255
    assert torch.equal(evals[2]['video'], expected)
    loader = data.make_loader(evals, batch_size=2)
    assert [b['video'].shape[0] for b in loader] == [2, 2, 1]


def test_bag_and_movi_sources_mix_with_clip_dirs(clip_dir, tmp_path):
    """open_sources dispatches schemes and one set of options serves every source kind."""
    typestore = get_typestore(Stores.ROS2_KILTED)
    Image = typestore.types['sensor_msgs/msg/Image']
    Header = typestore.types['std_msgs/msg/Header']
    Time = typestore.types['builtin_interfaces/msg/Time']
    rgb = np.random.default_rng(0).integers(0, 255, (7, 20, 28, 3), dtype=np.uint8)
    bag = tmp_path / 'bag'
    with Writer(bag, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        connection = writer.add_connection('/cam/image_raw', Image.__msgtype__,
                                           typestore=typestore)
        for i, frame in enumerate(rgb):
            msg = Image(header=Header(stamp=Time(sec=i, nanosec=0), frame_id='cam'),
                        height=20, width=28, encoding='rgb8', is_bigendian=0, step=28 * 3,
                        data=frame.reshape(-1))
            writer.write(connection, i * 10**9, typestore.serialize_cdr(msg, Image.__msgtype__))
    shard = tmp_path / 'movi' / 'movi_e-train.tfrecord-00000-of-00001'
    shard.parent.mkdir()
    fixtures_movi.write_movi_shard(shard, num_videos=2)

    source = data.open_sources(f'bag:{bag},movi:{shard.parent},clips:{clip_dir}',
                               num_frames=3, frame_step=1, labels=False, progress=False)
    assert isinstance(source, data.ConcatSource) and len(source.sources) == 3
    bag_source, movi_source, clip_source = source.sources
    assert len(bag_source) == 7 // 3 and len(movi_source) == 2 * (fixtures_movi.FRAMES // 3)
    np.testing.assert_array_equal(source.window(1, 3, 1)['video'], rgb[3:6])
    assert movi_source.window(0, 3, 1)['tracks_xy'].shape[0] == 0, 'labels=False: no tracks'
    dataset = data.TrainWindows(source, num_frames=3, frame_step=1, image_size=(16, 16),
                                seed=0)
    batch = data.collate_windows([dataset[s] for s in range(len(dataset))])
    assert batch['video'].shape == (len(source), 3, 16, 16, 3)
    assert len(clip_source) + len(bag_source) + len(movi_source) == len(source)

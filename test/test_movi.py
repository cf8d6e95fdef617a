"""MOVi TFDS records without TensorFlow (training/movi.py), checked against an exact fixture."""
import struct

from fixtures_movi import (
    BOX_FRONT_Z,
    F_PX,
    FRAMES,
    PLANE_Z,
    SIZE,
    box_corners,
    build_scene,
    explain_track,
    movi_features,
    unproject,
    write_movi_shard,
)
import numpy as np
import pytest

from moog_ros import clips
from moog_ros.training import movi


@pytest.fixture(scope='module')
def shard(tmp_path_factory):
    path = tmp_path_factory.mktemp('movi') / 'movi_e-train.tfrecord-00000-of-00001'
    scene = write_movi_shard(path, num_videos=2)
    return path, scene


def quantum(scene) -> float:
    return float(scene.range_m.max() - scene.range_m.min()) / 65535


# -- framing and Example -----------------------------------------------------------------------

def test_masked_crc32c_known_value():
    # CRC32C('123456789') = 0xE3069283; masked = rotr(crc, 15) + 0xa282ead8.
    crc = 0xE3069283
    assert movi.masked_crc32c(b'123456789') == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) \
        & 0xFFFFFFFF


def test_tfrecord_round_trip_corruption_and_truncation(tmp_path):
    path = tmp_path / 'x.tfrecord'
    records = [b'first', b'', b'\x00' * 1000]
    movi.write_tfrecord(path, records)
    assert list(movi.read_tfrecord(path)) == records

    data = bytearray(path.read_bytes())
    data[12 + 2] ^= 0xFF  # a payload byte of the first record
    path.write_bytes(bytes(data))
    with pytest.raises(movi.MoviFormatError, match='x.tfrecord: corrupt TFRecord data at byte 0'):
        list(movi.read_tfrecord(path))

    movi.write_tfrecord(path, records)
    path.write_bytes(path.read_bytes()[:-10])  # cut inside the last record
    with pytest.warns(UserWarning, match='cut short'):
        assert list(movi.read_tfrecord(path)) == records[:2]

    data = bytearray(path.read_bytes())
    data[0] ^= 1  # the length no longer matches its checksum
    path.write_bytes(bytes(data))
    with pytest.raises(movi.MoviFormatError, match='corrupt TFRecord length'):
        list(movi.read_tfrecord(path))


def test_example_round_trip_and_errors():
    data = movi.encode_example({
        'b': [b'png1', b'\x00tail\x00'], 's': b'one', 'f': np.array([1.5, -2.0], np.float32),
        'i': np.array([[1, -2], [3, 2**40]]), 'empty': np.zeros(0, np.int64),
    })
    features = movi.parse_example(data, 'rec')
    assert features.keys() == ['b', 'empty', 'f', 'i', 's']
    assert features.bytes_list('b') == [b'png1', b'\x00tail\x00']  # NUL bytes survive
    assert features.bytes_list('s') == [b'one']
    np.testing.assert_array_equal(features.floats('f'), [1.5, -2.0])
    np.testing.assert_array_equal(features.ints('i', (2, 2)), [[1, -2], [3, 2**40]])
    assert features.ints('empty').size == 0
    with pytest.raises(movi.MoviFormatError, match="rec: missing key 'nope'"):
        features.floats('nope')
    with pytest.raises(movi.MoviFormatError, match="rec, key 'f': holds a float_list"):
        features.ints('f')
    with pytest.raises(movi.MoviFormatError, match=r"key 'i': 4 values, expected shape \(3,\)"):
        features.ints('i', (3,))
    with pytest.raises(movi.MoviFormatError, match='not a tf.train.Example'):
        movi.parse_example(b'\x0a\xff\xff', 'junk')


# -- decoding the fixture ----------------------------------------------------------------------

def test_decode_video_segmentation_intrinsics_boxes(shard):
    path, scene = shard
    record = next(movi.read_tfrecord(path))
    out = movi.decode_record(record, num_tracks=0)
    np.testing.assert_array_equal(out['video'], scene.video)
    np.testing.assert_array_equal(out['segmentation'], scene.segmentation)
    assert out['segmentation'].dtype == np.uint16
    c = (SIZE - 1) / 2
    np.testing.assert_array_equal(out['intrinsics'], np.array(
        [[F_PX, 0, c], [0, F_PX, c], [0, 0, 1]], np.float32))
    # Boxes enclose the mask pixels exactly; instance 1 is never visible.
    np.testing.assert_array_equal(out['boxes_valid'], scene.boxes_valid)
    assert out['boxes_valid'][0].all() and not out['boxes_valid'][1].any()
    np.testing.assert_array_equal(out['boxes_xyxy'][0], scene.boxes_xyxy[0].astype(np.float32))
    assert out['tracks_xy'].shape == (0, FRAMES, 2)
    assert float(out['fps']) == movi.MOVI_FPS
    np.testing.assert_array_equal(out['stamps_ns'], np.round(np.arange(FRAMES) / 12 * 1e9))


def test_decode_depth_is_z_within_quantisation(shard):
    path, scene = shard
    out = movi.decode_record(next(movi.read_tfrecord(path)), num_tracks=0)
    depth = out['depth']
    assert depth.dtype == np.float32 and depth.shape == (FRAMES, SIZE, SIZE)
    tol = quantum(scene) + 1e-5  # one quantisation step of the range (z is smaller than range)
    np.testing.assert_allclose(depth, scene.depth_z, atol=tol, rtol=0)
    np.testing.assert_allclose(depth[scene.segmentation == 0], PLANE_Z, atol=tol, rtol=0)
    np.testing.assert_allclose(depth[scene.segmentation == 1], BOX_FRONT_Z, atol=tol, rtol=0)
    # Reading the range as if it were z would be far off at the image corners.
    assert np.abs(scene.range_m - scene.depth_z).max() > 100 * tol


def test_depth_intrinsics_and_pose_back_project_to_the_scene(shard):
    path, scene = shard
    out = movi.decode_record(next(movi.read_tfrecord(path)), num_tracks=0)
    K_inv = np.linalg.inv(out['intrinsics'].astype(np.float64))
    ys, xs = np.mgrid[0:SIZE, 0:SIZE]
    xy = np.stack([xs, ys], -1).reshape(-1, 2).astype(np.float64)
    for t in range(FRAMES):
        z = out['depth'][t].reshape(-1, 1).astype(np.float64)
        p_cam = z * (np.concatenate([xy, np.ones((len(xy), 1))], -1) @ K_inv.T)  # OpenCV axes
        pose = out['camera_pose'][t].astype(np.float64)
        world = p_cam @ pose[:3, :3].T + pose[:3, 3]
        _, expected, _ = unproject(xy, t, scene)
        np.testing.assert_allclose(world, expected, atol=2e-3)


def check_tracks(tracks_xy, visible, scene, frames):
    """Every track is the exact projection of one scene point (static on the backdrop, or fixed
    on the moving box) in every frame, visible or not; returns the surface of each track."""
    assert np.isfinite(tracks_xy[visible]).all()
    kinds = []
    for n in range(len(tracks_xy)):
        assert visible[n].any(), f'track {n} is never visible (its query frame must be)'
        kind, error = explain_track(tracks_xy[n].astype(np.float64), scene, frames)
        assert error < 0.01, f'track {n} follows no scene point (best error {error} px)'
        kinds.append(kind)
    return np.array(kinds)


def test_point_tracks_follow_scene_points(shard):
    path, scene = shard
    out = movi.decode_record(next(movi.read_tfrecord(path)), num_tracks=256,
                             rng=np.random.default_rng(3))
    tracks_xy, visible = out['tracks_xy'], out['tracks_visible']
    assert tracks_xy.dtype == np.float32 and visible.dtype == bool
    assert len(tracks_xy) >= 3
    kinds = check_tracks(tracks_xy, visible, scene, np.arange(FRAMES))
    assert (kinds == 0).any() and (kinds == 1).any()  # both background and object tracks


def test_point_track_occlusion_on_a_dense_grid():
    scene = build_scene()
    rng = np.random.default_rng(0)
    bboxes = np.stack([[box_corners(c) for c in scene.box_centres[k]] for k in range(2)])
    cam_pose = np.tile(np.eye(4), (FRAMES, 1, 1))
    cam_pose[:, :3, :3] = scene.camera_rotation @ np.diag([1.0, -1.0, -1.0])
    cam_pose[:, :3, 3] = scene.camera_position
    c = (SIZE - 1) / 2
    K = np.array([[F_PX, 0, c], [0, F_PX, c], [0, 0, 1]])
    tracks_xy, visible = movi.kubric_point_tracks(
        segmentation=scene.segmentation, range_m=scene.range_m,
        object_coordinates=lambda frames: scene.object_coordinates[frames], bboxes_3d=bboxes,
        intrinsics=K, camera_pose=cam_pose, num_tracks=400, rng=rng, stride=2, max_fraction=0.5)
    assert len(tracks_xy) > 100
    kinds = check_tracks(tracks_xy, visible, scene, np.arange(FRAMES))
    # Background points are hidden exactly when the box covers all 4 pixels around them, and
    # visible when none of those pixels is on the box (and the point is in the image).
    inside = ((tracks_xy >= -0.5) & (tracks_xy <= SIZE - 0.5)).all(-1)
    x0 = np.clip(np.floor(tracks_xy[..., 0]), 0, SIZE - 1).astype(int)
    y0 = np.clip(np.floor(tracks_xy[..., 1]), 0, SIZE - 1).astype(int)
    x1, y1 = np.clip(x0 + 1, 0, SIZE - 1), np.clip(y0 + 1, 0, SIZE - 1)
    t = np.broadcast_to(np.arange(FRAMES), x0.shape)
    on_box = np.stack([scene.segmentation[t, yy, xx] == 1 for yy in (y0, y1) for xx in (x0, x1)])
    background = kinds == 0
    covered = on_box.all(0) & background[:, None]
    clear = ~on_box.any(0) & background[:, None] & inside
    assert covered.any() and clear.any()
    assert not visible[covered].any()
    assert visible[clear].all()
    assert not visible[~inside].any()
    # Object points stay visible wherever they are in the image (nothing occludes the box).
    assert visible[(kinds == 1)[:, None] & inside].all()


def test_occlusion_rules_each_hide_points():
    # One frame of 4x4 pixels at 2 m; points exactly at pixel centres, 2 m away, segment 0.
    T, H, W = 1, 4, 4
    seg = np.zeros((T, H, W), np.uint16)
    rng_m = np.full((T, H, W), 2.0)
    ys, xs = np.mgrid[0:H, 0:W]
    xy = np.stack([xs, ys], -1).reshape(-1, 1, 2).astype(np.float64)  # [16, 1, 2]
    z = np.ones((16, 1))
    dist = np.full((16, 1), 2.0)
    ids = np.zeros(16, np.int64)
    assert not movi.kubric_occlusion(xy, z, dist, ids, seg, rng_m).any()
    # Something nearer covers rows/cols 1..3: points whose 4 pixels (x..x+1, y..y+1, clipped)
    # are all covered are hidden by the depth rule alone (same segment).
    near = rng_m.copy()
    near[0, 1:, 1:] = 1.0
    hidden = ((xs >= 1) & (ys >= 1)).reshape(-1, 1)
    np.testing.assert_array_equal(movi.kubric_occlusion(xy, z, dist, ids, seg, near), hidden)
    # The same region with another segment but the same depth: hidden by the segment rule alone.
    other = seg.copy()
    other[0, 1:, 1:] = 1
    np.testing.assert_array_equal(movi.kubric_occlusion(xy, z, dist, ids, other, rng_m), hidden)
    # Within the 1 % depth tolerance nothing is hidden.
    close = np.full_like(rng_m, 2.0 * 0.995)
    assert not movi.kubric_occlusion(xy, z, dist, ids, seg, close).any()
    # Behind the camera, or outside the image.
    behind = movi.kubric_occlusion(xy, -z, dist, ids, seg, rng_m)
    outside = movi.kubric_occlusion(xy + [[[W, 0]]], z, dist, ids, seg, rng_m)
    assert behind.all() and outside.all()
    edge = movi.kubric_occlusion(np.array([[[-0.49, 3.49]], [[-0.51, 0.0]]]), np.ones((2, 1)),
                                 np.full((2, 1), 2.0), np.zeros(2, np.int64), seg, rng_m)
    np.testing.assert_array_equal(edge, [[False], [True]])


# -- the window source -------------------------------------------------------------------------

def test_movi_source_windows(shard):
    path, scene = shard
    source = movi.MoviSource(path.parent, window_frames=2, num_tracks=64)
    assert source.num_videos == 2 and len(source) == 4 and source.video_frames == FRAMES
    window = source.window(1, 2, 1)  # video 0, second segment: frames 2 and 3
    np.testing.assert_array_equal(window['video'], scene.video[2:4])
    np.testing.assert_array_equal(window['segmentation'], scene.segmentation[2:4])
    np.testing.assert_array_equal(window['boxes_xyxy'][0],
                                  scene.boxes_xyxy[0, 2:4].astype(np.float32))
    np.testing.assert_array_equal(window['stamps_ns'], np.round(np.array([2, 3]) / 12 * 1e9))
    assert 'fps' not in window and window['camera_pose'].shape == (2, 4, 4)
    check_tracks(window['tracks_xy'], window['tracks_visible'], scene, np.array([2, 3]))
    strided = source.window(2, 2, 2)  # video 1, frames 0 and 2
    np.testing.assert_array_equal(strided['video'], scene.video[[0, 2]])
    check_tracks(strided['tracks_xy'], strided['tracks_visible'], scene, np.array([0, 2]))
    shifted = source.window(1, 3, 1)  # would run past frame 3: shifted back to frames 1..3
    np.testing.assert_array_equal(shifted['video'], scene.video[1:4])
    again = source.window(1, 2, 1)
    for key in window:
        np.testing.assert_array_equal(window[key], again[key], err_msg=key)
    with pytest.raises(ValueError, match='too few for a window'):
        source.window(0, 3, 2)
    with pytest.raises(IndexError):
        source.window(4, 2, 1)


def test_movi_clips_are_valid_clips(shard):
    path, _ = shard
    all_clips = list(movi.iter_clips(path, num_tracks=32))
    assert len(all_clips) == 2
    for clip in all_clips:
        assert isinstance(clip, clips.Clip) and clip.num_frames == FRAMES
        clips.validate(clip.to_arrays(), source='movi fixture')
        assert clip.fps == movi.MOVI_FPS and clip.segmentation is not None


def test_split_selection_and_bad_folders(tmp_path):
    write_movi_shard(tmp_path / 'movi_e-train.tfrecord-00000-of-00001')
    write_movi_shard(tmp_path / 'movi_e-validation.tfrecord-00000-of-00001', num_videos=3)
    with pytest.raises(movi.MoviFormatError, match=r"several splits \['train', 'validation'\]"):
        movi.MoviSource(tmp_path)
    assert movi.MoviSource(tmp_path, split='validation', window_frames=None).num_videos == 3
    assert len(movi.MoviSource(tmp_path, split='train')) == 1
    with pytest.raises(movi.MoviFormatError, match="no 'test' shards"):
        movi.MoviSource(tmp_path, split='test')
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(movi.MoviFormatError, match='has no'):
        movi.MoviSource(empty)


def test_missing_field_names_record_and_key(tmp_path, capfd):
    features = movi_features(build_scene())
    del features['camera/positions']
    path = tmp_path / 'bad.tfrecord'
    movi.write_tfrecord(path, [movi.encode_example(features)])
    source = movi.MoviSource(path, num_tracks=0)
    with pytest.raises(movi.MoviFormatError,
                       match=r"bad.tfrecord \(record at byte 0\): missing key 'camera/positions'"):
        source.window(0, 2, 1)
    # A record whose framing is fine but whose payload was altered fails its checksum.
    data = bytearray(path.read_bytes())
    (length,) = struct.unpack('<Q', data[:8])
    data[12 + length // 2] ^= 0x01
    path.write_bytes(bytes(data))
    # Its only record is skipped with a line naming it; with nothing left, the source fails.
    with pytest.raises(movi.MoviFormatError, match='no record is readable'):
        movi.MoviSource(path)
    err = capfd.readouterr().err
    assert 'skipping MOVi record' in err and 'bad.tfrecord (record at byte 0)' in err
    assert 'checksum mismatch' in err

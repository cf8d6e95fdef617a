"""moog_convert: MOVi shards and rosbag2 bags to clip-format files (training/convert.py)."""
from fixtures_movi import F_PX, FRAMES, SIZE, write_movi_shard
import numpy as np
import pytest
from test_bags import camera_info_msg, frames, image_msg, write_bag

from moog_ros import clips
from moog_ros.training import convert


def test_movi_to_clips_keeps_every_label(tmp_path):
    shard = tmp_path / 'movi_e-validation.tfrecord-00000-of-00001'
    scene = write_movi_shard(shard, num_videos=2)
    written = convert.convert(f'movi:{shard}', tmp_path / 'out', num_tracks=64, progress=False)
    assert [p.name for p in written] == ['movi_000000.npz', 'movi_000001.npz']
    assert clips.list_clips(tmp_path / 'out') == written
    clip = clips.load_clip(written[0])  # validates the format
    assert clip.num_frames == FRAMES and clip.fps == pytest.approx(12.0)
    np.testing.assert_array_equal(clip.video, scene.video)
    np.testing.assert_allclose(clip.depth, scene.depth_z, atol=2e-4)
    np.testing.assert_array_equal(clip.boxes_xyxy[0], scene.boxes_xyxy[0].astype(np.float32))
    np.testing.assert_array_equal(clip.boxes_valid, scene.boxes_valid)
    assert clip.tracks_xy.shape[0] > 0 and clip.tracks_visible.any()
    assert clip.segmentation is not None and clip.camera_pose is not None


def test_movi_split_into_resized_clips(tmp_path):
    shard = tmp_path / 'shard.tfrecord'
    scene = write_movi_shard(shard, num_videos=2)
    written = convert.convert(f'movi:{shard}', tmp_path / 'out', frames_per_clip=2,
                              resolution=(SIZE // 2,), num_tracks=16, progress=False)
    assert len(written) == 4  # 2 videos x 2 clips of 2 frames
    clip = clips.load_clip(written[1])  # video 0, frames 2..3
    assert clip.video.shape == (2, SIZE // 2, SIZE // 2, 3)
    # Halving: f / 2, and pixel centres at integers map as x' = (x + 0.5) / 2 - 0.5.
    c = (SIZE // 2 - 1) / 2
    np.testing.assert_allclose(clip.intrinsics, [[F_PX / 2, 0, c], [0, F_PX / 2, c], [0, 0, 1]],
                               rtol=1e-6)
    np.testing.assert_allclose(clip.boxes_xyxy[0], (scene.boxes_xyxy[0, 2:4] + 0.5) / 2 - 0.5,
                               rtol=1e-6)
    area_mean = scene.video[2:4].reshape(2, SIZE // 2, 2, SIZE // 2, 2, 3).mean(axis=(2, 4))
    assert np.abs(clip.video.astype(float) - area_mean).max() <= 1.0
    assert set(np.unique(clip.segmentation)) <= {0, 1}


def make_rgbd_bag(path, n=10, with_info=True):
    rgb = frames(n, H=8, W=10, seed=11)
    K = np.array([[20.0, 0, 4.5], [0, 20.0, 3.5], [0, 0, 1]])
    messages = [('/cam/camera_info', 0, camera_info_msg(0, K, 10, 8))] if with_info else []
    depth_mm = np.full((8, 10, 1), 1500, np.uint16)
    for i in range(n):
        stamp = 10**9 + i * 100_000_000  # 10 fps
        messages.append(('/cam/image_raw', stamp, image_msg(stamp, rgb[i], 'rgb8')))
        messages.append(('/cam/depth', stamp + 1, image_msg(stamp + 2_000_000, depth_mm, '16UC1')))
    return write_bag(path, 'mcap', messages), rgb, K


def test_bag_to_clips(tmp_path):
    path, rgb, K = make_rgbd_bag(tmp_path / 'bag')
    written = convert.convert(f'bag:{path}', tmp_path / 'out', topic='/cam/image_raw',
                              depth_topic='/cam/depth', frames_per_clip=4, progress=False)
    assert len(written) == 2  # 10 frames -> two whole clips of 4; the last 2 frames are dropped
    second = clips.load_clip(written[1])
    np.testing.assert_array_equal(second.video, rgb[4:8])
    np.testing.assert_allclose(second.depth, 1.5)
    np.testing.assert_allclose(second.intrinsics, K)
    assert second.fps == pytest.approx(10.0)
    assert second.tracks_xy.shape == (0, 4, 2) and second.boxes_xyxy.shape == (0, 4, 4)
    # Frame-rate subsampling: every other frame, 2 frames per clip -> 2 clips per 4 frames.
    sub = convert.convert(f'bag:{path}', tmp_path / 'sub', frames_per_clip=2, frame_step=2,
                          topic='/cam/image_raw', progress=False)
    assert len(sub) == 2
    clip = clips.load_clip(sub[1])
    np.testing.assert_array_equal(clip.video, rgb[[4, 6]])
    assert clip.fps == pytest.approx(5.0) and np.isnan(clip.depth).all()


def test_bag_without_camera_info_gets_default_intrinsics_once(tmp_path):
    path, _, _ = make_rgbd_bag(tmp_path / 'bag', n=6, with_info=False)
    with pytest.warns(UserWarning, match='no intrinsics') as record:
        written = convert.convert(f'bag:{path}', tmp_path / 'out', topic='/cam/image_raw',
                                  frames_per_clip=2, progress=False)
    assert len(written) == 3
    assert sum('no intrinsics' in str(w.message) for w in record) == 1
    K = clips.load_clip(written[0]).intrinsics
    np.testing.assert_allclose(K, convert.default_intrinsics(8, 10))
    assert K[0, 0] == pytest.approx(5 / np.tan(np.radians(30)))


def test_cli(tmp_path, capsys):
    path, _, _ = make_rgbd_bag(tmp_path / 'bag', n=4)
    argv = ['--from', f'bag:{path}', '--to', str(tmp_path / 'out'), '--topic', '/cam/image_raw',
            '--frames-per-clip', '2', '--resolution', '4', '5']
    assert convert.main(argv) == 0
    assert 'wrote 2 clips' in capsys.readouterr().out
    assert clips.load_clip(tmp_path / 'out' / 'bag_000000.npz').video.shape == (2, 4, 5, 3)
    assert convert.main(argv) == 1  # refuses to overwrite
    assert 'exists; pass --overwrite' in capsys.readouterr().err
    assert convert.main([*argv, '--overwrite']) == 0
    assert convert.main(['--from', f'bag:{path}', '--to', str(tmp_path / 'x')]) == 1
    assert 'several image topics' in capsys.readouterr().err
    assert convert.main(['--from', 'nope:x', '--to', str(tmp_path / 'y')]) == 1

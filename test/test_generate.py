"""The Kubric-like generator: determinism, camera geometry, tracks, boxes, CLI."""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from moog_ros import clips
from moog_ros.training import generate
from moog_ros.training.scenes import SceneConfig, intrinsics_matrix, simulate_scene

# Non-square on purpose: the principal point offsets differ in x and y.
CFG = generate.GenerateConfig(
    scene=SceneConfig(width=96, height=72, num_frames=8, num_objects=(4, 6)), num_tracks=256)


@pytest.fixture(scope='module')
def annotated():
    """A rendered scene, its clip and the raw track result."""
    scene_seed, track_seed = generate._seed_sequences(7, 3)
    recording = simulate_scene(CFG.scene, scene_seed)
    clip, tracks = generate.make_clip(recording, CFG, np.random.default_rng(track_seed))
    return recording, clip, tracks


def test_clip_is_valid_and_shaped(annotated) -> None:
    recording, clip, tracks = annotated
    clips.validate(clip.to_arrays(), source='generated')
    T, H, W = CFG.scene.num_frames, CFG.scene.height, CFG.scene.width
    K = len(recording.object_kind)
    assert clip.video.shape == (T, H, W, 3)
    assert clip.tracks_xy.shape == (CFG.num_tracks, T, 2)
    assert clip.boxes_xyxy.shape == (K, T, 4)
    assert CFG.scene.num_objects[0] <= K <= CFG.scene.num_objects[1]
    assert clip.fps == 12.0
    # The dome closes the scene: every pixel has depth, and the video is not flat.
    assert np.isfinite(clip.depth).all()
    assert clip.video.std() > 10
    # Objects are tracked more densely than their share of pixels (Kubric's segment balance).
    object_pixel_share = (clip.segmentation > 0).mean()
    assert (tracks.segment > 0).mean() > 2 * object_pixel_share
    # Instances are sorted by visible pixels, as in MOVi.
    visible_px = np.bincount(clip.segmentation.ravel(), minlength=K + 1)[1:]
    assert np.all(np.diff(visible_px) <= 0)


def test_same_seed_same_clip_other_seed_other_clip() -> None:
    cfg = generate.PRESETS['tiny']
    a = generate.generate_clip(cfg, seed=5, index=1).to_arrays()
    b = generate.generate_clip(cfg, seed=5, index=1).to_arrays()
    c = generate.generate_clip(cfg, seed=5, index=2).to_arrays()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert not np.array_equal(a['video'], c['video'])


@pytest.mark.parametrize('width, height', [(96, 72), (64, 64), (63, 49)])
def test_depth_matches_analytic_floor_plane(width: int, height: int) -> None:
    cfg = dataclasses.replace(CFG.scene, width=width, height=height, num_frames=2)
    recording = simulate_scene(cfg, 11)
    K = recording.intrinsics
    rel_errors = []
    for t in range(cfg.num_frames):
        rows, cols = np.nonzero(recording.floor_mask[t])
        assert len(rows) > 0.2 * width * height  # the floor fills a good part of the view
        # Ray through each floor pixel (integer pixel centres), intersected with z = 0.
        rays_cam = np.stack([cols, rows, np.ones_like(cols)], -1) @ np.linalg.inv(K).T
        pose = recording.camera_pose[t]
        rays_world = rays_cam @ pose[:3, :3].T
        scale = -pose[2, 3] / rays_world[:, 2]  # rays_cam z == 1, so scale is the z-depth
        depth = recording.depth_m[t, rows, cols]
        rel_errors.append(np.abs(depth - scale) / scale)
    rel_errors = np.concatenate(rel_errors)
    # A half-pixel mistake in the principal point gives ~1e-3; the renderer agrees to ~1e-6.
    assert np.median(rel_errors) < 1e-4
    assert np.percentile(rel_errors, 95) < 1e-3


def test_intrinsics_convention() -> None:
    K = intrinsics_matrix(96, 72, 90.0)
    np.testing.assert_allclose(K, [[36, 0, 48], [0, 36, 35], [0, 0, 1]])


def test_visible_tracks_lie_on_their_object(annotated) -> None:
    recording, clip, tracks = annotated
    N, T = clip.tracks_visible.shape
    H, W = clip.height, clip.width
    frame = np.broadcast_to(np.arange(T), (N, T))
    visible_on_object = clip.tracks_visible & (tracks.segment > 0)[:, None]
    assert visible_on_object.sum() > 200
    xy = clip.tracks_xy[visible_on_object]  # [M, 2]
    t = frame[visible_on_object]
    want = np.broadcast_to(tracks.segment[:, None], (N, T))[visible_on_object]
    col = np.clip(np.round(xy[:, 0]).astype(int), 0, W - 1)
    row = np.clip(np.round(xy[:, 1]).astype(int), 0, H - 1)
    within_1px = np.zeros(len(t), bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            r, c = np.clip(row + dy, 0, H - 1), np.clip(col + dx, 0, W - 1)
            within_1px |= clip.segmentation[t, r, c] == want
    assert within_1px.mean() >= 0.95
    # Silhouette quantisation puts some visible points one pixel off their mask; most are on.
    assert (clip.segmentation[t, row, col] == want).mean() >= 0.88

    # Away from silhouettes, the transported point is exactly the rendered surface point.
    seg = clip.segmentation
    pad = np.pad(seg, ((0, 0), (2, 2), (2, 2)), mode='edge')
    interior = np.ones_like(seg, bool)
    for dy in range(5):
        for dx in range(5):
            interior &= pad[:, dy:dy + H, dx:dx + W] == seg
    inner = interior[t, row, col] & (seg[t, row, col] == want)
    assert inner.sum() > 100
    depth_m = tracks.depth_m[visible_on_object][inner]
    rel = np.abs(clip.depth[t, row, col][inner] - depth_m) / depth_m
    assert np.median(rel) < 5e-3
    assert np.percentile(rel, 90) < 2e-2


def test_tracks_start_at_their_query_pixel(annotated) -> None:
    recording, clip, tracks = annotated
    n = np.arange(len(tracks.query_t))
    assert clip.tracks_visible[n, tracks.query_t].all()
    query_xy = clip.tracks_xy[n, tracks.query_t]
    np.testing.assert_allclose(query_xy, np.round(query_xy), atol=1e-3)
    assert set(np.unique(tracks.segment)) >= {0, 1}
    assert not clip.tracks_visible.all()  # occlusion / leaving the frame happens
    invisible = ~clip.tracks_visible
    assert np.isfinite(clip.tracks_xy[invisible]).all()


def test_boxes_enclose_masks_tightly(annotated) -> None:
    _, clip, _ = annotated
    K, T = clip.boxes_valid.shape
    for k in range(K):
        for t in range(T):
            rows, cols = np.nonzero(clip.segmentation[t] == k + 1)
            assert clip.boxes_valid[k, t] == (len(rows) > 0)
            if len(rows):
                np.testing.assert_array_equal(
                    clip.boxes_xyxy[k, t],
                    [cols.min() - 0.5, rows.min() - 0.5, cols.max() + 0.5, rows.max() + 0.5])
            else:
                np.testing.assert_array_equal(clip.boxes_xyxy[k, t], 0)
    assert clip.boxes_valid.any()


def test_object_centres_project_into_their_boxes(annotated) -> None:
    recording, clip, _ = annotated
    K = clip.boxes_valid.shape[0]
    # make_clip sorts instances by visibility; recover the pose order the same way.
    visible_px = np.bincount(recording.segmentation.ravel(), minlength=K + 1)[1:]
    object_pose = recording.object_pose[np.argsort(-visible_px, kind='stable')]
    world_to_cam = np.linalg.inv(clip.camera_pose.astype(np.float64))
    checked = 0
    for k in range(K):
        for t in range(clip.num_frames):
            box = clip.boxes_xyxy[k, t]
            inside = (box[0] > 0 and box[1] > 0 and box[2] < clip.width - 1
                      and box[3] < clip.height - 1)
            big_enough = (clip.segmentation[t] == k + 1).sum() >= 20
            if not (clip.boxes_valid[k, t] and inside and big_enough):
                continue
            centre_cam = (world_to_cam[t] @ object_pose[k, t, :, 3])[:3]
            assert centre_cam[2] > 0
            u, v, w = clip.intrinsics @ centre_cam
            assert box[0] - 1 <= u / w <= box[2] + 1 and box[1] - 1 <= v / w <= box[3] + 1
            checked += 1
    assert checked >= 5


def test_camera_pose_is_rigid_opencv(annotated) -> None:
    recording, clip, _ = annotated
    R = clip.camera_pose[:, :3, :3].astype(np.float64)
    np.testing.assert_allclose(R @ R.transpose(0, 2, 1), np.broadcast_to(np.eye(3), R.shape),
                               atol=1e-5)
    np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-5)
    # OpenCV axes: z looks at the scene centre, y points down (world z is up).
    to_centre = -clip.camera_pose[:, :3, 3]
    forward = clip.camera_pose[:, :3, 2]
    cos = np.sum(forward * to_centre, -1) / np.linalg.norm(to_centre, axis=-1)
    assert (cos > 0.95).all()
    assert (clip.camera_pose[:, 2, 1] < 0).all()


def test_config_json_round_trip() -> None:
    for cfg in generate.PRESETS.values():
        data = json.loads(json.dumps(cfg.to_dict()))
        assert generate.GenerateConfig.from_dict(data) == cfg
    with pytest.raises(ValueError, match='unknown field'):
        generate.GenerateConfig.from_dict({'num_trax': 3})
    with pytest.raises(ValueError, match='num_frames'):
        SceneConfig(num_frames=0)


def test_cli_workers_do_not_change_bytes_and_resume(tmp_path: Path, capsys) -> None:
    common = ['--num-clips', '2', '--seed', '4', '--preset', 'tiny', '--resolution', '48',
              '--frames', '4', '--num-tracks', '32']
    generate.main(['--out', str(tmp_path / 'one'), '--workers', '1', *common])
    generate.main(['--out', str(tmp_path / 'two'), '--workers', '2', *common])
    names = [p.name for p in clips.list_clips(tmp_path / 'one')]
    assert names == ['clip_4_000000.npz', 'clip_4_000001.npz']
    for name in names:
        assert (tmp_path / 'one' / name).read_bytes() == (tmp_path / 'two' / name).read_bytes()
    clip = clips.load_clip(tmp_path / 'one' / names[0])
    assert clip.video.shape == (4, 48, 48, 3) and clip.tracks_xy.shape[0] == 32
    assert 'clips/s' in capsys.readouterr().out

    # Resume: existing clips are skipped; a different config in the same folder is refused.
    before = (tmp_path / 'one' / names[0]).stat().st_mtime_ns
    generate.main(['--out', str(tmp_path / 'one'), *common[:-2], '--num-tracks', '32'])
    assert (tmp_path / 'one' / names[0]).stat().st_mtime_ns == before
    with pytest.raises(SystemExit, match='different generator config'):
        generate.main(['--out', str(tmp_path / 'one'), *common[:-2], '--num-tracks', '16'])

"""End-to-end evaluation harness on two tiny clips with a tiny random-weight MooG."""
import json

import cv2
import numpy as np
import pytest
import torch

from moog_ros import clips
from moog_ros.model import MoogPerception, get_perception_config, save_checkpoint
from moog_ros.training import evaluate

CLIP_HW = (40, 48)  # deliberately not the tiny model's 32 x 32: exercises the resize path
NUM_FRAMES = 6
VELOCITY = np.array([1.0, 0.5])  # px per frame at clip resolution


def _texture(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.uniform(0, 255, size=(height, width, 3)).astype(np.float32)
    return np.clip(cv2.GaussianBlur(noise, (0, 0), 2.0) * 3 - 255, 0, 255).astype(np.uint8)


def _write_clip(path, seed: int) -> None:
    """A textured scene translating by VELOCITY, with exact tracks, boxes and depth."""
    height, width = CLIP_HW
    canvas = _texture(2 * height, 2 * width, seed)
    video = []
    for t in range(NUM_FRAMES):
        warp = np.array([[1, 0, t * VELOCITY[0]], [0, 1, t * VELOCITY[1]]], np.float32)
        moved = cv2.warpAffine(canvas, warp, (2 * width, 2 * height), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REFLECT)
        video.append(moved[:height, :width])
    video = np.stack(video)
    frames = np.arange(NUM_FRAMES)[:, None] * VELOCITY  # [T, 2]
    start = np.array([[12.0, 10.0], [24.0, 20.0], [30.0, 14.0], [16.0, 26.0], [5.0, 5.0]])
    tracks = (start[:, None] + frames[None]).astype(np.float32)  # [N, T, 2]
    visible = np.ones((5, NUM_FRAMES), bool)
    visible[1, :2] = False  # queried at frame 2
    visible[4] = False      # never visible: dropped from the evaluation
    box0 = np.array([14.0, 12.0, 30.0, 26.0])
    boxes = np.stack([np.tile(box0, (NUM_FRAMES, 1)) + np.tile(frames, 2),
                      np.zeros((NUM_FRAMES, 4))]).astype(np.float32)  # [2, T, 4]
    boxes_valid = np.zeros((2, NUM_FRAMES), bool)
    boxes_valid[0, 1:] = True  # seeded at frame 1; box 1 is never valid
    depth = np.full((NUM_FRAMES, height, width), 2.0 + seed, np.float32)
    depth[:, :4] = np.nan
    intrinsics = np.array([[50, 0, width / 2 - 0.5], [0, 50, height / 2 - 0.5], [0, 0, 1]],
                          np.float32)
    clips.save_clip(path, clips.Clip(video=video, depth=depth, intrinsics=intrinsics,
                                     tracks_xy=tracks, tracks_visible=visible,
                                     boxes_xyxy=boxes, boxes_valid=boxes_valid))


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('eval')
    for i in range(2):
        _write_clip(root / 'clips' / f'clip_{i:02d}.npz', seed=i)
    torch.manual_seed(0)
    model = MoogPerception(get_perception_config('tiny'))
    save_checkpoint(root / 'ckpt', model)
    return root


@pytest.mark.slow  # the first checkpoint save of a session alone takes ~5 s here
def test_evaluate_end_to_end_writes_every_key(setup, capsys):
    out_json = setup / 'report.json'
    rc = evaluate.main(['--data', str(setup / 'clips'), '--checkpoint', str(setup / 'ckpt'),
                        '--grid-checkpoint', str(setup / 'ckpt'),
                        '--train-data', str(setup / 'clips'), '--json', str(out_json),
                        '--device', 'cpu', '--quiet'])
    assert rc == 0
    printed = capsys.readouterr().out
    for method in ('moog', 'grid', 'lk', 'box_tracker', 'median_depth', 'stay_put'):
        assert method in printed
    report = json.loads(out_json.read_text())  # strict JSON: no NaN
    assert report['clips'] == 2
    assert report['resolution'] == [32, 32]
    methods = report['methods']
    assert set(methods) == {'moog', 'grid', 'lk', 'box_tracker', 'median_depth', 'stay_put'}
    assert set(methods['stay_put']) == {'points_aj', 'points_delta_avg', 'points_oa',
                                        'boxes_miou'}
    # The scene moves, so staying put must score below the classical peers.
    assert methods['stay_put']['points_delta_avg'] < methods['lk']['points_delta_avg']
    for name in ('moog', 'grid'):
        for key in ('points_aj', 'points_delta_avg', 'points_oa', 'depth_absrel',
                    'depth_delta1', 'boxes_miou', 'frames_per_s'):
            assert isinstance(methods[name][key], float), (name, key)
    assert set(methods['lk']) == {'points_aj', 'points_delta_avg', 'points_oa', 'frames_per_s'}
    assert methods['box_tracker']['name'] in ('csrt', 'kcf', 'mil')
    assert set(methods['box_tracker']) == {'name', 'boxes_miou', 'frames_per_s'}
    # Median of clip depths 2.0 and 3.0 (equal pixel counts) is their midpoint.
    assert methods['median_depth']['median_depth_m'] == pytest.approx(2.5)
    # A constant 2.5 m against planes at 2 and 3 m: AbsRel (0.25 + 1/6) / 2, median-scaled 0.
    assert methods['median_depth']['depth_absrel'] == pytest.approx((0.25 + 1 / 6) / 2)
    assert methods['median_depth']['depth_absrel_median_scaled'] == pytest.approx(0.0)
    # The scene translates rigidly: the classical peers must get it right, which checks the
    # harness's query, ordering and resize bookkeeping (a random MooG cannot).
    assert methods['lk']['points_delta_avg'] > 0.9
    assert methods['lk']['points_oa'] > 0.9
    assert methods['box_tracker']['boxes_miou'] > 0.6


def test_evaluate_is_deterministic_and_shares_queries(setup):
    kwargs = {'grid_checkpoint': None, 'median_depth_m': 3.0, 'device': 'cpu',
              'progress': False}
    first = evaluate.evaluate(setup / 'clips', setup / 'ckpt', **kwargs)
    second = evaluate.evaluate(setup / 'clips', setup / 'ckpt', **kwargs)
    for report in (first, second):
        for entry in report['methods'].values():
            entry.pop('frames_per_s', None)  # timing differs run to run
    assert first == second
    assert 'grid' not in first['methods']
    one = evaluate.evaluate(setup / 'clips', setup / 'ckpt', max_clips=1, **kwargs)
    assert one['clips'] == 1


def test_prepare_clip_scales_ground_truth_and_drops_unqueryable(setup):
    clip = clips.load_clip(setup / 'clips' / 'clip_00.npz')
    prepared = evaluate.prepare_clip(clip, (20, 24), 'clip_00')
    assert prepared.video.shape == (NUM_FRAMES, 20, 24, 3)
    assert prepared.depth_m.shape == (NUM_FRAMES, 20, 24)
    assert len(prepared.query_frame) == 4  # the never-visible track is gone
    np.testing.assert_array_equal(prepared.query_frame, [0, 2, 0, 0])
    # Half resolution per axis: pixel centres map as x' = (x + 0.5) / 2 - 0.5.
    np.testing.assert_allclose(prepared.tracks_xy[0, 0], (np.array([12.0, 10.0]) + 0.5) / 2 - 0.5)
    assert len(prepared.box_start) == 1 and prepared.box_start[0] == 1


def test_evaluate_errors_name_the_problem(setup, tmp_path, capsys):
    rc = evaluate.main(['--data', str(setup / 'clips'), '--checkpoint', str(tmp_path / 'none'),
                        '--device', 'cpu', '--quiet'])
    assert rc == 2
    assert '--checkpoint' in capsys.readouterr().err
    rc = evaluate.main(['--data', str(tmp_path), '--checkpoint', str(setup / 'ckpt'),
                        '--device', 'cpu', '--quiet'])
    assert rc == 2
    assert 'no *.npz' in capsys.readouterr().err

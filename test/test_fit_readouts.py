"""fit_readouts end to end on two tiny generated clips (tiny configs, CPU)."""

from pathlib import Path
import shutil

import numpy as np
import pytest
import torch

from moog_ros import clips
from moog_ros.model import Moog, MoogPerception, get_config, load_checkpoint, save_checkpoint
from moog_ros.training import common
from moog_ros.training.fit_readouts import main, sample_queries

CONFIG = Path(__file__).resolve().parents[1] / 'config' / 'readouts_tiny.yaml'
SIZE = 32
T = 6


def _write_clip(path: Path, seed: int) -> None:
    """A textured square moving over a textured wall: depth, tracks and a box that agree."""
    rng = np.random.default_rng(seed)
    wall = rng.integers(40, 120, (SIZE, SIZE, 3)).astype(np.uint8)
    patch = rng.integers(150, 255, (10, 10, 3)).astype(np.uint8)
    start = rng.uniform(2, 10, 2)
    velocity = rng.uniform(1.0, 2.0, 2) * rng.choice([-1, 1], 2) * np.array([1, 0.5])
    start = np.where(velocity < 0, start + 10, start)
    video = np.empty((T, SIZE, SIZE, 3), np.uint8)
    depth = np.full((T, SIZE, SIZE), 6.0, np.float32)
    depth[:, :, : SIZE // 2] = 4.0  # a step in the wall
    corners = []
    for t in range(T):
        x0, y0 = np.round(start + t * velocity).astype(int)
        video[t] = wall
        video[t, y0:y0 + 10, x0:x0 + 10] = patch
        depth[t, y0:y0 + 10, x0:x0 + 10] = 2.0
        corners.append((x0, y0))
    corners = np.array(corners, np.float32)  # [T, 2]
    # Tracks: 9 points on the square (always visible) + 16 on the wall (hidden when covered).
    offsets = np.stack(np.meshgrid([1, 5, 8], [1, 5, 8]), -1).reshape(-1, 2).astype(np.float32)
    square_xy = corners[None] + offsets[:, None]  # [9, T, 2]
    wall_xy = np.stack(np.meshgrid(np.arange(2, 32, 8), np.arange(2, 32, 8)), -1).reshape(-1, 2)
    wall_xy = np.repeat(wall_xy[:, None].astype(np.float32), T, axis=1)  # [16, T, 2]
    inside = ((wall_xy >= corners[None]) & (wall_xy < corners[None] + 10)).all(-1)
    tracks_xy = np.concatenate([square_xy, wall_xy])
    visible = np.concatenate([np.ones((9, T), bool), ~inside])
    boxes = np.concatenate([corners - 0.5, corners + 9.5], axis=-1)[None]  # [1, T, 4]
    clip = clips.Clip(
        video=video, depth=depth,
        intrinsics=np.array([[30, 0, 15.5], [0, 30, 15.5], [0, 0, 1]], np.float32),
        tracks_xy=tracks_xy.astype(np.float32), tracks_visible=visible,
        boxes_xyxy=boxes.astype(np.float32), boxes_valid=np.ones((1, T), bool), fps=10.0)
    clips.save_clip(path, clip)


@pytest.fixture(scope='module')
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp('fit')
    data_dir = root / 'clips'
    data_dir.mkdir()
    for seed in range(2):
        _write_clip(data_dir / f'clip_{seed:03d}.npz', seed)
    torch.manual_seed(0)
    pretrained = save_checkpoint(root / 'pretrained', Moog(get_config('tiny')))
    return {'root': root, 'data': data_dir, 'pretrained': pretrained}


def _run(setup: dict[str, Path], out: str, *extra: str) -> int:
    return main(['--pretrained', str(setup['pretrained']), '--data', str(setup['data']),
                 '--config', str(CONFIG), '--out', str(setup['root'] / out), *extra])


def _train_rows(run: Path) -> list[dict]:
    return [r for r in common.read_metrics(run / 'metrics.jsonl') if r['kind'] == 'train']


@pytest.mark.slow
def test_frozen_fit_learns_and_keeps_backbone(setup: dict[str, Path]) -> None:
    assert _run(setup, 'frozen', '--set', 'train.eval_interval=30', '--set',
                'data.val=' + str(setup['data'])) == 0
    run = setup['root'] / 'frozen'
    rows = _train_rows(run)
    assert len(rows) == 30
    for head in ('depth', 'points_total', 'boxes_total'):
        assert all(np.isfinite(r[head]) for r in rows), head
    first = np.mean([r['loss'] for r in rows[:5]])
    last = np.mean([r['loss'] for r in rows[-5:]])
    assert last < 0.8 * first, (first, last)
    val = [r for r in common.read_metrics(run / 'metrics.jsonl') if r['kind'] == 'val']
    assert val and {'val_aj', 'val_absrel', 'val_miou'} <= set(val[-1])
    # One combined checkpoint; the backbone is the pretrained one, untouched.
    loaded = load_checkpoint(run / 'checkpoints' / 'latest')
    assert isinstance(loaded.model, MoogPerception)
    pretrained = load_checkpoint(setup['pretrained']).model
    for key, value in pretrained.state_dict().items():
        torch.testing.assert_close(loaded.model.moog.state_dict()[key], value)
    # The depth offset was estimated from the data (depths 2, 4 and 6 m).
    assert loaded.model.config.depth.median_depth_m in (4.0, 6.0)
    assert loaded.configs['fit_readouts']['train']['end_to_end'] is False


@pytest.mark.slow
def test_resume_continues_exactly(setup: dict[str, Path]) -> None:
    assert _run(setup, 'straight', '--set', 'train.steps=12') == 0
    # The same run, keeping a checkpoint every 5 steps; then pretend it died after step 10.
    assert _run(setup, 'resumed', '--set', 'train.steps=12', '--set',
                'train.keep_interval=5') == 0
    resumed = setup['root'] / 'resumed'
    shutil.rmtree(resumed / 'checkpoints' / 'latest')
    assert common.load_trainer_state(resumed / 'checkpoints' / 'step_000010')['step'] == 10
    assert main(['--out', str(resumed), '--resume']) == 0
    digest = common.parameter_digest
    straight = load_checkpoint(setup['root'] / 'straight' / 'checkpoints' / 'latest').model
    continued = load_checkpoint(resumed / 'checkpoints' / 'latest').model
    assert digest(continued) == digest(straight)
    rows = _train_rows(resumed)
    assert [r['step'] for r in rows] == list(range(1, 13))
    straight_rows = _train_rows(setup['root'] / 'straight')
    assert rows[-1]['loss'] == pytest.approx(straight_rows[-1]['loss'], rel=1e-6)


@pytest.mark.slow
def test_end_to_end_trains_backbone(setup: dict[str, Path]) -> None:
    assert _run(setup, 'e2e', '--end-to-end', '--set', 'train.steps=3') == 0
    run = setup['root'] / 'e2e'
    rows = _train_rows(run)
    assert all('rgb' in r for r in rows)
    loaded = load_checkpoint(run / 'checkpoints' / 'latest').model
    pretrained = load_checkpoint(setup['pretrained']).model
    changed = [not torch.equal(loaded.moog.state_dict()[k], v)
               for k, v in pretrained.state_dict().items()]
    assert any(changed)


@pytest.mark.slow
def test_hybrid_design_fits_fresh_readouts_on_a_tokens_checkpoint(setup: dict[str, Path]
                                                                   ) -> None:
    # A tokens-design perception checkpoint as --pretrained: the hybrid fit must take only its
    # backbone (a design switch must not silently continue the old readouts).
    assert _run(setup, 'tokens', '--set', 'train.steps=2') == 0
    tokens = setup['root'] / 'tokens' / 'checkpoints' / 'latest'
    assert main(['--pretrained', str(tokens), '--data', str(setup['data']), '--config',
                 str(CONFIG), '--out', str(setup['root'] / 'hybrid'), '--set',
                 'model.design=hybrid', '--set', 'train.steps=4', '--set',
                 'data.boxes_per_clip=2']) == 0
    loaded = load_checkpoint(setup['root'] / 'hybrid' / 'checkpoints' / 'latest').model
    assert loaded.local_points and loaded.config.points.local.use_tokens
    assert loaded.members_per_box == 16 and loaded.config.depth.fusion is not None
    previous = load_checkpoint(tokens).model
    for key, value in previous.moog.state_dict().items():
        torch.testing.assert_close(loaded.moog.state_dict()[key], value)
    rows = _train_rows(setup['root'] / 'hybrid')
    assert len(rows) == 4 and all(np.isfinite(r['points_total']) for r in rows)


def test_depth_only_data_trains_depth_alone(setup: dict[str, Path], tmp_path: Path) -> None:
    # An RGB-D source: clip-format files whose tracks and boxes are empty.
    data_dir = tmp_path / 'rgbd'
    data_dir.mkdir()
    for seed in range(2):
        clip = clips.load_clip(setup['data'] / f'clip_{seed:03d}.npz')
        clips.save_clip(data_dir / f'clip_{seed:03d}.npz', clips.Clip(
            video=clip.video, depth=clip.depth, intrinsics=clip.intrinsics,
            tracks_xy=np.zeros((0, T, 2), np.float32), tracks_visible=np.zeros((0, T), bool),
            boxes_xyxy=np.zeros((0, T, 4), np.float32), boxes_valid=np.zeros((0, T), bool)))
    out = tmp_path / 'run'
    assert main(['--pretrained', str(setup['pretrained']), '--data', str(data_dir), '--config',
                 str(CONFIG), '--out', str(out), '--set', 'train.steps=2']) == 0
    rows = _train_rows(out)
    assert all('depth' in r and 'points_total' not in r and 'boxes_total' not in r
               for r in rows)


def test_label_free_windows_are_skipped(setup: dict[str, Path], tmp_path: Path) -> None:
    data_dir = tmp_path / 'video_only'
    data_dir.mkdir()
    for seed in range(2):
        clip = clips.load_clip(setup['data'] / f'clip_{seed:03d}.npz')
        clips.save_clip(data_dir / f'clip_{seed:03d}.npz', clips.Clip(
            video=clip.video, depth=np.full_like(clip.depth, np.nan), intrinsics=clip.intrinsics,
            tracks_xy=np.zeros((0, T, 2), np.float32), tracks_visible=np.zeros((0, T), bool),
            boxes_xyxy=np.zeros((0, T, 4), np.float32), boxes_valid=np.zeros((0, T), bool)))
    out = tmp_path / 'run'
    assert main(['--pretrained', str(setup['pretrained']), '--data', str(data_dir), '--config',
                 str(CONFIG), '--out', str(out), '--set', 'train.steps=2']) == 0
    final = [r for r in common.read_metrics(out / 'metrics.jsonl') if r['kind'] == 'final']
    assert final[0]['skipped'] == 2
    # No depth anywhere: the depth offset keeps the preset's value.
    model = load_checkpoint(out / 'checkpoints' / 'latest').model
    assert model.config.depth.median_depth_m == 10.0


def test_bad_inputs_give_clear_errors(setup: dict[str, Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    assert main(['--data', str(setup['data']), '--out', str(tmp_path / 'a')]) == 2
    assert '--pretrained' in capsys.readouterr().err
    assert main(['--pretrained', str(setup['pretrained']), '--data', str(setup['data']),
                 '--config', str(CONFIG), '--out', str(tmp_path / 'b'),
                 '--set', 'model.overrides={moog: {num_tokens: 8}}']) == 2
    assert 'model.overrides' in capsys.readouterr().err
    assert main(['--pretrained', str(tmp_path / 'nope'), '--data', str(setup['data']),
                 '--config', str(CONFIG), '--out', str(tmp_path / 'c')]) == 2
    assert 'nope' in capsys.readouterr().err
    assert main(['--pretrained', str(setup['pretrained']), '--data', str(setup['data']),
                 '--config', str(CONFIG), '--out', str(tmp_path / 'd'),
                 '--set', 'loss.depth=l2']) == 2
    assert 'loss.depth' in capsys.readouterr().err


def test_sample_queries_first_visible_and_padding() -> None:
    coords = torch.arange(2 * 3 * 4 * 2, dtype=torch.float32).view(2, 3, 4, 2)  # [B, N, T, 2]
    flags = torch.tensor([[[False, True, True, False], [False, False, False, False],
                           [True, True, True, True]],
                          [[False, False, False, True], [False, False, False, False],
                           [False, False, False, False]]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    q = sample_queries(coords, flags, mask, 8, 'first', torch.Generator().manual_seed(0))
    assert q.xy.shape == (2, 2, 2)  # at most two candidates in a window
    assert q.valid.tolist() == [[True, True], [True, False]]
    for b, m in ((0, 0), (0, 1), (1, 0)):
        # Coordinates are unique, so the query point names its track and frame.
        n, t = [(n, t) for n in range(3) for t in range(4) if torch.equal(coords[b, n, t],
                                                                          q.xy[b, m])][0]
        assert int(q.start[b, m]) == t
        assert bool(flags[b, n, t]) and not bool(flags[b, n, :t].any())  # first visible frame
        torch.testing.assert_close(q.target[b, :, m], coords[b, n])
        assert torch.equal(q.flag[b, :, m], flags[b, n])
    active = q.active()
    assert active.shape == (2, 4, 2) and not active[1, :, 1].any()
    assert active[0, :, 0].tolist() == [t >= int(q.start[0, 0]) for t in range(4)]
    random = sample_queries(coords, flags, mask, 8, 'random', torch.Generator().manual_seed(1))
    at_start = torch.gather(random.flag.transpose(1, 2), 2, random.start[..., None])[..., 0]
    assert bool(at_start[random.valid].all())

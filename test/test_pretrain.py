"""Next-frame pretraining: learning, exact resume, DDP, interruption, config and checkpoints."""
from __future__ import annotations

import json
import os
from pathlib import Path
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from moog_ros import clips
from moog_ros.model import CheckpointError, load_checkpoint
from moog_ros.training import common, pretrain

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / 'config' / 'pretrain_tiny.yaml'


def write_moving_clips(directory: Path, count: int, T: int = 10, H: int = 40,
                       W: int = 48) -> Path:
    """Clips of a coloured disc moving over a scrolling checkerboard (predictable motion)."""
    directory.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:H, 0:W]
    for i in range(count):
        rng = np.random.default_rng(i)
        cx, cy = rng.uniform(12, W - 12), rng.uniform(12, H - 12)
        vx, vy = rng.uniform(-2, 2, 2)
        colour = rng.integers(80, 255, 3)
        video = np.zeros((T, H, W, 3), np.uint8)
        for t in range(T):
            video[t] = (((xx + 2 * t) // 6 + yy // 6) % 2 * 60 + 30)[..., None]
            video[t][(xx - cx - vx * t) ** 2 + (yy - cy - vy * t) ** 2 < 36] = colour
        clips.save_clip(directory / f'clip_{i:03d}.npz', clips.Clip(
            video=video, depth=np.full((T, H, W), np.nan, np.float32),
            intrinsics=np.array([[50, 0, W / 2], [0, 50, H / 2], [0, 0, 1]], np.float32),
            tracks_xy=np.zeros((0, T, 2), np.float32), tracks_visible=np.zeros((0, T), bool),
            boxes_xyxy=np.zeros((0, T, 4), np.float32), boxes_valid=np.zeros((0, T), bool),
            fps=12.0))
    return directory


@pytest.fixture(scope='module')
def clip_dir(tmp_path_factory) -> Path:
    return write_moving_clips(tmp_path_factory.mktemp('clips'), 5)


def run(clip_dir: Path, out: Path, *extra: str) -> int:
    return pretrain.main(['--config', str(TINY), '--data', str(clip_dir), '--out', str(out),
                          *extra])


def rows(out: Path, kind: str) -> list[dict]:
    return [r for r in common.read_metrics(out / 'metrics.jsonl') if r['kind'] == kind]


@pytest.mark.slow
def loaded_model_config(run_dir):
    return json.loads((run_dir / 'checkpoints' / 'latest' / 'config.json').read_text())[
        'configs']['model']


def test_loss_falls_and_run_folder_is_complete(clip_dir, tmp_path):
    out = tmp_path / 'run'
    assert run(clip_dir, out, '--set', 'train.steps=50') == 0
    losses = [r['loss'] for r in rows(out, 'train')]
    assert [r['step'] for r in rows(out, 'train')] == list(range(1, 51))
    assert np.mean(losses[-5:]) < 0.3 * np.mean(losses[:5]), losses
    first = rows(out, 'train')[0]
    assert {'loss', 'psnr', 'lr', 'grad_norm', 'samples_per_s'} <= set(first)
    val = rows(out, 'val')
    assert [r['step'] for r in val] == [25, 50]
    assert 0 < val[-1]['val_loss'] < 0.3 * np.mean(losses[:5])
    assert {'val_psnr', 'val_psnr_copy_last', 'val_windows'} <= set(val[-1])
    saved = json.loads((out / 'config.json').read_text())
    assert saved['model']['preset'] == 'tiny' and saved['train']['steps'] == 50
    # The whole model config is pinned in the run folder, so a later edit of the 'tiny' preset
    # cannot change what --resume rebuilds.
    assert saved['model']['overrides'] == loaded_model_config(out)
    assert saved['data']['train'] == str(clip_dir)
    assert (out / 'config.yaml').is_file()
    loaded = load_checkpoint(out / 'checkpoints' / 'latest')
    assert loaded.meta['step'] == 50 and 'pretrain' in loaded.configs
    state = common.load_trainer_state(out / 'checkpoints' / 'latest')
    assert state['step'] == 50 and state['data_position']['samples_seen'] == 50 * 4


@pytest.mark.slow
def test_resume_continues_bit_for_bit(clip_dir, tmp_path):
    settings = ['--set', 'train.steps=8', '--set', 'train.keep_interval=4',
                '--set', 'train.eval_interval=100']
    full, stopped, branched = tmp_path / 'full', tmp_path / 'stopped', tmp_path / 'branched'
    assert run(clip_dir, full, *settings) == 0
    # Stop after 4 steps (checkpoint + exit, as on SIGINT), then --resume in the same folder.
    assert run(clip_dir, stopped, *settings, '--set', 'train.stop_after=4') == 0
    stop_row = rows(stopped, 'final')[-1]
    assert stop_row['step'] == 4 and stop_row['interrupted'] is True
    assert pretrain.main(['--out', str(stopped), '--resume']) == 0
    # Another run folder branched off the kept step-4 checkpoint of the first run.
    assert run(clip_dir, branched, *settings, '--resume-from',
               str(full / 'checkpoints' / 'step_000004')) == 0
    reference = {r['step']: r for r in rows(full, 'train')}
    for out in (stopped, branched):
        continued = {r['step']: r for r in rows(out, 'train') if r['step'] > 4}
        assert sorted(continued) == [5, 6, 7, 8]
        for step, row in continued.items():
            assert row['loss'] == reference[step]['loss'], (out.name, step)
            assert row['grad_norm'] == reference[step]['grad_norm'], (out.name, step)
        assert rows(out, 'final')[-1]['param_digests'] == rows(full, 'final')[-1][
            'param_digests']
    # The resumed folder's log reads as one run: steps 1..8 once each.
    assert [r['step'] for r in rows(stopped, 'train')] == list(range(1, 9))


def test_config_errors_name_the_key_and_file(tmp_path, capsys):
    bad = tmp_path / 'bad.yaml'
    bad.write_text('train:\n  stepz: 3\n')
    with pytest.raises(common.ConfigError, match=r"bad.yaml.*'stepz'"):
        common.build_config(pretrain.PretrainConfig, bad)
    with pytest.raises(common.ConfigError, match=r"--set optim.lrr: unknown key 'lrr'"):
        common.build_config(pretrain.PretrainConfig, None, ['optim.lrr=1'])
    with pytest.raises(common.ConfigError, match='train.batch_size: expected an integer'):
        common.build_config(pretrain.PretrainConfig, None, ['train.batch_size=many'])
    cfg = common.build_config(pretrain.PretrainConfig, TINY, [
        'optim.lr=1e-3', 'data.crop_scale=[0.5, 0.9]', 'model.overrides.num_tokens=8',
        'train.bf16=false'])
    assert cfg.optim.lr == 1e-3 and cfg.data.crop_scale == (0.5, 0.9)
    assert cfg.moog_config().num_tokens == 8 and cfg.train.bf16 is False
    with pytest.raises(ValueError, match='model.overrides.num_tokenz'):
        common.build_config(pretrain.PretrainConfig, TINY,
                            ['model.overrides.num_tokenz=8']).moog_config()
    assert pretrain.main(['--config', str(bad), '--out', str(tmp_path / 'x')]) == 2
    assert 'stepz' in capsys.readouterr().err


def test_corrupt_trainer_state_names_the_file(clip_dir, tmp_path, capsys):
    out = tmp_path / 'run'
    assert run(clip_dir, out, '--set', 'train.steps=2') == 0
    state_file = out / 'checkpoints' / 'latest' / common.TRAINER_STATE_FILE
    state_file.write_bytes(state_file.read_bytes()[:100])        # truncated
    with pytest.raises(CheckpointError, match=str(state_file)):
        common.load_trainer_state(state_file.parent)
    assert pretrain.main(['--out', str(out), '--resume']) == 2
    assert str(state_file) in capsys.readouterr().err
    torch.save({'format': common.TRAINER_STATE_FORMAT, 'step': 1}, state_file)
    with pytest.raises(CheckpointError, match='missing key'):
        common.load_trainer_state(state_file)
    # A fresh run refuses a folder that already holds checkpoints.
    assert run(clip_dir, out, '--set', 'train.steps=2') == 2


def test_schedule_rng_and_atomic_checkpoint_helpers(tmp_path):
    schedule = common.WarmupCosine(warmup_steps=4, total_steps=14, final_ratio=1e-3)
    assert [schedule(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert schedule(9) == pytest.approx(0.5 * (1 + 1e-3))
    assert schedule(14) == pytest.approx(1e-3) and schedule(100) == pytest.approx(1e-3)

    common.seed_all(3)
    state = common.capture_rng_state()
    first = (np.random.rand(), torch.rand(2), __import__('random').random())
    common.seed_all(99)
    common.restore_rng_state(state)
    second = (np.random.rand(), torch.rand(2), __import__('random').random())
    assert first[0] == second[0] and torch.equal(first[1], second[1]) and first[2] == second[2]

    model = torch.nn.Linear(2, 2)
    dest = tmp_path / 'checkpoints' / 'latest'

    def write_model(path: Path) -> None:
        path.mkdir()
        (path / 'config.json').write_text('{}')

    for step in (1, 2):
        common.save_training_checkpoint(dest, write_model=write_model, trainer_state={
            'step': step, 'optimizer': {}, 'scheduler': {}, 'data_position': {},
            'weights': model.weight.detach().clone()})
    assert common.load_trainer_state(dest)['step'] == 2
    assert sorted(p.name for p in dest.parent.iterdir()) == ['latest'], 'no temp leftovers'
    assert common.find_checkpoint(tmp_path) == dest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, 'OMP_NUM_THREADS': '1', 'GLOO_SOCKET_IFNAME': 'lo',
            'PYTHONUNBUFFERED': '1'}


@pytest.mark.slow
def test_two_rank_gloo_ddp_keeps_replicas_identical(clip_dir, tmp_path):
    out = tmp_path / 'ddp'
    command = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
               '--master_addr=127.0.0.1', f'--master_port={_free_port()}',
               '-m', 'moog_ros.training.pretrain', '--config', str(TINY), '--data',
               str(clip_dir), '--out', str(out), '--set', 'train.steps=4',
               '--set', 'train.eval_interval=4']
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    final = rows(out, 'final')[-1]
    assert len(final['param_digests']) == 2
    assert final['param_digests'][0] == final['param_digests'][1]
    saved = common.load_trainer_state(out / 'checkpoints' / 'latest')
    assert saved['data_position'] == {'samples_seen': 4 * 8, 'global_batch': 8,
                                      'world_size': 2, 'seed': 0}
    assert len(saved['rng']) == 2
    assert rows(out, 'val')[-1]['val_windows'] == 4   # shards add up to the whole set


@pytest.mark.slow
def test_sigint_writes_a_checkpoint_and_the_run_resumes_exactly(clip_dir, tmp_path):
    out = tmp_path / 'interrupted'
    settings = ['--config', str(TINY), '--data', str(clip_dir), '--set', 'train.steps=400',
                '--set', 'train.eval_interval=1000']
    process = subprocess.Popen([sys.executable, '-m', 'moog_ros.training.pretrain',
                                *settings, '--out', str(out)], env=_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / 'metrics.jsonl'
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    final = rows(out, 'final')[-1]
    assert final['interrupted'] is True and 2 <= final['step'] < 400
    stopped_at = final['step']
    assert common.load_trainer_state(out / 'checkpoints' / 'latest')['step'] == stopped_at
    # Resume for 3 more steps and compare with an uninterrupted run of stopped_at + 3 steps.
    assert pretrain.main(['--out', str(out), '--resume', '--set', 'train.stop_after=3']) == 0
    reference = tmp_path / 'reference'
    assert pretrain.main([*settings, '--out', str(reference), '--set',
                          f'train.stop_after={stopped_at + 3}']) == 0
    resumed = {r['step']: r['loss'] for r in rows(out, 'train')}
    expected = {r['step']: r['loss'] for r in rows(reference, 'train')}
    assert [resumed[s] for s in range(stopped_at + 1, stopped_at + 4)] == \
        [expected[s] for s in range(stopped_at + 1, stopped_at + 4)]
    assert rows(out, 'final')[-1]['param_digests'] == rows(reference, 'final')[-1][
        'param_digests']


def test_resume_keeps_moments_but_takes_the_schedule_from_the_current_config():
    def build(lr: float, total: int) -> tuple:
        model = torch.nn.Linear(3, 1)
        torch.nn.init.ones_(model.weight)
        optimizer = common.build_adamw(model.parameters(), lr=lr, weight_decay=1e-4,
                                       betas=(0.9, 0.95))
        return model, optimizer, common.build_scheduler(optimizer, warmup_steps=2,
                                                        total_steps=total, final_ratio=1e-3)

    model, optimizer, scheduler = build(1e-2, 10)
    for _ in range(4):
        model(torch.ones(2, 3)).sum().backward()
        optimizer.step()
        scheduler.step()
    state = {'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict()}
    # Unchanged config: the next lr is exactly the one the original run would use.
    _, same_opt, same_sched = build(1e-2, 10)
    common.restore_trainer_state(state, optimizer=same_opt, scheduler=same_sched, source='x')
    assert same_opt.param_groups[0]['lr'] == optimizer.param_groups[0]['lr']
    # Extended and re-tuned: the new schedule at the restored position, the old moments.
    _, new_opt, new_sched = build(2e-2, 20)
    common.restore_trainer_state(state, optimizer=new_opt, scheduler=new_sched, source='x')
    assert new_sched.last_epoch == 4
    assert new_opt.param_groups[0]['lr'] == 2e-2 * common.WarmupCosine(2, 20, 1e-3)(4)
    assert new_sched.get_last_lr() == [new_opt.param_groups[0]['lr']]
    moments = new_opt.state_dict()['state'][0]['exp_avg']
    assert torch.equal(moments, optimizer.state_dict()['state'][0]['exp_avg'])

"""Training survives a bad file: corrupt clips are skipped with one line, kill -9 during a
checkpoint write leaves a loadable ``latest`` (issue 12)."""
from __future__ import annotations

import os
from pathlib import Path
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from test_clips import make_arrays
import torch

from moog_ros import clips
from moog_ros.model import MoogPerception, get_perception_config, load_checkpoint, save_checkpoint
from moog_ros.training import common, data


def _write_clips(folder: Path, count: int) -> list[Path]:
    arrays = make_arrays()
    paths = []
    for k in range(count):
        arrays['video'] = np.full_like(arrays['video'], 10 * k)  # tells the clips apart
        path = folder / f'clip_{k:03d}.npz'
        clips.save_clip(path, clips.Clip.from_arrays(arrays))
        paths.append(path)
    return paths


def test_corrupt_and_truncated_clips_are_skipped_with_one_line_each(tmp_path, capfd):
    paths = _write_clips(tmp_path, 4)
    truncated, corrupt = paths[1], paths[2]
    truncated.write_bytes(truncated.read_bytes()[:300])          # recorder killed mid-write
    raw = bytearray(corrupt.read_bytes())
    middle = len(raw) // 3
    raw[middle:middle + 64] = bytes(64)                           # damaged member data
    corrupt.write_bytes(bytes(raw))
    source = data.open_source(str(tmp_path), num_frames=2)
    assert [p.name for p in source.files] == ['clip_000.npz', 'clip_002.npz', 'clip_003.npz']
    train = data.TrainWindows(source, num_frames=2, frame_step=1, image_size=(6, 6), seed=0)
    seen = set()
    for slot in range(3 * len(train)):                          # three epochs: no crash
        sample = train[slot]
        seen.add(int(sample['video'].float().mean().round()))  # which clip it came from
    assert 20 not in seen and seen <= {0, 10, 30}  # nothing of the corrupt clip is used
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith('[data] skipping')]
    assert len(lines) == 2, err
    assert any(str(truncated) in line for line in lines)
    assert any(str(corrupt) in line for line in lines)
    # Samples stay a pure function of the slot: the same slot gives the same sample again.
    again = data.TrainWindows(data.open_source(str(tmp_path), num_frames=2), num_frames=2,
                              frame_step=1, image_size=(6, 6), seed=0)
    for slot in range(len(train)):
        torch.testing.assert_close(again[slot]['video'], train[slot]['video'])


def test_a_corrupt_bag_among_several_is_skipped_with_one_line(tmp_path, capfd):
    from test_bags import frames, image_msg, write_bag

    from moog_ros.training import bags
    rgb = frames(6)
    good = write_bag(tmp_path / 'good', 'mcap', [
        ('/cam/image_raw', i, image_msg(i * 10**8, rgb[i], 'rgb8')) for i in range(6)])
    bad = write_bag(tmp_path / 'bad', 'sqlite3', [
        ('/cam/image_raw', i, image_msg(i * 10**8, rgb[i], 'rgb8')) for i in range(3)])
    db = next(bad.glob('*.db3'))
    db.write_bytes(db.read_bytes()[:5000])  # cut short: cannot be salvaged
    source = bags.BagSource([bad, good], window_frames=3, progress=False)
    assert len(source) == 2
    np.testing.assert_array_equal(source.window(1, 3)['video'], rgb[3:6])
    lines = [x for x in capfd.readouterr().err.splitlines() if x.startswith('[data] skipping')]
    assert len(lines) == 1 and str(bad) in lines[0]
    source.close()


def test_a_movi_shard_with_corrupt_framing_is_skipped(tmp_path, capfd):
    from fixtures_movi import build_scene, movi_features

    from moog_ros.training import movi
    record = movi.encode_example(movi_features(build_scene()))
    good, bad = tmp_path / 'movi-train.tfrecord-00000', tmp_path / 'movi-train.tfrecord-00001'
    movi.write_tfrecord(good, [record])
    movi.write_tfrecord(bad, [record, record])
    raw = bytearray(bad.read_bytes())
    raw[9] ^= 0xFF  # the length checksum of the first record: the framing cannot be trusted
    bad.write_bytes(bytes(raw))
    source = movi.MoviSource(tmp_path, num_tracks=0)
    assert source.num_videos == 1 and source.window(0, 2, 1)['video'].shape[0] == 2
    lines = [x for x in capfd.readouterr().err.splitlines() if x.startswith('[data] skipping')]
    assert len(lines) == 1 and str(bad) in lines[0] and 'checksum' in lines[0]


def test_a_data_set_with_no_readable_clip_still_fails_clearly(tmp_path):
    (tmp_path / 'a.npz').write_bytes(b'not a zip')
    with pytest.raises(clips.ClipFormatError, match='none of the 1 clips'):
        data.open_source(str(tmp_path))


# The child writes checkpoint step 2 over step 1 and dies by SIGKILL at a chosen moment:
# 'model' half-way through model.safetensors; 'before-swap-K' / 'after-swap-K' around the K-th
# rename-like call (os.replace, os.rename, the atomic exchange) whose target lies in the
# checkpoints folder itself (the ones inside the staging folder do not touch `latest`).
# Killing itself makes the moment exact; SIGKILL leaves no chance to clean up.
_CHILD = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import torch
    from moog_ros.model import MoogPerception, get_perception_config, save_checkpoint
    from moog_ros.training import common

    dest, point = Path(sys.argv[1]), sys.argv[2]
    torch.manual_seed(2)
    model = MoogPerception(get_perception_config('tiny'))
    swaps = [0]

    def counted(function):
        def wrapper(*args, **kwargs):
            top = Path(os.fsdecode(args[1])).parent == dest.parent
            if top and point == f'before-swap-{swaps[0] + 1}':
                os.kill(os.getpid(), signal.SIGKILL)
            result = function(*args, **kwargs)
            if top:
                swaps[0] += 1
                if point == f'after-swap-{swaps[0]}':
                    os.kill(os.getpid(), signal.SIGKILL)
            return result
        return wrapper

    os.replace, os.rename = counted(os.replace), counted(os.rename)
    common._exchange_dirs = counted(common._exchange_dirs)

    def write_model(path):
        save_checkpoint(path, model)
        if point == 'model':
            weights = path / 'model.safetensors'
            data = weights.read_bytes()
            with weights.open('wb') as handle:  # rewritten half-way, then killed
                handle.write(data[:len(data) // 2])
                handle.flush()
                os.kill(os.getpid(), signal.SIGKILL)

    common.save_training_checkpoint(dest, write_model=write_model,
                                    trainer_state={'step': 2, 'optimizer': {}, 'scheduler': {},
                                                   'data_position': {}})
    print('finished')
""")


@pytest.mark.slow  # a Python process with torch: a few seconds
@pytest.mark.parametrize('point', ['model', 'before-swap-1', 'after-swap-1', 'after-swap-2'])
def test_kill_9_during_a_checkpoint_write_leaves_a_loadable_latest(tmp_path, point):
    latest = tmp_path / 'checkpoints' / 'latest'
    torch.manual_seed(1)
    model = MoogPerception(get_perception_config('tiny'))
    state = {'step': 1, 'optimizer': {}, 'scheduler': {}, 'data_position': {}}
    common.save_training_checkpoint(latest, write_model=lambda p: save_checkpoint(p, model),
                                    trainer_state=state)
    child = subprocess.run([sys.executable, '-c', _CHILD, str(latest), point],
                           capture_output=True, text=True, timeout=120,
                           env={**os.environ, 'OMP_NUM_THREADS': '1'})
    killed = child.returncode == -signal.SIGKILL
    assert killed or (child.returncode == 0 and 'finished' in child.stdout), child.stderr
    if point != 'after-swap-2':
        assert killed  # these moments exist in every implementation
    # `latest` itself (not an aside copy) is a complete checkpoint: the old or the new one.
    loaded = load_checkpoint(latest, expected_kind='perception')
    step = common.load_trainer_state(latest)['step']
    assert step == (1 if point in ('model', 'before-swap-1') else 2)
    if step == 1:  # the old weights, intact
        for name, tensor in model.state_dict().items():
            torch.testing.assert_close(loaded.model.state_dict()[name], tensor)
    assert common.find_checkpoint(tmp_path) == latest
    # The next save works and leaves no half-written staging folder behind.
    common.save_training_checkpoint(latest, write_model=lambda p: save_checkpoint(p, model),
                                    trainer_state={**state, 'step': 3})
    assert common.load_trainer_state(latest)['step'] == 3
    assert sorted(p.name for p in latest.parent.iterdir()) == ['latest']

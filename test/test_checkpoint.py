"""Checkpoint round trip and error reporting (tiny preset, CPU)."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
import torch

from moog_ros.model import (
    CheckpointError,
    Moog,
    get_config,
    load_checkpoint,
    load_state_dict_file,
    read_checkpoint_config,
    save_checkpoint,
    save_state_dict_file,
)
from moog_ros.model.checkpoint import CONFIG_FILE, FORMAT_TAG, TENSORS_FILE


@pytest.fixture
def model() -> Moog:
    torch.manual_seed(0)
    return Moog(get_config('tiny')).eval()


@pytest.fixture
def saved(tmp_path: Path, model: Moog) -> Path:
    return save_checkpoint(tmp_path / 'ckpt', model, meta={'step': 12, 'note': 'test'})


def _outputs(model: Moog) -> torch.Tensor:
    video = torch.rand(1, 2, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, _ = model(video, decode='eval', generator=torch.Generator().manual_seed(1))
    return out.rgb


def _edit_json(path: Path, edit) -> None:
    document = json.loads((path / CONFIG_FILE).read_text())
    edit(document)
    (path / CONFIG_FILE).write_text(json.dumps(document))


def test_round_trip_gives_identical_outputs(saved: Path, model: Moog) -> None:
    loaded = load_checkpoint(saved)
    assert loaded.kind == 'moog'
    assert loaded.meta == {'step': 12, 'note': 'test'}
    assert loaded.configs['model'] == model.config.to_dict()
    assert loaded.model.config == model.config
    assert not loaded.model.training
    assert torch.equal(_outputs(loaded.model), _outputs(model))
    document = read_checkpoint_config(saved)
    assert document['format'] == FORMAT_TAG
    assert document['tensors']['count'] == len(model.state_dict())


def test_grid_model_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Moog(get_config('tiny_grid')).eval()
    loaded = load_checkpoint(save_checkpoint(tmp_path / 'grid', model)).model
    assert loaded.config.token_binding == 'grid'
    assert torch.equal(loaded.cross_attn_mask, model.cross_attn_mask)
    assert torch.equal(_outputs(loaded), _outputs(model))


def test_save_keeps_other_files_and_overwrites_in_place(saved: Path, model: Moog) -> None:
    (saved / 'trainer_state.pt').write_bytes(b'kept')
    with torch.no_grad():
        model.state_norm.weight.add_(1.0)
    save_checkpoint(saved, model)
    assert (saved / 'trainer_state.pt').read_bytes() == b'kept'
    assert torch.equal(load_checkpoint(saved).model.state_norm.weight, model.state_norm.weight)
    assert sorted(p.name for p in saved.iterdir()) == sorted(
        [CONFIG_FILE, TENSORS_FILE, 'trainer_state.pt'])  # no temp files left behind


def test_save_rejects_configs_that_do_not_build_the_model(tmp_path: Path, model: Moog) -> None:
    other = get_config('tiny').to_dict()
    other['token_size'] = 48
    other['encoder']['width'] = 48
    other['corrector']['qkv_size'] = other['predictor']['qkv_size'] = 48
    with pytest.raises(CheckpointError, match=r'model.safetensors: .*shape mismatch'):
        save_checkpoint(tmp_path / 'bad', model, configs={'model': other})
    assert not (tmp_path / 'bad' / CONFIG_FILE).exists()


def test_missing_directory_and_files(tmp_path: Path, saved: Path) -> None:
    with pytest.raises(CheckpointError, match='nope: not a checkpoint directory'):
        load_checkpoint(tmp_path / 'nope')
    (saved / TENSORS_FILE).unlink()
    with pytest.raises(CheckpointError, match=r'model\.safetensors: missing'):
        load_checkpoint(saved)
    (saved / CONFIG_FILE).unlink()
    with pytest.raises(CheckpointError, match=r'config\.json: missing'):
        load_checkpoint(saved)


def test_corrupt_json(saved: Path) -> None:
    (saved / CONFIG_FILE).write_text('{"format": ')
    with pytest.raises(CheckpointError, match=r'config\.json: corrupt JSON'):
        load_checkpoint(saved)


@pytest.mark.parametrize('edit, message', [
    (lambda d: d.update(format='moog_ros.checkpoint.v0'),
     "format tag is 'moog_ros.checkpoint.v0'"),
    (lambda d: d.update(kind='slots'), "unknown kind 'slots'"),
    (lambda d: d.update(configs=[]), "key 'configs' must be an object"),
    (lambda d: d['configs'].pop('model'), "configs has no 'model' entry"),
    (lambda d: d['configs']['model']['corrector'].update(num_heads=3),
     r'invalid config: configs.model.corrector: num_heads \(3\) must divide'),
])
def test_bad_config_json(saved: Path, edit, message: str) -> None:
    _edit_json(saved, edit)
    with pytest.raises(CheckpointError, match=r'config\.json: .*' + message):
        load_checkpoint(saved)


def test_expected_kind(saved: Path) -> None:
    with pytest.raises(CheckpointError, match="kind is 'moog', expected 'perception'"):
        load_checkpoint(saved, expected_kind='perception')


def test_corrupt_tensor_file(saved: Path) -> None:
    data = (saved / TENSORS_FILE).read_bytes()
    (saved / TENSORS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r'model\.safetensors: unreadable safetensors'):
        load_checkpoint(saved)


def _rewrite_tensors(saved: Path, edit) -> None:
    path = saved / TENSORS_FILE
    with open(path, 'rb') as f:  # keep the save_id so only the tensor problem is reported
        header = json.loads(f.read(int.from_bytes(f.read(8), 'little')))
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata=header['__metadata__'])


def test_missing_unexpected_and_misshaped_tensors_are_listed(saved: Path) -> None:
    _rewrite_tensors(saved, lambda t: t.pop('decoder.head.weight'))
    with pytest.raises(CheckpointError,
                       match=r'model\.safetensors: .*1 tensor\(s\) missing: decoder.head.weight'):
        load_checkpoint(saved)
    _rewrite_tensors(saved, lambda t: t.update({'decoder.head.weight': torch.zeros(3, 48),
                                                'extra.bias': torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r'1 unexpected tensor\(s\): extra.bias'):
        load_checkpoint(saved)
    _rewrite_tensors(saved, lambda t: (t.pop('extra.bias'),
                                       t.update({'state_norm.weight': torch.ones(7)})))
    with pytest.raises(CheckpointError, match=r'1 shape mismatch\(es\): '
                       r'state_norm.weight \(file \[7\], config \[32\]\)'):
        load_checkpoint(saved)


def test_config_that_disagrees_with_the_tensors(saved: Path) -> None:
    _edit_json(saved, lambda d: d['configs']['model'].update(num_tokens=99))
    # num_tokens is not a weight shape in free binding, so this one must load ...
    assert load_checkpoint(saved).model.config.num_tokens == 99
    _edit_json(saved, lambda d: d['configs']['model']['decoder'].update(out_channels=1))
    with pytest.raises(CheckpointError, match=r'decoder.head.bias \(file \[3\], config \[1\]\)'):
        load_checkpoint(saved)


def test_torn_save_is_detected(saved: Path, tmp_path: Path, model: Moog) -> None:
    other = save_checkpoint(tmp_path / 'other', model)
    (saved / TENSORS_FILE).write_bytes((other / TENSORS_FILE).read_bytes())
    with pytest.raises(CheckpointError, match='come from different saves'):
        load_checkpoint(saved)


def test_state_dict_file_round_trip_and_errors(tmp_path: Path) -> None:
    state = {'step': 3, 'optimizer': {'lr': 1e-4}, 'rng': torch.arange(4)}
    save_state_dict_file(tmp_path / 'trainer_state.pt', state)
    loaded = load_state_dict_file(tmp_path / 'trainer_state.pt')
    assert loaded['step'] == 3 and torch.equal(loaded['rng'], state['rng'])
    with pytest.raises(CheckpointError, match='absent.pt: missing'):
        load_state_dict_file(tmp_path / 'absent.pt')
    (tmp_path / 'junk.pt').write_bytes(b'not a zip file')
    with pytest.raises(CheckpointError, match='junk.pt: cannot be loaded with weights_only'):
        load_state_dict_file(tmp_path / 'junk.pt')
    # Arbitrary Python objects are refused (never unpickled).
    torch.save({'obj': Path('x')}, tmp_path / 'code.pt')
    with pytest.raises(CheckpointError, match='code.pt: cannot be loaded with weights_only'):
        load_state_dict_file(tmp_path / 'code.pt')
    torch.save([1, 2], tmp_path / 'list.pt')
    with pytest.raises(CheckpointError, match='list.pt: expected a dict, got list'):
        load_state_dict_file(tmp_path / 'list.pt')


def test_wrapped_models_are_saved_without_the_wrapper(tmp_path: Path, model: Moog) -> None:
    path = save_checkpoint(tmp_path / 'wrapped', torch.nn.DataParallel(model))
    assert read_checkpoint_config(path)['kind'] == 'moog'
    assert set(load_file(path / TENSORS_FILE)) == set(model.state_dict())


def test_unregistered_module_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match='no checkpoint kind is registered for Linear'):
        save_checkpoint(tmp_path / 'linear', torch.nn.Linear(2, 2))

"""moog_export: a training checkpoint becomes a model folder with provenance, no trainer state."""
import json

import torch

from moog_ros.model import MoogPerception, get_perception_config, load_checkpoint, save_checkpoint
from moog_ros.model.checkpoint import save_state_dict_file
from moog_ros.training import export


def test_export_strips_trainer_state_and_records_provenance(tmp_path):
    torch.manual_seed(0)
    model = MoogPerception(get_perception_config('tiny'))
    run_ckpt = tmp_path / 'run' / 'latest'
    save_checkpoint(run_ckpt, model, meta={'step': 7})
    save_state_dict_file(run_ckpt / 'trainer_state.pt', {'step': 7})
    provenance = tmp_path / 'provenance.json'
    provenance.write_text(json.dumps({'data_seed': 1, 'hardware': 'test'}))
    out = tmp_path / 'models' / 'moog_tiny'

    assert export.main(['--checkpoint', str(run_ckpt), '--out', str(out),
                        '--provenance', str(provenance)]) == 0

    assert sorted(p.name for p in out.iterdir()) == ['config.json', 'model.safetensors']
    loaded = load_checkpoint(out, expected_kind='perception')
    assert loaded.meta['provenance'] == {'data_seed': 1, 'hardware': 'test'}
    assert loaded.meta['step'] == 7
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    # Exporting again replaces the folder in one piece.
    assert export.main(['--checkpoint', str(run_ckpt), '--out', str(out)]) == 0
    assert load_checkpoint(out).meta['provenance'] == {}


def test_export_names_a_broken_checkpoint(tmp_path, capsys):
    (tmp_path / 'bad').mkdir()
    (tmp_path / 'bad' / 'config.json').write_text('{not json')
    assert export.main(['--checkpoint', str(tmp_path / 'bad'), '--out',
                        str(tmp_path / 'out')]) == 2
    assert 'config.json' in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()

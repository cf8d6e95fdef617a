"""Export a training checkpoint as a shippable model: weights + config JSON, no trainer state.

    python -m moog_ros.training.export --checkpoint runs/fit_small/checkpoints/latest \
        --out models/moog_small --provenance models/provenance_small.json

The result is what the node loads (`checkpoint` parameter): `config.json` (every component config
plus `meta.provenance`: how it was made) and `model.safetensors`. Optimizer moments and RNG states
stay in the run folder; a model folder never holds a pickle.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
import shutil
import sys
import tempfile

from moog_ros.model import CheckpointError, load_checkpoint, save_checkpoint

PROG = 'moog_export'


def export(checkpoint: str | Path, out: str | Path, provenance: dict) -> Path:
    """Rebuilds the model from ``checkpoint`` and writes it to ``out`` with ``provenance``.

    The folder is written beside ``out`` and swapped in, so a failed export leaves the old one.
    """
    loaded = load_checkpoint(checkpoint, map_location='cpu')
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {**loaded.meta, 'provenance': provenance, 'exported_from': str(checkpoint)}
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f'.{out.name}.') as tmp:
        staged = Path(tmp) / out.name
        save_checkpoint(staged, loaded.model, configs=loaded.configs, meta=meta,
                        kind=loaded.kind)
        load_checkpoint(staged)   # the exported folder must load on its own before it replaces
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument('--checkpoint', required=True,
                        help='training checkpoint directory (config.json + model.safetensors)')
    parser.add_argument('--out', required=True, help='model folder to write (replaced)')
    parser.add_argument('--provenance', default=None,
                        help='JSON file describing how the model was made (commands, seeds, '
                             'data, hardware, time); stored under meta.provenance')
    args = parser.parse_args(argv)
    provenance = {}
    if args.provenance:
        try:
            provenance = json.loads(Path(args.provenance).read_text())
        except (OSError, json.JSONDecodeError) as error:
            print(f'{PROG}: --provenance {args.provenance}: {error}', file=sys.stderr)
            return 2
    try:
        out = export(args.checkpoint, args.out, provenance)
    except CheckpointError as error:
        print(f'{PROG}: {error}', file=sys.stderr)
        return 2
    size_mb = sum(p.stat().st_size for p in out.iterdir()) / 2**20
    print(f'{PROG}: wrote {out} ({size_mb:.1f} MB)')
    return 0


if __name__ == '__main__':
    sys.exit(main())

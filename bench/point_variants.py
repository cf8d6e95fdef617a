"""Zero-shot point-tracking variants of the local readout on evaluation clips (prints figures).

The untrained local readout is a coarse-to-fine template tracker on XFeat features; this
script scores variants of its fixed parts (pyramid levels, window radius, temperature,
velocity prior) on the same clips and queries as ``moog_evaluate``, to choose the defaults
that the learned residual then starts from::

    python bench/point_variants.py --data data/heldout --max-clips 16 \\
        --set levels=3 --set temperature=0.05 --set velocity_momentum=1.0
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time

import numpy as np
import torch

from moog_ros import clips
from moog_ros.model import MoogPerception, get_perception_config
from moog_ros.training import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data', required=True)
    parser.add_argument('--max-clips', type=int, default=16)
    parser.add_argument('--set', action='append', default=[],
                        help='LocalEvidenceConfig field=value (repeatable)')
    parser.add_argument('--xfeat-scale', type=int, default=2)
    parser.add_argument('--threads', type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = get_perception_config('small_hybrid')
    fields = {f.name: f.type for f in dataclasses.fields(cfg.points.local)}
    changes = {}
    for item in args.set:
        key, value = item.split('=', 1)
        if key not in fields:
            raise SystemExit(f'unknown field {key!r}; known: {sorted(fields)}')
        changes[key] = (value.lower() == 'true') if fields[key] in ('bool', bool) else (
            int(value) if fields[key] in ('int', int) else float(value))
    local = dataclasses.replace(cfg.points.local, **changes)
    cfg = dataclasses.replace(cfg, points=dataclasses.replace(cfg.points, local=local),
                              xfeat_scale=args.xfeat_scale)
    model = MoogPerception(cfg)
    model.load_pretrained_features()
    model.eval()
    paths = clips.list_clips(args.data)[: args.max_clips]
    rows, seconds, frames = [], 0.0, 0
    for i, path in enumerate(paths):
        clip = evaluate.prepare_clip(clips.load_clip(path), cfg.moog.image_size, path.stem)
        start = time.perf_counter()
        pred = evaluate.run_perception(model, clip, torch.device('cpu'), seed=i)
        seconds += time.perf_counter() - start
        frames += clip.num_frames
        rows.append(evaluate.score(clip, pred))
    keys = ('points_aj', 'points_delta_avg', 'points_oa', 'boxes_miou')
    means = {k: float(np.nanmean([r.get(k, np.nan) for r in rows])) for k in keys}
    print(f'{len(paths)} clips, local={changes or "defaults"}, xfeat_scale={args.xfeat_scale}: '
          + ', '.join(f'{k} {v:.3f}' for k, v in means.items())
          + f', {frames / seconds:.1f} frames/s; load {os.getloadavg()[0]:.2f}')


if __name__ == '__main__':
    main()

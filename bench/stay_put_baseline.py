#!/usr/bin/env python3
"""Scores the stay-put tracker on a clip directory: the floor any point or box tracker must beat.

Every point query stays at its query pixel and is called visible on every frame; every box keeps
its seed box and is called present. The clips, queries, seeds and metrics are exactly those of
``moog_ros.training.evaluate`` (same ``prepare_clip`` and ``score``), so the figures sit beside
its table (``models/README.md``).

Example:
    .venv/bin/python bench/stay_put_baseline.py --data data/heldout
"""

from __future__ import annotations

import argparse
import json

from moog_ros import clips, metrics
from moog_ros.training import evaluate


def stay_put(clip: evaluate.EvalClip) -> evaluate.Predictions:
    """Predictions that never move (``moog_evaluate``'s ``stay_put`` method)."""
    return evaluate.run_stay_put(clip)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data', required=True, help='clip directory (the clip format)')
    parser.add_argument('--resolution', type=int, nargs=2, default=(128, 128),
                        metavar=('H', 'W'), help='evaluation resolution (as moog_evaluate)')
    args = parser.parse_args()
    averager = metrics.ClipAverager()
    paths = clips.list_clips(args.data)
    for path in paths:
        clip = evaluate.prepare_clip(clips.load_clip(path), tuple(args.resolution), path.stem)
        averager.add(evaluate.score(clip, stay_put(clip)))
    print(json.dumps({'clips': len(paths), 'stay_put': averager.mean()}, indent=2))


if __name__ == '__main__':
    main()

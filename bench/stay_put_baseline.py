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

import numpy as np

from moog_ros import clips, metrics
from moog_ros.training import evaluate


def stay_put(clip: evaluate.EvalClip) -> evaluate.Predictions:
    """Predictions that never move: each query's own coordinates on every frame."""
    num_tracks, num_frames = clip.tracks_visible.shape
    start_xy = clip.tracks_xy[np.arange(num_tracks), clip.query_frame]  # [N, 2]
    num_boxes = len(clip.box_start)
    seed_xyxy = clip.boxes_xyxy[np.arange(num_boxes), clip.box_start]  # [K, 4]
    return evaluate.Predictions(
        points_xy=np.repeat(start_xy[:, None], num_frames, axis=1),
        points_visible=np.ones((num_tracks, num_frames), bool),
        boxes_xyxy=np.repeat(seed_xyxy[:, None], num_frames, axis=1),
        boxes_present=np.ones((num_boxes, num_frames), bool))


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

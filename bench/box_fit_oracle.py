#!/usr/bin/env python3
"""The ceiling of MedianFlow box refitting (``moog_ros.model.box_fit``) with perfect points.

Each box is tracked by member points chosen on its seed frame (its first valid frame ``t0``):
the ground-truth tracks visible at ``t0`` whose position lies inside the box's central
``--interior`` region and on the object's own segmentation. On every later frame the box is
refit with ``fit_boxes`` from those members' *ground-truth* positions, weighted by their
ground-truth visibility (previous = the last fitted box). A point tracker can only do worse, so
this is the best the design can score; the gap to 1 is what the box model itself loses
(members that do not span the box, objects that rotate, members that all get occluded).

Variants, all on the same members unless named:

- ``fit``: the default fit (MedianFlow centre, isotropic repeated-median scale);
- ``fit_vote``, ``fit_vote_anisotropic``: the other ``centre_rule`` / ``anisotropic`` choices;
- ``fit_no_seg``, ``fit_no_seg_vote``: members = every GT track in the interior region, no
  segmentation check (what background members cost: they move with the background);
- ``stay_put``: the seed box never moves (the floor, as ``bench/stay_put_baseline.py``);
- ``*_clip``: the same boxes cut to the image extent (the ground-truth boxes are; the fit is not,
  so an object leaving the image costs IoU that a final clip gets back).

Three views of the same runs: ``all_boxes`` (the evaluation's figure),
``boxes_with_ge2_seg_members`` (only boxes that got at least ``--min-members`` on-object members
on their seed frame; the GT tracks are sparse, about one per 64 px^2, so small boxes get none)
and ``frames_with_ge2_visible_members`` (only scored frames where enough members are visible,
i.e. what the box model loses when it does get to refit; other frames keep the last box).

Example:
    .venv/bin/python bench/box_fit_oracle.py --data data/heldout --interior 0.6
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys

import cv2
import numpy as np
import torch

from moog_ros import clips, metrics
from moog_ros.model.box_fit import fit_boxes
from moog_ros.training import evaluate

# name -> (members with the segmentation check?, fit_boxes keyword arguments)
VARIANTS: dict[str, tuple[bool, dict]] = {
    'fit': (True, {}),
    'fit_vote': (True, {'centre_rule': 'vote'}),
    'fit_vote_anisotropic': (True, {'centre_rule': 'vote', 'anisotropic': True}),
    'fit_no_seg': (False, {}),
    'fit_no_seg_vote': (False, {'centre_rule': 'vote'}),
}


def eval_segmentation(clip: clips.Clip, resolution_hw: tuple[int, int]) -> np.ndarray | None:
    """``[T, H, W]`` uint16 segmentation at evaluation resolution (as prepare_clip does depth)."""
    if clip.segmentation is None:
        return None
    height, width = resolution_hw
    if (clip.height, clip.width) == (height, width):
        return clip.segmentation
    return np.stack([cv2.resize(s, (width, height), interpolation=cv2.INTER_NEAREST_EXACT)
                     for s in clip.segmentation])


def select_members(ev: evaluate.EvalClip, segmentation: np.ndarray, object_ids: np.ndarray,
                   interior: float, use_segmentation: bool) -> list[np.ndarray]:
    """Per box, the indices of the GT tracks that are its members (chosen at its seed frame)."""
    height, width = ev.image_hw
    out = []
    for k, t0 in enumerate(ev.box_start):
        box = ev.boxes_xyxy[k, t0]  # [4]
        centre = 0.5 * (box[:2] + box[2:])
        half = 0.5 * interior * (box[2:] - box[:2])
        xy = ev.tracks_xy[:, t0]  # [N, 2]
        keep = ev.tracks_visible[:, t0] & (np.abs(xy - centre) <= half).all(-1)  # [N]
        if use_segmentation:
            # Pixel centres at integers: pixel i covers [i - 0.5, i + 0.5).
            col = np.clip(np.floor(xy[:, 0] + 0.5), 0, width - 1).astype(np.int64)
            row = np.clip(np.floor(xy[:, 1] + 0.5), 0, height - 1).astype(np.int64)
            keep &= segmentation[t0, row, col] == object_ids[k] + 1
        out.append(np.flatnonzero(keep))
    return out


def run_fit(ev: evaluate.EvalClip, members: list[np.ndarray], fit_kwargs: dict,
            min_members: int) -> tuple[evaluate.Predictions, np.ndarray]:
    """Refits every box on every frame after its seed from its members' GT positions.

    Returns the predictions and bool ``[K, T]``: where the fit fell back to the previous box.
    """
    num_boxes, num_frames = ev.boxes_valid.shape
    num_members = max([len(m) for m in members], default=0)
    index = np.zeros((num_boxes, num_members), np.int64)
    slot = np.zeros((num_boxes, num_members), bool)  # real member (not padding)
    for k, m in enumerate(members):
        index[k, :len(m)] = m
        slot[k, :len(m)] = True
    start = ev.box_start  # [K]
    xy = torch.from_numpy(ev.tracks_xy[index])  # [K, G, T, 2]
    visible = torch.from_numpy(ev.tracks_visible[index] & slot[..., None])  # [K, G, T]
    seed_xyxy = torch.from_numpy(ev.boxes_xyxy[np.arange(num_boxes), start])  # [K, 4]
    seed_points = xy[torch.arange(num_boxes), :, torch.from_numpy(start)]  # [K, G, 2]
    boxes = np.empty((num_boxes, num_frames, 4), np.float32)
    fallback = (visible.sum(1) < min_members).numpy()  # [K, T]
    previous = seed_xyxy.clone()  # [K, 4]
    for t in range(num_frames):
        fitted, _ = fit_boxes(seed_xyxy[None], seed_points[None], xy[None, :, :, t],
                              visible[None, :, :, t], previous[None], min_members,
                              **fit_kwargs)
        current = torch.where(torch.from_numpy(t > start)[:, None], fitted[0], seed_xyxy)
        boxes[:, t] = current.numpy()
        previous = current
    return evaluate.Predictions(boxes_xyxy=boxes,
                                boxes_present=np.ones((num_boxes, num_frames), bool)), fallback


def clip_to_image(pred: evaluate.Predictions, image_hw: tuple[int, int]) -> evaluate.Predictions:
    """Boxes cut to the image extent [-0.5, W - 0.5] x [-0.5, H - 0.5] (the GT boxes are)."""
    height, width = image_hw
    lo = np.array([-0.5, -0.5, -0.5, -0.5], np.float32)
    hi = np.array([width - 0.5, height - 0.5, width - 0.5, height - 0.5], np.float32)
    return dataclasses.replace(pred, boxes_xyxy=np.clip(pred.boxes_xyxy, lo, hi))


def box_subset(ev: evaluate.EvalClip, keep: np.ndarray) -> evaluate.EvalClip:
    """``ev`` with only the boxes where ``keep`` [K] holds (tracks untouched)."""
    return dataclasses.replace(ev, boxes_xyxy=ev.boxes_xyxy[keep],
                               boxes_valid=ev.boxes_valid[keep], box_start=ev.box_start[keep])


def score_boxes(ev: evaluate.EvalClip, pred: evaluate.Predictions,
                keep: np.ndarray) -> tuple[float, float]:
    """Box mIoU (evaluate.score) on all boxes and on the boxes where ``keep`` [K] holds."""
    subset = dataclasses.replace(pred, boxes_xyxy=pred.boxes_xyxy[keep],
                                 boxes_present=pred.boxes_present[keep])
    return (evaluate.score(ev, pred)['boxes_miou'],
            evaluate.score(box_subset(ev, keep), subset)['boxes_miou'])


def stay_put(ev: evaluate.EvalClip) -> evaluate.Predictions:
    num_boxes, num_frames = ev.boxes_valid.shape
    seed = ev.boxes_xyxy[np.arange(num_boxes), ev.box_start]  # [K, 4]
    return evaluate.Predictions(boxes_xyxy=np.repeat(seed[:, None], num_frames, axis=1),
                                boxes_present=np.ones((num_boxes, num_frames), bool))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data', required=True, help='clip directory (the clip format)')
    parser.add_argument('--max-clips', type=int, default=None)
    parser.add_argument('--interior', type=float, default=0.6,
                        help='central fraction of the box (per axis) members are drawn from')
    parser.add_argument('--min-members', type=int, default=2)
    parser.add_argument('--resolution', type=int, nargs=2, default=(128, 128),
                        metavar=('H', 'W'), help='evaluation resolution (as moog_evaluate)')
    args = parser.parse_args()
    torch.set_num_threads(1)
    resolution = tuple(args.resolution)
    paths = clips.list_clips(args.data)[:args.max_clips]
    averager = metrics.ClipAverager()
    subset_averager = metrics.ClipAverager()
    fitted_averager = metrics.ClipAverager()
    fallback_scored: list[bool] = []
    counts: dict[str, list[int]] = {'seg': [], 'no_seg': []}
    skipped = 0
    for path in paths:
        clip = clips.load_clip(path)
        segmentation = eval_segmentation(clip, resolution)
        if segmentation is None:
            skipped += 1
            continue
        ev = evaluate.prepare_clip(clip, resolution, path.stem)
        # prepare_clip keeps only boxes valid somewhere; segmentation ids follow the clip's k.
        object_ids = np.flatnonzero(metrics.first_visible_queries(clip.boxes_valid)[1])
        members = {use: select_members(ev, segmentation, object_ids, args.interior, use)
                   for use in (True, False)}
        counts['seg'].extend(len(m) for m in members[True])
        counts['no_seg'].extend(len(m) for m in members[False])
        # Boxes the oracle can refit at all: enough on-object members on the seed frame.
        has_members = np.array([len(m) >= args.min_members for m in members[True]], bool)
        scores: dict[str, float] = {}
        subset_scores: dict[str, float] = {}
        fitted_scores: dict[str, float] = {}
        preds = {'stay_put': stay_put(ev)}
        for name, (use_seg, kwargs) in VARIANTS.items():
            preds[name], fallback = run_fit(ev, members[use_seg], kwargs, args.min_members)
            if name == 'fit':
                scored = ev.boxes_valid & (np.arange(ev.num_frames) > ev.box_start[:, None])
                fallback_scored.extend(fallback[scored].tolist())
            preds[name + '_clip'] = clip_to_image(preds[name], ev.image_hw)
            # Only the frames the fit could refit (>= min_members members visible there).
            fitted_ev = dataclasses.replace(ev, boxes_valid=ev.boxes_valid & ~fallback)
            for suffix in ('', '_clip'):
                fitted_scores[name + suffix] = evaluate.score(
                    fitted_ev, preds[name + suffix])['boxes_miou']
        for name, pred in preds.items():
            scores[name], subset_scores[name] = score_boxes(ev, pred, has_members)
        averager.add(scores, prefix='miou_')
        subset_averager.add(subset_scores, prefix='miou_')
        fitted_averager.add(fitted_scores, prefix='miou_')
    report = {
        'clips': len(paths) - skipped, 'skipped_no_segmentation': skipped,
        'interior': args.interior, 'min_members': args.min_members,
        'resolution': list(resolution), 'boxes': len(counts['seg']),
        'all_boxes': averager.mean(),
        f'boxes_with_ge{args.min_members}_seg_members': subset_averager.mean(),
        f'frames_with_ge{args.min_members}_visible_members': fitted_averager.mean(),
        'frac_scored_frames_fallback_fit': (float(np.mean(fallback_scored)) if fallback_scored
                                            else float('nan')),
    }
    for key, values in counts.items():
        arr = np.asarray(values, dtype=np.float64)
        report[f'members_per_box_{key}'] = float(arr.mean()) if arr.size else float('nan')
        report[f'frac_boxes_lt2_members_{key}'] = (float((arr < 2).mean()) if arr.size
                                                   else float('nan'))
    print(json.dumps(report, indent=2))
    print('command:', shlex.join([os.path.relpath(sys.executable), *sys.argv]))
    print('uptime:', subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip())


if __name__ == '__main__':
    main()

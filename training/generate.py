"""Generate Kubric-like (MOVi-E style) training clips with full ground truth on the CPU.

    python -m moog_ros.training.generate --out DIR --num-clips N --seed S [--workers K]

Each clip is a pybullet scene (``training/scenes.py``) written in the clip format
(``moog_ros/clips.py``): video, metric z-depth, intrinsics, camera poses, segmentation,
per-object boxes, and MOVi-style point tracks with visibility. Clip ``i`` of seed ``S`` is
``DIR/clip_{S}_{i:06d}.npz`` and depends only on ``(S, i)`` and the config, never on the number of
workers, so runs are resumable (existing clips are skipped) and reproducible byte for byte.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
import dataclasses
from dataclasses import dataclass
import json
import multiprocessing
import os
from pathlib import Path
import sys
import time
from typing import Any

import numpy as np
from tqdm import tqdm

from moog_ros import clips
from moog_ros.training.scenes import SceneConfig, SceneRecording, simulate_scene

__all__ = [
    'PRESETS',
    'GenerateConfig',
    'TrackResult',
    'boxes_from_segmentation',
    'clip_path',
    'compute_tracks',
    'generate_clip',
    'main',
    'make_clip',
    'sample_track_queries',
]

CONFIG_FILE = 'generate_config.json'
_FORMAT = 'moog_ros.generate/1'


@dataclass(frozen=True)
class GenerateConfig:
    """Generator settings: the scene plus the ground-truth extraction (saved as JSON)."""

    scene: SceneConfig = SceneConfig()
    num_tracks: int = 256  # point tracks per clip (MOVi / TAP-Vid-Kubric default)
    # Kubric spreads tracks evenly over segments (so objects are over-represented against the
    # background) but takes at most this share of a segment's pixels.
    max_track_fraction: float = 0.1
    # Kubric's occlusion test: occluded if the largest depth of the 4 pixels around the
    # projected point is below this factor times the point's own depth.
    occlusion_depth_ratio: float = 0.99
    sort_objects_by_visibility: bool = True  # MOVi orders instances by visible pixels

    def __post_init__(self) -> None:
        if self.num_tracks < 1:
            raise ValueError(f'GenerateConfig.num_tracks={self.num_tracks}: must be >= 1')
        if not 0 < self.max_track_fraction <= 1:
            raise ValueError(f'GenerateConfig.max_track_fraction={self.max_track_fraction}: '
                             'must be in (0, 1]')
        if not 0 < self.occlusion_depth_ratio <= 1:
            raise ValueError(f'GenerateConfig.occlusion_depth_ratio='
                             f'{self.occlusion_depth_ratio}: must be in (0, 1]')
        scene = self.scene
        if self.num_tracks > scene.num_frames * scene.height * scene.width:
            raise ValueError(f'GenerateConfig.num_tracks={self.num_tracks}: more than the '
                             f'{scene.num_frames * scene.height * scene.width} pixels of a clip')

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GenerateConfig:
        """Inverse of ``to_dict``; unknown fields are an error."""
        values = dict(values)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f'GenerateConfig: unknown field(s) {unknown}')
        if 'scene' in values:
            values['scene'] = SceneConfig.from_dict(values['scene'])
        return cls(**values)


PRESETS: dict[str, GenerateConfig] = {
    # MOVi-E-like: 24 frames at 12 fps, 128 x 128, 256 tracks.
    'movi_e': GenerateConfig(),
    # Tests and smoke runs: a few small frames.
    'tiny': GenerateConfig(scene=SceneConfig(width=64, height=64, num_frames=6,
                                             num_objects=(2, 4)), num_tracks=64),
}


# ---------------------------------------------------------------------------------------------
# Ground truth


def boxes_from_segmentation(segmentation: np.ndarray, num_objects: int
                            ) -> tuple[np.ndarray, np.ndarray]:
    """Per-object boxes enclosing their mask pixels.

    Pixel centres are at integer coordinates, so a mask spanning columns c0..c1 gets
    ``x_min = c0 - 0.5`` and ``x_max = c1 + 0.5`` (the box covers the pixels' full extent).

    Args:
        segmentation: [T, H, W] ids, 0 background, k + 1 object k.
        num_objects: K.

    Returns:
        boxes_xyxy [K, T, 4] float32 (zeros where invalid), boxes_valid [K, T] bool.
    """
    T = segmentation.shape[0]
    boxes = np.zeros((num_objects, T, 4), np.float32)
    valid = np.zeros((num_objects, T), bool)
    for t in range(T):
        for segment in np.unique(segmentation[t]):
            k = int(segment) - 1
            if k < 0 or k >= num_objects:
                continue
            mask = segmentation[t] == segment
            rows = np.flatnonzero(mask.any(axis=1))
            cols = np.flatnonzero(mask.any(axis=0))
            boxes[k, t] = (cols[0] - 0.5, rows[0] - 0.5, cols[-1] + 0.5, rows[-1] + 0.5)
            valid[k, t] = True
    return boxes, valid


def _even_split(total: int, caps: np.ndarray) -> np.ndarray:
    """Split ``total`` as evenly as possible over bins, none above its cap (water filling)."""
    quota = np.zeros_like(caps)
    remaining = total
    while remaining > 0:
        open_bins = np.flatnonzero(quota < caps)
        share = max(remaining // len(open_bins), 1)
        for b in open_bins:
            add = min(share, caps[b] - quota[b], remaining)
            quota[b] += add
            remaining -= add
            if remaining == 0:
                break
    return quota


def sample_track_queries(segmentation: np.ndarray, depth_m: np.ndarray, num_tracks: int,
                         max_fraction: float, rng: np.random.Generator
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Query pixels (t, row, col) for MOVi-style tracks, biased towards objects.

    Like Kubric's ``get_num_to_sample``, tracks are spread evenly over the segments present in
    the clip (background and each object), each capped at ``max_fraction`` of its pixels; the
    cap is lifted when a clip is too small to honour it. Pixels without depth are never queried.

    Returns:
        query_t, query_row, query_col: int64 [N] each, in random order.
    """
    T, H, W = segmentation.shape
    flat_segment = segmentation.reshape(-1).astype(np.int64)
    candidates = np.isfinite(depth_m.reshape(-1))
    counts = np.bincount(flat_segment[candidates])  # [S] pixels per segment id
    if counts.sum() < num_tracks:
        raise ValueError(f'cannot sample {num_tracks} tracks from {counts.sum()} pixels with '
                         'known depth')
    caps = np.where(counts > 0, np.maximum(np.floor(counts * max_fraction), 1), 0)
    caps = caps.astype(np.int64)
    if caps.sum() < num_tracks:
        caps = counts
    quota = _even_split(num_tracks, caps)
    chosen = []
    for segment in np.flatnonzero(quota):
        pixels = np.flatnonzero(candidates & (flat_segment == segment))
        chosen.append(rng.choice(pixels, size=quota[segment], replace=False))
    flat = rng.permutation(np.concatenate(chosen))
    return np.unravel_index(flat, (T, H, W))


@dataclass(frozen=True)
class TrackResult:
    """Ground-truth point tracks of one clip (pixel centres at integer coordinates)."""

    tracks_xy: np.ndarray  # [N, T, 2] float64 projected position, also where not visible
    tracks_visible: np.ndarray  # [N, T] bool
    depth_m: np.ndarray  # [N, T] float64 camera z of the point (<= near plane: not rendered)
    query_t: np.ndarray  # [N] int64 frame the point was sampled in
    segment: np.ndarray  # [N] int64 segment id the point belongs to (0 background)


def compute_tracks(recording: SceneRecording, segmentation: np.ndarray,
                   object_pose: np.ndarray, cfg: GenerateConfig, rng: np.random.Generator
                   ) -> TrackResult:
    """MOVi-style point tracks from exact poses and rendered depth.

    Each query pixel is back-projected with its depth. Object points move rigidly with their
    object's pose; background points stay put in the world. Every point is projected into every
    frame and is visible when it is in front of the camera, inside the image, not occluded by
    the depth test and its segment id appears among the 4 pixels around it (Kubric's rules).

    Args:
        recording: rendered scene (depth, intrinsics, camera poses).
        segmentation: [T, H, W] ids consistent with ``object_pose`` (0 background).
        object_pose: [K, T, 4, 4] object-to-world; object k is segment k + 1.
        cfg: generator settings (track count, sampling cap, occlusion tolerance).
        rng: randomness for the query sampling.
    """
    depth = recording.depth_m.astype(np.float64)  # [T, H, W]
    T, H, W = depth.shape
    K_cam = recording.intrinsics
    cam_to_world = recording.camera_pose  # [T, 4, 4]
    world_to_cam = np.linalg.inv(cam_to_world)
    q_t, q_row, q_col = sample_track_queries(segmentation, depth, cfg.num_tracks,
                                             cfg.max_track_fraction, rng)
    segment = segmentation[q_t, q_row, q_col].astype(np.int64)  # [N]

    # Back-project the query pixels: camera ray through (col, row) scaled to depth z.
    z = depth[q_t, q_row, q_col]
    pixels = np.stack([q_col, q_row, np.ones_like(q_col)], axis=-1).astype(np.float64)
    points_cam = (pixels @ np.linalg.inv(K_cam).T) * z[:, None]  # [N, 3]
    points_world = np.einsum('nij,nj->ni', cam_to_world[q_t, :3, :3], points_cam)
    points_world += cam_to_world[q_t, :3, 3]  # [N, 3]

    # Object points: into the object frame at the query time, then along the object's poses.
    N = len(q_t)
    homog = np.concatenate([points_world, np.ones((N, 1))], axis=-1)  # [N, 4]
    world_t = np.broadcast_to(homog[:, None], (N, T, 4)).copy()  # [N, T, 4]
    on_object = segment > 0
    if np.any(on_object):
        k = segment[on_object] - 1
        local = np.einsum('nij,nj->ni', np.linalg.inv(object_pose[k, q_t[on_object]]),
                          homog[on_object])  # [M, 4]
        world_t[on_object] = np.einsum('ntij,nj->nti', object_pose[k], local)

    cam = np.einsum('tij,ntj->nti', world_to_cam, world_t)[..., :3]  # [N, T, 3]
    depth_t = cam[..., 2]
    in_front = depth_t > cfg.scene.near_m  # the renderer clips anything nearer
    # Keep projections finite behind the camera; those samples are invisible anyway.
    safe_z = np.where(in_front, depth_t, 1.0)
    uvw = cam @ K_cam.T
    xy = uvw[..., :2] / safe_z[..., None]  # [N, T, 2]
    in_image = ((xy[..., 0] >= -0.5) & (xy[..., 0] <= W - 0.5)
                & (xy[..., 1] >= -0.5) & (xy[..., 1] <= H - 0.5))

    # Kubric's 4-neighbour rules: the pixel centres around the point.
    x0 = np.clip(np.floor(xy[..., 0]).astype(np.int64), 0, W - 1)
    y0 = np.clip(np.floor(xy[..., 1]).astype(np.int64), 0, H - 1)
    x1, y1 = np.minimum(x0 + 1, W - 1), np.minimum(y0 + 1, H - 1)
    frame = np.broadcast_to(np.arange(T)[None], (N, T))
    far_depth = np.where(np.isnan(depth), np.inf, depth)  # no hit never occludes
    max_depth = np.zeros((N, T))
    segment_seen = np.zeros((N, T), bool)
    for yy, xx in ((y0, x0), (y0, x1), (y1, x0), (y1, x1)):
        max_depth = np.maximum(max_depth, far_depth[frame, yy, xx])
        segment_seen |= segmentation[frame, yy, xx] == segment[:, None]
    unoccluded = max_depth >= cfg.occlusion_depth_ratio * depth_t
    visible = in_front & in_image & unoccluded & segment_seen
    return TrackResult(tracks_xy=xy, tracks_visible=visible, depth_m=depth_t, query_t=q_t,
                       segment=segment)


# ---------------------------------------------------------------------------------------------
# One clip


def clip_path(out_dir: Path, seed: int, index: int) -> Path:
    """File of clip ``index`` of ``seed`` in ``out_dir``."""
    return Path(out_dir) / f'clip_{seed}_{index:06d}.npz'


def make_clip(recording: SceneRecording, cfg: GenerateConfig, rng: np.random.Generator
              ) -> tuple[clips.Clip, TrackResult]:
    """Ground truth for a rendered scene, as a clip (plus the raw track result for checks)."""
    segmentation = recording.segmentation
    object_pose = recording.object_pose
    K = object_pose.shape[0]
    if cfg.sort_objects_by_visibility and K > 1:
        visible_px = np.bincount(segmentation.reshape(-1), minlength=K + 1)[1:]
        order = np.argsort(-visible_px, kind='stable')  # new k -> old k
        relabel = np.zeros(K + 1, np.uint16)
        relabel[order + 1] = np.arange(1, K + 1)
        segmentation = relabel[segmentation]
        object_pose = object_pose[order]
    boxes_xyxy, boxes_valid = boxes_from_segmentation(segmentation, K)
    tracks = compute_tracks(recording, segmentation, object_pose, cfg, rng)
    clip = clips.Clip(
        video=recording.video,
        depth=recording.depth_m.astype(np.float32),
        intrinsics=recording.intrinsics.astype(np.float32),
        tracks_xy=tracks.tracks_xy.astype(np.float32),
        tracks_visible=tracks.tracks_visible,
        boxes_xyxy=boxes_xyxy,
        boxes_valid=boxes_valid,
        segmentation=segmentation.astype(np.uint16),
        camera_pose=recording.camera_pose.astype(np.float32),
        fps=recording.fps,
    )
    return clip, tracks


def _seed_sequences(seed: int, index: int) -> tuple[np.random.SeedSequence, ...]:
    # Clip `index` of run `seed` has its own entropy; scene and tracks draw from separate streams.
    return tuple(np.random.SeedSequence([seed, index]).spawn(2))


def generate_clip(cfg: GenerateConfig, seed: int, index: int) -> clips.Clip:
    """Simulate, render and annotate clip ``index`` of run ``seed`` (deterministic)."""
    scene_seed, track_seed = _seed_sequences(seed, index)
    recording = simulate_scene(cfg.scene, scene_seed)
    clip, _ = make_clip(recording, cfg, np.random.default_rng(track_seed))
    return clip


def _generate_to_file(job: tuple[GenerateConfig, int, int, str]) -> int:
    cfg, seed, index, out_dir = job
    path = clip_path(Path(out_dir), seed, index)
    try:
        clips.save_clip(path, generate_clip(cfg, seed, index))
    except Exception as err:
        # Worker tracebacks lose the job; say which clip failed.
        raise RuntimeError(f'generating {path} failed: {type(err).__name__}: {err}') from err
    return index


# ---------------------------------------------------------------------------------------------
# CLI


def _check_config_file(out_dir: Path, cfg: GenerateConfig) -> None:
    """Write the config beside the clips, or make sure an existing one matches."""
    path = out_dir / CONFIG_FILE
    record = {'format': _FORMAT, 'config': cfg.to_dict()}
    if path.exists():
        try:
            existing = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise SystemExit(f'{path} is not valid JSON ({err}); remove it or pick a new '
                             '--out') from err
        if existing != json.loads(json.dumps(record)):
            raise SystemExit(f'{path} holds a different generator config; clips from different '
                             'settings must not share a directory (pick a new --out)')
        return
    tmp = path.with_name(f'.{path.name}.tmp')
    tmp.write_text(json.dumps(record, indent=2) + '\n')
    os.replace(tmp, path)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog='moog_generate', description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', type=Path, required=True,
                        help='output directory for clip_{seed}_{index}.npz files')
    parser.add_argument('--num-clips', type=int, required=True,
                        help='number of clips (indices 0..N-1; existing files are skipped)')
    parser.add_argument('--seed', type=int, default=0,
                        help='run seed, non-negative; clip i depends only on (seed, i) '
                             '(default 0)')
    parser.add_argument('--preset', choices=sorted(PRESETS), default='movi_e',
                        help='base settings; the flags below override them (default movi_e)')
    parser.add_argument('--resolution', type=int, default=None,
                        help='square image side in pixels (preset: 128)')
    parser.add_argument('--frames', type=int, default=None,
                        help='frames per clip (preset: 24)')
    parser.add_argument('--num-tracks', type=int, default=None,
                        help='point tracks per clip (preset: 256)')
    parser.add_argument('--workers', type=int, default=1,
                        help='worker processes, one pybullet client each (default 1)')
    args = parser.parse_args(argv)
    if args.num_clips < 0:
        parser.error('--num-clips must be >= 0')
    if args.seed < 0:
        parser.error('--seed must be >= 0')
    if args.workers < 1:
        parser.error('--workers must be >= 1')
    return args


def config_from_args(args: argparse.Namespace) -> GenerateConfig:
    """The preset with the command-line overrides applied."""
    cfg = PRESETS[args.preset]
    scene = cfg.scene
    if args.resolution is not None:
        scene = dataclasses.replace(scene, width=args.resolution, height=args.resolution)
    if args.frames is not None:
        scene = dataclasses.replace(scene, num_frames=args.frames)
    cfg = dataclasses.replace(cfg, scene=scene)
    if args.num_tracks is not None:
        cfg = dataclasses.replace(cfg, num_tracks=args.num_tracks)
    return cfg


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point ``moog_generate``."""
    args = _parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as err:
        raise SystemExit(f'moog_generate: {err}') from err
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_config_file(out_dir, cfg)

    todo = [i for i in range(args.num_clips) if not clip_path(out_dir, args.seed, i).exists()]
    skipped = args.num_clips - len(todo)
    if skipped:
        print(f'{skipped} of {args.num_clips} clips already exist in {out_dir}; skipping them',
              file=sys.stderr)
    jobs = [(cfg, args.seed, i, str(out_dir)) for i in todo]
    start = time.perf_counter()
    progress = tqdm(total=len(jobs), unit='clip', desc='generate', dynamic_ncols=True)
    workers = min(args.workers, max(len(jobs), 1))
    if workers == 1:
        for job in jobs:
            _generate_to_file(job)
            progress.update()
    else:
        # spawn: a clean interpreter per worker (no inherited pybullet or thread state).
        with multiprocessing.get_context('spawn').Pool(workers) as pool:
            for _ in pool.imap_unordered(_generate_to_file, jobs):
                progress.update()
    progress.close()
    seconds = time.perf_counter() - start
    rate = len(jobs) / seconds if seconds > 0 else 0.0
    print(f'wrote {len(jobs)} clip(s) to {out_dir} in {seconds:.1f} s ({rate:.2f} clips/s, '
          f'{workers} worker(s))')


if __name__ == '__main__':
    main()

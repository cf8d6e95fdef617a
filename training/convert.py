"""Convert Kubric MOVi shards or rosbag2 bags into clip-format files (``moog_convert``).

    python -m moog_ros.training.convert --from movi:PATH --to DIR [--split validation]
    python -m moog_ros.training.convert --from bag:PATH[,PATH...] --to DIR \\
        --topic /cam/image_raw [--depth-topic /cam/depth] [--frames-per-clip 24] \\
        [--resolution 128 [160]]

The clips are for inspection and for evaluation with ground truth. MOVi clips carry every label;
bag clips carry what a recording knows: video, depth when a registered depth topic is given (NaN
where unknown), intrinsics from CameraInfo, and empty tracks (N = 0) and boxes (K = 0). Without
CameraInfo the intrinsics are a pinhole guess from ``--default-hfov-deg`` (with a warning).
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
import math
from pathlib import Path
import sys
import time
from typing import Any
import warnings

import cv2
import numpy as np
from tqdm import tqdm

from moog_ros import clips
from moog_ros.imaging import RESIZE_MODES, FrameGeometry

__all__ = ['convert', 'main', 'window_to_clip']

DEFAULT_HFOV_DEG = 60.0


def default_intrinsics(height: int, width: int, hfov_deg: float = DEFAULT_HFOV_DEG) -> np.ndarray:
    """A centred pinhole K with square pixels and the given horizontal field of view."""
    f = (width / 2) / math.tan(math.radians(hfov_deg) / 2)
    return np.array([[f, 0, (width - 1) / 2], [0, f, (height - 1) / 2], [0, 0, 1]], np.float32)


def _warp_nearest(geometry: FrameGeometry, frames: np.ndarray, fill: float) -> np.ndarray:
    """Nearest-neighbour warp of ``[T, H, W]`` label maps (depth, ids) onto the target canvas."""
    cx, cy, cw, ch = geometry.crop_xywh
    px, py, pw, ph = geometry.place_xywh
    Wm, Hm = geometry.model_wh
    out = np.full((len(frames), Hm, Wm), fill, dtype=frames.dtype)
    for t, frame in enumerate(frames):
        out[t, py:py + ph, px:px + pw] = cv2.resize(frame[cy:cy + ch, cx:cx + cw], (pw, ph),
                                                    interpolation=cv2.INTER_NEAREST)
    return out


def resize_window(arrays: dict[str, np.ndarray], height: int, width: int,
                  mode: str = 'crop') -> dict[str, np.ndarray]:
    """Move a window's pixels and every label to ``height x width`` (see ``moog_ros.imaging``).

    Video is resampled with area/linear interpolation, depth and segmentation with nearest
    neighbour; intrinsics, tracks and boxes follow the same pixel map. Tracks that leave the
    kept part of the image become invisible; boxes are clipped to it (invalid when empty).
    """
    T, H0, W0 = arrays['video'].shape[:3]
    geometry = FrameGeometry.fit((W0, H0), (width, height), mode)
    out = dict(arrays)
    out['video'] = np.stack([geometry.warp(frame) for frame in arrays['video']])
    if 'depth' in arrays:
        out['depth'] = _warp_nearest(geometry, arrays['depth'], np.nan)
    if 'segmentation' in arrays:
        out['segmentation'] = _warp_nearest(geometry, arrays['segmentation'], 0)
    if 'intrinsics' in arrays:
        out['intrinsics'] = geometry.scale_intrinsics(arrays['intrinsics']).astype(np.float32)
    if 'tracks_xy' in arrays:
        out['tracks_xy'] = geometry.to_model_xy(arrays['tracks_xy'])
        out['tracks_visible'] = arrays['tracks_visible'] & geometry.input_in_view(
            arrays['tracks_xy'])
    if 'boxes_xyxy' in arrays:
        boxes = geometry.to_model_xyxy(arrays['boxes_xyxy'])
        # Clip to the part of the canvas that shows the image.
        px, py, pw, ph = geometry.place_xywh
        lo = np.array([px - 0.5, py - 0.5] * 2, np.float32)
        hi = np.array([px + pw - 0.5, py + ph - 0.5] * 2, np.float32)
        boxes = np.clip(boxes, lo, hi)
        nonempty = (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
        out['boxes_valid'] = arrays['boxes_valid'] & nonempty
        out['boxes_xyxy'] = boxes
    return out


def window_to_clip(arrays: dict[str, np.ndarray], *, fps: float | None = None,
                   default_hfov_deg: float = DEFAULT_HFOV_DEG,
                   source: str = '<window>') -> clips.Clip:
    """Fill the clip-format keys a window lacks and build a :class:`moog_ros.clips.Clip`.

    Missing depth becomes NaN, missing tracks/boxes become empty (N = 0, K = 0), missing
    intrinsics a centred pinhole with ``default_hfov_deg`` (warning). ``fps`` defaults to the
    median spacing of ``stamps_ns``.
    """
    video = arrays['video']
    T, H, W = video.shape[:3]
    out: dict[str, Any] = {'video': video}
    out['depth'] = arrays.get('depth', np.full((T, H, W), np.nan, np.float32)).astype(np.float32)
    if 'intrinsics' in arrays:
        out['intrinsics'] = arrays['intrinsics'].astype(np.float32)
    else:
        warnings.warn(f'{source}: no intrinsics (no CameraInfo); writing a centred pinhole with '
                      f'a {default_hfov_deg:g} deg horizontal field of view', stacklevel=2)
        out['intrinsics'] = default_intrinsics(H, W, default_hfov_deg)
    out['tracks_xy'] = arrays.get('tracks_xy', np.zeros((0, T, 2), np.float32))
    out['tracks_visible'] = arrays.get('tracks_visible', np.zeros((0, T), bool))
    out['boxes_xyxy'] = arrays.get('boxes_xyxy', np.zeros((0, T, 4), np.float32))
    out['boxes_valid'] = arrays.get('boxes_valid', np.zeros((0, T), bool))
    for key in ('segmentation', 'camera_pose'):
        if key in arrays:
            out[key] = arrays[key]
    if fps is None and 'stamps_ns' in arrays and T > 1:
        spacing = np.median(np.diff(arrays['stamps_ns'].astype(np.float64)))
        fps = 1e9 / spacing if spacing > 0 else None
    if fps is not None:
        out['fps'] = float(fps)
    return clips.Clip(**out)


def _open(spec: str, args: argparse.Namespace, window_frames: int) -> Any:
    scheme, _, rest = spec.partition(':')
    if scheme == 'movi':
        from moog_ros.training.movi import MoviSource

        return MoviSource(rest, split=args.split, window_frames=window_frames,
                          num_tracks=args.num_tracks, seed=args.seed)
    if scheme == 'bag':
        from moog_ros.training.bags import BagSource

        return BagSource([p for p in rest.split(',') if p], topic=args.topic,
                         depth_topic=args.depth_topic, camera_info_topic=args.camera_info_topic,
                         depth_tolerance_s=args.depth_tolerance_ms / 1e3,
                         window_frames=window_frames)
    raise ValueError(f'--from {spec!r}: expected movi:PATH or bag:PATH[,PATH...]')


def convert(spec: str, out_dir: str | Path, *, topic: str | None = None,
            depth_topic: str | None = None, camera_info_topic: str | None = None,
            depth_tolerance_ms: float = 20.0, frames_per_clip: int | None = None,
            frame_step: int = 1, resolution: Sequence[int] | None = None,
            resize_mode: str = 'crop', split: str | None = None, num_tracks: int = 256,
            seed: int = 0, max_clips: int | None = None, overwrite: bool = False,
            default_hfov_deg: float = DEFAULT_HFOV_DEG, progress: bool = True) -> list[Path]:
    """Write the clips of a MOVi or bag source into ``out_dir``; see the module docstring.

    Args:
        spec: ``movi:PATH`` or ``bag:PATH[,PATH...]``.
        out_dir: output directory (created).
        topic, depth_topic, camera_info_topic, depth_tolerance_ms: bag options.
        frames_per_clip: frames per clip (bags: default 24; MOVi: default the whole video).
        frame_step: keep every ``frame_step``-th frame.
        resolution: ``(H,)`` (width from the aspect ratio) or ``(H, W)``; None keeps the size.
        resize_mode: aspect policy when ``(H, W)`` has another aspect ('crop', 'pad', 'stretch').
        split, num_tracks, seed: MOVi options.
        max_clips: stop after this many clips.
        overwrite: replace existing clip files (otherwise an existing file is an error).
        default_hfov_deg: field of view of the guessed intrinsics when a bag has no CameraInfo.
        progress: show a progress bar.

    Returns:
        The written clip paths, in order.
    """
    args = argparse.Namespace(topic=topic, depth_topic=depth_topic,
                              camera_info_topic=camera_info_topic,
                              depth_tolerance_ms=depth_tolerance_ms, split=split,
                              num_tracks=num_tracks, seed=seed)
    if frame_step < 1:
        raise ValueError(f'frame_step must be >= 1, got {frame_step}')
    scheme = spec.partition(':')[0]
    if frames_per_clip is None and scheme == 'bag':
        frames_per_clip = 24
    if frames_per_clip is not None and frames_per_clip < 1:
        raise ValueError(f'frames_per_clip must be >= 1, got {frames_per_clip}')
    if frames_per_clip is None:
        source = _open(spec, args, window_frames=None)  # MOVi: whole videos
        frames_per_clip = source.video_frames // frame_step
    else:
        # Segments of frames_per_clip * frame_step frames: consecutive clips do not overlap.
        source = _open(spec, args, window_frames=frames_per_clip * frame_step)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = scheme
    count = len(source) if max_clips is None else min(len(source), max_clips)
    written = []
    captured_warnings: set[str] = set()
    for index in tqdm(range(count), desc=f'convert {source.name}', unit='clip',
                      disable=not progress):
        path = out_dir / f'{prefix}_{index:06d}.npz'
        if path.exists() and not overwrite:
            raise FileExistsError(f'{path} exists; pass --overwrite to replace it')
        arrays = source.window(index, frames_per_clip, frame_step)
        if resolution is not None:
            H0, W0 = arrays['video'].shape[1:3]
            height = int(resolution[0])
            width = int(resolution[1]) if len(resolution) > 1 else max(1, round(height * W0 / H0))
            arrays = resize_window(arrays, height, width, resize_mode)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            clip = window_to_clip(arrays, default_hfov_deg=default_hfov_deg,
                                  source=f'{source.name} window {index}')
        for w in caught:  # say it once, not once per clip
            text = str(w.message).split(': ', 1)[-1]
            if text not in captured_warnings:
                captured_warnings.add(text)
                warnings.warn(f'{source.name}: {text}', stacklevel=2)
        clips.save_clip(path, clip)
        written.append(path)
    return written


def build_parser() -> argparse.ArgumentParser:
    """The ``moog_convert`` command line."""
    parser = argparse.ArgumentParser(
        prog='moog_convert', description=__doc__.split('\n\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--from', dest='source', required=True,
                        help='movi:PATH (shard or shard folder) or bag:PATH[,PATH...] (rosbag2 '
                             'directories or .mcap/.db3 files, concatenated)')
    parser.add_argument('--to', required=True, type=Path, help='output directory for the clips')
    parser.add_argument('--topic', help='bag colour image topic (Image or CompressedImage); '
                                        'default: the only image topic')
    parser.add_argument('--depth-topic', help='bag depth topic registered to the colour camera '
                                              '(16UC1 mm, 32FC1 m or compressedDepth)')
    parser.add_argument('--camera-info-topic',
                        help='bag CameraInfo topic; default: <namespace>/camera_info beside the '
                             'image topic when recorded')
    parser.add_argument('--depth-tolerance-ms', type=float, default=20.0,
                        help='largest colour/depth stamp difference for a pair (ms)')
    parser.add_argument('--frames-per-clip', type=int,
                        help='frames per clip (bags: 24; MOVi: the whole 24-frame video)')
    parser.add_argument('--frame-step', type=int, default=1,
                        help='keep every N-th frame (frame-rate subsampling)')
    parser.add_argument('--resolution', type=int, nargs='+', metavar='PX',
                        help='output size: H, or H W; one value keeps the aspect ratio')
    parser.add_argument('--resize-mode', choices=RESIZE_MODES, default='crop',
                        help='aspect policy when H W has another aspect ratio')
    parser.add_argument('--split', help='MOVi split when the folder holds several '
                                        '(train, validation, test)')
    parser.add_argument('--num-tracks', type=int, default=256,
                        help='MOVi point tracks per clip (Kubric-style sampling)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the MOVi track sampling')
    parser.add_argument('--max-clips', type=int, help='stop after this many clips')
    parser.add_argument('--overwrite', action='store_true', help='replace existing clip files')
    parser.add_argument('--default-hfov-deg', type=float, default=DEFAULT_HFOV_DEG,
                        help='horizontal field of view of the guessed intrinsics for bags '
                             'without CameraInfo')
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``moog_convert``."""
    args = build_parser().parse_args(argv)
    if args.resolution is not None and len(args.resolution) > 2:
        build_parser().error('--resolution takes H or H W')
    start = time.perf_counter()
    try:
        written = convert(
            args.source, args.to, topic=args.topic, depth_topic=args.depth_topic,
            camera_info_topic=args.camera_info_topic, depth_tolerance_ms=args.depth_tolerance_ms,
            frames_per_clip=args.frames_per_clip, frame_step=args.frame_step,
            resolution=args.resolution, resize_mode=args.resize_mode, split=args.split,
            num_tracks=args.num_tracks, seed=args.seed, max_clips=args.max_clips,
            overwrite=args.overwrite, default_hfov_deg=args.default_hfov_deg)
    except (OSError, ValueError, RuntimeError) as err:
        print(f'moog_convert: error: {err}', file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - start
    print(f'wrote {len(written)} clips to {args.to} in {elapsed:.1f} s')
    return 0


if __name__ == '__main__':
    sys.exit(main())

#!/usr/bin/env python3
"""Regenerate the bundled sample bag ``samples/moog_sample.mcap`` (deterministic, a few seconds).

    .venv/bin/python scripts/make_sample_bag.py [--out samples/moog_sample.mcap]

The bag is what a robot camera driver would record, made from generated scenes
(``moog_ros.training.generate``, seeds from 900000 on, which training never uses):

- ``/camera/image_raw/compressed``  sensor_msgs/CompressedImage, JPEG (``rgb8; jpeg compressed
  bgr8``, image_transport's format string), 160x120 at 12 fps;
- ``/camera/camera_info``           sensor_msgs/CameraInfo with the renderer's true intrinsics
  (no distortion), one per frame with the frame's header;
- ``/camera/depth/image_raw``       sensor_msgs/Image ``16UC1`` ground-truth z-depth in
  millimetres (0 = unknown, REP 118), registered to the colour camera;
- ``/ground_truth/boxes``           vision_msgs/Detection2DArray, the renderer's box of every
  object seen in the frame (input pixels; ``Detection2D.id`` and the hypothesis' ``class_id``
  are ``gt<k>``, score 1). The demo seeds the node's box tracks from each scene's first frame
  of these, as a detector would, and scores the tracked boxes against the rest.

Header frame_id is ``camera_optical_frame``; bag times equal header stamps. The clips follow each
other with a 2.5 s pause, longer than the node's default ``reset_gap`` (2 s), so each clip starts
from a fresh model state, as after a camera restart.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
from pathlib import Path
import shutil
import tempfile

import cv2
import numpy as np
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / 'samples' / 'moog_sample.mcap'
FIRST_SEED = 900_000  # generator seeds from here on are reserved for samples (never trained on)
FRAME_ID = 'camera_optical_frame'
IMAGE_TOPIC = '/camera/image_raw/compressed'
INFO_TOPIC = '/camera/camera_info'
DEPTH_TOPIC = '/camera/depth/image_raw'
BOXES_TOPIC = '/ground_truth/boxes'
START_NS = 1_700_000_000 * 10**9  # a fixed wall-clock-like epoch, so the bag is reproducible


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', type=Path, default=DEFAULT_OUT,
                        help=f'the .mcap file to write (default {DEFAULT_OUT.relative_to(REPO)})')
    parser.add_argument('--seed', type=int, default=FIRST_SEED,
                        help=f'generator run seed (default {FIRST_SEED}; keep it >= {FIRST_SEED})')
    parser.add_argument('--clips', type=int, default=3, help='number of scenes (default 3)')
    parser.add_argument('--frames', type=int, default=36,
                        help='frames per scene (default 36 = 3 s at 12 fps)')
    parser.add_argument('--width', type=int, default=160, help='image width (default 160)')
    parser.add_argument('--height', type=int, default=120, help='image height (default 120)')
    parser.add_argument('--jpeg-quality', type=int, default=90,
                        help='JPEG quality 1-100 (default 90)')
    parser.add_argument('--gap', type=float, default=2.5,
                        help='seconds of silence between scenes (default 2.5)')
    args = parser.parse_args(argv)
    for name in ('clips', 'frames'):
        if getattr(args, name) < 1:
            parser.error(f'--{name} must be >= 1')
    if not 1 <= args.jpeg_quality <= 100:
        parser.error('--jpeg-quality must be in 1..100')
    if args.gap < 0:
        parser.error('--gap must be >= 0')
    if args.out.suffix != '.mcap':
        parser.error('--out must end in .mcap')
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from moog_ros.tools.bagio import BagWriter, mcap_file
    from moog_ros.training.generate import PRESETS, generate_clip

    base = PRESETS['movi_e']
    cfg = dataclasses.replace(
        base, num_tracks=64,  # the bag carries no tracks; fewer makes generation faster
        scene=dataclasses.replace(base.scene, width=args.width, height=args.height,
                                  num_frames=args.frames))
    period_ns = round(1e9 / cfg.scene.fps)
    W, H = args.width, args.height
    with tempfile.TemporaryDirectory(prefix='moog_sample_') as tmp:
        bag_dir = Path(tmp) / args.out.stem
        with BagWriter(bag_dir) as writer:
            # rosbags' message classes: their serialiser zeroes CDR padding (reproducible bytes).
            types = writer.typestore.types
            Header, Time = types['std_msgs/msg/Header'], types['builtin_interfaces/msg/Time']
            CompressedImage, Image = (types['sensor_msgs/msg/CompressedImage'],
                                      types['sensor_msgs/msg/Image'])
            CameraInfo, Roi = (types['sensor_msgs/msg/CameraInfo'],
                               types['sensor_msgs/msg/RegionOfInterest'])

            def boxes_msg(header, boxes_xyxy, valid):  # [K, 4], [K] -> Detection2DArray
                detections = []
                for k in np.flatnonzero(valid):
                    x0, y0, x1, y1 = (float(v) for v in boxes_xyxy[k])
                    pose = types['geometry_msgs/msg/PoseWithCovariance'](
                        pose=types['geometry_msgs/msg/Pose'](
                            position=types['geometry_msgs/msg/Point'](x=0.0, y=0.0, z=0.0),
                            orientation=types['geometry_msgs/msg/Quaternion'](
                                x=0.0, y=0.0, z=0.0, w=1.0)),
                        covariance=np.zeros(36))
                    hypothesis = types['vision_msgs/msg/ObjectHypothesisWithPose'](
                        hypothesis=types['vision_msgs/msg/ObjectHypothesis'](
                            class_id=f'gt{k}', score=1.0), pose=pose)
                    bbox = types['vision_msgs/msg/BoundingBox2D'](
                        center=types['vision_msgs/msg/Pose2D'](
                            position=types['vision_msgs/msg/Point2D'](
                                x=0.5 * (x0 + x1), y=0.5 * (y0 + y1)), theta=0.0),
                        size_x=x1 - x0, size_y=y1 - y0)
                    detections.append(types['vision_msgs/msg/Detection2D'](
                        header=header, results=[hypothesis], bbox=bbox, id=f'gt{k}'))
                return types['vision_msgs/msg/Detection2DArray'](header=header,
                                                                  detections=detections)
            stamp_ns = START_NS
            for index in tqdm(range(args.clips), desc='scenes', unit='scene'):
                clip = generate_clip(cfg, args.seed, index)
                K = clip.intrinsics.astype(np.float64)
                for t in range(clip.video.shape[0]):
                    header = Header(stamp=Time(sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9),
                                    frame_id=FRAME_ID)
                    ok, jpeg = cv2.imencode('.jpg', cv2.cvtColor(clip.video[t], cv2.COLOR_RGB2BGR),
                                            [cv2.IMWRITE_JPEG_QUALITY, args.jpeg_quality])
                    if not ok:
                        raise RuntimeError(f'JPEG encoding failed for scene {index} frame {t}')
                    writer.write_typed(IMAGE_TOPIC, stamp_ns, CompressedImage(
                        header=header, format='rgb8; jpeg compressed bgr8',
                        data=jpeg.reshape(-1)))
                    # A rectified pinhole camera: zero distortion, P = [K | 0].
                    writer.write_typed(INFO_TOPIC, stamp_ns, CameraInfo(
                        header=header, height=H, width=W, distortion_model='plumb_bob',
                        d=np.zeros(5), k=K.ravel(), r=np.eye(3).ravel(),
                        p=np.hstack([K, np.zeros((3, 1))]).ravel(), binning_x=0, binning_y=0,
                        roi=Roi(x_offset=0, y_offset=0, height=0, width=0, do_rectify=False)))
                    # 16UC1 millimetres: 0 where unknown or beyond 65.535 m (REP 118).
                    depth_mm = np.nan_to_num(clip.depth[t] * 1000.0, nan=0.0).round()
                    depth_mm[(depth_mm < 0) | (depth_mm > 65535)] = 0
                    writer.write_typed(DEPTH_TOPIC, stamp_ns, Image(
                        header=header, height=H, width=W, encoding='16UC1', is_bigendian=0,
                        step=2 * W, data=depth_mm.astype('<u2').reshape(-1).view(np.uint8)))
                    writer.write_typed(BOXES_TOPIC, stamp_ns, boxes_msg(
                        header, clip.boxes_xyxy[:, t], clip.boxes_valid[:, t]))
                    stamp_ns += period_ns
                stamp_ns += round(args.gap * 1e9) - period_ns
            counts = dict(writer.counts)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(mcap_file(bag_dir), args.out)
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(f'wrote {args.out}: {args.out.stat().st_size / 1e6:.2f} MB, '
          f'{", ".join(f"{t} {n}" for t, n in counts.items())} messages; sha256 {digest}')


if __name__ == '__main__':
    main()

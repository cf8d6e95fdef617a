#!/usr/bin/env python3
"""End-to-end latency and throughput of the live node at several camera rates.

A camera stand-in runs in its own process (as a driver would) and publishes frames plus
CameraInfo at each rate; the node (``MoogNode``, the real lifecycle node) runs here with a
multi-threaded executor, and a subscriber records when each ``tracks`` message arrives.

Per rate it prints:

- ``latency p50/p95``: frame received by the node -> its last output published (the node's
  own measurement: conversion, model step, publishing, plus any wait behind the frame in
  flight);
- ``e2e p50/p95``: header stamp (set by the camera process) -> ``tracks`` received here, so DDS
  transport both ways is included;
- throughput (processed frames per second); frames sent by the camera, received by the node,
  and dropped before the model (replaced while waiting, or older than ``max_frame_age``);
- where the per-frame time went: model ``step`` versus conversion (message -> RGB), runtime
  pre/post-processing (warp, id bookkeeping, depth post-processing) and publishing; the
  ``overhead`` column is their share of the frame (goal: at most 10 %).

Random weights are used unless ``--checkpoint`` is given (speed does not depend on them).

    ROS_DOMAIN_ID=63 .venv/bin/python bench/bench_node.py --preset small --rates 15 30 60
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
from pathlib import Path
import tempfile
import threading
import time

import numpy as np
from tqdm import tqdm


def _camera(rate_hz: float, seconds: float, width: int, height: int, encoding: str,
            domain_id: int, ready: mp.Event, sent: mp.Value) -> None:
    """The camera stand-in (child process): publishes frames at ``rate_hz`` for ``seconds``."""
    import cv2
    import rclpy
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CameraInfo, CompressedImage, Image
    from std_msgs.msg import Header

    from moog_ros.ros import conversions as conv

    rclpy.init(domain_id=domain_id)
    node = rclpy.create_node('bench_camera')
    qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT)
    compressed = encoding == 'jpeg'
    image_pub = node.create_publisher(CompressedImage if compressed else Image,
                                      'image/compressed' if compressed else 'image', qos)
    info_pub = node.create_publisher(CameraInfo, 'camera_info', qos)
    # A moving pattern, so the model sees motion (and jpeg has real content to code).
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    frames = [np.stack([(x + 8 * k) % 256, (y + 4 * k) % 256, (x + y) % 256], -1)
              .astype(np.uint8) for k in range(16)]
    jpegs = [cv2.imencode('.jpg', f[..., ::-1])[1].tobytes() for f in frames] if compressed \
        else []
    info = CameraInfo(width=width, height=height, distortion_model='plumb_bob')
    f = 0.8 * width
    info.k = [f, 0.0, (width - 1) / 2, 0.0, f, (height - 1) / 2, 0.0, 0.0, 1.0]
    info.p = [f, 0.0, (width - 1) / 2, 0.0, 0.0, f, (height - 1) / 2, 0.0, 0.0, 0.0, 1.0, 0.0]
    deadline = time.monotonic() + 30
    while image_pub.get_subscription_count() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    ready.set()
    period = 1.0 / rate_hz
    start = time.monotonic()
    k = 0
    while time.monotonic() - start < seconds:
        header = Header(frame_id='camera_optical_frame')
        header.stamp = node.get_clock().now().to_msg()
        info.header = header
        info_pub.publish(info)
        if compressed:
            image_pub.publish(CompressedImage(header=header, format='jpeg',
                                              data=jpegs[k % len(jpegs)]))
        else:
            msg = conv.rgb_to_image(frames[k % len(frames)], header)
            if encoding == 'bgr8':
                msg.encoding = 'bgr8'  # same bytes, other channel order: one conversion
            image_pub.publish(msg)
        k += 1
        sent.value = k
        time.sleep(max(0.0, start + k * period - time.monotonic()))
    node.destroy_node()
    rclpy.shutdown()


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float('nan')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--checkpoint', default='',
                        help='perception checkpoint directory (default: random weights of '
                             '--preset, saved to a temporary folder)')
    parser.add_argument('--preset', default='small',
                        help='perception preset for random weights (small, tiny, paper)')
    parser.add_argument('--device', default='auto', help="torch device ('auto', 'cpu', 'cuda')")
    parser.add_argument('--rates', type=float, nargs='+', default=[15.0, 30.0, 60.0],
                        help='camera rates to test (Hz)')
    parser.add_argument('--seconds', type=float, default=8.0,
                        help='measured seconds per rate')
    parser.add_argument('--width', type=int, default=640, help='camera image width (pixels)')
    parser.add_argument('--height', type=int, default=480, help='camera image height (pixels)')
    parser.add_argument('--encoding', choices=['rgb8', 'bgr8', 'jpeg'], default='rgb8',
                        help='what the camera publishes (jpeg goes to image/compressed)')
    parser.add_argument('--grid-points', type=int, default=64,
                        help='grid_points parameter of the node')
    parser.add_argument('--visual', action='store_true',
                        help='also subscribe overlay and markers (their cost is then included)')
    parser.add_argument('--threads', type=int, default=0,
                        help='torch CPU threads (0: leave torch default)')
    args = parser.parse_args()

    # Never let DDS discovery leave this machine.
    os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    domain_id = int(os.environ.get('ROS_DOMAIN_ID', '63'))

    import rclpy
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image, PointCloud2
    import torch
    from visualization_msgs.msg import MarkerArray

    from moog_ros.model import MoogPerception, get_perception_config, save_checkpoint
    from moog_ros.ros import conversions as conv
    from moog_ros.ros.node import MoogNode

    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint = args.checkpoint
    tmp = None
    if not checkpoint:
        tmp = tempfile.TemporaryDirectory(prefix='bench_node_')
        print(f'saving random {args.preset} weights to {tmp.name} ...', flush=True)
        checkpoint = str(save_checkpoint(Path(tmp.name) / args.preset,
                                         MoogPerception(get_perception_config(args.preset))))

    rclpy.init(domain_id=domain_id)
    node = MoogNode(parameter_overrides=[
        Parameter('checkpoint', value=checkpoint), Parameter('device', value=args.device),
        Parameter('input_transport', value='compressed' if args.encoding == 'jpeg' else 'raw'),
        Parameter('grid_points', value=args.grid_points), Parameter('autostart', value=False)])
    listener = rclpy.create_node('bench_listener')
    arrivals: dict[int, float] = {}  # stamp ns -> wall time the tracks message arrived

    def on_tracks(msg: PointCloud2) -> None:
        arrivals[conv.stamp_to_ns(msg.header.stamp)] = time.time()

    reliable = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE)
    listener.create_subscription(PointCloud2, 'tracks', on_tracks, reliable)
    if args.visual:
        listener.create_subscription(Image, 'overlay', lambda m: None, reliable)
        for topic in ('tracks/markers', 'detections/markers'):
            listener.create_subscription(MarkerArray, topic, lambda m: None, reliable)
    executor = MultiThreadedExecutor(num_threads=3)
    executor.add_node(node)
    executor.add_node(listener)
    if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
        raise SystemExit('configure failed (see the log above)')
    node.trigger_activate()
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()

    rows = []
    ctx = mp.get_context('spawn')
    for rate in tqdm(args.rates, desc='rates', unit='rate'):
        ready, sent = ctx.Event(), ctx.Value('i', 0)
        camera = ctx.Process(target=_camera, args=(rate, args.seconds, args.width, args.height,
                                                   args.encoding, domain_id, ready, sent))
        camera.start()
        ready.wait(timeout=60)
        counts_before = node.monitor.counts()
        timings_before = len(node.timings)
        started = time.time()
        camera.join()
        time.sleep(1.0)  # let the last frame through
        counts = {k: v - counts_before[k] for k, v in node.monitor.counts().items()}
        timings = list(node.timings)[timings_before:]
        e2e = [(arrival - stamp / 1e9) * 1e3 for stamp, arrival in arrivals.items()
               if stamp / 1e9 >= started]
        arrivals.clear()
        total = [t.convert_ms + t.runtime_ms + t.publish_ms for t in timings]
        step = [t.step_ms for t in timings]
        rows.append({
            'rate': rate,
            'processed_hz': counts['processed'] / args.seconds,
            'sent': sent.value,
            'received': counts['received'],
            'dropped': counts['replaced'] + counts['stale'],
            'lat50': _percentile([t.latency_ms for t in timings], 50),
            'lat95': _percentile([t.latency_ms for t in timings], 95),
            'e2e50': _percentile(e2e, 50),
            'e2e95': _percentile(e2e, 95),
            'step': float(np.mean(step)) if step else float('nan'),
            'convert': float(np.mean([t.convert_ms for t in timings])) if timings else 0.0,
            'runtime': float(np.mean([t.runtime_ms - t.step_ms for t in timings]))
            if timings else 0.0,
            'publish': float(np.mean([t.publish_ms for t in timings])) if timings else 0.0,
            'overhead': 1.0 - sum(step) / sum(total) if total else float('nan'),
        })

    node.trigger_deactivate()
    device = str(node.runtime.device)
    node.trigger_cleanup()
    executor.shutdown()
    node.destroy_node()
    listener.destroy_node()
    rclpy.try_shutdown()
    if tmp is not None:
        tmp.cleanup()

    print(f'\nmoog_node, {args.preset if not args.checkpoint else checkpoint} on {device}, '
          f'{args.width}x{args.height} {args.encoding}, grid_points {args.grid_points}'
          f'{", overlay+markers subscribed" if args.visual else ""}; times in ms')
    header = (f'{"rate Hz":>7} {"proc Hz":>7} {"sent":>5} {"recv":>5} {"drop":>5} {"lat p50":>8} '
              f'{"lat p95":>8} {"e2e p50":>8} {"e2e p95":>8} {"step":>7} {"convert":>7} '
              f'{"runtime":>7} {"publish":>7} {"overhead":>8}')
    print(header)
    print('-' * len(header))
    for r in rows:
        print(f'{r["rate"]:7.1f} {r["processed_hz"]:7.1f} {r["sent"]:5d} {r["received"]:5d} '
              f'{r["dropped"]:5d} '
              f'{r["lat50"]:8.1f} {r["lat95"]:8.1f} {r["e2e50"]:8.1f} {r["e2e95"]:8.1f} '
              f'{r["step"]:7.1f} {r["convert"]:7.2f} {r["runtime"]:7.2f} {r["publish"]:7.2f} '
              f'{100 * r["overhead"]:7.1f}%')
    print('sent: camera frames; recv: frames that reached the node (the rest were lost in DDS);'
          ' drop: replaced while waiting or stale.')
    print('overhead = (convert + runtime pre/post + publish) / frame time; goal <= 10 %.')


if __name__ == '__main__':
    main()

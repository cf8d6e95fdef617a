#!/usr/bin/env python3
"""Fuzz + soak of the real node: hostile messages on every input, then a long run.

The node runs as its own process (the ``moog_node`` console script, parameters from
``config/moog.yaml``); this process is an independent client on loopback (discovery confined
to this machine, its own ``ROS_DOMAIN_ID``). Per image transport (``raw`` and ``compressed``,
one node process each):

1. **warm-up**: good frames (a moving pattern, with CameraInfo) until outputs arrive; the
   track ids of the last output are remembered;
2. **fuzz**: ``--fuzz-messages`` hostile messages spread over every input -- the image topic
   of the transport, ``camera_info``, ``detections_in``, ``~/add_points``,
   ``~/add_points_batch``, ``~/add_box`` -- with a good frame after every ``--good-every``
   bad ones (the good frames are what "good frames that got outputs" counts);
3. **services**: bursts of ``~/clear_points`` and ``~/reset`` calls (they legitimately end
   tracks, so they come after the id-continuity check);
4. **recovery**: ``--recovery-frames`` good frames, each waited for;
5. **soak** (raw only): ``--soak-frames`` good frames in lock-step (each waits for its
   output), re-seeding tracks with ``~/clear_points`` every ``--reseed-every`` frames and a
   clicked point every 50 frames.

Printed per transport: crashes (the node process died), good frames with outputs, whether the
track ids of the warm-up continued through the fuzz (and resets counted meanwhile), RSS of the
node process (start / max / end, sampled every 0.25 s), log lines per kind (the node's stderr:
lines per kind, the most lines of one kind in any 5 s, the longest line, lines that are not ROS
log lines = native noise), drops by kind from ``/diagnostics``; for the soak the node's step
p50/p95 (``/diagnostics``, the last 200 frames of each 500-frame block), the client's
round-trip p50/p95 per block and the RSS per block.

Defaults are sized for a 2-core machine (a few minutes with the tiny random-weight model);
the issue's full version is ``--fuzz-messages 10000 --soak-frames 3000``.

    ROS_DOMAIN_ID=62 .venv/bin/python bench/fuzz_soak.py
    ROS_DOMAIN_ID=62 .venv/bin/python bench/fuzz_soak.py --fuzz-messages 10000 --checkpoint DIR
"""
from __future__ import annotations

import argparse
from collections import defaultdict
import json
import os
from pathlib import Path
import re
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib

import numpy as np

REPO = Path(__file__).resolve().parents[1]
W, H = 64, 48
INPUTS = ('image', 'camera_info', 'detections_in', 'add_points', 'add_points_batch', 'add_box')
ROS_LINE = re.compile(r'^\[(DEBUG|INFO|WARN|ERROR|FATAL)\] \[(\d+)\.(\d+)\] \[[^\]]*\]: (.*)$')


# ------------------------------------------------------------------------------------------------
# Hostile payloads.
# ------------------------------------------------------------------------------------------------

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))


def png_bomb(width: int, height: int) -> bytes:
    """A small PNG whose IHDR claims ``width x height`` (a decompression bomb's header)."""
    ihdr = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
    return (b'\x89PNG\r\n\x1a\n' + _png_chunk(b'IHDR', ihdr)
            + _png_chunk(b'IDAT', zlib.compress(bytes(4096))) + _png_chunk(b'IEND', b''))


def jpeg_claiming(jpeg: bytes, width: int, height: int) -> bytes:
    """``jpeg`` with its frame header (SOF0) patched to claim another size."""
    data = bytearray(jpeg)
    at = data.find(b'\xff\xc0')
    data[at + 5:at + 7] = height.to_bytes(2, 'big')
    data[at + 7:at + 9] = width.to_bytes(2, 'big')
    return bytes(data)


class Hostile:
    """Makes the hostile messages of each input, cycling through many variants."""

    def __init__(self, rng: np.random.Generator, stamp_ns) -> None:
        import cv2
        self.cv2 = cv2
        self.rng = rng
        self.stamp_ns = stamp_ns  # () -> a current stamp (ns)
        rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        self.jpeg = cv2.imencode('.jpg', rgb)[1].tobytes()
        self.png = cv2.imencode('.png', rgb)[1].tobytes()

    def _header(self, stamp_ns: int | None = None):
        from rclpy.time import Time
        from std_msgs.msg import Header
        return Header(stamp=Time(nanoseconds=self.stamp_ns() if stamp_ns is None
                                 else stamp_ns).to_msg(), frame_id='camera_optical_frame')

    def image(self, k: int):
        from sensor_msgs.msg import Image
        rng = self.rng
        header = self._header()
        # (encoding, height, width, step, data)
        variants = [
            ('hsv8', H, W, 3 * W, bytes(3 * W * H)),
            ('rgb8', H, W, 3 * W, bytes(100)),
            ('rgb8', 100000, 100000, 300000, bytes(64)),
            ('rgb8', 1, 1, 3, bytes(3)),
            ('rgb8', 0, 0, 0, b''),
            ('rgb8', H, W, 0, bytes(3 * W * H)),
            ('32FC1', H, W, 4 * W, np.full(W * H, np.nan, np.float32).tobytes()),
            ('32FC1', H, W, 4 * W, rng.random(W * H, dtype=np.float32).tobytes()),
            ('mono16', H, W, 2 * W, rng.integers(0, 65535, W * H, dtype=np.uint16).tobytes()),
            ('rgba8', H, W, 4 * W, rng.integers(0, 256, 4 * W * H, dtype=np.uint8).tobytes()),
            ('bayer_gbrg16', H, W, 2 * W,
             rng.integers(0, 65535, W * H, dtype=np.uint16).tobytes()),
            ('rgb8', 40, 40, 120, rng.integers(0, 256, 4800, dtype=np.uint8).tobytes()),
            ('yuv422', H, W - 1, 2 * W, bytes(2 * W * H)),
            ('', H, W, 3 * W, bytes(3 * W * H)),
        ]
        fields = variants[k % len(variants)]
        if k % len(variants) == 3 and k % 2:  # a valid stream frame stamped in 2038
            fields = ('rgb8', H, W, 3 * W,
                      rng.integers(0, 256, 3 * W * H, dtype=np.uint8).tobytes())
            header = self._header(2_145_000_000 * 10**9)
        encoding, height, width, step, data = fields
        return Image(header=header, encoding=encoding, height=height, width=width, step=step,
                     is_bigendian=0, data=data)

    def compressed(self, k: int):
        from sensor_msgs.msg import CompressedImage
        garbled = bytearray(self.jpeg)
        start = garbled.find(b'\xff\xda') + 20
        garbled[start:-2] = self.rng.integers(0, 255, len(garbled) - 2 - start,
                                              dtype=np.uint8).tobytes()
        variants = [
            ('jpeg', b'\xff\xd8\xff\xe0 not really a jpeg'),
            ('jpeg', self.jpeg[:len(self.jpeg) // 2]),
            ('png', self.png[:len(self.png) // 2]),
            ('png', png_bomb(20000, 20000)),
            ('jpeg', jpeg_claiming(self.jpeg, 20000, 20000)),
            ('jpeg', jpeg_claiming(self.jpeg, 65500, 65500)),
            ('jpeg', bytes(garbled)),
            ('png', self.rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()),
            ('webp', b'RIFF....WEBP'),
            ('16UC1; compressedDepth png', self.png),
            ('jpeg', b''),
            ('jpeg', jpeg_claiming(self.jpeg, 40, 40)),
        ]
        fmt, data = variants[k % len(variants)]
        return CompressedImage(header=self._header(), format=fmt, data=data)

    def camera_info(self, k: int):
        from sensor_msgs.msg import CameraInfo
        ks = [
            [0.0] * 9,
            [float('nan')] * 9,
            [-50.0, 0, 31.5, 0, -50.0, 23.5, 0, 0, 1],
            [50.0, 50.0, 0, 50.0, 50.0, 0, 0, 0, 1],  # fx, fy > 0, k8 = 1, singular
            [1e308, 0, 1e308, 0, 1e308, 1e308, 0, 0, 1],
            [50.0, 0, 31.5, 0, 50.0, 23.5, 0, 0, 2.0],
        ]
        info = CameraInfo(header=self._header(), width=W, height=H, distortion_model='plumb_bob')
        info.k = [float(v) for v in ks[k % len(ks)]]
        return info

    def detections(self, k: int):
        from vision_msgs.msg import Detection2D, Detection2DArray

        def box(cx, cy, w, h):
            det = Detection2D()
            det.bbox.center.position.x, det.bbox.center.position.y = float(cx), float(cy)
            det.bbox.size_x, det.bbox.size_y = float(w), float(h)
            return det
        if not hasattr(self, '_many'):  # 10,000 detections take a while to build: once
            self._many = [box(30, 20, 8, 8) for _ in range(10000)]
        variants = [
            [box(float('nan'), 10, 5, 5)],
            [box(10, 10, -5, 5)],
            [box(1e308, 1e308, 1e308, 1e308)],
            [box(10, 10, 0, 0)],
            self._many,
            [box(-1e6, -1e6, 4, 4)],
        ]
        return Detection2DArray(header=self._header(), detections=variants[k % len(variants)])

    def point(self, k: int):
        from geometry_msgs.msg import PointStamped
        values = [(float('nan'), 1.0), (1e308, 1e308), (-5.0, -5.0), (float('inf'), 0.0),
                  (1e9, 3.0)]
        msg = PointStamped(header=self._header())
        msg.point.x, msg.point.y = values[k % len(values)]
        return msg

    def cloud(self, k: int):
        from sensor_msgs.msg import PointCloud2, PointField
        f32 = PointField.FLOAT32
        uv = [PointField(name='u', offset=0, datatype=f32, count=1),
              PointField(name='v', offset=4, datatype=f32, count=1)]
        variants = [
            (uv, 0, 4, bytes(32)),                                         # point_step 0
            (uv, 4, 4, bytes(64)),                                         # smaller than u, v
            ([uv[0], PointField(name='v', offset=64, datatype=f32, count=1)], 8, 4, bytes(32)),
            (uv, 8, 10**9, bytes(64)),                                     # huge count
            (uv, 8, 5000, np.full(10000, 30.0, np.float32).tobytes()),     # over the limit
            (uv, 8, 4, np.full(8, np.nan, np.float32).tobytes()),
            ([PointField(name='u', offset=0, datatype=PointField.INT32, count=1), uv[1]], 8, 4,
             bytes(32)),
            ([PointField(name='w', offset=0, datatype=f32, count=1)], 8, 4, bytes(32)),
            (uv, 8, 900, np.full(1800, 1e30, np.float32).tobytes()),      # outside the view
        ]
        fields, step, count, data = variants[k % len(variants)]
        return PointCloud2(header=self._header(), height=1, width=count, fields=fields,
                           is_bigendian=False, point_step=step, row_step=step * count,
                           data=data, is_dense=True)

    def add_box(self, k: int):
        from vision_msgs.msg import Detection2D
        values = [(float('nan'), 0, 5, 5), (10, 10, 0, 5), (1e308, 1e308, 1, 1),
                  (-1e5, -1e5, 2, 2)]
        det = Detection2D()
        (det.bbox.center.position.x, det.bbox.center.position.y, det.bbox.size_x,
         det.bbox.size_y) = (float(v) for v in values[k % len(values)])
        return det


# ------------------------------------------------------------------------------------------------
# The client.
# ------------------------------------------------------------------------------------------------

class Client:
    """Publishers for every input of namespace ``ns``, recorders for tracks and diagnostics."""

    def __init__(self, context, ns: str, transport: str) -> None:
        from diagnostic_msgs.msg import DiagnosticArray
        from geometry_msgs.msg import PointStamped
        from rclpy.node import Node
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
        from std_srvs.srv import Trigger
        from vision_msgs.msg import Detection2D, Detection2DArray

        self.node = Node(f'fuzz_client_{transport}', context=context)
        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self.lock = threading.Condition()
        self.outputs: dict[int, tuple[float, list[int]]] = {}  # stamp -> (received s, ids)
        self.diagnostics: list[dict[str, str]] = []
        p = f'/{ns}/'
        self.node.create_subscription(PointCloud2, p + 'tracks', self._on_tracks, reliable)
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diag, reliable)
        self.transport = transport
        if transport == 'compressed':
            self.image = self.node.create_publisher(CompressedImage, p + 'image/compressed',
                                                    reliable)
        else:
            self.image = self.node.create_publisher(Image, p + 'image', reliable)
        self.info = self.node.create_publisher(CameraInfo, p + 'camera_info', reliable)
        self.detections = self.node.create_publisher(Detection2DArray, p + 'detections_in',
                                                     reliable)
        self.point = self.node.create_publisher(PointStamped, p + 'moog/add_points', reliable)
        self.cloud = self.node.create_publisher(PointCloud2, p + 'moog/add_points_batch',
                                                reliable)
        self.box = self.node.create_publisher(Detection2D, p + 'moog/add_box', reliable)
        self.reset = self.node.create_client(Trigger, p + 'moog/reset')
        self.clear = self.node.create_client(Trigger, p + 'moog/clear_points')
        self.Trigger = Trigger
        self.last_stamp_ns = 0

    def _on_tracks(self, msg) -> None:
        from moog_ros.ros.conversions import TRACK_POINT_DTYPE
        stamp = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
        ids = np.frombuffer(bytes(msg.data), TRACK_POINT_DTYPE)['track_id'].tolist()
        with self.lock:
            self.outputs[stamp] = (time.monotonic(), ids)
            self.lock.notify_all()

    def _on_diag(self, msg) -> None:
        for status in msg.status:
            if status.name.endswith(': pipeline') and status.hardware_id:
                values = {kv.key: kv.value for kv in status.values}
                with self.lock:
                    self.diagnostics.append(values)

    def stamp_ns(self) -> int:
        """Now on the node clock, strictly after every stamp sent so far."""
        now = self.node.get_clock().now().nanoseconds
        self.last_stamp_ns = max(now, self.last_stamp_ns + 1_000_000)
        return self.last_stamp_ns

    def good_frame(self, k: int) -> int:
        """Publishes CameraInfo and a good frame (a moving pattern); returns its stamp."""
        import cv2
        from rclpy.time import Time
        from sensor_msgs.msg import CameraInfo, CompressedImage
        from std_msgs.msg import Header

        from moog_ros.ros import conversions as conv
        stamp = self.stamp_ns()
        header = Header(stamp=Time(nanoseconds=stamp).to_msg(), frame_id='camera_optical_frame')
        x, y = np.meshgrid(np.arange(W), np.arange(H))
        rgb = np.stack([(x + 2 * k) % 256, (y + k) % 256, (x * y + k) % 256], -1).astype(np.uint8)
        info = CameraInfo(header=header, width=W, height=H, distortion_model='plumb_bob')
        info.k = [50.0, 0.0, (W - 1) / 2, 0.0, 50.0, (H - 1) / 2, 0.0, 0.0, 1.0]
        info.p = [50.0, 0.0, (W - 1) / 2, 0.0, 0.0, 50.0, (H - 1) / 2, 0.0, 0.0, 0.0, 1.0, 0.0]
        self.info.publish(info)
        if self.transport == 'compressed':
            self.image.publish(CompressedImage(header=header, format='jpeg', data=cv2.imencode(
                '.jpg', rgb[..., ::-1])[1].tobytes()))
        else:
            self.image.publish(conv.rgb_to_image(rgb, header))
        return stamp

    def wait_output(self, stamp: int, timeout: float) -> list[int] | None:
        deadline = time.monotonic() + timeout
        with self.lock:
            while stamp not in self.outputs:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self.lock.wait(remaining)
            return self.outputs[stamp][1]

    def call(self, client) -> None:
        client.call_async(self.Trigger.Request())  # not awaited: a burst


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f'/proc/{pid}/status').read_text().splitlines():
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float('nan')


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.samples, self.stop = pid, [], threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.monotonic(), rss_mb(self.pid)))
            self.stop.wait(0.25)


def log_kind(text: str) -> str:
    """A log line's kind: the node's ``[kind]`` prefix, else its text with numbers, quotes and
    lists blanked, first 6 words."""
    match = re.match(r'\[([^\]]+)\] ', text)
    if match:
        return match.group(1)
    text = re.sub(r"'[^']*'|\[[^\]]*\]|\([^)]*\)", '_', text)
    text = re.sub(r'[-+]?\d[\d.e+-]*', '#', text)
    return ' '.join(text.split()[:6])


def analyse_log(path: Path, since_s: float) -> dict:
    """Lines per kind, the most lines of one kind in any 5 s, longest line, native noise."""
    times: dict[str, list[float]] = defaultdict(list)
    native, longest = [], 0
    for raw in path.read_bytes().splitlines():
        line = raw.decode('utf-8', 'replace')
        longest = max(longest, len(raw))
        match = ROS_LINE.match(line)
        if not match:
            if line.strip():
                native.append(line[:120])
            continue
        t = int(match.group(2)) + int(match.group(3)) / 1e9
        if t >= since_s:
            times[log_kind(match.group(4))].append(t)
    worst = {}
    for kind, ts in times.items():
        ts = np.sort(ts)
        worst[kind] = int(max(np.searchsorted(ts, t + 5.0) - k for k, t in enumerate(ts)))
    return {'lines_per_kind': {k: len(v) for k, v in sorted(times.items())},
            'max_per_kind_in_5s': max(worst.values(), default=0),
            'kinds_over_1_per_5s': sorted(k for k, v in worst.items() if v > 1),
            'longest_line_bytes': longest, 'native_lines': len(native),
            'native_examples': native[:5]}


def start_node(args, ns: str, transport: str, checkpoint: Path, log_path: Path,
               env: dict) -> subprocess.Popen:
    command = [str(Path(sys.prefix) / 'bin' / 'moog_node'), '--ros-args',
               '--params-file', str(REPO / 'config' / 'moog.yaml'),
               '-p', f'checkpoint:={checkpoint}', '-p', f'input_transport:={transport}',
               '-p', 'max_frame_age:=0.0', '-p', 'device:=cpu', '-r', f'__ns:=/{ns}']
    for param in args.node_param:
        command += ['-p', param]
    return subprocess.Popen(command, stdout=log_path.open('wb'), stderr=subprocess.STDOUT,
                            env=env)


def percentiles(values) -> str:
    if not len(values):
        return 'n/a'
    p50, p95 = np.percentile(values, [50, 95])
    return f'{p50:.1f}/{p95:.1f}'


def run_transport(args, context, executor, transport: str, checkpoint: Path, out: Path,
                  env: dict) -> dict:
    ns = f'fuzz_{transport}'
    log_path = out / f'node_{transport}.log'
    process = start_node(args, ns, transport, checkpoint, log_path, env)
    client = Client(context, ns, transport)
    executor.add_node(client.node)
    report: dict = {'transport': transport}
    sampler = None
    try:
        # --- warm-up: until the node answers.
        deadline = time.monotonic() + args.startup_timeout
        ids_before = None
        k = 0
        while ids_before is None:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f'{transport} node did not start (exit {process.poll()}); '
                                   f'see {log_path}')
            if client.image.get_subscription_count():
                ids_before = client.wait_output(client.good_frame(k), 1.0)
                k += 1
            else:
                time.sleep(0.2)
        for _ in range(10):
            ids_before = client.wait_output(client.good_frame(k), 10.0) or ids_before
            k += 1
        sampler = RssSampler(process.pid)
        sampler.start()
        time.sleep(0.3)
        log_start = time.time()
        diag_start = dict(client.diagnostics[-1]) if client.diagnostics else {}

        # --- fuzz.
        hostile = Hostile(np.random.default_rng(args.seed), client.stamp_ns)
        image_maker = hostile.compressed if transport == 'compressed' else hostile.image
        every = {'image': [(client.image, image_maker)] * 4,
                 'camera_info': [(client.info, hostile.camera_info)],
                 'detections_in': [(client.detections, hostile.detections)],
                 'add_points': [(client.point, hostile.point)],
                 'add_points_batch': [(client.cloud, hostile.cloud)],
                 'add_box': [(client.box, hostile.add_box)]}
        inputs = [entry for name in args.inputs for entry in every[name]]
        good_sent, good_stamps = 0, []
        sent = defaultdict(int)  # per message maker: each cycles through its variants, so
        # consecutive images are of different kinds (4 alike in a row would be a sustained
        # change of stream, which the node is right to follow)
        start = last_good = time.monotonic()
        for n in range(args.fuzz_messages):
            publisher, make = inputs[n % len(inputs)]
            publisher.publish(make(sent[make]))
            sent[make] += 1
            # A good frame every --good-every bad ones, and at least every --good-period s
            # (a camera pausing longer than reset_gap would reset the state by design).
            if (n % args.good_every == args.good_every - 1
                    or time.monotonic() - last_good > args.good_period):
                last_good = time.monotonic()
                good_stamps.append(client.good_frame(k))
                k += 1
                good_sent += 1
            time.sleep(args.fuzz_period)
            if process.poll() is not None:
                break
        fuzz_s = time.monotonic() - start
        time.sleep(1.0)
        with client.lock:
            got = sum(s in client.outputs for s in good_stamps)
        last_fuzz = max((s for s in good_stamps if s in client.outputs), default=None)
        ids_after = client.outputs[last_fuzz][1] if last_fuzz is not None else []
        diag_fuzz = dict(client.diagnostics[-1]) if client.diagnostics else {}
        report['fuzz'] = {
            'messages': args.fuzz_messages, 'seconds': round(fuzz_s, 1),
            'good_frames': good_sent, 'good_with_outputs': got,
            'good_fraction': round(got / max(1, good_sent), 3),
            'ids_before': len(ids_before), 'ids_continued': bool(set(ids_before)
                                                                 & set(ids_after)),
            'ids_kept': len(set(ids_before) & set(ids_after)),
            'resets_during_fuzz': int(diag_fuzz.get('state_resets', 0))
            - int(diag_start.get('state_resets', 0)),
        }

        # --- services: bursts (they end tracks by design, so after the continuity check).
        if client.reset.wait_for_service(timeout_sec=5.0):
            for _ in range(args.service_calls):
                client.call(client.clear)
                client.call(client.reset)
        time.sleep(0.5)

        # --- recovery.
        recovered = 0
        for _ in range(args.recovery_frames):
            recovered += client.wait_output(client.good_frame(k), 2.0) is not None
            k += 1
        report['recovery'] = {'frames': args.recovery_frames, 'with_outputs': recovered}

        # --- soak (raw only).
        if transport == 'raw' and args.soak_frames:
            blocks = []
            block_rtt, block_start_rss = [], rss_mb(process.pid)
            soak_ids_seen = set()
            misses = 0
            for f in range(args.soak_frames):
                if f and f % args.reseed_every == 0:
                    client.call(client.clear)  # every track ends; the grid re-seeds
                if f % 50 == 25:
                    click = hostile.point(0)
                    click.point.x, click.point.y = 20.0 + f % 20, 20.0
                    client.point.publish(click)
                t0 = time.monotonic()
                stamp = client.good_frame(k)
                k += 1
                ids = client.wait_output(stamp, 2.0)
                if ids is not None:
                    block_rtt.append((time.monotonic() - t0) * 1e3)
                    soak_ids_seen.update(ids)
                    misses = 0
                else:
                    misses += 1
                if process.poll() is not None or misses >= 20:
                    report['soak_aborted'] = f'at frame {f}: node gone or 20 frames unanswered'
                    break
                if (f + 1) % 500 == 0 or f + 1 == args.soak_frames:
                    time.sleep(args.diagnostics_wait)
                    diag = client.diagnostics[-1] if client.diagnostics else {}
                    blocks.append({
                        'frames': f + 1, 'outputs': len(block_rtt),
                        'step_ms_p50': diag.get('step_ms_p50'),
                        'step_ms_p95': diag.get('step_ms_p95'),
                        'rtt_ms_p50_p95': percentiles(block_rtt),
                        'rss_mb_start_end': f'{block_start_rss:.0f}/{rss_mb(process.pid):.0f}',
                    })
                    block_rtt, block_start_rss = [], rss_mb(process.pid)
            report['soak'] = {'frames': args.soak_frames, 'blocks': blocks,
                              'distinct_track_ids': len(soak_ids_seen)}
        sampler.stop.set()
        sampler.join()
        rss = [r for _, r in sampler.samples if np.isfinite(r)]
        report['rss_mb'] = {'start': round(rss[0], 1), 'max': round(max(rss), 1),
                            'end': round(rss[-1], 1),
                            'max_over_start': round(max(rss) / rss[0], 3)}
        final = dict(client.diagnostics[-1]) if client.diagnostics else {}
        report['dropped_by_kind'] = {k2[len('dropped_'):]: int(v) for k2, v in final.items()
                                     if k2.startswith('dropped_') and k2 != 'dropped_by_policy'}
        report['diagnostics'] = {key: final.get(key) for key in (
            'frames_received', 'frames_processed', 'frames_replaced', 'frames_dropped_invalid',
            'dropped_by_policy', 'errors', 'state_resets')}
    finally:
        report['crashes'] = int(process.poll() not in (None, 0))
        report['exit_code'] = process.poll()
        if sampler is not None:
            sampler.stop.set()
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        executor.remove_node(client.node)
        client.node.destroy_node()
    report['log'] = analyse_log(log_path, log_start if 'fuzz' in report else 0.0)
    return report


def print_report(report: dict) -> None:
    t = report['transport']
    print(f'\n=== {t} ===')
    print(f"crashes: {report['crashes']} (exit code {report['exit_code']})")
    if 'fuzz' in report:
        fz = report['fuzz']
        print(f"fuzz: {fz['messages']} hostile messages in {fz['seconds']} s; good frames with "
              f"outputs {fz['good_with_outputs']}/{fz['good_frames']} ({fz['good_fraction']:.1%})"
              f"; track ids continued: {fz['ids_continued']} ({fz['ids_kept']}/"
              f"{fz['ids_before']} kept); state resets during the fuzz: "
              f"{fz['resets_during_fuzz']}")
    if 'recovery' in report:
        rc = report['recovery']
        print(f"recovery after service bursts: {rc['with_outputs']}/{rc['frames']} frames")
    if 'rss_mb' in report:
        r = report['rss_mb']
        print(f"RSS MB start/max/end: {r['start']}/{r['max']}/{r['end']} "
              f"(max/start {r['max_over_start']})")
    lg = report['log']
    print(f"log: {sum(lg['lines_per_kind'].values())} lines, {len(lg['lines_per_kind'])} kinds, "
          f"most of one kind in 5 s: {lg['max_per_kind_in_5s']}, longest line "
          f"{lg['longest_line_bytes']} B, native (non-ROS) lines {lg['native_lines']}")
    for kind, count in lg['lines_per_kind'].items():
        print(f'  {count:5d}  {kind}')
    if lg['kinds_over_1_per_5s']:
        print(f"  kinds over 1 line per 5 s: {lg['kinds_over_1_per_5s']}")
    if lg['native_examples']:
        print(f"  native examples: {lg['native_examples']}")
    if 'dropped_by_kind' in report:
        print(f"dropped by kind (/diagnostics): {report['dropped_by_kind']}")
        print(f"diagnostics: {report['diagnostics']}")
    if 'soak' in report:
        sk = report['soak']
        print(f"soak: {sk['frames']} frames, {sk['distinct_track_ids']} distinct track ids")
        print('  frames  outputs  step p50/p95 ms  rtt p50/p95 ms  RSS MB start/end')
        for b in sk['blocks']:
            print(f"  {b['frames']:6d}  {b['outputs']:7d}  {b['step_ms_p50']}/{b['step_ms_p95']}"
                  f"  {b['rtt_ms_p50_p95']:>14}  {b['rss_mb_start_end']:>16}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--checkpoint', help='perception checkpoint (default: a random-weight '
                        '--preset model saved to a temporary directory)')
    parser.add_argument('--preset', default='tiny', help='perception preset for random weights')
    parser.add_argument('--transports', nargs='+', default=['raw', 'compressed'],
                        choices=['raw', 'compressed'])
    parser.add_argument('--fuzz-messages', type=int, default=2000)
    parser.add_argument('--inputs', nargs='+', default=list(INPUTS), choices=INPUTS,
                        help='inputs that get hostile messages (images: 4 in 9 messages)')
    parser.add_argument('--good-every', type=int, default=50)
    parser.add_argument('--good-period', type=float, default=0.5)
    parser.add_argument('--fuzz-period', type=float, default=0.004,
                        help='seconds between hostile messages')
    parser.add_argument('--service-calls', type=int, default=50)
    parser.add_argument('--recovery-frames', type=int, default=60)
    parser.add_argument('--soak-frames', type=int, default=3000)
    parser.add_argument('--reseed-every', type=int, default=250)
    parser.add_argument('--diagnostics-wait', type=float, default=1.2,
                        help='seconds to wait for a /diagnostics report after each block')
    parser.add_argument('--startup-timeout', type=float, default=120.0)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--node-param', action='append', default=[], metavar='NAME:=VALUE',
                        help='extra node parameter (repeatable), e.g. input_depth:=5')
    parser.add_argument('--out', type=Path, default=None, help='folder for node logs and '
                        'report.json (default: a temporary folder)')
    args = parser.parse_args()

    if os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST') != 'LOCALHOST':
        parser.error('ROS_AUTOMATIC_DISCOVERY_RANGE must be LOCALHOST (loopback only)')
    os.environ.pop('ROS_STATIC_PEERS', None)
    os.environ.setdefault('AMENT_PREFIX_PATH', sys.prefix)
    domain_id = int(os.environ.setdefault('ROS_DOMAIN_ID', '62'))
    out = args.out or Path(tempfile.mkdtemp(prefix='fuzz_soak_'))
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}

    import rclpy
    from rclpy.context import Context
    from rclpy.executors import MultiThreadedExecutor
    import torch

    from moog_ros.model import MoogPerception, get_perception_config, save_checkpoint

    checkpoint = Path(args.checkpoint) if args.checkpoint else None
    if checkpoint is None:
        torch.manual_seed(0)
        checkpoint = save_checkpoint(out / f'random_{args.preset}',
                                     MoogPerception(get_perception_config(args.preset)))
    context = Context()
    rclpy.init(context=context, domain_id=domain_id)
    executor = MultiThreadedExecutor(num_threads=2, context=context)
    spin = threading.Thread(target=executor.spin, daemon=True)
    spin.start()
    reports = []
    try:
        for transport in args.transports:
            report = run_transport(args, context, executor, transport, checkpoint, out, env)
            print_report(report)
            reports.append(report)
    finally:
        executor.shutdown()
        context.try_shutdown()
    (out / 'report.json').write_text(json.dumps(reports, indent=2))
    print(f'\nlogs and report.json in {out}; load average {os.getloadavg()}')
    return int(any(r['crashes'] for r in reports))


if __name__ == '__main__':
    sys.exit(main())

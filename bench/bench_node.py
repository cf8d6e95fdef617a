#!/usr/bin/env python3
"""Does the live node keep up with the camera? The real node, a camera, at several rates.

Three processes, as on a robot: the node (``MoogNode`` spun exactly as ``moog_node`` spins it:
a ``SingleThreadedExecutor`` and the node's own inference thread, autostart), a camera
stand-in publishing frames plus CameraInfo at a fixed rate, and this process, which starts a
fresh node for every repeat (so start-to-start variation shows), subscribes to ``tracks`` and
collects the node's per-frame timings when it stops.

Per configuration (torch threads, precision), rate and repeat it prints:

- ``proc %``: frames the node processed out of the frames the camera published;
- ``miss`` / ``repl`` / ``stale``: frames that never reached the node's callback (gaps in the
  publisher's sequence numbers), were replaced while waiting by a newer one, or waited longer
  than ``max_frame_age``; every skipped frame is one of these;
- ``lat p50/p95``: the node's latency, from the frame's arrival at the middleware (its
  reception timestamp) to its last output published, as ``/diagnostics`` reports it;
  ``wait p50``: arrival -> inference start; ``e2e p50``: camera publish -> ``tracks`` here;
- ``step p50/p95``: the model step after warm-up (the first ``--warmup-frames`` processed
  frames are left out), and ``p95/p50``;
- ``threads``: torch intra-op threads and all OS threads of the node process; ``cpu %``: the
  node process's CPU time over the run's wall time (200 % = both cores of a 2-core machine).

Then per rate over the repeats: the spread of step p50 ((max - min) / median) and the worst
p95/p50, against the goals of issue 11 (at 15 Hz: >= 95 % processed, p95 <= 1.5 x p50, spread
<= 20 %). The machine's load average is printed with the figures: other work on the same cores
changes them.

``--past-stamps`` stamps frames a day in the past (a bag replayed without ``--clock``); the node
must still process them and warn once (the count of warnings is printed). ``--quick``: 15 Hz,
two repeats of 5 s.

    ROS_DOMAIN_ID=53 .venv/bin/python bench/bench_node.py            # 12, 15, 30 Hz x 3
    ROS_DOMAIN_ID=53 .venv/bin/python bench/bench_node.py --quick --precision fp32 bf16
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
from pathlib import Path
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / 'models' / 'moog_small'
PAST_OFFSET_NS = 86_400 * 10**9  # --past-stamps: a day behind the clock
REPLAY_WARNING = 'look like a replay'  # the node's one warning about foreign stamps


# ------------------------------------------------------------------------------------------------
# The node process.
# ------------------------------------------------------------------------------------------------

def serve_node(params_json: str, result_path: str) -> None:
    """Runs the real node as ``moog_node`` does until SIGINT, then writes its timings as JSON."""
    import resource

    import rclpy
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
    from rclpy.parameter import Parameter

    # Only after moog_ros.ros, which sets OpenMP's wait policy before torch loads it.
    import torch

    from moog_ros.ros.node import MoogNode, _autostart

    rclpy.init()
    node = MoogNode(parameter_overrides=[Parameter(k, value=v)
                                         for k, v in json.loads(params_json).items()])
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    if not _autostart(node):
        sys.exit(1)
    wall0, cpu0 = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
    threads_seen = 0

    def sample_threads() -> None:  # the most OS threads the process had while running
        nonlocal threads_seen
        while rclpy.ok():
            status = Path('/proc/self/status').read_text()
            count = int(next(line.split()[1] for line in status.splitlines()
                             if line.startswith('Threads:')))
            threads_seen = max(threads_seen, count)
            time.sleep(0.5)

    threading.Thread(target=sample_threads, daemon=True).start()
    with contextlib.suppress(KeyboardInterrupt, ExternalShutdownException):
        executor.spin()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    result = {
        'timings': [t._asdict() for t in node.timings],
        'counts': node.monitor.counts(),
        'torch_threads': torch.get_num_threads(),
        'os_threads': threads_seen,
        'cpu_share': cpu_s / max(time.monotonic() - wall0, 1e-9),
        'precision': 'bf16' if node.runtime.autocast_dtype is not None else 'fp32',
        'device': str(node.runtime.device),
    }
    Path(result_path).write_text(json.dumps(result))
    executor.shutdown()
    node.destroy_node()
    rclpy.try_shutdown()


class NodeProcess:
    """``serve_node`` in a subprocess; ``stop()`` returns its result and log."""

    def __init__(self, params: dict, workdir: Path, tag: str) -> None:
        self.result_path = workdir / f'{tag}.json'
        self.log_path = workdir / f'{tag}.log'
        self._log = self.log_path.open('w')
        env = dict(os.environ, PYTHONUNBUFFERED='1', RCUTILS_COLORIZED_OUTPUT='0')
        self.process = subprocess.Popen(
            [sys.executable, __file__, '--serve-node', json.dumps(params), str(self.result_path)],
            stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def stop(self) -> tuple[dict, str]:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()
        log = self.log_path.read_text(errors='replace')
        if not self.result_path.is_file():
            raise SystemExit(f'the node process failed (exit {self.process.returncode}):\n'
                             + log[-3000:])
        return json.loads(self.result_path.read_text()), log


# ------------------------------------------------------------------------------------------------
# The camera process.
# ------------------------------------------------------------------------------------------------

def camera(rate_hz: float, seconds: float, width: int, height: int, encoding: str,
           past_stamps: bool, domain_id: int, ready, go, sent, published_path: str) -> None:
    """Publishes frames at ``rate_hz`` for ``seconds`` once ``go`` is set (child process)."""
    import cv2
    import rclpy
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from rclpy.time import Time
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
    deadline = time.monotonic() + 120
    while image_pub.get_subscription_count() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    ready.set()
    go.wait(120)
    published = {}  # stamp ns -> wall time of publishing
    period = 1.0 / rate_hz
    start = time.monotonic()
    k = 0
    while time.monotonic() - start < seconds:
        now_ns = time.time_ns()
        stamp_ns = now_ns - PAST_OFFSET_NS if past_stamps else now_ns
        header = Header(frame_id='camera_optical_frame', stamp=Time(nanoseconds=stamp_ns).to_msg())
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
        published[stamp_ns] = now_ns / 1e9
        k += 1
        sent.value = k
        time.sleep(max(0.0, start + k * period - time.monotonic()))
    Path(published_path).write_text(json.dumps({str(k): v for k, v in published.items()}))
    node.destroy_node()
    rclpy.shutdown()


# ------------------------------------------------------------------------------------------------
# One run and the report.
# ------------------------------------------------------------------------------------------------

def _pct(values, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float('nan')


def run_once(args: argparse.Namespace, params: dict, rate: float, tag: str, workdir: Path,
             listener, arrivals: dict, domain_id: int) -> dict:
    node = NodeProcess(params, workdir, tag)
    ctx = mp.get_context('spawn')
    ready, go, sent = ctx.Event(), ctx.Event(), ctx.Value('i', 0)
    published_path = workdir / f'{tag}.published.json'
    cam = ctx.Process(target=camera, args=(
        rate, args.seconds, args.width, args.height, args.encoding, args.past_stamps,
        domain_id, ready, go, sent, str(published_path)))
    cam.start()
    try:
        if not ready.wait(180):
            raise SystemExit('the node did not subscribe within 180 s; log: '
                             + node.log_path.read_text()[-2000:])
        time.sleep(0.5)  # the node's subscription matched; let the listener match too
        arrivals.clear()
        go.set()
        cam.join()
        time.sleep(1.0)  # let the last frame through
    finally:
        result, log = node.stop()
        if cam.is_alive():
            cam.terminate()
    published = {int(k): v for k, v in json.loads(published_path.read_text()).items()}
    timings = result['timings']
    counts = result['counts']
    measured = timings[args.warmup_frames:]
    step = [t['step_ms'] for t in measured]
    e2e = [(arrivals[s] - published[s]) * 1e3 for s in published if s in arrivals]
    return {
        'rate': rate, 'sent': sent.value, 'processed': counts['processed'],
        'proc': counts['processed'] / max(sent.value, 1),
        'missed': counts['missed'], 'replaced': counts['replaced'], 'stale': counts['stale'],
        'invalid': counts['invalid'] + counts['errors'],
        'lat50': _pct([t['latency_ms'] for t in timings], 50),
        'lat95': _pct([t['latency_ms'] for t in timings], 95),
        'wait50': _pct([t['wait_ms'] for t in timings], 50),
        'e2e50': _pct(e2e, 50),
        'step50': _pct(step, 50), 'step95': _pct(step, 95),
        'publish': float(np.mean([t['publish_ms'] for t in measured])) if measured else 0.0,
        'torch_threads': result['torch_threads'], 'os_threads': result['os_threads'],
        'cpu': result['cpu_share'], 'precision': result['precision'],
        'device': result['device'], 'warnings': log.count(REPLAY_WARNING),
    }


def _load() -> str:
    return '/'.join(f'{x:.2f}' for x in os.getloadavg())


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == '--serve-node':
        serve_node(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--checkpoint', default=str(SHIPPED),
                        help='perception checkpoint (default: the shipped models/moog_small)')
    parser.add_argument('--device', default='auto', help="torch device ('auto', 'cpu', 'cuda')")
    parser.add_argument('--rates', type=float, nargs='+', default=[12.0, 15.0, 30.0],
                        help='camera rates (Hz)')
    parser.add_argument('--repeats', type=int, default=3, help='fresh node runs per rate')
    parser.add_argument('--seconds', type=float, default=10.0, help='camera seconds per run')
    parser.add_argument('--warmup-frames', type=int, default=10,
                        help='processed frames left out of the step percentiles')
    parser.add_argument('--num-threads', type=int, nargs='+', default=[0],
                        help="node num_threads values to compare (0: the node's default)")
    parser.add_argument('--precision', nargs='+', default=['auto'],
                        choices=['auto', 'fp32', 'bf16'], help='node precision values to compare')
    parser.add_argument('--width', type=int, default=320, help='camera image width (pixels)')
    parser.add_argument('--height', type=int, default=240, help='camera image height (pixels)')
    parser.add_argument('--encoding', choices=['rgb8', 'bgr8', 'jpeg'], default='rgb8',
                        help='what the camera publishes (jpeg goes to image/compressed)')
    parser.add_argument('--grid-points', type=int, default=64, help='grid_points of the node')
    parser.add_argument('--past-stamps', action='store_true',
                        help='stamp frames a day in the past (a replay without --clock)')
    parser.add_argument('--visual', action='store_true',
                        help='also subscribe overlay and markers (their cost is then included)')
    parser.add_argument('--visual-rate', type=float, default=None,
                        help="node visual_rate (Hz; 0: every frame; default: the node's)")
    parser.add_argument('--quick', action='store_true',
                        help='15 Hz only, 2 repeats of 5 s (a smoke test of the figures)')
    args = parser.parse_args()
    if args.quick:
        args.rates, args.repeats, args.seconds = [15.0], 2, 5.0

    # Never let DDS discovery leave this machine.
    os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    os.environ.pop('ROS_STATIC_PEERS', None)
    domain_id = int(os.environ.setdefault('ROS_DOMAIN_ID', '53'))
    os.environ.setdefault('AMENT_PREFIX_PATH', sys.prefix)

    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image, PointCloud2
    from visualization_msgs.msg import MarkerArray

    from moog_ros.ros import conversions as conv

    rclpy.init(domain_id=domain_id)
    listener = rclpy.create_node('bench_listener')
    arrivals: dict[int, float] = {}  # stamp ns -> wall time its tracks arrived here

    def on_tracks(msg: PointCloud2) -> None:
        arrivals[conv.stamp_to_ns(msg.header.stamp)] = time.time()

    reliable = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE)
    listener.create_subscription(PointCloud2, 'tracks', on_tracks, reliable)
    if args.visual:
        listener.create_subscription(Image, 'overlay', lambda m: None, reliable)
        for topic in ('tracks/markers', 'detections/markers'):
            listener.create_subscription(MarkerArray, topic, lambda m: None, reliable)
    executor = SingleThreadedExecutor()
    executor.add_node(listener)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()

    print(f'bench_node: {args.checkpoint}, camera {args.width}x{args.height} {args.encoding}'
          f'{", stamps a day in the past" if args.past_stamps else ""}, grid_points '
          f'{args.grid_points}{", overlay+markers subscribed" if args.visual else ""}'
          f'{f", visual_rate {args.visual_rate:g}" if args.visual_rate is not None else ""}; '
          f'{len(os.sched_getaffinity(0))} cores; load average {_load()} at start', flush=True)
    header = (f'{"thr":>3} {"prec":>4} {"Hz":>4} {"rep":>3} {"sent":>4} {"proc %":>6} '
              f'{"miss":>4} {"repl":>4} {"stale":>5} {"lat p50":>7} {"lat p95":>7} '
              f'{"wait50":>6} {"e2e p50":>7} {"step50":>6} {"step95":>6} {"95/50":>5} '
              f'{"pub":>5} {"threads":>7} {"cpu %":>5} {"warn":>4}  load')
    print(header)
    print('-' * len(header), flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix='bench_node_') as tmp:
        for threads in args.num_threads:
            for precision in args.precision:
                params = {'checkpoint': args.checkpoint, 'device': args.device,
                          'num_threads': threads, 'precision': precision,
                          'grid_points': args.grid_points,
                          'max_points': max(256, args.grid_points),
                          'input_transport': 'compressed' if args.encoding == 'jpeg' else 'raw'}
                if args.visual_rate is not None:
                    params['visual_rate'] = args.visual_rate
                for rate in args.rates:
                    for rep in range(args.repeats):
                        tag = f't{threads}_{precision}_{rate:g}_{rep}'
                        r = run_once(args, params, rate, tag, Path(tmp), listener, arrivals,
                                     domain_id)
                        r.update(threads=threads, precision_asked=precision, repeat=rep,
                                 load=_load())
                        rows.append(r)
                        print(f'{r["torch_threads"]:3d} {r["precision"]:>4} {rate:4g} {rep:3d} '
                              f'{r["sent"]:4d} {100 * r["proc"]:6.1f} {r["missed"]:4d} '
                              f'{r["replaced"]:4d} {r["stale"]:5d} {r["lat50"]:7.1f} '
                              f'{r["lat95"]:7.1f} {r["wait50"]:6.1f} {r["e2e50"]:7.1f} '
                              f'{r["step50"]:6.1f} {r["step95"]:6.1f} '
                              f'{r["step95"] / r["step50"]:5.2f} {r["publish"]:5.1f} '
                              f'{r["torch_threads"]:3d}/{r["os_threads"]:<3d} '
                              f'{100 * r["cpu"]:5.0f} {r["warnings"]:4d}  {r["load"]}',
                              flush=True)
    executor.shutdown()
    spinner.join(5.0)  # out of rcl before the context goes (else a C++ terminate at exit)
    listener.destroy_node()
    rclpy.try_shutdown()

    print('\nover the repeats (goals at 15 Hz: proc >= 95 %, step p95/p50 <= 1.5, '
          'step p50 spread <= 20 %):')
    keys = sorted({(r['threads'], r['precision_asked'], r['rate']) for r in rows})
    for threads, precision, rate in keys:
        group = [r for r in rows if (r['threads'], r['precision_asked'], r['rate'])
                 == (threads, precision, rate)]
        p50 = [r['step50'] for r in group]
        spread = (max(p50) - min(p50)) / float(np.median(p50)) if group else float('nan')
        proc = [100 * r['proc'] for r in group]
        print(f'  num_threads {threads} precision {precision} at {rate:g} Hz: processed '
              f'{min(proc):.1f}-{max(proc):.1f} %, step p50 {min(p50):.1f}-{max(p50):.1f} ms '
              f'(spread {100 * spread:.0f} %), '
              f'worst p95/p50 {max(r["step95"] / r["step50"] for r in group):.2f}, latency p95 '
              f'worst {max(r["lat95"] for r in group):.1f} ms, skipped (miss+repl+stale) '
              f'{sum(r["missed"] + r["replaced"] + r["stale"] for r in group)}, replay warnings '
              f'per run {sorted({r["warnings"] for r in group})}')
    print(f'load average at end {_load()}')


if __name__ == '__main__':
    main()

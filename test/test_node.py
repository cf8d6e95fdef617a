"""The live node in-process with real rclpy, the tiny MoogPerception and the built vision_msgs.

One raw-image node and one compressed-image node (namespace ``cmp``) serve the whole module;
a fixture node plays tiny clips at them and records every output. Everything stays on loopback
in the module's own DDS domain (``test/conftest.py``).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
import os
from pathlib import Path
import shutil
import signal
import subprocess
import sys
import threading
import time

from ament_index_python.packages import get_package_share_directory
import cv2
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PointStamped
import numpy as np
import pytest
import rclpy
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy
from rclpy.time import Time
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from std_msgs.msg import Header
from std_srvs.srv import Trigger
import torch
from vision_msgs.msg import Detection2D, Detection2DArray
from visualization_msgs.msg import MarkerArray
import yaml

from moog_ros.model import MoogPerception, get_perception_config, save_checkpoint
from moog_ros.ros import conversions as conv
from moog_ros.ros.node import Arrival, Mailbox, MoogNode
from moog_ros.ros.params import DEFAULTS, PARAMETER_NAMES, check_values, resolve_checkpoint

pytestmark = pytest.mark.ros

REPO = Path(__file__).resolve().parents[1]
W, H = 64, 48  # input frames; the tiny model runs at 32x32 (centre crop 48x48 -> 32x32)
TIMEOUT_S = 15.0
OUTPUTS = {'depth/image': Image, 'depth/camera_info': CameraInfo, 'tracks': PointCloud2,
           'tracks/markers': MarkerArray, 'detections': Detection2DArray,
           'detections/markers': MarkerArray, 'overlay': Image}


def test_yaml_defaults_match_the_declared_parameters():
    params = yaml.safe_load((REPO / 'config' / 'moog.yaml').read_text())['/**']['ros__parameters']
    assert set(params) == set(PARAMETER_NAMES)
    for name, value in params.items():
        assert value == DEFAULTS[name] and type(value) is type(DEFAULTS[name]), name


def test_parameter_checks_without_a_node():
    assert check_values(DEFAULTS) == []
    problems = check_values({'device': 'gpu', 'grid_points': 2.5, 'resize_mode': 'zoom',
                             'visible_threshold': float('nan'), 'colour': 'red'})
    text = ' | '.join(problems)
    for expected in ("device: 'gpu'", 'grid_points: expected int', "resize_mode: 'zoom'",
                     'visible_threshold: nan is outside', 'colour: not a parameter'):
        assert expected in text, text
    assert check_values({'device': 'cuda:1', 'max_frame_age': 1}) == []  # int for a float is ok
    assert 'must be below' in check_values({'depth_min_m': 5.0, 'depth_max_m': 1.0})[0]


def test_mailbox_keeps_only_the_newest_frame_and_wakes_on_close():
    box = Mailbox()
    assert box.put(Arrival('a', 1.0)) is False
    assert box.put(Arrival('b', 2.0)) is True  # 'a' was still waiting: replaced
    assert box.take() == Arrival('b', 2.0)
    taken = []
    reader = threading.Thread(target=lambda: taken.append(box.take()))
    reader.start()
    time.sleep(0.05)
    assert reader.is_alive()  # empty: take blocks
    box.put(Arrival('c', 3.0))
    reader.join(timeout=5)
    assert taken == [Arrival('c', 3.0)]
    reader = threading.Thread(target=lambda: taken.append(box.take()))
    reader.start()
    box.close()
    reader.join(timeout=5)
    assert not reader.is_alive() and taken[-1] is None
    box.put(Arrival('d', 4.0))
    assert box.take() is None  # closed for good



def test_mailbox_keeps_the_replaced_frame_as_fallback_and_carries_its_reset():
    box = Mailbox()
    box.put(Arrival('a', 1.0, 'stream changed'))
    assert box.put(Arrival('b', 2.0)) is True
    # The newest frame carries the replaced one's reset; the replaced one is its fallback.
    assert box.take_with_fallback() == (Arrival('b', 2.0, 'stream changed'), Arrival('a', 1.0))
    box.put(Arrival('c', 3.0))
    assert box.take_with_fallback() == (Arrival('c', 3.0), None)  # nothing was replaced
    box.put(Arrival('d', 4.0))
    box.put(Arrival('e', 5.0))
    box.close()
    assert box.take_with_fallback() == (None, None)

def test_default_checkpoint_resolves_through_the_ament_index():
    path = resolve_checkpoint('')
    assert path.parts[-3:] == ('moog_ros', 'models', 'moog_small')
    assert path.parent.parent == Path(get_package_share_directory('moog_ros'))
    assert resolve_checkpoint('~/x') == Path.home() / 'x'


# ------------------------------------------------------------------------------------------------
# Fixtures.
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp('ckpt') / 'tiny',
                           MoogPerception(get_perception_config('tiny')))


@pytest.fixture(scope='module')
def context(ros_domain_id) -> Context:
    ctx = Context()
    rclpy.init(context=ctx, domain_id=ros_domain_id)
    yield ctx
    ctx.try_shutdown()


def _camera_info(width: int = W, height: int = H) -> CameraInfo:
    info = CameraInfo(width=width, height=height, distortion_model='plumb_bob')
    info.k = [50.0, 0.0, (width - 1) / 2, 0.0, 50.0, (height - 1) / 2, 0.0, 0.0, 1.0]
    info.p = [50.0, 0.0, (width - 1) / 2, 0.0, 0.0, 50.0, (height - 1) / 2, 0.0, 0.0, 0.0, 1.0,
              0.0]
    info.d = [0.0] * 5
    return info


class Harness:
    """A fixture node: plays frames, sends commands, records every output per topic."""

    def __init__(self, context: Context, namespace: str) -> None:
        self.ns = namespace
        self.node = Node('harness_' + namespace.strip('/').replace('/', '_') or 'root',
                         context=context)
        self.cond = threading.Condition()
        self.messages: dict[str, list] = defaultdict(list)
        prefix = namespace.rstrip('/') + '/'
        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        for topic, msg_type in OUTPUTS.items():
            self.node.create_subscription(msg_type, prefix + topic, self._recorder(topic),
                                          reliable)
        self.node.create_subscription(DiagnosticArray, '/diagnostics',
                                      self._recorder('/diagnostics'), reliable)
        self.image = self.node.create_publisher(Image, prefix + 'image', reliable)
        self.compressed = self.node.create_publisher(CompressedImage, prefix + 'image/compressed',
                                                     reliable)
        self.info = self.node.create_publisher(CameraInfo, prefix + 'camera_info', reliable)
        self.detections = self.node.create_publisher(Detection2DArray, prefix + 'detections_in',
                                                     reliable)
        self.add_point = self.node.create_publisher(PointStamped, prefix + 'moog/add_points',
                                                    reliable)
        self.add_points = self.node.create_publisher(PointCloud2,
                                                     prefix + 'moog/add_points_batch', reliable)
        self.add_box = self.node.create_publisher(Detection2D, prefix + 'moog/add_box', reliable)
        self.clock_base = self.node.get_clock().now().nanoseconds
        self.frames_sent = 0

    def _recorder(self, topic: str) -> Callable:
        def record(msg) -> None:
            with self.cond:
                self.messages[topic].append(msg)
                self.cond.notify_all()
        return record

    def header(self, stamp_ns: int | None = None) -> Header:
        if stamp_ns is None:
            self.frames_sent += 1
            stamp_ns = self.clock_base + self.frames_sent * 33_000_000
        return Header(stamp=Time(nanoseconds=stamp_ns).to_msg(), frame_id='cam_optical')

    def wait_for(self, topic: str, predicate: Callable = lambda m: True,
                 timeout: float = TIMEOUT_S):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for msg in reversed(self.messages[topic]):
                    if predicate(msg):
                        return msg
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f'no matching message on {topic} within {timeout} s')
                self.cond.wait(remaining)

    def frame_outputs(self, header: Header, topics=('tracks', 'depth/image', 'detections'),
                      timeout: float = TIMEOUT_S) -> dict:
        """Waits for each topic's message with this header's stamp."""
        return {topic: self.wait_for(topic, lambda m: _stamp(m) == header.stamp, timeout)
                for topic in topics}

    def send_raw(self, rgb: np.ndarray | None = None, header: Header | None = None,
                 with_info: bool = True, wait: bool = True, **image_fields) -> tuple:
        header = header or self.header()
        if with_info:
            info = _camera_info(*(rgb.shape[1::-1] if rgb is not None else (W, H)))
            info.header = header
            self.info.publish(info)
        if rgb is None:
            msg = Image(header=header, **image_fields)
        else:
            msg = conv.rgb_to_image(rgb, header)
        self.image.publish(msg)
        return header, (self.frame_outputs(header) if wait else None)

    def call(self, service: str) -> Trigger.Response:
        client = self.node.create_client(Trigger, service)
        assert client.wait_for_service(timeout_sec=TIMEOUT_S), service
        future = client.call_async(Trigger.Request())
        deadline = time.monotonic() + TIMEOUT_S
        while not future.done() and time.monotonic() < deadline:
            time.sleep(0.01)
        self.node.destroy_client(client)
        assert future.done(), f'{service} did not answer'
        return future.result()


def _stamp(msg):
    """The header stamp of a message (a MarkerArray's is its markers')."""
    if isinstance(msg, MarkerArray):
        return msg.markers[0].header.stamp if msg.markers else None
    return msg.header.stamp


def _frame(seed: int, width: int = W, height: int = H) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _ids(cloud: PointCloud2) -> list[int]:
    return np.frombuffer(bytes(cloud.data), conv.TRACK_POINT_DTYPE)['track_id'].tolist()


def _wait_until(condition: Callable[[], bool], timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, 'condition not met in time'
        time.sleep(0.02)


@pytest.fixture(scope='module')
def live(context, checkpoint):
    """(raw node, its harness, compressed node, its harness) spinning in the background."""
    common = {
        'checkpoint': str(checkpoint), 'max_frame_age': 0.0, 'reset_gap': 0.0, 'grid_points': 8,
        'box_presence_threshold': 0.0, 'max_invisible_frames': 1000, 'trail_length': 4,
        'diagnostics_period': 0.2, 'warmup_steps': 1, 'depth_min_m': 0.0, 'depth_max_m': 1e5,
        'visual_rate': 0.0,  # overlay and markers for every frame: the tests wait for them
    }
    compressed = {**common, 'input_transport': 'compressed'}
    nodes = [
        MoogNode(context=context, parameter_overrides=[
            Parameter(k, value=v) for k, v in common.items()]),
        MoogNode(context=context, namespace='cmp', parameter_overrides=[
            Parameter(k, value=v) for k, v in compressed.items()]),
    ]
    harnesses = [Harness(context, '/'), Harness(context, '/cmp')]
    # One executor thread, as moog_node spins (rclpy 9.1.2's MultiThreadedExecutor re-submits
    # pending tasks in a busy loop, ros2/rclpy#1452: it holds the GIL and stalls the node's
    # inference thread for seconds on a 2-core machine).
    executor = SingleThreadedExecutor(context=context)
    for n in (*nodes, *(h.node for h in harnesses)):
        executor.add_node(n)
    thread = threading.Thread(target=executor.spin, daemon=True)
    thread.start()
    for node in nodes:
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
    for node, harness in zip(nodes, harnesses):
        # Outputs that are only computed with subscribers must see the harness first.
        _wait_until(lambda node=node: all(
            pub.get_subscription_count() > 0 for pub in node._pubs.values()))
        _wait_until(lambda h=harness: h.compressed.get_subscription_count()
                    + h.image.get_subscription_count() > 0)
    yield nodes[0], harnesses[0], nodes[1], harnesses[1]
    # Stop spinning first: transitions triggered from this thread destroy subscriptions that a
    # spinning executor thread may be adding to its wait set at that moment (InvalidHandle).
    executor.shutdown()
    thread.join(timeout=5)
    for node in nodes:
        node.trigger_deactivate()
        assert node.trigger_cleanup() == TransitionCallbackReturn.SUCCESS
        assert node.runtime is None
    for n in (*nodes, *(h.node for h in harnesses)):
        n.destroy_node()


# ------------------------------------------------------------------------------------------------
# Lifecycle.
# ------------------------------------------------------------------------------------------------


def test_configure_fails_cleanly_on_missing_or_corrupt_checkpoint(context, checkpoint,
                                                                    tmp_path):
    corrupt = tmp_path / 'corrupt'
    shutil.copytree(checkpoint, corrupt)
    (corrupt / 'config.json').write_text('{ not json')
    for path in (tmp_path / 'missing', corrupt):
        node = MoogNode(context=context, parameter_overrides=[
            Parameter('checkpoint', value=str(path))])
        try:
            assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
            assert node._state_machine.current_state[1] == 'unconfigured'
            assert node.runtime is None and not node._pubs
        finally:
            node.destroy_node()


def test_deactivate_stops_processing_and_activate_resumes(live):
    node, harness, _, _ = live
    assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
    header, _ = harness.send_raw(_frame(1), wait=False)
    time.sleep(0.5)
    assert not any(m.header.stamp == header.stamp for m in harness.messages['tracks'])
    assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
    _wait_until(lambda: harness.image.get_subscription_count() > 0)
    harness.send_raw(_frame(2))


# ------------------------------------------------------------------------------------------------
# Outputs.
# ------------------------------------------------------------------------------------------------


def test_outputs_carry_the_input_header_units_and_scaled_intrinsics(live):
    node, harness, _, _ = live
    box = Detection2D()
    box.bbox.center.position.x, box.bbox.center.position.y = 32.0, 24.0
    box.bbox.size_x, box.bbox.size_y = 16.0, 16.0
    harness.add_box.publish(box)
    _wait_until(lambda: node.runtime.queued_requests == 1)
    harness.send_raw(_frame(3))
    header, _ = harness.send_raw(_frame(4))
    out = harness.frame_outputs(header, topics=tuple(OUTPUTS))
    for topic, msg in out.items():
        headers = [m.header for m in msg.markers] if isinstance(msg, MarkerArray) else [
            msg.header]
        assert all(h.frame_id == 'cam_optical' and h.stamp == header.stamp for h in headers), topic
    depth = out['depth/image']
    assert (depth.encoding, depth.width, depth.height, depth.step) == ('32FC1', 32, 32, 128)
    values = np.frombuffer(bytes(depth.data), np.float32)
    finite = values[np.isfinite(values)]
    assert finite.size and (finite > 0).all()  # metres along z; NaN would mean invalid
    info = out['depth/camera_info']
    assert (info.width, info.height) == (32, 32)
    s = 32 / 48  # crop 48x48 at x = 8, scaled to 32x32
    K = np.asarray(info.k).reshape(3, 3)
    np.testing.assert_allclose(K, [[50 * s, 0, 15.5], [0, 50 * s, 15.5], [0, 0, 1]], atol=1e-9)
    overlay = out['overlay']
    assert (overlay.encoding, overlay.width, overlay.height) == ('rgb8', W, H)
    cloud = out['tracks']
    assert [f.name for f in cloud.fields] == ['x', 'y', 'z', 'u', 'v', 'track_id', 'visible',
                                              'confidence']
    points = np.frombuffer(bytes(cloud.data), conv.TRACK_POINT_DTYPE)
    assert ((points['u'] >= 7.5) & (points['u'] <= 55.5)).all()  # input pixels, in the crop
    # x, y, z come from depth and the input K: reprojecting them gives back u, v.
    ok = np.isfinite(points['z'])
    assert ok.any()
    u = 50 * points['x'][ok] / points['z'][ok] + (W - 1) / 2
    np.testing.assert_allclose(u, points['u'][ok], atol=1e-2)
    # REP 117: depth outside [depth_min_m, depth_max_m] is NaN, and so is the 3-D position.
    assert node.set_parameters([Parameter('depth_max_m', value=1e-3)])[0].successful
    try:
        _, out = harness.send_raw(_frame(5))
        assert np.isnan(np.frombuffer(bytes(out['depth/image'].data), np.float32)).all()
        points = np.frombuffer(bytes(out['tracks'].data), conv.TRACK_POINT_DTYPE)
        assert np.isnan(points['z']).all() and not out['tracks'].is_dense
    finally:
        node.set_parameters([Parameter('depth_max_m', value=1e5)])


def test_track_ids_are_stable_and_unique(live):
    _, harness, _, _ = live
    clouds = [harness.send_raw(_frame(10 + k))[1]['tracks'] for k in range(3)]
    for previous, cloud in zip(clouds, clouds[1:]):
        ids, before = _ids(cloud), _ids(previous)
        assert len(set(ids)) == len(ids)
        assert ids[:len(before)] == before  # no track ended: same ids, same order


def test_added_points_and_clear_points(live):
    node, harness, _, _ = live
    assert node.set_parameters([Parameter('grid_points', value=0)])[0].successful
    assert harness.call('/moog/clear_points').success
    _, out = harness.send_raw(_frame(20))
    assert _ids(out['tracks']) == []
    point = PointStamped(header=harness.header())
    point.point.x, point.point.y = 30.0, 20.0
    harness.add_point.publish(point)
    batch = conv.tracks_to_cloud(harness.header(), np.array([0, 0], np.uint32),
                                 np.array([[20.0, 10.0], [40.0, 30.0]]), np.ones(2, bool),
                                 np.ones(2), np.full((2, 3), np.nan))
    harness.add_points.publish(batch)
    _wait_until(lambda: node.runtime.queued_requests == 2)
    _, out = harness.send_raw(_frame(21))
    ids = _ids(out['tracks'])
    assert len(ids) == 3 and len(set(ids)) == 3
    assert node.set_parameters([Parameter('grid_points', value=8)])[0].successful


def test_boxes_from_a_detector_keep_their_ids(live):
    node, harness, _, _ = live
    det = Detection2D()
    det.bbox.center.position.x, det.bbox.center.position.y = 30.0, 24.0
    det.bbox.size_x, det.bbox.size_y = 20.0, 16.0
    from vision_msgs.msg import ObjectHypothesisWithPose
    hypothesis = ObjectHypothesisWithPose()
    hypothesis.hypothesis.class_id, hypothesis.hypothesis.score = 'cup', 0.9
    det.results = [hypothesis]
    harness.detections.publish(Detection2DArray(header=harness.header(), detections=[det]))
    _wait_until(lambda: node.runtime.queued_requests == 1)
    _, out = harness.send_raw(_frame(30))
    (tracked,) = [d for d in out['detections'].detections
                  if d.results[0].hypothesis.class_id == 'cup']
    # The detector sees the object where the tracker put it: the track keeps its id.
    harness.detections.publish(Detection2DArray(header=harness.header(), detections=[tracked]))
    _wait_until(lambda: node.runtime.queued_requests == 1)
    _, out = harness.send_raw(_frame(31))
    ids = [d.id for d in out['detections'].detections]
    assert tracked.id in ids and ids.count(tracked.id) == 1
    before = set(ids)
    manual = Detection2D()
    manual.bbox.center.position.x, manual.bbox.center.position.y = 50.0, 10.0
    manual.bbox.size_x, manual.bbox.size_y = 6.0, 6.0
    harness.add_box.publish(manual)
    _wait_until(lambda: node.runtime.queued_requests == 1)
    _, out = harness.send_raw(_frame(32))
    new = {d.id for d in out['detections'].detections} - before
    assert len(new) == 1 and all(d.header.stamp == out['detections'].header.stamp
                                 for d in out['detections'].detections)


def _sustained(harness, node, make_header, publish) -> Header:
    """Sends frames of a new stream every 30 ms until the node takes one; returns its header.

    A change of stream must be sustained: the first ``stream_change_frames - 1`` frames (and
    any sent while the old stream was heard from too recently) are dropped as strays.
    """
    change = node.config.stream_change_frames
    policy = node.monitor.counts()['policy']
    sent: list[Header] = []
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        header = make_header(len(sent))
        publish(header)
        sent.append(header)
        time.sleep(0.03)
        with harness.cond:
            stamps = [_stamp(m) for m in harness.messages['tracks']]
        taken = [k for k, h in enumerate(sent) if h.stamp in stamps]
        if taken:
            break
        assert time.monotonic() < deadline, 'the node never switched to the new stream'
    assert taken[0] >= change - 1, (taken, change)
    assert node.monitor.counts()['policy'] >= policy + change - 1
    return sent[taken[0]]


def test_state_resets_on_sustained_backwards_stamp_and_on_request(live):
    node, harness, _, _ = live
    change = node.config.stream_change_frames
    assert change == 3  # the default
    resets = node.monitor.counts()['resets']
    _, out = harness.send_raw(_frame(40))
    before = set(_ids(out['tracks']))
    late = harness.header()
    base = late.stamp.sec * 10**9 + late.stamp.nanosec - 500_000_000
    # A bag loop: the stamps go back and stay on the new timeline; the third frame resets.
    header = _sustained(harness, node, lambda k: harness.header(base + k * 33_000_000),
                        lambda header: harness.send_raw(_frame(41), header=header, wait=False))
    after = set(_ids(harness.frame_outputs(header)['tracks']))
    assert after and not after & before
    assert node.monitor.counts()['resets'] == resets + 1
    harness.frames_sent += 10  # the harness timeline continues after the loop
    assert harness.call('/moog/reset').success
    _, out = harness.send_raw(_frame(42))
    assert not set(_ids(out['tracks'])) & after
    assert node.monitor.counts()['resets'] == resets + 2

    # A new encoding (here the same picture as bgr8) sustained is a new stream: reset too.
    def bgr_frame(header):
        bgr = conv.rgb_to_image(np.ascontiguousarray(_frame(43)[..., ::-1]), header)
        bgr.encoding = 'bgr8'
        harness.image.publish(bgr)

    _sustained(harness, node, lambda k: harness.header(), bgr_frame)
    assert node.monitor.counts()['resets'] == resets + 3
    _sustained(harness, node, lambda k: harness.header(),
               lambda header: harness.send_raw(_frame(44), header=header, wait=False))
    assert node.monitor.counts()['resets'] == resets + 4  # and back to rgb8


def test_fast_publisher_does_not_grow_latency(live):
    node, harness, _, _ = live
    counts = node.monitor.counts()
    already = len(node.timings)
    rgb = _frame(50)
    for _ in range(200):  # ~250 Hz for ~1 s: several frames arrive during each model step
        harness.send_raw(rgb, with_info=False, wait=False)
        time.sleep(0.004)
    header, _ = harness.send_raw(rgb)  # the last frame always gets through
    now = node.monitor.counts()
    received = now['received'] - counts['received']
    processed = now['processed'] - counts['processed']
    assert processed < received and now['replaced'] > counts['replaced']
    latencies = [t.latency_ms for t in list(node.timings)[already:]]
    steps = [t.runtime_ms for t in list(node.timings)[already:]]
    # Without a queue a frame waits at most for the one in flight: latency stays near the step
    # time instead of growing through the burst (a queue of this burst would take seconds).
    # Bounds are loose: the machine running the tests may be busy.
    assert np.median(latencies) < 3 * np.median(steps) + 150, (latencies, steps)
    assert np.median(latencies[-5:]) < 3 * np.median(steps) + 500, (latencies, steps)
    diag = harness.wait_for('/diagnostics', lambda m: any(
        s.name == 'moog: pipeline' and int({kv.key: kv.value for kv in s.values}
                                           ['frames_replaced']) > 0 for s in m.status))
    values = {kv.key: kv.value for kv in diag.status[0].values}
    for key in ('input_rate_hz', 'processed_rate_hz', 'step_ms_p50', 'step_ms_p95',
                'latency_ms_p50', 'frames_dropped_stale', 'device', 'model', 'state_age_s'):
        assert key in values


def test_overlay_and_markers_are_limited_to_visual_rate(live):
    node, harness, _, _ = live
    assert node.set_parameters([Parameter('visual_rate', value=0.5)])[0].successful
    try:
        headers = [harness.send_raw(_frame(100 + k))[0] for k in range(8)]  # well under 2 s
    finally:
        node.set_parameters([Parameter('visual_rate', value=0.0)])
    stamps = {(h.stamp.sec, h.stamp.nanosec) for h in headers}

    def drawn(topic: str) -> int:
        return sum((_stamp(m).sec, _stamp(m).nanosec) in stamps
                   for m in harness.messages[topic] if _stamp(m) is not None)

    # Every frame got its depth, tracks and detections (send_raw waited for them); the overlay
    # and markers once every 2 s, starting with the first frame.
    assert drawn('tracks') == 8
    assert drawn('overlay') == 1 and drawn('tracks/markers') == 1
    assert any(_stamp(m) == headers[0].stamp for m in harness.messages['overlay'])


def test_parameter_changes_are_validated_with_a_reason(live):
    node = live[0]
    cases = {
        'resize_mode': ('pad', 'read-only'),
        'checkpoint': ('/elsewhere', 'read-only'),
        'num_threads': (1, 'read-only'),
        'precision': ('bf16', 'read-only'),
        'visual_rate': (-1.0, 'out of range'),
        'visible_threshold': (1.5, 'out of range'),
        'depth_max_m': (0.0, 'must be below'),  # not above depth_min_m (0.0 here)
        'max_frame_age': ('soon', 'type'),
    }
    for name, (value, reason) in cases.items():
        (result,) = node.set_parameters([Parameter(name, value=value)])
        assert not result.successful and reason in result.reason, (name, result.reason)
    (result,) = node.set_parameters([Parameter('visible_threshold', value=0.7)])
    assert result.successful and node.config.visible_threshold == 0.7
    assert node.runtime.config.visible_threshold == 0.7
    node.set_parameters([Parameter('visible_threshold', value=0.5)])


def test_bad_input_is_dropped_and_the_node_keeps_serving(live):
    node, harness, _, _ = live
    invalid = node.monitor.counts()['invalid']
    bad_frames = [
        {'height': H, 'width': W, 'encoding': 'hsv8', 'step': 3 * W, 'data': bytes(3 * W * H)},
        {'height': H, 'width': W, 'encoding': 'rgb8', 'step': 3 * W, 'data': bytes(10)},
        {'height': 0, 'width': 0, 'encoding': 'rgb8', 'step': 0, 'data': b''},
        {'height': 1, 'width': 1, 'encoding': '32FC1', 'step': 4,
             'data': np.array([np.nan], np.float32).tobytes()},
    ]
    counts = node.monitor.counts()
    refused = counts['invalid'] + counts['policy']
    for k, fields in enumerate(bad_frames, start=1):
        harness.send_raw(None, wait=False, **fields)
        # Invalid (cannot be read), or the 1x1 32FC1 frame: valid but not the stream.
        _wait_until(lambda k=k: sum(node.monitor.counts()[c] for c in ('invalid', 'policy'))
                    == refused + k)
        harness.send_raw(_frame(60))  # served
    assert node.monitor.counts()['invalid'] == invalid + 3
    # An uncalibrated CameraInfo (K = 0) is ignored: the last good K stays in use.
    zero = CameraInfo(width=W, height=H)
    zero.header = harness.header()
    harness.info.publish(zero)
    time.sleep(0.2)
    header, _ = harness.send_raw(_frame(61), with_info=False)
    info = harness.wait_for('depth/camera_info', lambda m: m.header.stamp == header.stamp)
    assert info.k[0] == pytest.approx(50 * 32 / 48)
    # A sustained resolution change mid-stream resets the state and carries on at the new size.
    resets = node.monitor.counts()['resets']
    header = _sustained(harness, node, lambda k: harness.header(), lambda header: harness.send_raw(
        _frame(62, 40, 40), header=header, with_info=False, wait=False))
    out = harness.frame_outputs(header)
    assert node.monitor.counts()['resets'] == resets + 1
    overlay = harness.wait_for('overlay', lambda m: m.header.stamp == header.stamp)
    assert (overlay.width, overlay.height) == (40, 40)
    # ... and without a matching CameraInfo there is no depth/camera_info for it (3-D is NaN).
    assert not any(m.header.stamp == header.stamp for m in harness.messages['depth/camera_info'])
    points = np.frombuffer(bytes(out['tracks'].data), conv.TRACK_POINT_DTYPE)
    assert np.isnan(points['z']).all()
    _sustained(harness, node, lambda k: harness.header(),
               lambda header: harness.send_raw(_frame(63), header=header, wait=False))
    harness.send_raw(_frame(63))  # back to 64x48 with its CameraInfo


def test_stale_frames_are_dropped_and_counted(live):
    node, harness, _, _ = live
    stale = node.monitor.counts()['stale']
    # Age is the time a frame waited in the node since the middleware received it: every frame
    # waits longer than a microsecond, whatever its header stamp says.
    assert node.set_parameters([Parameter('max_frame_age', value=1e-6)])[0].successful
    try:
        header, _ = harness.send_raw(_frame(70), wait=False)
        _wait_until(lambda: node.monitor.counts()['stale'] == stale + 1)
    finally:
        node.set_parameters([Parameter('max_frame_age', value=0.0)])
    harness.send_raw(_frame(71))
    assert not any(m.header.stamp == header.stamp for m in harness.messages['tracks'])
    diag = harness.wait_for('/diagnostics', lambda m: int({
        kv.key: kv.value for kv in m.status[0].values}['frames_dropped_stale']) > stale)
    values = {kv.key: kv.value for kv in diag.status[0].values}
    assert int(values['frames_skipped']) >= int(values['frames_dropped_stale'])


def test_frames_lost_before_the_callback_are_counted_from_sequence_gaps(live):
    node, harness, _, _ = live
    missed = node.monitor.counts()['missed']
    camera = {'implementation_identifier': 'rmw_fastrtps_cpp', 'data': b'camera-1'}
    other = {'implementation_identifier': 'rmw_fastrtps_cpp', 'data': b'camera-2'}
    for sequence, gid in ((1, camera), (2, camera), (6, camera), (1, other), (7, camera)):
        node._count_missed({'publication_sequence_number': sequence, 'publisher_gid': gid,
                            'received_timestamp': 0, 'source_timestamp': 0})
    assert node.monitor.counts()['missed'] == missed + 3  # 3, 4, 5 of the first camera
    node._count_missed({'publication_sequence_number': None, 'publisher_gid': None})
    assert node.monitor.counts()['missed'] == missed + 3  # a middleware without them
    # Real traffic from one publisher at a pace the node keeps up with: nothing missed.
    for k in range(5):
        harness.send_raw(_frame(300 + k), with_info=False)
    assert node.monitor.counts()['missed'] == missed + 3


def test_replayed_stamps_far_in_the_past_are_processed_with_one_warning(context, checkpoint,
                                                                        capfd):
    """A bag replayed without --clock: stamps a day old, at a steady rate, default freshness."""
    node = MoogNode(context=context, namespace='replay', parameter_overrides=[
        Parameter('checkpoint', value=str(checkpoint)), Parameter('warmup_steps', value=1),
        Parameter('grid_points', value=4), Parameter('autostart', value=False)])
    assert node.get_parameter('max_frame_age').value == 0.5  # the default applies
    harness = Harness(context, '/replay')
    # Spun as moog_node spins it: one executor thread, inference on the node's own thread.
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    executor.add_node(harness.node)
    thread = threading.Thread(target=executor.spin, daemon=True)
    try:
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        thread.start()
        _wait_until(lambda: harness.image.get_subscription_count() > 0
                    and node._pubs['tracks'].get_subscription_count() > 0)
        start_ns = harness.node.get_clock().now().nanoseconds - 86_400 * 10**9
        headers = []
        for k in range(20):  # 10 Hz, stamps 100 ms apart like the recording
            header, _ = harness.send_raw(_frame(200 + k), header=harness.header(
                start_ns + k * 100_000_000), wait=False)
            headers.append(header)
            time.sleep(0.1)
        harness.wait_for('tracks', lambda m: m.header.stamp == headers[-1].stamp)
        served = {(m.header.stamp.sec, m.header.stamp.nanosec) for m in harness.messages['tracks']}
        got = sum((h.stamp.sec, h.stamp.nanosec) in served for h in headers)
        assert got >= 19, f'{got} of 20 replayed frames got outputs'
        assert node.monitor.counts()['stale'] == 0
    finally:
        executor.shutdown()
        thread.join(timeout=5)
        node.trigger_deactivate()
        node.trigger_cleanup()
        node.destroy_node()
        harness.node.destroy_node()
    log = capfd.readouterr().err
    assert log.count('look like a replay') == 1, log[-2000:]


def test_num_threads_parameter_sets_torch_threads_at_configure(context, checkpoint):
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    try:
        for value, expected in ((2, 2), (0, max(1, cores - 1))):
            torch.set_num_threads(cores + 1)  # neither value: the configure must change it
            node = MoogNode(context=context, namespace='threads', parameter_overrides=[
                Parameter('checkpoint', value=str(checkpoint)), Parameter('warmup_steps', value=0),
                Parameter('num_threads', value=value), Parameter('autostart', value=False)])
            try:
                assert node.get_parameter('num_threads').value == value
                assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
                assert torch.get_num_threads() == expected, value
                assert node.trigger_cleanup() == TransitionCallbackReturn.SUCCESS
            finally:
                node.destroy_node()
    finally:
        torch.set_num_threads(before)


def test_compressed_input(live):
    _, _, node, harness = live
    invalid = node.monitor.counts()['invalid']
    for k, data in enumerate((cv2.imencode('.jpg', _frame(80))[1].tobytes(),
                              b'\xff\xd8\xff\xe0 corrupt',
                              cv2.imencode('.png', _frame(81))[1].tobytes())):
        header = harness.header()
        info = _camera_info()
        info.header = header
        harness.info.publish(info)
        harness.compressed.publish(CompressedImage(header=header, format='jpeg' if k < 2 else
                                                   'png', data=data))
        if k == 1:
            _wait_until(lambda: node.monitor.counts()['invalid'] == invalid + 1)
        else:
            out = harness.frame_outputs(header, topics=('tracks', 'overlay', 'depth/camera_info'))
            assert (out['overlay'].width, out['overlay'].height) == (W, H)


@pytest.mark.slow  # starts a Python process with torch and rclpy: seconds on a busy machine
def test_moog_node_executable_autostarts_and_stops_on_sigint(context, checkpoint):
    """The console script alone (no launch): params file, remaps, autostart, clean Ctrl-C."""
    command = [str(Path(sys.prefix) / 'bin' / 'moog_node'), '--ros-args',
               '--params-file', str(REPO / 'config' / 'moog.yaml'),
               '-p', f'checkpoint:={checkpoint}', '-p', 'max_frame_age:=0.0',
               '-r', '__ns:=/exe', '-r', 'image:=/exe_camera/image']
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env={**os.environ, 'OMP_NUM_THREADS': '1'}, text=True)
    node = Node('exe_harness', context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    got = []
    node.create_subscription(PointCloud2, '/exe/tracks', got.append, 10)
    publisher = node.create_publisher(Image, '/exe_camera/image', 10)
    try:
        deadline = time.monotonic() + 90
        while not got and time.monotonic() < deadline and process.poll() is None:
            if publisher.get_subscription_count():
                stamp = Time(nanoseconds=node.get_clock().now().nanoseconds).to_msg()
                publisher.publish(conv.rgb_to_image(_frame(90), Header(stamp=stamp,
                                                                      frame_id='cam')))
            executor.spin_once(timeout_sec=0.2)
        assert got, f'no tracks from moog_node; exit code {process.poll()}'
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=30)
        assert process.returncode == 0, output
        assert 'autostart: active' in output
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
        executor.shutdown()
        node.destroy_node()

"""Hostile input: messages that used to kill the node or cost its state, bombs, logs (issue 12).

The first half is pure (conversions, codecs, the input policy, the log limiter); the second
drives a real tiny node in-process with the fixture harness of ``test_node.py``.
"""
from __future__ import annotations

import struct
import threading
import time
import zlib

import cv2
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PointStamped
import numpy as np
import pytest
import rclpy
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.serialization import serialize_message
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2, PointField
from test_node import Harness, _camera_info, _frame, _ids, _wait_until
import torch
from vision_msgs.msg import Detection2D, Detection2DArray

from moog_ros import image_codecs
from moog_ros.input_policy import FOREIGN, OUTLIER, InputPolicy, InputPolicyConfig
from moog_ros.logtext import LogLimiter, clip_text, short_list
from moog_ros.model import MoogPerception, get_perception_config, save_checkpoint
from moog_ros.ros import conversions as conv
from moog_ros.ros.node import MoogNode

W, H = 64, 48

# ------------------------------------------------------------------------------------------------
# Payloads.
# ------------------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))


def _png_claiming(width: int, height: int) -> bytes:
    ihdr = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
    return (b'\x89PNG\r\n\x1a\n' + _png_chunk(b'IHDR', ihdr)
            + _png_chunk(b'IDAT', zlib.compress(bytes(4096))) + _png_chunk(b'IEND', b''))


def _jpeg(rgb: np.ndarray | None = None) -> bytes:
    rgb = _frame(1) if rgb is None else rgb
    return cv2.imencode('.jpg', rgb[..., ::-1])[1].tobytes()


def _jpeg_claiming(width: int, height: int) -> bytes:
    data = bytearray(_jpeg())
    at = data.find(b'\xff\xc0')
    data[at + 5:at + 7] = height.to_bytes(2, 'big')
    data[at + 7:at + 9] = width.to_bytes(2, 'big')
    return bytes(data)


def _cloud(fields, point_step: int, count: int, data: bytes) -> PointCloud2:
    return PointCloud2(height=1, width=count, fields=fields, is_bigendian=False,
                       point_step=point_step, row_step=point_step * count, data=data,
                       is_dense=True)


_UV = [PointField(name='u', offset=0, datatype=PointField.FLOAT32, count=1),
       PointField(name='v', offset=4, datatype=PointField.FLOAT32, count=1)]
# The three layouts that raised ValueError from numpy's dtype and ended the node.
KILLER_CLOUDS = [
    _cloud(_UV, 0, 4, bytes(32)),  # point_step 0
    _cloud(_UV, 4, 4, bytes(64)),  # point_step smaller than u, v
    _cloud([_UV[0], PointField(name='v', offset=64, datatype=PointField.FLOAT32, count=1)], 8,
           4, bytes(32)),  # a field offset beyond point_step
]


def _singular_k_info() -> CameraInfo:
    info = _camera_info()
    info.k = [50.0, 50.0, 0.0, 50.0, 50.0, 0.0, 0.0, 0.0, 1.0]  # fx, fy > 0, k[8] = 1, det 0
    return info


# ------------------------------------------------------------------------------------------------
# Pure.
# ------------------------------------------------------------------------------------------------


def test_point_cloud_layouts_that_killed_the_node_are_conversion_errors():
    for cloud in KILLER_CLOUDS:
        with pytest.raises(conv.ConversionError, match='point_step'):
            conv.cloud_to_xy(cloud)
    good = _cloud(_UV, 8, 2, np.array([1, 2, 3, 4], np.float32).tobytes())
    np.testing.assert_array_equal(conv.cloud_to_xy(good), [[1, 2], [3, 4]])
    with pytest.raises(conv.ConversionError, match='max_points_per_message'):
        conv.cloud_to_xy(good, max_points=1)


def test_decompression_bombs_are_refused_from_the_header(monkeypatch):
    def never(*args):
        raise AssertionError('a bomb reached the decoder')
    monkeypatch.setattr(image_codecs.cv2, 'imdecode', never)
    bombs = [('png', _png_claiming(20000, 20000)), ('jpeg', _jpeg_claiming(20000, 20000)),
             ('jpeg', _jpeg_claiming(65500, 65500))]
    for fmt, data in bombs:
        assert len(data) < 10_000  # small payloads that claim gigabytes
        with pytest.raises(image_codecs.ImageDecodeError, match='max_image_pixels'):
            image_codecs.decode_compressed_rgb(fmt, data)
        with pytest.raises(conv.ConversionError, match='over the limit'):
            conv.compressed_header(CompressedImage(format=fmt, data=data))
    # The limit is a parameter: a legal 64x48 image is refused under a limit of 1000 pixels.
    with pytest.raises(image_codecs.ImageDecodeError, match='limit of 1000'):
        image_codecs.decode_compressed_rgb('jpeg', _jpeg(), max_pixels=1000)
    # Raw images too, before a pixel is touched: 100000 x 100000 with 64 bytes of data.
    with pytest.raises(conv.ConversionError, match='max_image_pixels'):
        conv.image_header(Image(encoding='rgb8', height=100000, width=100000, step=300000,
                                data=bytes(64)))


def test_compressed_headers_give_the_size_and_catch_truncation(capfd):
    rgb = _frame(2)
    jpeg, png = _jpeg(rgb), cv2.imencode('.png', rgb[..., ::-1])[1].tobytes()  # BGR inside
    assert image_codecs.compressed_size('jpeg', jpeg) == (W, H)
    assert image_codecs.compressed_size('png', png) == (W, H)
    assert conv.compressed_header(CompressedImage(format='rgb8; jpeg compressed bgr8',
                                                  data=jpeg)) == ('rgb8', W, H)
    for data, what in ((jpeg[:len(jpeg) // 2], 'truncated'), (png[:len(png) // 2], 'truncated'),
                       (b'GIF89a' + bytes(40), 'signature')):
        with pytest.raises(image_codecs.ImageDecodeError, match=what):
            image_codecs.decode_compressed_rgb('jpeg', data)
    # A valid header over a garbled body: refused with the codec's own words, and nothing
    # reaches the process's stderr (libjpeg prints there itself).
    garbled = bytearray(jpeg)
    start = garbled.find(b'\xff\xda') + 20
    garbled[start:-2] = np.random.default_rng(0).integers(0, 255, len(garbled) - 2 - start,
                                                          dtype=np.uint8).tobytes()
    capfd.readouterr()
    with pytest.raises(image_codecs.ImageDecodeError, match='Corrupt JPEG data'):
        image_codecs.decode_compressed_rgb('jpeg', bytes(garbled))
    assert 'JPEG' not in capfd.readouterr().err
    np.testing.assert_allclose(image_codecs.decode_compressed_rgb('png', png), rgb)


def test_camera_info_needs_a_finite_invertible_k():
    assert conv.camera_info_k(_camera_info())[0, 0] == 50.0
    with pytest.raises(conv.ConversionError, match='singular'):
        conv.camera_info_k(_singular_k_info())
    for k in ([1e308, 0, 1e308, 0, 1e308, 1e308, 0, 0, 1], [float('nan')] * 9, [0.0] * 9):
        info = _camera_info()
        info.k = [float(v) for v in k]
        with pytest.raises(conv.ConversionError):
            conv.camera_info_k(info)


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _stream(policy: InputPolicy, clock: _Clock, start_ns: int, frames: int,
            identity=('rgb8', W, H), period_s: float = 0.033) -> int:
    """``frames`` accepted frames of ``identity``; returns the last stamp."""
    stamp = start_ns
    for k in range(frames):
        clock.t += period_s
        stamp = start_ns + int(k * period_s * 1e9)
        assert policy.check(*identity, stamp, stamp).accept
    return stamp


def test_input_policy_drops_strays_and_keeps_the_stream():
    clock = _Clock()
    policy = InputPolicy(InputPolicyConfig(change_frames=3, reset_gap_s=2.0), clock)
    t0 = 1_700_000_000 * 10**9
    last = _stream(policy, clock, t0, 10)
    # One frame of another encoding, of another size, one stamped in 2038, one 5 s back:
    strays = [(('bgr8', W, H), last + 1, FOREIGN), (('rgb8', 40, 40), last + 2, FOREIGN),
              (('rgb8', W, H), 2_145_000_000 * 10**9, OUTLIER),
              (('rgb8', W, H), last - 5 * 10**9, OUTLIER)]
    for identity, stamp, kind in strays:
        clock.t += 0.01
        verdict = policy.check(*identity, stamp, last)
        assert not verdict.accept and verdict.drop == kind and verdict.reset is None
    # ... and the next real frame is just the next frame: no "time jump back" reset.
    clock.t += 0.01
    verdict = policy.check('rgb8', W, H, last + 33_000_000, last)
    assert verdict.accept and verdict.reset is None


def test_input_policy_next_real_frame_after_a_2038_stray_is_accepted():
    clock = _Clock()
    policy = InputPolicy(InputPolicyConfig(change_frames=3), clock)
    t0 = 1_700_000_000 * 10**9
    last = _stream(policy, clock, t0, 10)
    clock.t += 0.01
    assert policy.check('rgb8', W, H, 2_145_000_000 * 10**9, last).drop == OUTLIER
    clock.t += 0.02
    verdict = policy.check('rgb8', W, H, last + 33_000_000, last + 33_000_000)
    assert verdict.accept and verdict.reset is None
    assert policy.identity == ('rgb8', W, H)


def test_input_policy_switches_only_on_a_sustained_change():
    clock = _Clock()
    policy = InputPolicy(InputPolicyConfig(change_frames=3), clock)
    t0 = 1_700_000_000 * 10**9
    last = _stream(policy, clock, t0, 20)
    # Strays interleaved with the stream never add up, however many.
    for k in range(10):
        clock.t += 0.016
        assert not policy.check('rgb8', 40, 40, last + k * 10**6 + 1, None).accept
        clock.t += 0.016
        assert policy.check('rgb8', W, H, last + k * 10**6 + 2, None).accept
    last += 10 * 10**6
    # Three adjacent strays moments after a stream frame (its frames lost on the way, say) are
    # not a new stream either: the stream was heard from less than 3 periods ago.
    for k in range(3):
        clock.t += 0.005
        assert not policy.check('rgb8', 40, 40, last + k + 1, None).accept
    # The camera really changes resolution: the old size stops, the new one keeps coming.
    verdicts = []
    for k in range(6):
        clock.t += 0.033
        verdicts.append(policy.check('rgb8', 40, 40, last + (k + 10) * 33_000_000, None))
    accepted = [k for k, v in enumerate(verdicts) if v.accept]
    assert accepted and accepted[0] >= 2 and verdicts[accepted[0]].reset
    assert 'consecutive frames' in verdicts[accepted[0]].reset
    assert policy.identity == ('rgb8', 40, 40)
    # A bag loop: stamps go back and stay on the new timeline.
    back = last - 60 * 10**9
    clock.t += 1.0
    loop = [policy.check('rgb8', 40, 40, back + k * 33_000_000, None) for k in range(3)]
    assert [v.accept for v in loop] == [False, False, True] and 'stamp' in loop[2].reset
    # change_frames = 1: every change resets at once (the old behaviour).
    eager = InputPolicy(InputPolicyConfig(change_frames=1), clock)
    assert eager.check('rgb8', W, H, t0, None).accept
    assert eager.check('bgr8', W, H, t0 + 1, None).reset


def test_input_policy_pinned_stream_never_switches():
    clock = _Clock()
    policy = InputPolicy(InputPolicyConfig(encoding='rgb8', width=W, height=H), clock)
    for k in range(10):
        clock.t += 1.0
        verdict = policy.check('bgr8', W, H, k, None)
        assert not verdict.accept and 'stream_encoding' in verdict.detail
    assert policy.check('rgb8', W, H, 100, None).accept


def test_log_limiter_one_line_per_kind_per_period_and_short_lines():
    clock = _Clock()
    limiter = LogLimiter(5.0, clock=clock)
    lines = [limiter('bad_points', f'ignoring {k}') for k in range(1000)]
    assert sum(line is not None for line in lines) == 1
    assert limiter('other_kind', 'x') == 'x'  # kinds are independent
    clock.t += 4.9
    assert limiter('bad_points', 'still') is None
    clock.t += 0.2
    line = limiter('bad_points', 'again')
    assert line.startswith('again') and '+1000 more like this' in line
    ids = short_list(range(10000))
    assert ids.endswith('... (+9992 more)]') and len(ids) < 80
    long = limiter('huge', 'ids ' + str(list(range(10000))))
    assert len(long) <= 900 and 'more characters' in long
    assert clip_text('short') == 'short'
    # emit() starts the period when the line is out, so a slow write cannot bring two lines of
    # a kind closer than the period.
    written, delays = [], [2.0, 0.0]

    def slow_write(line):  # the first line takes 2 s to come out
        clock.t += delays[len(written)]
        written.append((clock.t, line))
    start = clock.t
    assert limiter.emit('slow', 'first', slow_write)
    clock.t = start + 5.1  # 5.1 s after the first decision, only 3.1 s after its line
    assert not limiter.emit('slow', 'second', slow_write)
    clock.t += 2.0
    assert limiter.emit('slow', 'third', slow_write)
    assert written[1][0] - written[0][0] >= 5.0 and '+1 more' in written[1][1]


def test_detection_count_is_read_without_deserialising():
    for frame_id in ('', 'a', 'cam', 'camera_optical_frame'):
        msg = Detection2DArray(detections=[Detection2D() for _ in range(7)])
        msg.header.frame_id = frame_id
        assert conv.cdr_header_sequence_length(serialize_message(msg)) == 7
    assert conv.cdr_header_sequence_length(b'\x01\x02 nonsense') is None


# ------------------------------------------------------------------------------------------------
# The live node.
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def live(ros_domain_id, tmp_path_factory):
    """A raw-image tiny node and its harness, spinning in the background."""
    torch.manual_seed(0)
    checkpoint = save_checkpoint(tmp_path_factory.mktemp('ckpt') / 'tiny',
                                 MoogPerception(get_perception_config('tiny')))
    context = Context()
    rclpy.init(context=context, domain_id=ros_domain_id)
    params = {'checkpoint': str(checkpoint), 'max_frame_age': 0.0, 'grid_points': 8,
              'box_presence_threshold': 0.0, 'max_invisible_frames': 1000,
              'diagnostics_period': 0.2, 'warmup_steps': 1}
    node = MoogNode(context=context, parameter_overrides=[
        Parameter(k, value=v) for k, v in params.items()])
    harness = Harness(context, '/')
    # One executor thread, as moog_node spins (ros2/rclpy#1452; see test_node's ``live``).
    executor = SingleThreadedExecutor(context=context)
    for n in (node, harness.node):
        executor.add_node(n)
    thread = threading.Thread(target=executor.spin, daemon=True)
    thread.start()
    assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
    assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
    _wait_until(lambda: all(pub.get_subscription_count() > 0 for pub in node._pubs.values()))
    _wait_until(lambda: harness.image.get_subscription_count() > 0)
    harness.send_raw(_frame(0))
    yield node, harness, thread
    executor.shutdown()
    thread.join(timeout=5)
    node.trigger_deactivate()
    node.trigger_cleanup()
    for n in (node, harness.node):
        n.destroy_node()
    context.try_shutdown()


def _dropped(node, kind: str) -> int:
    return node.monitor.dropped_by_kind().get(kind, 0)


def test_every_input_survives_hostile_messages(live):
    node, harness, thread = live
    before = {k: _dropped(node, k) for k in ('bad_points', 'detections_over_limit',
                                             'bad_camera_info', 'bad_add_box')}
    for cloud in KILLER_CLOUDS:
        harness.add_points.publish(cloud)
    many = Detection2DArray(detections=[Detection2D() for _ in range(10000)])
    harness.detections.publish(many)
    harness.info.publish(_singular_k_info())
    point = PointStamped()
    point.point.x = float('nan')
    harness.add_point.publish(point)
    box = Detection2D()
    box.bbox.size_x = box.bbox.size_y = 1e308
    harness.add_box.publish(box)
    _wait_until(lambda: _dropped(node, 'bad_points') >= before['bad_points'] + 4
                and _dropped(node, 'detections_over_limit') > before['detections_over_limit']
                and _dropped(node, 'bad_camera_info') > before['bad_camera_info']
                and _dropped(node, 'bad_add_box') > before['bad_add_box'])
    assert thread.is_alive()
    # Still serving, and the singular K never replaced the good one.
    header, out = harness.send_raw(_frame(3), with_info=False)
    info = harness.wait_for('depth/camera_info', lambda m: m.header.stamp == header.stamp)
    assert info.k[0] == pytest.approx(50 * 32 / 48)
    assert node.monitor.counts()['errors'] == 0


def test_a_foreign_frame_does_not_touch_the_state(live):
    node, harness, _ = live
    _, out = harness.send_raw(_frame(10))
    ids = _ids(out['tracks'])
    resets = node.monitor.counts()['resets']
    foreign, outliers = _dropped(node, 'foreign_frame'), _dropped(node, 'time_outlier')
    bgr = conv.rgb_to_image(_frame(11), harness.header())
    bgr.encoding = 'bgr8'
    harness.image.publish(bgr)
    harness.send_raw(_frame(12, 40, 40), with_info=False, wait=False)
    last = harness.header()
    harness.send_raw(_frame(13), header=harness.header(2_145_000_000 * 10**9), wait=False)
    back = last.stamp.sec * 10**9 + last.stamp.nanosec - 10**9
    harness.send_raw(_frame(14), header=harness.header(back), wait=False)
    _wait_until(lambda: _dropped(node, 'foreign_frame') == foreign + 2
                and _dropped(node, 'time_outlier') == outliers + 2)
    _, out = harness.send_raw(_frame(15))
    assert _ids(out['tracks']) == ids  # the same tracks, continued
    assert node.monitor.counts()['resets'] == resets
    diag = harness.wait_for('/diagnostics', lambda m: any(
        kv.key == 'dropped_foreign_frame' and int(kv.value) >= foreign + 2
        for s in m.status for kv in s.values))
    assert isinstance(diag, DiagnosticArray)


def test_a_sustained_change_resets(live):
    node, harness, _ = live
    resets = node.monitor.counts()['resets']
    sent, taken = [], None
    deadline = time.monotonic() + 15
    while taken is None:
        header, _ = harness.send_raw(_frame(20, 40, 40), with_info=False, wait=False)
        sent.append(header)
        time.sleep(0.03)
        with harness.cond:
            stamps = {m.header.stamp.sec * 10**9 + m.header.stamp.nanosec
                      for m in harness.messages['tracks']}
        taken = next((k for k, h in enumerate(sent)
                      if h.stamp.sec * 10**9 + h.stamp.nanosec in stamps), None)
        assert time.monotonic() < deadline
    assert taken >= node.config.stream_change_frames - 1
    _wait_until(lambda: node.monitor.counts()['resets'] == resets + 1)
    assert node._policy.identity == ('rgb8', 40, 40)


def test_logs_stay_readable_under_a_flood(live, capfd):
    node, harness, _ = live
    capfd.readouterr()
    bad = _dropped(node, 'bad_points')
    for _ in range(200):
        harness.add_points.publish(KILLER_CLOUDS[0])
        point = PointStamped()
        point.point.x, point.point.y = 1e9, 1e9  # outside any view: rejected, logged
        harness.add_point.publish(point)
        time.sleep(0.002)  # the command readers keep 10: let most arrive
    many = Detection2DArray(detections=[Detection2D() for _ in range(10000)])
    harness.detections.publish(many)
    _wait_until(lambda: _dropped(node, 'bad_points') >= bad + 50)
    time.sleep(0.5)
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert sum('~/add_points_batch' in line for line in lines) <= 1, lines
    assert sum('ignoring ~/add_points:' in line for line in lines) <= 1, lines
    assert all(len(line.encode()) < 1024 for line in lines)
    assert node._limiter.held().get('bad_points', 0) > 0  # the flood was seen, and held back

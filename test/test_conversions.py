"""moog_ros.ros.conversions: message <-> numpy, without spinning a node."""
import math

import cv2
from geometry_msgs.msg import PointStamped
import numpy as np
import pytest
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointField
from std_msgs.msg import Header
from vision_msgs.msg import Detection2D, Detection2DArray, ObjectHypothesisWithPose
from visualization_msgs.msg import Marker

from moog_ros.imaging import FrameGeometry
from moog_ros.ros import conversions as conv
from moog_ros.runtime import FrameResult

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, size=(6, 10, 3), dtype=np.uint8)  # [H, W, 3]


def _header(sec: int = 12, nanosec: int = 345, frame: str = 'cam_optical') -> Header:
    header = Header(frame_id=frame)
    header.stamp.sec, header.stamp.nanosec = sec, nanosec
    return header


def _image(pixels: np.ndarray, encoding: str, pad: int = 0, bigendian: bool = False) -> Image:
    """An Image with ``pad`` bytes of row padding (so ``step`` is honoured, not assumed)."""
    H, W = pixels.shape[:2]
    if pixels.dtype.itemsize > 1:
        pixels = pixels.astype(pixels.dtype.newbyteorder('>' if bigendian else '<'))
    rows = pixels.reshape(H, -1).view(np.uint8).reshape(H, -1)
    rows = np.concatenate([rows, np.full((H, pad), 77, np.uint8)], axis=1)
    return Image(height=H, width=W, encoding=encoding, is_bigendian=bigendian,
                 step=rows.shape[1], data=rows.tobytes())


@pytest.mark.parametrize('encoding, pixels', [
    ('rgb8', RGB),
    ('bgr8', RGB[..., ::-1]),
    ('rgba8', np.concatenate([RGB, np.full((6, 10, 1), 9, np.uint8)], -1)),
    ('bgra8', np.concatenate([RGB[..., ::-1], np.full((6, 10, 1), 9, np.uint8)], -1)),
    ('rgb16', RGB.astype(np.uint16) * 257),
    ('bgr16', RGB[..., ::-1].astype(np.uint16) * 257),
])
@pytest.mark.parametrize('pad', [0, 3])
def test_colour_encodings(encoding, pixels, pad):
    for bigendian in (False, True) if pixels.dtype == np.uint16 else (False,):
        out = conv.image_to_rgb(_image(np.ascontiguousarray(pixels), encoding, pad, bigendian))
        assert out.dtype == np.uint8 and out.shape == (6, 10, 3)
        np.testing.assert_array_equal(out, RGB)


def test_mono_and_float_encodings():
    grey = RGB[..., 0]
    for encoding, pixels in (('mono8', grey), ('mono16', grey.astype(np.uint16) * 257),
                             ('32FC1', grey.astype(np.float32) / 255.0)):
        out = conv.image_to_rgb(_image(pixels, encoding, pad=2))
        np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, -1), err_msg=encoding)


def test_yuv422_byte_orders():
    """Pure red in hand-packed UYVY / YUYV (BT.601): swapping the orders would give no red."""
    y, u, v = 76, 85, 255
    uyvy = np.tile(np.array([u, y, v, y], np.uint8), (4, 4))  # 8 px wide, 4 rows
    yuyv = np.tile(np.array([y, u, y, v], np.uint8), (4, 4))
    for encoding, packed in (('uyvy', uyvy), ('yuv422', uyvy), ('yuyv', yuyv),
                             ('yuv422_yuy2', yuyv)):
        msg = Image(height=4, width=8, encoding=encoding, step=16, data=packed.tobytes())
        out = conv.image_to_rgb(msg).astype(int)
        assert out.shape == (4, 8, 3)
        assert (abs(out - [255, 0, 0]) < 30).all(), (encoding, out[0, 0])


def test_nv12_and_nv21():
    rgb = np.zeros((4, 8, 3), np.uint8)
    rgb[..., 2] = 255  # pure blue
    i420 = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420).ravel()  # Y, then U plane, then V plane
    y, u, v = i420[:32], i420[32:40], i420[40:48]
    nv12 = np.concatenate([y, np.stack([u, v], 1).ravel()])
    nv21 = np.concatenate([y, np.stack([v, u], 1).ravel()])
    for encoding, data in (('nv12', nv12), ('nv21', nv21)):
        msg = Image(height=4, width=8, encoding=encoding, step=8, data=data.tobytes())
        out = conv.image_to_rgb(msg).astype(int)
        assert (abs(out - [0, 0, 255]) < 30).all(), (encoding, out[0, 0])


@pytest.mark.parametrize('pattern', ['rggb', 'bggr', 'gbrg', 'grbg'])
def test_bayer_patterns(pattern):
    colour = {'r': 200, 'g': 100, 'b': 30}
    mosaic = np.zeros((8, 8), np.uint8)
    for k, (dy, dx) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        mosaic[dy::2, dx::2] = colour[pattern[k]]
    out = conv.image_to_rgb(_image(mosaic, f'bayer_{pattern}8'))
    np.testing.assert_allclose(out[2:-2, 2:-2].reshape(-1, 3).mean(0), [200, 100, 30], atol=2)


@pytest.mark.parametrize('msg, match', [
    (Image(height=2, width=2, encoding='hsv8', step=6, data=bytes(12)), 'unsupported encoding'),
    (Image(height=2, width=2, encoding='rgb8', step=6, data=bytes(7)), 'expected step'),
    (Image(height=0, width=2, encoding='rgb8', step=6, data=b''), 'zero size'),
    (Image(height=2, width=2, encoding='rgb8', step=4, data=bytes(12)), 'smaller than one row'),
    (Image(height=2, width=3, encoding='uyvy', step=6, data=bytes(12)), 'even width'),
    (Image(height=1, width=1, encoding='32FC1', step=4,
           data=np.array([np.nan], np.float32).tobytes()), 'NaN'),
])
def test_bad_images_name_the_problem(msg, match):
    with pytest.raises(conv.ConversionError, match=match) as info:
        conv.image_to_rgb(msg)
    assert msg.encoding in str(info.value)


def test_compressed_jpeg_and_png():
    smooth = np.zeros((16, 24, 3), np.uint8)
    smooth[..., 0], smooth[..., 1] = 180, 60
    for fmt, ext in (('jpeg', '.jpg'), ('rgb8; jpeg compressed bgr8', '.jpg'), ('png', '.png')):
        ok, data = cv2.imencode(ext, cv2.cvtColor(smooth, cv2.COLOR_RGB2BGR))
        assert ok
        out = conv.compressed_to_rgb(CompressedImage(format=fmt, data=data.tobytes()))
        assert out.shape == (16, 24, 3)
        np.testing.assert_allclose(out.astype(int), smooth.astype(int), atol=4)
    for msg, match in (
            (CompressedImage(format='jpeg', data=b'\xff\xd8\xff garbage bytes'), 'corrupt'),
            (CompressedImage(format='jpeg', data=b''), 'empty'),
            (CompressedImage(format='16UC1; compressedDepth png', data=b'1'), 'unsupported'),
            (CompressedImage(format='webp', data=b'1'), 'unsupported')):
        with pytest.raises(conv.ConversionError, match=match):
            conv.compressed_to_rgb(msg)


def _camera_info(width: int = 640, height: int = 480) -> CameraInfo:
    info = CameraInfo(width=width, height=height, distortion_model='plumb_bob')
    info.k = [500.0, 0.0, 319.5, 0.0, 500.0, 239.5, 0.0, 0.0, 1.0]
    info.p = [500.0, 0.0, 319.5, 0.0, 0.0, 500.0, 239.5, 0.0, 0.0, 0.0, 1.0, 0.0]
    info.d = [0.1, 0.0, 0.0, 0.0, 0.0]
    return info


def test_camera_info_scaled_to_model_resolution():
    geometry = FrameGeometry.fit((640, 480), (32, 32), 'crop')
    header = _header()
    out = conv.scaled_camera_info(_camera_info(), geometry, header, 'model')
    assert out.header is header and (out.width, out.height) == (32, 32)
    K = np.asarray(out.k).reshape(3, 3)
    s = 32 / 480
    # The optical centre (image centre) maps to the model centre; focal lengths scale.
    np.testing.assert_allclose(K, [[500 * s, 0, 15.5], [0, 500 * s, 15.5], [0, 0, 1]], atol=1e-9)
    np.testing.assert_allclose(np.asarray(out.p).reshape(3, 4)[:, :3], K)
    assert list(out.d) == [0.1, 0.0, 0.0, 0.0, 0.0]
    same = conv.scaled_camera_info(_camera_info(), geometry, header, 'input')
    assert (same.width, same.height) == (640, 480) and list(same.k) == list(_camera_info().k)
    info = _camera_info()
    info.p = [0.0] * 12  # P left empty by some drivers: derived from K
    out = conv.scaled_camera_info(info, geometry, header, 'model')
    np.testing.assert_allclose(np.asarray(out.p).reshape(3, 4)[:, :3], K)


def test_camera_info_rejects_zero_k_and_wrong_size():
    geometry = FrameGeometry.fit((640, 480), (32, 32), 'crop')
    with pytest.raises(conv.ConversionError, match='field k'):
        conv.camera_info_k(CameraInfo(width=640, height=480))
    with pytest.raises(conv.ConversionError, match='do not match'):
        conv.scaled_camera_info(_camera_info(320, 240), geometry, _header(), 'model')


def test_unproject_inverts_projection():
    K = np.asarray(_camera_info().k).reshape(3, 3)
    points = np.array([[0.2, -0.1, 2.0], [-1.0, 0.5, 4.0]])
    uv = (points @ K.T)[:, :2] / points[:, 2:]
    np.testing.assert_allclose(conv.unproject(K, uv, points[:, 2]), points, atol=1e-5)
    assert np.isnan(conv.unproject(None, uv, points[:, 2])).all()


def test_depth_and_overlay_images():
    depth = np.array([[1.5, np.nan, 3.0]], np.float32)
    msg = conv.depth_to_image(depth, _header())
    assert (msg.encoding, msg.width, msg.height, msg.step) == ('32FC1', 3, 1, 12)
    back = np.frombuffer(bytes(msg.data), np.float32).reshape(1, 3)
    np.testing.assert_array_equal(back, depth)  # NaN survives (REP 117: invalid)
    msg = conv.rgb_to_image(RGB, _header())
    assert (msg.encoding, msg.step) == ('rgb8', 30)
    np.testing.assert_array_equal(conv.image_to_rgb(msg), RGB)


def test_tracks_cloud_layout_and_round_trip():
    header = _header()
    ids = np.array([3, 17], np.uint32)
    xy = np.array([[10.5, 20.0], [30.0, 40.25]], np.float32)
    xyz = np.array([[0.1, 0.2, 2.0], [np.nan, np.nan, np.nan]], np.float32)
    msg = conv.tracks_to_cloud(header, ids, xy, np.array([True, False]),
                               np.array([0.9, 0.2], np.float32), xyz)
    assert msg.header is header and (msg.width, msg.height) == (2, 1)
    assert msg.point_step == 32 and msg.row_step == 64 and not msg.is_dense
    fields = {f.name: (f.offset, f.datatype) for f in msg.fields}
    assert fields['track_id'] == (20, PointField.UINT32)
    assert fields['visible'] == (24, PointField.UINT8)
    assert fields['confidence'] == (28, PointField.FLOAT32)
    points = np.frombuffer(bytes(msg.data), conv.TRACK_POINT_DTYPE)
    assert points['track_id'].tolist() == [3, 17] and points['visible'].tolist() == [1, 0]
    np.testing.assert_allclose(points['z'][0], 2.0)
    np.testing.assert_array_equal(conv.cloud_to_xy(msg), xy)
    msg.data = bytes(msg.data)[:40]
    with pytest.raises(conv.ConversionError, match='expected point_step'):
        conv.cloud_to_xy(msg)


def test_point_stamped_to_xy():
    msg = PointStamped()
    msg.point.x, msg.point.y = 12.0, 7.5
    np.testing.assert_array_equal(conv.point_to_xy(msg), [[12.0, 7.5]])


def test_detections_round_trip_with_ids_and_labels():
    header = _header()
    msg = conv.boxes_to_detections(header, np.array([5, 9], np.uint32),
                                   np.array([[10, 20, 50, 60], [0, 0, 4, 8]], np.float32),
                                   np.array([0.8, 0.6], np.float32), ['cup', ''])
    assert msg.header is header
    assert [d.id for d in msg.detections] == ['5', '9']
    assert all(d.header is header for d in msg.detections)
    det = msg.detections[0]
    assert (det.bbox.center.position.x, det.bbox.center.position.y) == (30.0, 40.0)
    assert (det.bbox.size_x, det.bbox.size_y) == (40.0, 40.0)
    assert det.results[0].hypothesis.class_id == 'cup'
    assert det.results[0].hypothesis.score == pytest.approx(0.8)
    assert msg.detections[1].results[0].hypothesis.class_id == 'object'
    xyxy, labels = conv.detections_to_xyxy(msg)
    np.testing.assert_allclose(xyxy, [[10, 20, 50, 60], [0, 0, 4, 8]])
    assert labels == ['cup', 'object']


def test_detection_input_validation_and_rotation():
    det = Detection2D()
    det.bbox.center.position.x, det.bbox.center.position.y = 50.0, 50.0
    det.bbox.size_x, det.bbox.size_y = 20.0, 10.0
    det.bbox.center.theta = math.pi / 2  # rotated a quarter turn: the hull swaps the sides
    np.testing.assert_allclose(conv.bbox_to_xyxy(det.bbox), [45, 40, 55, 60], atol=1e-9)
    hypotheses = [ObjectHypothesisWithPose(), ObjectHypothesisWithPose()]
    hypotheses[0].hypothesis.class_id, hypotheses[0].hypothesis.score = 'cat', 0.3
    hypotheses[1].hypothesis.class_id, hypotheses[1].hypothesis.score = 'dog', 0.7
    det.results = hypotheses
    assert conv.detection_label(det) == 'dog'
    bad = Detection2D()
    bad.bbox.size_x = -1.0
    with pytest.raises(conv.ConversionError, match=r'detections\[1\]\.bbox'):
        conv.detections_to_xyxy(Detection2DArray(detections=[det, bad]))


def test_track_markers_are_stable_and_deleted_when_gone():
    header = _header()
    ids = np.array([1, 2, 3], np.uint32)
    xyz = np.array([[0, 0, 1.0], [0.1, 0, 2.0], [np.nan, np.nan, np.nan]], np.float32)
    trails = np.full((3, 4, 3), np.nan, np.float32)
    trails[0, 2:] = [[0, 0, 1.0], [0.01, 0, 1.0]]
    trails[2, 2:] = [[0, 0, 1.0], [0.01, 0, 1.0]]
    markers, drawn = conv.track_markers(header, ids, xyz, np.array([True, False, True]), trails,
                                        previous_ids={2, 7})
    assert drawn == {1}  # 2 has no trail yet, 3 has no depth
    by_key = {(m.ns, m.id): m for m in markers.markers}
    points = by_key[('tracks', 0)]
    assert points.type == Marker.SPHERE_LIST and len(points.points) == 2
    assert points.colors[1].a < points.colors[0].a  # occluded: faded
    trail = by_key[('track_trails', 1)]
    assert trail.type == Marker.LINE_STRIP and len(trail.points) == 2
    assert by_key[('track_trails', 2)].action == Marker.DELETE  # drawn before, no trail now
    assert by_key[('track_trails', 7)].action == Marker.DELETE  # gone since the last frame
    assert ('track_trails', 3) not in by_key
    assert all(m.header is header for m in markers.markers)
    markers, drawn = conv.track_markers(header, ids[2:], xyz[2:], np.ones(1, bool), None, drawn)
    assert {(m.ns, m.id, m.action) for m in markers.markers} == {
        ('tracks', 0, Marker.DELETE), ('track_trails', 1, Marker.DELETE)}
    assert drawn == set()


def test_box_markers():
    header = _header()
    K = np.asarray(_camera_info().k).reshape(3, 3)
    markers, drawn = conv.box_markers(header, np.array([4, 6], np.uint32),
                                      np.array([[300, 220, 340, 260], [0, 0, 10, 10]]),
                                      np.array([2.0, np.nan]), ['cup', ''], K, previous_ids={9})
    assert drawn == {4}
    by_key = {(m.ns, m.id): m for m in markers.markers}
    outline = by_key[('boxes', 4)]
    assert outline.type == Marker.LINE_STRIP and len(outline.points) == 5
    assert all(p.z == pytest.approx(2.0) for p in outline.points)
    assert by_key[('box_labels', 4)].text == '#4 cup'
    assert by_key[('boxes', 9)].action == Marker.DELETE
    empty, drawn = conv.box_markers(header, np.array([4], np.uint32), np.zeros((1, 4)),
                                    np.ones(1), [''], None, previous_ids=set())
    assert not empty.markers and not drawn


def test_stamp_to_ns():
    assert conv.stamp_to_ns(_header(3, 25).stamp) == 3_000_000_025


def _result(track_ids, geometry, boxes: int = 1) -> FrameResult:
    N = len(track_ids)
    return FrameResult(
        stamp_ns=0, frame_index=0, geometry=geometry,
        depth_m=np.full((32, 32), 2.0, np.float32),
        track_ids=np.asarray(track_ids, np.uint32),
        tracks_xy=np.tile(np.array([[300.0, 200.0]], np.float32), (N, 1)),
        tracks_visible=np.ones(N, bool), tracks_confidence=np.ones(N, np.float32),
        tracks_depth_m=np.full(N, 2.0, np.float32), ended_track_ids=np.zeros(0, np.uint32),
        box_ids=np.arange(100, 100 + boxes, dtype=np.uint32),
        boxes_xyxy=np.tile(np.array([[250.0, 150.0, 350.0, 250.0]], np.float32), (boxes, 1)),
        boxes_score=np.ones(boxes, np.float32), boxes_depth_m=np.full(boxes, 2.0, np.float32),
        box_labels=('cup',) * boxes, ended_box_ids=np.zeros(0, np.uint32), reset_reason=None,
        notes=(), step_ms=1.0, total_ms=2.0)


def test_frame_message_builder():
    geometry = FrameGeometry.fit((640, 480), (32, 32), 'crop')
    header = _header()
    rgb = np.zeros((480, 640, 3), np.uint8)
    builder = conv.FrameMessageBuilder('model')
    trails = np.full((2, 3, 3), np.nan, np.float32)
    trails[:, 1:] = [300.0, 200.0, 2.0]
    out = builder.build(header, rgb, _result([1, 2], geometry), _camera_info(), trails)
    assert set(out) == set(conv.OUTPUT_TOPICS)
    assert all(msg.header is header for key, msg in out.items() if 'markers' not in key)
    assert (out['depth_info'].width, out['overlay'].width) == (32, 640)
    assert builder.overlay_rgb.shape == (480, 640, 3) and builder.overlay_rgb.any()
    # Track 2 vanishes: its markers are deleted; only the cheap outputs are wanted.
    out = builder.build(header, rgb, _result([1], geometry), _camera_info(), trails[:1],
                        wanted={'tracks', 'track_markers'})
    assert set(out) == {'tracks', 'track_markers'}
    deleted = {(m.ns, m.id) for m in out['track_markers'].markers if m.action == Marker.DELETE}
    assert deleted == {('track_trails', 2)}
    # No CameraInfo for this size: no depth_info, NaN positions, the markers are taken down.
    out = builder.build(header, rgb, _result([1], geometry), _camera_info(320, 240))
    assert 'depth_info' not in out
    points = np.frombuffer(bytes(out['tracks'].data), conv.TRACK_POINT_DTYPE)
    assert np.isnan(points['z']).all()
    assert all(m.action == Marker.DELETE for m in out['track_markers'].markers)
    assert {(m.ns, m.id) for m in out['box_markers'].markers} == {('boxes', 100),
                                                                  ('box_labels', 100)}
    out = builder.build(header, rgb, _result([1], geometry, boxes=0), None)
    assert 'box_markers' not in out  # nothing left to delete: nothing sent

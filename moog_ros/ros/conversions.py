"""Pure ROS message <-> numpy conversions (no node, no spinning; unit-tested in isolation).

Inputs: ``sensor_msgs/Image`` in the common encodings, ``CompressedImage`` (jpeg/png) -- both
decoded by the pure :mod:`moog_ros.image_codecs` that bag training shares --,
``CameraInfo`` intrinsics, clicked points, batches of points and detector boxes.
Outputs: REP 118 depth (``32FC1`` metres, NaN invalid), its ``CameraInfo`` scaled to the depth
resolution, ``PointCloud2`` tracks, ``vision_msgs/Detection2DArray`` boxes with persistent ids,
``MarkerArray`` s for RViz and the ``rgb8`` overlay.

Every builder takes the *input* image's header and puts it on what it returns, so outputs pair
with their source frame in ``message_filters`` and TF. The node and ``moog_infer`` both use these
functions; ``moog_infer`` serialises the returned objects with ``rclpy.serialization``.

Bad input raises :class:`ConversionError` (a ``ValueError``) whose message names the message
type, the field and the problem; callers log it and drop the message.
"""
from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
import copy
import struct
import sys
from typing import TYPE_CHECKING

from geometry_msgs.msg import Point, PointStamped
import numpy as np
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2, PointField
from std_msgs.msg import ColorRGBA, Header
from vision_msgs.msg import (
    BoundingBox2D,
    Detection2D,
    Detection2DArray,
    ObjectHypothesis,
    ObjectHypothesisWithPose,
)
from visualization_msgs.msg import Marker, MarkerArray

from moog_ros import image_codecs
from moog_ros.imaging import FrameGeometry, draw_overlay, id_colour
from moog_ros.logtext import short_list

if TYPE_CHECKING:  # the runtime imports torch; conversions only needs its result type
    from moog_ros.runtime import FrameResult


class ConversionError(ValueError):
    """A message that cannot be converted; the text names the message, field and problem.

    Image decoding errors are :class:`moog_ros.image_codecs.ImageDecodeError` re-raised as this
    class with the same text (and chained), so the node handles one error type.
    """


# ------------------------------------------------------------------------------------------------
# Time.
# ------------------------------------------------------------------------------------------------

def stamp_to_ns(stamp) -> int:
    """``builtin_interfaces/Time`` -> integer nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


# ------------------------------------------------------------------------------------------------
# Images in.
# ------------------------------------------------------------------------------------------------

def _bytes_view(data) -> np.ndarray:
    """uint8 view of a message's ``data`` (array.array, bytes or list) without copying."""
    if isinstance(data, list | tuple):  # only hand-built messages; the middleware gives buffers
        return np.asarray(data, dtype=np.uint8)
    return np.frombuffer(data, dtype=np.uint8)


def image_to_rgb(msg: Image, max_pixels: int | None = None) -> np.ndarray:
    """Converts a ``sensor_msgs/Image`` to RGB uint8 ``[H, W, 3]``.

    A thin wrapper of :func:`moog_ros.image_codecs.decode_rgb` (the one decoder shared with
    ``moog_infer`` and bag training): ``rgb8`` is a zero-copy view of ``msg.data``, 16-bit data
    keeps its top 8 bits, ``32FC1`` is intensity in [0, 1].

    Raises:
        ConversionError: unsupported encoding, zero size, more than ``max_pixels`` (None: the
            codec's ``DEFAULT_MAX_PIXELS``), ``step`` too small, data shorter than
            ``step * height`` or non-finite values in a float image (the text of the codec's
            :class:`~moog_ros.image_codecs.ImageDecodeError`, which it chains).
    """
    try:
        return image_codecs.image_msg_to_rgb(msg, max_pixels)
    except image_codecs.ImageDecodeError as err:
        raise ConversionError(str(err)) from err


def image_header(msg: Image, max_pixels: int | None = None) -> tuple[str, int, int]:
    """``(encoding, width, height)`` of an Image whose header and layout are valid.

    Arithmetic on the header only (no pixel is converted), so a receiver can refuse a bad
    frame before it displaces a good one waiting for inference.

    Raises:
        ConversionError: what :func:`image_to_rgb` would raise, except for non-finite float
            values (found only by decoding).
    """
    try:
        image_codecs.check_image_layout(msg.encoding, msg.height, msg.width, msg.step, msg.data,
                                        max_pixels)
    except image_codecs.ImageDecodeError as err:
        raise ConversionError(str(err)) from err
    return msg.encoding, int(msg.width), int(msg.height)


def compressed_header(msg: CompressedImage, max_pixels: int | None = None
                      ) -> tuple[str, int, int]:
    """``(encoding, width, height)`` of a CompressedImage from its PNG/JPEG header alone.

    ``encoding`` is the original encoding image_transport names before the codec (``'rgb8'``
    of ``'rgb8; jpeg compressed bgr8'``), ``''`` for a bare ``'jpeg'``/``'png'``: the codec
    itself does not make another stream (both decode to the same RGB).

    Raises:
        ConversionError: empty, neither PNG nor JPEG, damaged or truncated, or more than
            ``max_pixels`` (a decompression bomb is refused here, before any decoding).
    """
    try:
        width, height = image_codecs.compressed_size(msg.format, msg.data, max_pixels)
    except image_codecs.ImageDecodeError as err:
        raise ConversionError(str(err)) from err
    return msg.format.partition(';')[0].strip() if ';' in msg.format else '', width, height


def compressed_to_rgb(msg: CompressedImage, max_pixels: int | None = None) -> np.ndarray:
    """Decodes a ``sensor_msgs/CompressedImage`` (jpeg or png) to RGB uint8 ``[H, W, 3]``.

    A thin wrapper of :func:`moog_ros.image_codecs.decode_compressed_rgb`: ``format`` may be a
    bare ``'jpeg'``/``'png'`` (BGR inside, as OpenCV decodes) or image_transport's
    ``'<encoding>; jpeg compressed <order>'`` (``<order>`` honoured). ``compressedDepth`` is
    rejected.

    Raises:
        ConversionError: unsupported format, empty, truncated or undecodable data, or a header
            claiming more than ``max_pixels`` (checked before decoding).
    """
    try:
        return image_codecs.compressed_msg_to_rgb(msg, max_pixels)
    except image_codecs.ImageDecodeError as err:
        raise ConversionError(str(err)) from err


# ------------------------------------------------------------------------------------------------
# Camera intrinsics.
# ------------------------------------------------------------------------------------------------

def camera_info_k(msg: CameraInfo) -> np.ndarray:
    """``[3, 3]`` float64 K of a CameraInfo, validated.

    Raises:
        ConversionError: non-finite K, a non-positive focal length (an uncalibrated camera
            publishes K = 0) or a K that cannot be inverted (3-D positions need ``K^-1``).
    """
    K = np.asarray(msg.k, dtype=np.float64).reshape(3, 3)
    if not np.isfinite(K).all() or K[0, 0] <= 0 or K[1, 1] <= 0 or K[2, 2] != 1.0:
        raise ConversionError(f'CameraInfo ({msg.width}x{msg.height}): field k is not a '
                              f'calibrated camera matrix (fx, fy > 0, k[8] = 1): '
                              f'{K.ravel().tolist()}')
    # fx, fy > 0 and k[8] = 1 do not make K invertible (e.g. two equal rows). A condition number
    # this large means K^-1 amplifies rounding into metres of error, or overflows (1e308).
    with np.errstate(all='ignore'):
        condition = np.linalg.cond(K)
    if not np.isfinite(condition) or condition > _MAX_K_CONDITION:
        raise ConversionError(f'CameraInfo ({msg.width}x{msg.height}): field k is singular or '
                              f'ill-conditioned (condition number {condition:.3g}): '
                              f'{K.ravel().tolist()}')
    return K


_MAX_K_CONDITION = 1e12


def scaled_camera_info(msg: CameraInfo, geometry: FrameGeometry, header: Header,
                       resolution: str) -> CameraInfo:
    """The CameraInfo of a map published at ``resolution`` ('model' or 'input').

    At model resolution K and P go through the same affine map as the pixels (crop offset and
    pad bars included: ``K' = A @ K``, ``P' = A @ P``) and width/height become the model size,
    so ``depth_image_proc``'s ``point_cloud_xyz`` reprojects the depth image correctly.
    Distortion and R are unchanged; binning and ROI are reset (the image is full-frame).

    Raises:
        ConversionError: the CameraInfo's size does not match the image it should describe,
            or its K is not calibrated.
    """
    camera_info_k(msg)
    if (int(msg.width), int(msg.height)) != tuple(geometry.input_wh):
        raise ConversionError(
            f'CameraInfo: width/height {msg.width}x{msg.height} do not match the image '
            f'({geometry.input_wh[0]}x{geometry.input_wh[1]})')
    out = CameraInfo()
    out.header = header
    out.distortion_model = msg.distortion_model
    out.d = msg.d
    out.r = msg.r
    if resolution == 'input':
        out.width, out.height = msg.width, msg.height
        out.k, out.p = msg.k, msg.p
        out.binning_x, out.binning_y, out.roi = msg.binning_x, msg.binning_y, msg.roi
        return out
    if resolution != 'model':
        raise ValueError(f"resolution: expected 'model' or 'input', got {resolution!r}")
    out.width, out.height = geometry.model_wh
    out.k = geometry.scale_intrinsics(np.asarray(msg.k, np.float64).reshape(3, 3)).ravel()
    P = np.asarray(msg.p, np.float64).reshape(3, 4)
    if not P.any():  # P is optional in practice; derive it from K like image_proc does
        P[:, :3] = np.asarray(msg.k, np.float64).reshape(3, 3)
    out.p = geometry.scale_intrinsics(P).ravel()
    return out


def unproject(K: np.ndarray | None, xy: np.ndarray, depth_m: np.ndarray) -> np.ndarray:
    """Camera-frame points ``[N, 3]`` (float32, metres) of pixels ``xy [N, 2]`` at depth ``[N]``.

    ``p = z * K^-1 [u, v, 1]`` (optical frame: x right, y down, z forward). NaN where the depth
    is NaN or K is None. Assumes a rectified image (like depth_image_proc).
    """
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    if K is None:
        return np.full((len(xy), 3), np.nan, dtype=np.float32)
    rays = np.concatenate([xy, np.ones((len(xy), 1))], axis=1) @ np.linalg.inv(K).T  # [N, 3]
    return (rays * np.asarray(depth_m, dtype=np.float64).reshape(-1, 1)).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Images out.
# ------------------------------------------------------------------------------------------------

_BIG_ENDIAN_HOST = sys.byteorder == 'big'


def depth_to_image(depth_m: np.ndarray, header: Header) -> Image:
    """REP 118 depth: ``32FC1`` metres along z, NaN invalid (REP 117), from ``[H, W]``."""
    depth = np.ascontiguousarray(depth_m, dtype=np.float32)
    if depth.ndim != 2:
        raise ValueError(f'depth_to_image: expected [H, W], got {list(depth.shape)}')
    msg = Image()
    msg.header = header
    msg.height, msg.width = depth.shape
    msg.encoding = '32FC1'
    msg.is_bigendian = _BIG_ENDIAN_HOST
    msg.step = 4 * depth.shape[1]
    msg.data = depth.tobytes()
    return msg


def rgb_to_image(rgb: np.ndarray, header: Header) -> Image:
    """``rgb8`` Image from uint8 ``[H, W, 3]``."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f'rgb_to_image: expected [H, W, 3], got {list(rgb.shape)}')
    msg = Image()
    msg.header = header
    msg.height, msg.width = rgb.shape[:2]
    msg.encoding = 'rgb8'
    msg.is_bigendian = False
    msg.step = 3 * rgb.shape[1]
    msg.data = rgb.tobytes()
    return msg


# ------------------------------------------------------------------------------------------------
# Tracks as PointCloud2.
# ------------------------------------------------------------------------------------------------

# Packed 32-byte points: 4-byte alignment for every float, 3 bytes of padding after `visible`.
TRACK_POINT_DTYPE = np.dtype({
    'names': ['x', 'y', 'z', 'u', 'v', 'track_id', 'visible', 'confidence'],
    'formats': ['<f4', '<f4', '<f4', '<f4', '<f4', '<u4', 'u1', '<f4'],
    'offsets': [0, 4, 8, 12, 16, 20, 24, 28],
    'itemsize': 32,
})
_POINT_FIELD_TYPES = {'<f4': PointField.FLOAT32, '<u4': PointField.UINT32, '|u1': PointField.UINT8}


def tracks_to_cloud(header: Header, track_ids: np.ndarray, tracks_xy: np.ndarray,
                    tracks_visible: np.ndarray, tracks_confidence: np.ndarray,
                    tracks_xyz: np.ndarray) -> PointCloud2:
    """Point tracks as an unorganised ``PointCloud2`` in the camera optical frame.

    Fields: ``x, y, z`` (float32 metres; NaN without depth or intrinsics), ``u, v`` (float32
    input pixels), ``track_id`` (uint32), ``visible`` (uint8 0/1), ``confidence`` (float32).
    """
    N = len(track_ids)
    points = np.zeros(N, dtype=TRACK_POINT_DTYPE)
    xyz = np.asarray(tracks_xyz, dtype=np.float32).reshape(N, 3)
    points['x'], points['y'], points['z'] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    xy = np.asarray(tracks_xy, dtype=np.float32).reshape(N, 2)
    points['u'], points['v'] = xy[:, 0], xy[:, 1]
    points['track_id'] = track_ids
    points['visible'] = tracks_visible
    points['confidence'] = tracks_confidence
    msg = PointCloud2()
    msg.header = header
    msg.height, msg.width = 1, N
    msg.fields = [
        PointField(name=name, offset=TRACK_POINT_DTYPE.fields[name][1],
                   datatype=_POINT_FIELD_TYPES[TRACK_POINT_DTYPE.fields[name][0].str], count=1)
        for name in TRACK_POINT_DTYPE.names
    ]
    msg.is_bigendian = False
    msg.point_step = TRACK_POINT_DTYPE.itemsize
    msg.row_step = TRACK_POINT_DTYPE.itemsize * N
    msg.is_dense = bool(np.isfinite(xyz).all())
    msg.data = points.tobytes()
    return msg


_CLOUD_NUMPY_TYPES = {PointField.FLOAT32: 'f4', PointField.FLOAT64: 'f8'}


def cloud_to_xy(msg: PointCloud2, max_points: int | None = None) -> np.ndarray:
    """Pixel positions ``[N, 2]`` (float64) from a PointCloud2 with fields ``u, v`` (or ``x, y``).

    Used for batches of query points on ``~/add_points_batch``.

    Raises:
        ConversionError: missing or non-float fields, a ``point_step`` that cannot hold the
            fields (0, smaller than them, a field offset past it), more than ``max_points``
            points, or data shorter than the declared size.
    """
    fields = {f.name: f for f in msg.fields}
    names = ('u', 'v') if {'u', 'v'} <= fields.keys() else ('x', 'y')
    where = f'PointCloud2 ({msg.width}x{msg.height} points, point_step {msg.point_step})'
    for name in names:
        if name not in fields:
            raise ConversionError(f'{where}: needs float fields u, v (or x, y); has '
                                  f'{short_list(sorted(fields))}')
        if fields[name].datatype not in _CLOUD_NUMPY_TYPES:
            raise ConversionError(f'{where}: field {name!r} must be FLOAT32 or FLOAT64')
    step = int(msg.point_step)
    for name in names:
        # NumPy refuses a structured dtype whose fields do not fit its itemsize (ValueError):
        # check here so every bad layout is a ConversionError naming the field.
        end = int(fields[name].offset) + int(_CLOUD_NUMPY_TYPES[fields[name].datatype][1])
        if end > step:
            raise ConversionError(f'{where}: field {name!r} at offset {fields[name].offset} '
                                  f'does not fit in point_step {step}')
    count = int(msg.width) * int(msg.height)
    if max_points is not None and count > max_points:
        raise ConversionError(f'{where}: {count} points is over the limit of {max_points} '
                              '(max_points_per_message)')
    raw = _bytes_view(msg.data)
    if raw.size < count * step:
        raise ConversionError(f'{where}: data has {raw.size} bytes, expected point_step * '
                              f'count = {count * step}')
    order = '>' if msg.is_bigendian else '<'
    try:
        dtype = np.dtype({
            'names': list(names),
            'formats': [order + _CLOUD_NUMPY_TYPES[fields[n].datatype] for n in names],
            'offsets': [int(fields[n].offset) for n in names],
            'itemsize': step,
        })
    except (ValueError, TypeError) as err:  # anything the checks above missed
        raise ConversionError(f'{where}: unusable field layout: {err}') from err
    points = np.frombuffer(raw[:count * step].tobytes(), dtype=dtype)
    return np.stack([points[names[0]], points[names[1]]], axis=1).astype(np.float64)


def point_to_xy(msg: PointStamped) -> np.ndarray:
    """``[1, 2]`` pixel position from a PointStamped (x, y in input pixels; z ignored)."""
    return np.array([[msg.point.x, msg.point.y]], dtype=np.float64)


# ------------------------------------------------------------------------------------------------
# Boxes.
# ------------------------------------------------------------------------------------------------

def bbox_to_xyxy(bbox: BoundingBox2D, where: str = 'BoundingBox2D') -> np.ndarray:
    """``[4]`` xyxy pixels of a (possibly rotated) BoundingBox2D: its axis-aligned hull.

    Raises:
        ConversionError: non-finite values or a non-positive size.
    """
    cx, cy = bbox.center.position.x, bbox.center.position.y
    w, h, theta = bbox.size_x, bbox.size_y, bbox.center.theta
    if not np.isfinite([cx, cy, w, h, theta]).all() or w <= 0 or h <= 0:
        raise ConversionError(f'{where}: center ({cx}, {cy}), size {w}x{h}, theta {theta}: '
                              'needs finite values and a positive size')
    # Half-extents of the rotated rectangle's axis-aligned hull.
    c, s = abs(np.cos(theta)), abs(np.sin(theta))
    hw, hh = 0.5 * (w * c + h * s), 0.5 * (w * s + h * c)
    return np.array([cx - hw, cy - hh, cx + hw, cy + hh], dtype=np.float64)


def detection_label(det: Detection2D) -> str:
    """The class id of a detection's most likely hypothesis ('' if it has none)."""
    if not det.results:
        return ''
    best = max(det.results, key=lambda r: r.hypothesis.score)
    return best.hypothesis.class_id


def detections_to_xyxy(msg: Detection2DArray, max_detections: int | None = None
                       ) -> tuple[np.ndarray, list[str]]:
    """Boxes ``[N, 4]`` (xyxy input pixels) and class labels of a Detection2DArray.

    Raises:
        ConversionError: more than ``max_detections`` detections (checked before any is
            converted), or any detection has an invalid box (the message names its index).
    """
    if max_detections is not None and len(msg.detections) > max_detections:
        raise ConversionError(f'Detection2DArray: {len(msg.detections)} detections is over the '
                              f'limit of {max_detections} (max_detections)')
    boxes = [bbox_to_xyxy(det.bbox, f'Detection2DArray.detections[{k}].bbox')
             for k, det in enumerate(msg.detections)]
    labels = [detection_label(det) for det in msg.detections]
    return np.array(boxes, dtype=np.float64).reshape(-1, 4), labels


def cdr_header_sequence_length(raw: bytes | memoryview) -> int | None:
    """The length of the first sequence after a ``std_msgs/Header`` in a serialised message.

    For a ``Detection2DArray`` that is the number of detections, read from the CDR bytes
    without deserialising them: building 10,000 ``Detection2D`` objects holds the interpreter
    for a tenth of a second, long enough for camera frames to be overwritten in their
    keep-last reader. None when the bytes are too short or not CDR.

    Layout (after the 4-byte encapsulation header): ``int32 sec, uint32 nanosec``, the
    ``frame_id`` string (``uint32`` length including the NUL, then the bytes), padding to 4,
    then the sequence's ``uint32`` length.
    """
    raw = bytes(raw[:4096]) if len(raw) > 4096 else bytes(raw)
    if len(raw) < 16 or raw[0] != 0 or raw[1] not in (0, 1):
        return None
    order = '<' if raw[1] == 1 else '>'
    (text_length,) = struct.unpack_from(order + 'I', raw, 4 + 8)
    offset = 4 + (8 + 4 + text_length + 3) // 4 * 4
    if offset + 4 > len(raw):
        return None
    return struct.unpack_from(order + 'I', raw, offset)[0]


def boxes_to_detections(header: Header, box_ids: np.ndarray, boxes_xyxy: np.ndarray,
                        boxes_score: np.ndarray, box_labels: Sequence[str]) -> Detection2DArray:
    """``Detection2DArray`` with ``Detection2D.id`` = the persistent box-track id.

    Boxes are axis-aligned in input pixels; each detection has one hypothesis whose ``class_id``
    is the label the track was seeded with (``'object'`` if none) and whose ``score`` is the
    presence probability.
    """
    out = Detection2DArray()
    out.header = header
    for box_id, (x0, y0, x1, y1), score, label in zip(
            np.asarray(box_ids).tolist(), np.asarray(boxes_xyxy, np.float64).tolist(),
            np.asarray(boxes_score, np.float64).tolist(), box_labels):
        det = Detection2D()
        det.header = header
        det.id = str(box_id)
        det.bbox.center.position.x = 0.5 * (x0 + x1)
        det.bbox.center.position.y = 0.5 * (y0 + y1)
        det.bbox.size_x = max(0.0, x1 - x0)
        det.bbox.size_y = max(0.0, y1 - y0)
        det.results = [ObjectHypothesisWithPose(
            hypothesis=ObjectHypothesis(class_id=label or 'object', score=score))]
        out.detections.append(det)
    return out


# ------------------------------------------------------------------------------------------------
# RViz markers. Each track/box owns one marker id per namespace (= its track id); markers of ids
# that were published before and are gone now are deleted explicitly, so RViz never shows a dead
# track and no lifetime has to guess the frame rate.
# ------------------------------------------------------------------------------------------------

def _colour(track_id: int, alpha: float) -> ColorRGBA:
    r, g, b = id_colour(track_id)
    return ColorRGBA(r=r / 255.0, g=g / 255.0, b=b / 255.0, a=float(alpha))


def _delete(header: Header, ns: str, marker_id: int) -> Marker:
    return Marker(header=header, ns=ns, id=int(marker_id), action=Marker.DELETE)


def _points(xyz: np.ndarray) -> list[Point]:
    return [Point(x=x, y=y, z=z) for x, y, z in np.asarray(xyz, np.float64).tolist()]


TRACK_POINTS_NS = 'tracks'  # one SPHERE_LIST (id 0) with every current point
TRACK_TRAILS_NS = 'track_trails'  # one LINE_STRIP per track, id = track id
BOX_NAMESPACES = ('boxes', 'box_labels')


def track_markers(header: Header, track_ids: np.ndarray, tracks_xyz: np.ndarray,
                  tracks_visible: np.ndarray, trails_xyz: np.ndarray | None,
                  previous_ids: Iterable[int]) -> tuple[MarkerArray, set[int]]:
    """Point tracks in the optical frame: a trail per track plus all current points.

    Each track owns the ``track_trails`` marker whose id is its track id (a LINE_STRIP of its
    recent positions, ending at the current one); trails of vanished tracks are deleted. The
    current points share one SPHERE_LIST (``tracks``, id 0) coloured per track, occluded ones
    translucent: one marker instead of one per track keeps building and serialising the array
    cheap (rclpy pays per message object).

    Args:
        header: the input image's header.
        track_ids: uint32 ``[N]``.
        tracks_xyz: ``[N, 3]`` metres; tracks with NaN are not drawn (trails deleted if drawn).
        tracks_visible: bool ``[N]``.
        trails_xyz: ``[N, L, 3]`` recent positions, oldest first (NaN gaps skipped), or None.
        previous_ids: trail ids drawn by the previous call.

    Returns:
        ``(markers, drawn_ids)``; pass ``drawn_ids`` as ``previous_ids`` next time.
    """
    markers = MarkerArray()
    drawn: set[int] = set()
    xyz = np.asarray(tracks_xyz, dtype=np.float64).reshape(-1, 3)
    ids = np.asarray(track_ids).tolist()
    finite = np.isfinite(xyz).all(axis=1)
    if finite.any():
        # Sized by the median range so a point covers about the same pixels near and far.
        diameter = max(0.004, 0.012 * float(np.median(xyz[finite, 2])))
        points = Marker(header=header, ns=TRACK_POINTS_NS, id=0, type=Marker.SPHERE_LIST,
                        action=Marker.ADD)
        points.pose.orientation.w = 1.0
        points.scale.x = points.scale.y = points.scale.z = diameter
        points.points = _points(xyz[finite])
        points.colors = [_colour(ids[k], 1.0 if tracks_visible[k] else 0.35)
                         for k in np.flatnonzero(finite)]
        markers.markers.append(points)
        if trails_xyz is not None:
            trails = np.asarray(trails_xyz, dtype=np.float64)
            trail_ok = np.isfinite(trails).all(axis=2)  # [N, L]
            # Marker() builds every nested default (texture, mesh, lifetime, ...): ~45 us each,
            # most of this function's time with hundreds of tracks. Trails differ only in id,
            # colour and points, so each is a shallow copy of one prototype (nested header, pose
            # and scale are shared and never mutated after this).
            proto = Marker(header=header, ns=TRACK_TRAILS_NS, type=Marker.LINE_STRIP,
                           action=Marker.ADD)
            proto.pose.orientation.w = 1.0
            proto.scale.x = 0.5 * diameter
            for k in np.flatnonzero(finite & (trail_ok.sum(axis=1) >= 2)):  # a strip needs 2
                trail = copy.copy(proto)
                trail.id = ids[k]
                trail.color = _colour(ids[k], 0.8)
                trail.points = _points(trails[k, trail_ok[k]])
                markers.markers.append(trail)
                drawn.add(ids[k])
    else:
        markers.markers.append(_delete(header, TRACK_POINTS_NS, 0))
    for stale in sorted(set(previous_ids) - drawn):
        markers.markers.append(_delete(header, TRACK_TRAILS_NS, stale))
    return markers, drawn


def box_markers(header: Header, box_ids: np.ndarray, boxes_xyxy: np.ndarray,
                boxes_depth_m: np.ndarray, box_labels: Sequence[str], K: np.ndarray | None,
                previous_ids: Iterable[int]) -> tuple[MarkerArray, set[int]]:
    """Each box as a rectangle (LINE_STRIP) at its median depth, plus a text label.

    Boxes without a finite depth or without intrinsics are not drawn (and deleted if they were).

    Returns:
        ``(markers, drawn_ids)``; pass ``drawn_ids`` as ``previous_ids`` next time.
    """
    markers = MarkerArray()
    drawn: set[int] = set()
    if K is not None:
        for k, box_id in enumerate(np.asarray(box_ids).tolist()):
            depth = float(boxes_depth_m[k])
            x0, y0, x1, y1 = np.asarray(boxes_xyxy[k], np.float64)
            if not np.isfinite([depth, x0, y0, x1, y1]).all():
                continue
            drawn.add(box_id)
            corners_xy = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]])
            corners = unproject(K, corners_xy, np.full(5, depth))
            outline = Marker(header=header, ns='boxes', id=box_id, type=Marker.LINE_STRIP,
                             action=Marker.ADD, color=_colour(box_id, 1.0))
            outline.pose.orientation.w = 1.0
            outline.scale.x = max(0.004, 0.006 * depth)
            outline.points = _points(corners)
            label = Marker(header=header, ns='box_labels', id=box_id,
                           type=Marker.TEXT_VIEW_FACING, action=Marker.ADD,
                           color=_colour(box_id, 1.0))
            label.pose.position = Point(x=float(corners[0, 0]), y=float(corners[0, 1]),
                                        z=float(corners[0, 2]))
            label.pose.orientation.w = 1.0
            label.scale.z = max(0.02, 0.05 * depth)  # text height in metres
            label.text = f'#{box_id} {box_labels[k]}'.rstrip()
            markers.markers += [outline, label]
    for stale in sorted(set(previous_ids) - drawn):
        markers.markers += [_delete(header, ns, stale) for ns in BOX_NAMESPACES]
    return markers, drawn


def delete_all_markers(header: Header) -> MarkerArray:
    """One DELETEALL marker (sent after a state reset, when every id is gone at once)."""
    return MarkerArray(markers=[Marker(header=header, action=Marker.DELETEALL)])



# ------------------------------------------------------------------------------------------------
# Every output of one frame.
# ------------------------------------------------------------------------------------------------

# Output key -> relative topic of the node (moog_infer writes the same names into bags).
OUTPUT_TOPICS = {
    'depth': 'depth/image',
    'depth_info': 'depth/camera_info',
    'tracks': 'tracks',
    'track_markers': 'tracks/markers',
    'detections': 'detections',
    'box_markers': 'detections/markers',
    'overlay': 'overlay',
}


def matching_intrinsics(camera_info: CameraInfo | None, input_wh: Sequence[int]
                        ) -> np.ndarray | None:
    """K of ``camera_info`` if it describes images of ``input_wh``, else None."""
    if camera_info is None or (int(camera_info.width), int(camera_info.height)) != tuple(
            input_wh):
        return None
    return camera_info_k(camera_info)


class FrameMessageBuilder:
    """Builds the per-frame output messages from a ``FrameResult`` (node and ``moog_infer``).

    Stateful only in the marker ids drawn last frame, so markers of vanished tracks are deleted.
    ``depth/camera_info`` and 3-D positions need a CameraInfo of the input resolution; without
    one ``depth_info`` is left out, ``x, y, z`` are NaN and no markers are drawn.

    Args:
        depth_resolution: ``'model'`` or ``'input'`` (the runtime's ``depth_resolution``).
    """

    def __init__(self, depth_resolution: str) -> None:
        self.depth_resolution = depth_resolution
        self.marker_ids: dict[str, set[int]] = {'tracks': set(), 'boxes': set()}
        self.overlay_rgb: np.ndarray | None = None  # the last rendered overlay

    def build(self, header: Header, rgb: np.ndarray, result: FrameResult,
              camera_info: CameraInfo | None, trails: np.ndarray | None = None,
              wanted: Collection[str] = tuple(OUTPUT_TOPICS)) -> dict:
        """``{output key: message}`` for the ``wanted`` keys of :data:`OUTPUT_TOPICS`.

        Args:
            header: the input image's header (every message carries it).
            rgb: uint8 ``[H, W, 3]`` input frame (for the overlay).
            result: the runtime's result for this frame.
            camera_info: the latest input CameraInfo, or None.
            trails: ``runtime.trails(result.track_ids)`` ``[N, L, 3]`` for markers and overlay.
            wanted: which outputs to build (skip the costly ones nobody watches).
        """
        K = matching_intrinsics(camera_info, result.geometry.input_wh)
        out = {}
        if 'depth' in wanted:
            out['depth'] = depth_to_image(result.depth_m, header)
        if 'depth_info' in wanted and K is not None:
            out['depth_info'] = scaled_camera_info(camera_info, result.geometry, header,
                                                   self.depth_resolution)
        tracks_xyz = unproject(K, result.tracks_xy, result.tracks_depth_m)
        if 'tracks' in wanted:
            out['tracks'] = tracks_to_cloud(header, result.track_ids, result.tracks_xy,
                                            result.tracks_visible, result.tracks_confidence,
                                            tracks_xyz)
        if 'detections' in wanted:
            out['detections'] = boxes_to_detections(header, result.box_ids, result.boxes_xyxy,
                                                    result.boxes_score, result.box_labels)
        if 'track_markers' in wanted:
            trails_xyz = None
            if trails is not None:
                N, L = trails.shape[:2]
                trails_xyz = unproject(K, trails[..., :2].reshape(-1, 2),
                                       trails[..., 2].reshape(-1)).reshape(N, L, 3)
            markers, self.marker_ids['tracks'] = track_markers(
                header, result.track_ids, tracks_xyz, result.tracks_visible, trails_xyz,
                self.marker_ids['tracks'])
            if markers.markers:  # nothing drawn and nothing to delete: nothing to send
                out['track_markers'] = markers
        if 'box_markers' in wanted:
            markers, self.marker_ids['boxes'] = box_markers(
                header, result.box_ids, result.boxes_xyxy, result.boxes_depth_m,
                result.box_labels, K, self.marker_ids['boxes'])
            if markers.markers:
                out['box_markers'] = markers
        if 'overlay' in wanted:
            self.overlay_rgb = draw_overlay(
                rgb, result.track_ids, result.tracks_xy, result.tracks_visible,
                trails[..., :2] if trails is not None else None, result.box_ids,
                result.boxes_xyxy, result.box_labels, result.boxes_score)
            out['overlay'] = rgb_to_image(self.overlay_rgb, header)
        return out

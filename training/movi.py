"""Kubric MOVi (A-E) TFDS tfrecord shards as clips and training windows, without TensorFlow.

Layers, bottom up:

* TFRecord framing: ``uint64 length, uint32 masked_crc32c(length), data,
  uint32 masked_crc32c(data)``; both checksums are verified (``crc32c`` package).
* ``tf.train.Example``: the message types are built here from ``descriptor_pb2`` (no generated or
  vendored code). Reading only splits the top-level feature map and parses the features a clip
  needs, so the large flow fields are never decoded.
* MOVi fields (flattened TFDS keys, see ``shared/notes/data.md`` section 1): PNG frames decoded
  with OpenCV (``IMREAD_UNCHANGED``: 16-bit PNGs keep full precision; Pillow would truncate the
  16-bit RGB ``object_coordinates`` to 8 bits).

Conversions to the project conventions (``docs/architecture.md``):

* depth: the uint16 PNG holds the *distance to the camera centre* quantised over
  ``metadata/depth_range``; it is dequantised and converted to z-depth with the intrinsics;
* intrinsics: ``f = focal_length / sensor_width * W`` pixels (square pixels), principal point at
  the image centre ``((W - 1) / 2, (H - 1) / 2)`` in the integer-pixel-centre convention;
* boxes: normalised ``(ymin, xmin, ymax, xmax)`` from the segmentation (``max + 1``) become pixel
  ``xyxy`` edges, ``x = x_norm * W - 0.5``, which enclose the mask pixels;
* camera poses: Kubric's camera-to-world (quaternion ``wxyz``, Blender/OpenGL axes: -z forward,
  +y up) becomes OpenCV optical axes (x right, y down, z forward) by flipping y and z;
* point tracks: computed like Kubric's point-tracking challenge (``challenges/point_tracking``):
  object-biased query sampling on a stride-4 grid, object points moved with the per-frame affine
  fit of the unit box to ``instances/bboxes_3d`` (from ``object_coordinates``), background points
  back-projected with the query frame's depth and kept static in the world, reprojected into every
  frame and marked occluded when behind the camera, outside the image, farther than the largest
  depth of the 4 neighbouring pixels / 0.99, or when none of those pixels has the point's segment.
  The surface-normal "faces away" test of the original is not applied.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
import functools
import os
from pathlib import Path
import re
import struct
from typing import Any
import warnings

import crc32c
import cv2
import numpy as np

from moog_ros import clips
from moog_ros.training.data import report_skip

__all__ = [
    'MOVI_FPS',
    'MoviFormatError',
    'MoviSource',
    'decode_record',
    'encode_example',
    'iter_clips',
    'kubric_occlusion',
    'kubric_point_tracks',
    'masked_crc32c',
    'parse_example',
    'read_tfrecord',
    'write_tfrecord',
]

MOVI_FPS = 12.0  # MOVi videos are 24 frames rendered at 12 fps


class MoviFormatError(ValueError):
    """A shard or record breaks the TFRecord / MOVi format; the message names the file and key."""


# ---------------------------------------------------------------------------------------------
# TFRecord framing.


def masked_crc32c(data: bytes | memoryview) -> int:
    """TFRecord's masked CRC32C: ``rotate_right(crc, 15) + 0xa282ead8`` (mod 2**32)."""
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _record_offsets(path: Path) -> list[tuple[int, int]]:
    """(data offset, length) of every record of a shard, from the headers alone.

    A shard cut short inside its last record keeps the complete records before it (warning);
    a wrong length checksum is an error (the framing cannot be trusted after it).
    """
    size = path.stat().st_size
    offsets = []
    with path.open('rb') as f:
        pos = 0
        while pos < size:
            head = f.read(12)
            if len(head) < 12:
                warnings.warn(f'{path}: truncated record header at byte {pos}; using the '
                              f'{len(offsets)} complete records before it', stacklevel=3)
                break
            length, length_crc = struct.unpack('<QI', head)
            if masked_crc32c(head[:8]) != length_crc:
                raise MoviFormatError(f'{path}: corrupt TFRecord length at byte {pos} '
                                      f'(checksum mismatch)')
            end = pos + 12 + length + 4
            if end > size:
                warnings.warn(f'{path}: record at byte {pos} is cut short ({size - pos} of '
                              f'{end - pos} bytes); using the {len(offsets)} complete records '
                              f'before it', stacklevel=3)
                break
            offsets.append((pos + 12, length))
            f.seek(end)
            pos = end
    return offsets


def _read_record_at(path: Path, offset: int, length: int) -> bytes:
    with path.open('rb') as f:
        f.seek(offset)
        data = f.read(length)  # two reads: no copy of a possibly 50 MB payload for slicing
        crc = f.read(4)
    if len(data) != length or len(crc) != 4:
        raise MoviFormatError(f'{path}: record at byte {offset - 12} is cut short')
    if masked_crc32c(data) != struct.unpack('<I', crc)[0]:
        raise MoviFormatError(f'{path}: corrupt TFRecord data at byte {offset - 12} '
                              f'(checksum mismatch)')
    return data


def read_tfrecord(path: str | os.PathLike) -> Iterator[bytes]:
    """Yield the checked payloads of a TFRecord file in order."""
    path = Path(path)
    for offset, length in _record_offsets(path):
        yield _read_record_at(path, offset, length)


def write_tfrecord(path: str | os.PathLike, records: Iterable[bytes]) -> None:
    """Write payloads as a TFRecord file (uncompressed, with masked CRC32C checksums)."""
    with Path(path).open('wb') as f:
        for record in records:
            head = struct.pack('<Q', len(record))
            f.write(head + struct.pack('<I', masked_crc32c(head)))
            f.write(record + struct.pack('<I', masked_crc32c(record)))


# ---------------------------------------------------------------------------------------------
# tf.train.Example, built from descriptors.


@functools.cache
def _proto_classes() -> dict[str, type]:
    """Message classes equivalent to tensorflow/core/example/{example,feature}.proto."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    package = 'moog_ros.tfexample'
    proto = descriptor_pb2.FileDescriptorProto(name='moog_ros/tfexample.proto', package=package,
                                               syntax='proto3')

    def message(name: str) -> Any:
        msg = proto.message_type.add()
        msg.name = name
        return msg

    def field(msg: Any, name: str, number: int, kind: int, label: int = F.LABEL_OPTIONAL,
              type_name: str = '', oneof: int | None = None) -> None:
        f = msg.field.add(name=name, number=number, type=kind, label=label)
        if type_name:
            f.type_name = f'.{package}.{type_name}'
        if oneof is not None:
            f.oneof_index = oneof

    field(message('BytesList'), 'value', 1, F.TYPE_BYTES, F.LABEL_REPEATED)
    field(message('FloatList'), 'value', 1, F.TYPE_FLOAT, F.LABEL_REPEATED)  # packed (proto3)
    field(message('Int64List'), 'value', 1, F.TYPE_INT64, F.LABEL_REPEATED)
    feature = message('Feature')
    feature.oneof_decl.add(name='kind')
    field(feature, 'bytes_list', 1, F.TYPE_MESSAGE, type_name='BytesList', oneof=0)
    field(feature, 'float_list', 2, F.TYPE_MESSAGE, type_name='FloatList', oneof=0)
    field(feature, 'int64_list', 3, F.TYPE_MESSAGE, type_name='Int64List', oneof=0)
    features = message('Features')
    entry = features.nested_type.add(name='FeatureEntry')
    entry.options.map_entry = True
    field(entry, 'key', 1, F.TYPE_STRING)
    field(entry, 'value', 2, F.TYPE_MESSAGE, type_name='Feature')
    field(features, 'feature', 1, F.TYPE_MESSAGE, F.LABEL_REPEATED, 'Features.FeatureEntry')
    field(message('Example'), 'features', 1, F.TYPE_MESSAGE, type_name='Features')

    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f'{package}.{name}'))
            for name in ('Feature', 'Features', 'Example')}


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError('bad varint')
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, memoryview]]:
    """Length-delimited fields (number, payload) of a protobuf message; others are skipped."""
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > len(buf):
                raise ValueError('field runs past the end of the message')
            yield number, buf[pos: pos + n]
            pos += n
        elif wire == 0:
            _, pos = _varint(buf, pos)
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ValueError(f'unsupported wire type {wire}')


class Features:
    """The feature map of one ``tf.train.Example``; features are parsed on first access."""

    def __init__(self, raw: dict[str, memoryview], source: str) -> None:
        self._raw = raw
        self._parsed: dict[str, Any] = {}
        self.source = source

    def __contains__(self, key: str) -> bool:
        return key in self._raw

    def keys(self) -> list[str]:
        """All feature keys of the example."""
        return sorted(self._raw)

    def _parse(self, key: str) -> Any:
        if key not in self._raw:
            raise MoviFormatError(f'{self.source}: missing key {key!r}')
        if key not in self._parsed:
            try:
                self._parsed[key] = _proto_classes()['Feature'].FromString(bytes(self._raw[key]))
            except Exception as err:
                raise MoviFormatError(f'{self.source}, key {key!r}: cannot parse the feature: '
                                      f'{err}') from err
        return self._parsed[key]

    def _values(self, key: str, kind: str) -> Any:
        feature = self._parse(key)
        which = feature.WhichOneof('kind')
        if which not in (kind, None):  # None: an empty feature, read as an empty list
            raise MoviFormatError(f'{self.source}, key {key!r}: holds a {which}, expected {kind}')
        return getattr(feature, kind).value

    def bytes_list(self, key: str) -> list[bytes]:
        """A ``bytes_list`` feature."""
        return list(self._values(key, 'bytes_list'))

    def floats(self, key: str, shape: Sequence[int] | None = None) -> np.ndarray:
        """A ``float_list`` feature as float32, optionally reshaped (size checked)."""
        return self._shaped(key, np.asarray(self._values(key, 'float_list'), np.float32), shape)

    def ints(self, key: str, shape: Sequence[int] | None = None) -> np.ndarray:
        """An ``int64_list`` feature as int64, optionally reshaped (size checked)."""
        return self._shaped(key, np.asarray(self._values(key, 'int64_list'), np.int64), shape)

    def scalar(self, key: str) -> float:
        """The single value of a float or int feature."""
        kind = self._parse(key).WhichOneof('kind')
        if kind == 'int64_list':
            values = self.ints(key)
        elif kind == 'float_list':
            values = self.floats(key)
        else:
            raise MoviFormatError(f'{self.source}, key {key!r}: holds a {kind}, expected a number')
        if values.size != 1:
            raise MoviFormatError(f'{self.source}, key {key!r}: expected one value, got '
                                  f'{values.size}')
        return values.item()

    def _shaped(self, key: str, values: np.ndarray, shape: Sequence[int] | None) -> np.ndarray:
        if shape is None:
            return values
        if values.size != int(np.prod(shape)):
            raise MoviFormatError(f'{self.source}, key {key!r}: {values.size} values, expected '
                                  f'shape {tuple(shape)}')
        return values.reshape(shape)


def parse_example(data: bytes, source: str = '<record>') -> Features:
    """Split a serialised ``tf.train.Example`` into its (lazily parsed) features.

    Raises:
        MoviFormatError: the bytes are not an Example (naming ``source``).
    """
    raw: dict[str, memoryview] = {}
    try:
        for number, features in _fields(memoryview(data)):
            if number != 1:
                continue
            for entry_number, entry in _fields(features):
                if entry_number != 1:
                    continue
                key, value = None, memoryview(b'')
                for part_number, part in _fields(entry):
                    if part_number == 1:
                        key = bytes(part).decode()
                    elif part_number == 2:
                        value = part
                if key is None:
                    raise ValueError('feature map entry without a key')
                raw[key] = value  # proto map semantics: the last entry wins
    except (ValueError, UnicodeDecodeError) as err:
        raise MoviFormatError(f'{source}: not a tf.train.Example: {err}') from err
    return Features(raw, source)


def encode_example(features: Mapping[str, Any]) -> bytes:
    """Serialise a ``tf.train.Example``.

    Values: ``bytes`` / ``str`` or a list of them -> ``bytes_list``; float arrays ->
    ``float_list``; integer or bool arrays -> ``int64_list`` (flattened, as TFDS does).
    """
    example = _proto_classes()['Example']()
    for key, value in features.items():
        feature = example.features.feature[key]
        if isinstance(value, (bytes, str)):
            value = [value]
        if isinstance(value, list) and all(isinstance(v, (bytes, str)) for v in value):
            feature.bytes_list.value.extend(v.encode() if isinstance(v, str) else v for v in value)
            continue
        array = np.asarray(value).reshape(-1)
        if array.dtype.kind == 'f':
            feature.float_list.value.extend(array.astype(np.float32).tolist())
        elif array.dtype.kind in 'iub':
            feature.int64_list.value.extend(array.astype(np.int64).tolist())
        else:
            raise TypeError(f'feature {key!r}: cannot encode values of dtype {array.dtype}')
    return example.SerializeToString()


# ---------------------------------------------------------------------------------------------
# MOVi fields -> clip arrays.


def _decode_png(data: bytes, source: str, key: str, frame: int, channels: int,
                dtype: type) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise MoviFormatError(f'{source}, key {key!r}, frame {frame}: not a decodable PNG')
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] != channels or image.dtype != dtype:
        raise MoviFormatError(f'{source}, key {key!r}, frame {frame}: decoded to '
                              f'{image.dtype} {image.shape}, expected {np.dtype(dtype)} with '
                              f'{channels} channel(s)')
    if channels == 3:
        image = image[:, :, ::-1]  # OpenCV decodes colour PNGs as BGR
    return np.ascontiguousarray(image)


def _frames_of(features: Features, key: str, frames: np.ndarray, channels: int, dtype: type,
               size: tuple[int, int]) -> np.ndarray:
    pngs = features.bytes_list(key)
    if frames.size and int(frames.max()) >= len(pngs):
        raise MoviFormatError(f'{features.source}, key {key!r}: {len(pngs)} frames, need frame '
                              f'{int(frames.max())}')
    out = np.stack([_decode_png(pngs[t], features.source, key, int(t), channels, dtype)
                    for t in frames])
    if out.shape[1:3] != size:
        raise MoviFormatError(f'{features.source}, key {key!r}: frames are {out.shape[1:3]}, '
                              f'metadata says {size}')
    return out


def _quaternion_wxyz_to_matrix(q: np.ndarray) -> np.ndarray:
    """Rotation matrices ``[..., 3, 3]`` from (w, x, y, z) quaternions ``[..., 4]``."""
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    w, x, y, z = np.moveaxis(q, -1, 0)
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


def _ray_norms(intrinsics: np.ndarray, height: int, width: int) -> np.ndarray:
    """``|K^-1 [x, y, 1]|`` per pixel ``[H, W]``: range = z * norm along each pixel's ray."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    fx, fy, cx, cy = intrinsics[0, 0], intrinsics[1, 1], intrinsics[0, 2], intrinsics[1, 2]
    return np.sqrt(1.0 + ((xs - cx) / fx) ** 2 + ((ys - cy) / fy) ** 2)


@dataclass(frozen=True)
class _Meta:
    num_frames: int
    height: int
    width: int
    num_instances: int


def _meta(features: Features) -> _Meta:
    meta = _Meta(*(int(features.scalar(f'metadata/{k}'))
                   for k in ('num_frames', 'height', 'width', 'num_instances')))
    if min(meta.num_frames, meta.height, meta.width) <= 0 or meta.num_instances < 0:
        raise MoviFormatError(f'{features.source}: bad metadata {meta}')
    return meta


def _boxes(features: Features, meta: _Meta) -> tuple[np.ndarray, np.ndarray]:
    """All-frame boxes ``[K, S, 4]`` pixel xyxy and validity ``[K, S]`` from the ragged fields."""
    K, S, H, W = meta.num_instances, meta.num_frames, meta.height, meta.width
    boxes = np.zeros((K, S, 4), np.float32)
    valid = np.zeros((K, S), bool)
    if K == 0:
        return boxes, valid
    src = features.source
    flat = features.floats('instances/bboxes/ragged_flat_values').reshape(-1, 4)
    rows = features.ints('instances/bboxes/ragged_row_lengths_0')
    frames = features.ints('instances/bbox_frames/ragged_flat_values')
    frame_rows = features.ints('instances/bbox_frames/ragged_row_lengths_0')
    if rows.size != K or not np.array_equal(rows, frame_rows) or rows.sum() != len(flat) \
            or frames.size != len(flat):
        raise MoviFormatError(f'{src}, key instances/bboxes: ragged rows {rows.tolist()} and '
                              f'bbox_frames rows {frame_rows.tolist()} do not match '
                              f'{len(flat)} boxes / {frames.size} frames for {K} instances')
    if frames.size and (frames.min() < 0 or frames.max() >= S):
        raise MoviFormatError(f'{src}, key instances/bbox_frames: frame index out of [0, {S})')
    instance = np.repeat(np.arange(K), rows)
    ymin, xmin, ymax, xmax = flat.T
    # Normalised edges -> pixel edges in the integer-centre convention (image spans -0.5..W-0.5).
    boxes[instance, frames] = np.stack(
        [xmin * W - 0.5, ymin * H - 0.5, xmax * W - 0.5, ymax * H - 0.5], axis=-1)
    valid[instance, frames] = True
    return boxes, valid


def _camera(features: Features, meta: _Meta) -> tuple[np.ndarray, np.ndarray]:
    """Intrinsics ``[3, 3]`` (pixels) and OpenCV camera-to-world poses ``[S, 4, 4]``."""
    S, H, W = meta.num_frames, meta.height, meta.width
    focal_mm = features.scalar('camera/focal_length')
    sensor_mm = features.scalar('camera/sensor_width')
    if not (focal_mm > 0 and sensor_mm > 0):
        raise MoviFormatError(f'{features.source}, key camera/focal_length: focal length '
                              f'{focal_mm} and sensor width {sensor_mm} must be positive')
    f = focal_mm / sensor_mm * W
    intrinsics = np.array([[f, 0, (W - 1) / 2], [0, f, (H - 1) / 2], [0, 0, 1]], np.float64)
    positions = features.floats('camera/positions', (S, 3)).astype(np.float64)
    quaternions = features.floats('camera/quaternions', (S, 4)).astype(np.float64)
    pose = np.tile(np.eye(4), (S, 1, 1))
    pose[:, :3, :3] = _quaternion_wxyz_to_matrix(quaternions)
    pose[:, :3, 3] = positions
    # Blender/OpenGL camera axes (x right, y up, looking down -z) -> OpenCV (y down, z forward).
    pose = pose @ np.diag([1.0, -1.0, -1.0, 1.0])
    return intrinsics, pose


def _range_depth(features: Features, meta: _Meta, frames: np.ndarray) -> np.ndarray:
    """Dequantised distance to the camera centre ``[T, H, W]`` (float64)."""
    dmin, dmax = features.floats('metadata/depth_range', (2,)).astype(np.float64)
    raw = _frames_of(features, 'depth', frames, 1, np.uint16, (meta.height, meta.width))[..., 0]
    return raw.astype(np.float64) / 65535.0 * (dmax - dmin) + dmin


def decode_record(data: bytes, *, frames: Sequence[int] | np.ndarray | None = None,
                  num_tracks: int = 256, rng: np.random.Generator | None = None,
                  source: str = '<record>') -> dict[str, np.ndarray]:
    """Decode one MOVi record (a whole video, or the given frames of it) into clip arrays.

    Args:
        data: the serialised ``tf.train.Example``.
        frames: frame indices to keep (in this order); None keeps all.
        num_tracks: point tracks to sample (Kubric's ``tracks_to_sample``); 0 skips tracking.
        rng: random generator for the track queries (default: seeded with 0).
        source: file/record description for error messages.

    Returns:
        Clip-format arrays: ``video``, ``depth`` (z, metres), ``intrinsics``, ``tracks_xy``,
        ``tracks_visible``, ``boxes_xyxy``, ``boxes_valid``, ``segmentation``, ``camera_pose``,
        ``fps`` (:data:`MOVI_FPS`), plus ``stamps_ns`` (frame index / fps).

    Raises:
        MoviFormatError: a missing or malformed field (naming ``source`` and the key).
    """
    features = parse_example(data, source)
    meta = _meta(features)
    S, H, W = meta.num_frames, meta.height, meta.width
    frames = np.arange(S) if frames is None else np.asarray(frames, dtype=np.int64)
    if frames.size == 0 or frames.min() < 0 or frames.max() >= S:
        raise MoviFormatError(f'{source}: frames {frames.tolist()} not within the {S} frames')
    intrinsics, pose = _camera(features, meta)
    video = _frames_of(features, 'video', frames, 3, np.uint8, (H, W))
    segmentation = _frames_of(features, 'segmentations', frames, 1, np.uint8, (H, W))[..., 0]
    if int(segmentation.max()) > meta.num_instances:
        raise MoviFormatError(f'{source}, key segmentations: id {int(segmentation.max())} but '
                              f'only {meta.num_instances} instances')
    range_m = _range_depth(features, meta, frames)
    depth_z = (range_m / _ray_norms(intrinsics, H, W)).astype(np.float32)
    boxes, valid = _boxes(features, meta)
    out = {
        'video': video,
        'depth': depth_z,
        'intrinsics': intrinsics.astype(np.float32),
        'boxes_xyxy': np.ascontiguousarray(boxes[:, frames]),
        'boxes_valid': np.ascontiguousarray(valid[:, frames]),
        'segmentation': segmentation.astype(np.uint16),
        'camera_pose': pose[frames].astype(np.float32),
        'fps': np.asarray(MOVI_FPS, np.float32),
        'stamps_ns': np.round(frames / MOVI_FPS * 1e9).astype(np.int64),
    }
    tracks_xy = np.zeros((0, len(frames), 2), np.float32)
    visible = np.zeros((0, len(frames)), bool)
    if num_tracks > 0:
        bboxes_3d = features.floats('instances/bboxes_3d', (meta.num_instances, S, 8, 3))
        rng = np.random.default_rng(0) if rng is None else rng

        def object_coordinates(query_frames: np.ndarray) -> np.ndarray:
            # Only the frames that hold query points are decoded: [Tq, H, W, 3] uint16.
            return _frames_of(features, 'object_coordinates', frames[query_frames], 3,
                              np.uint16, (H, W))

        tracks_xy, visible = kubric_point_tracks(
            segmentation=segmentation, range_m=range_m, object_coordinates=object_coordinates,
            bboxes_3d=bboxes_3d[:, frames].astype(np.float64), intrinsics=intrinsics,
            camera_pose=pose[frames], num_tracks=num_tracks, rng=rng)
    out['tracks_xy'] = tracks_xy
    out['tracks_visible'] = visible
    return out


# ---------------------------------------------------------------------------------------------
# Point tracks (Kubric point-tracking challenge, in numpy).


def _num_to_sample(counts: np.ndarray, max_fraction: float, total: int) -> np.ndarray:
    """Spread ``total`` samples evenly over segments, at most ``max_fraction`` of each one's
    grid points (Kubric ``get_num_to_sample``): smallest segments first, leftovers move on."""
    order = np.argsort(counts, kind='stable')
    take = np.zeros_like(counts)
    remaining = total
    for position, seg in enumerate(order):
        want = int(np.round(remaining / (len(order) - position)))
        take[seg] = min(want, int(np.round(counts[seg] * max_fraction)))
        remaining -= take[seg]
    return take


def kubric_point_tracks(*, segmentation: np.ndarray, range_m: np.ndarray,
                        object_coordinates: Any, bboxes_3d: np.ndarray,
                        intrinsics: np.ndarray, camera_pose: np.ndarray, num_tracks: int = 256,
                        rng: np.random.Generator, stride: int = 4,
                        max_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Ground-truth point tracks the way Kubric's point-tracking challenge computes them.

    Args:
        segmentation: ``[T, H, W]`` ids, 0 background, ``k + 1`` instance k.
        range_m: ``[T, H, W]`` distance to the camera centre (not z).
        object_coordinates: callable ``(frame indices [Tq]) -> [Tq, H, W, 3]`` uint16 object-box
            coordinates (``v / 65535 - 0.5`` in the unit box), decoded on demand.
        bboxes_3d: ``[K, T, 8, 3]`` world corners of each instance's box (corner order
            ``itertools.product`` over x, y, z of -0.5/+0.5).
        intrinsics: ``[3, 3]`` pixels, integer pixel centres.
        camera_pose: ``[T, 4, 4]`` camera-to-world, OpenCV axes.
        num_tracks: tracks to sample (fewer when segments are small).
        rng: random generator (grid offset and query choice).
        stride: query grid stride in t, y and x.
        max_fraction: cap on the sampled fraction of a segment's grid points.

    Returns:
        ``tracks_xy`` float32 ``[N, T, 2]`` pixels and ``tracks_visible`` bool ``[N, T]``.
    """
    T, H, W = segmentation.shape
    K = bboxes_3d.shape[0]
    t0, y0, x0 = (int(rng.integers(0, min(stride, n))) for n in (T, H, W))
    ts, ys, xs = np.arange(t0, T, stride), np.arange(y0, H, stride), np.arange(x0, W, stride)
    grid_seg = segmentation[np.ix_(ts, ys, xs)].astype(np.int64)  # [Tg, Hg, Wg]
    counts = np.bincount(grid_seg.ravel())
    take = _num_to_sample(counts, max_fraction, num_tracks)
    chosen = []  # (segment id, [n, 3] grid indices into (ts, ys, xs))
    for seg in np.flatnonzero(take):
        if seg > K:
            continue  # an id without a box cannot be tracked
        candidates = np.argwhere(grid_seg == seg)
        pick = rng.choice(len(candidates), size=int(take[seg]), replace=False)
        chosen.append((int(seg), candidates[np.sort(pick)]))
    if not chosen:
        return np.zeros((0, T, 2), np.float32), np.zeros((0, T), bool)

    query_frames = np.unique(np.concatenate([ts[c[:, 0]] for _, c in chosen]))
    coords = object_coordinates(query_frames) if any(s > 0 for s, _ in chosen) else None
    frame_slot = {int(t): i for i, t in enumerate(query_frames)}
    K_inv = np.linalg.inv(intrinsics)
    # Affine map of the unit box onto each box, per instance and frame (least squares, exact for
    # a rigid, scaled box): world = [local, 1] @ A.
    unit = np.array([[x, y, z, 1.0] for x in (-0.5, 0.5) for y in (-0.5, 0.5)
                     for z in (-0.5, 0.5)])  # [8, 4]
    world_tracks, segment_of = [], []
    for seg, idx in chosen:
        t_q, y_q, x_q = ts[idx[:, 0]], ys[idx[:, 1]], xs[idx[:, 2]]
        if seg == 0:
            # Background: back-project with the query frame's range, static in the world.
            rays = np.stack([x_q, y_q, np.ones_like(x_q)], -1) @ K_inv.T  # [n, 3]
            rays /= np.linalg.norm(rays, axis=-1, keepdims=True)
            p_cam = rays * range_m[t_q, y_q, x_q][:, None]
            p_world = np.einsum('nij,nj->ni', camera_pose[t_q, :3, :3], p_cam) \
                + camera_pose[t_q, :3, 3]
            world = np.repeat(p_world[:, None], T, axis=1)  # [n, T, 3]
        else:
            local = coords[[frame_slot[int(t)] for t in t_q], y_q, x_q] / 65535.0 - 0.5
            local_h = np.concatenate([local, np.ones((len(local), 1))], -1)  # [n, 4]
            corners_h = np.concatenate([bboxes_3d[seg - 1], np.ones((T, 8, 1))], -1)
            affine = np.stack([np.linalg.lstsq(unit, corners_h[t], rcond=None)[0]
                               for t in range(T)])  # [T, 4, 4]
            world_h = np.einsum('nj,tjk->ntk', local_h, affine)
            world = world_h[..., :3] / world_h[..., 3:]
        world_tracks.append(world)
        segment_of.append(np.full(len(world), seg))
    world = np.concatenate(world_tracks)  # [N, T, 3]
    seg_id = np.concatenate(segment_of)  # [N]

    # Reproject into every frame.
    world_to_cam = np.linalg.inv(camera_pose)  # [T, 4, 4]
    p_cam = np.einsum('tij,ntj->nti', world_to_cam[:, :3, :3], world) + world_to_cam[:, :3, 3]
    z = p_cam[..., 2]
    with np.errstate(divide='ignore', invalid='ignore'):
        xy = (p_cam @ intrinsics.T)[..., :2] / z[..., None]
    dist = np.linalg.norm(world - camera_pose[None, :, :3, 3], axis=-1)  # [N, T]
    occluded = kubric_occlusion(xy, z, dist, seg_id, segmentation, range_m)
    tracks_xy = np.where(np.isfinite(xy), xy, 0.0).astype(np.float32)
    return tracks_xy, ~occluded


def kubric_occlusion(xy: np.ndarray, z: np.ndarray, dist: np.ndarray, seg_id: np.ndarray,
                     segmentation: np.ndarray, range_m: np.ndarray) -> np.ndarray:
    """Kubric's occlusion rule for reprojected track points.

    A point is occluded when it is behind the camera, outside the image, farther than the
    largest rendered distance of the 4 pixels around it divided by 0.99 (something is in front
    of it), or when none of those 4 pixels shows its segment.

    Args:
        xy: ``[N, T, 2]`` pixel coordinates (integer pixel centres).
        z: ``[N, T]`` camera-frame z (negative or zero: behind the camera).
        dist: ``[N, T]`` distance of the point to the camera centre.
        seg_id: ``[N]`` segment of each point (0 background, k + 1 instance k).
        segmentation: ``[T, H, W]`` segment ids.
        range_m: ``[T, H, W]`` rendered distance to the camera centre.

    Returns:
        ``[N, T]`` bool, True where occluded.
    """
    T, H, W = segmentation.shape
    x, y = xy[..., 0], xy[..., 1]
    occluded = (z <= 0) | ~np.isfinite(xy).all(-1)
    occluded |= (x < -0.5) | (x > W - 0.5) | (y < -0.5) | (y > H - 0.5)
    safe_x = np.floor(np.where(np.isfinite(x), x, 0.0))
    safe_y = np.floor(np.where(np.isfinite(y), y, 0.0))
    t_idx = np.broadcast_to(np.arange(T), x.shape)
    max_depth = np.full(x.shape, -np.inf)
    seg_match = np.zeros(x.shape, bool)
    for dy in (0, 1):
        for dx in (0, 1):
            yy = np.clip(safe_y + dy, 0, H - 1).astype(np.int64)
            xx = np.clip(safe_x + dx, 0, W - 1).astype(np.int64)
            max_depth = np.maximum(max_depth, range_m[t_idx, yy, xx])
            seg_match |= segmentation[t_idx, yy, xx] == seg_id[:, None]
    occluded |= max_depth < 0.99 * dist
    occluded |= ~seg_match
    return occluded


# ---------------------------------------------------------------------------------------------
# Shards, the window source and the clip iterator.

_SPLIT = re.compile(r'-(?P<split>[A-Za-z0-9_]+)\.tfrecord')


def _find_shards(path: Path, split: str | None) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise MoviFormatError(f'MOVi path {path} does not exist')
    shards = sorted(p for p in path.iterdir() if '.tfrecord' in p.name and p.is_file())
    if not shards:
        raise MoviFormatError(f'MOVi folder {path} has no *.tfrecord* shard')
    splits = {}
    for shard in shards:
        match = _SPLIT.search(shard.name)
        splits.setdefault(match.group('split') if match else '', []).append(shard)
    if split is not None:
        if split not in splits:
            raise MoviFormatError(f'MOVi folder {path} has no {split!r} shards (splits: '
                                  f'{sorted(splits)})')
        return splits[split]
    if len(splits) > 1:
        raise MoviFormatError(f'MOVi folder {path} holds several splits {sorted(splits)}; '
                              f'pass split=')
    return shards


class MoviSource:
    """MOVi shards as a training ``WindowSource`` (see ``docs/architecture.md``).

    Each video (24 frames in MOVi) is cut into ``window_frames``-frame segments (None: one
    segment per video); ``window(i, num_frames, frame_step)`` starts at segment ``i``'s first
    frame, shifted back when it would run past the end of the video. Only the window's frames are
    decoded; point tracks are sampled on them with a generator seeded by ``(seed, window)``.

    Args:
        path: a shard file or a folder of shards (``*.tfrecord*``).
        split: ``train``/``validation``/``test`` when the folder holds several splits.
        window_frames: segment length for the window grid (None: whole videos).
        num_tracks: point tracks per window (0: none).
        seed: seed for the track queries.

    Raises:
        MoviFormatError: no shards, several splits without ``split``, corrupt framing.
    """

    def __init__(self, path: str | os.PathLike, *, split: str | None = None,
                 window_frames: int | None = None, num_tracks: int = 256, seed: int = 0) -> None:
        self.path = Path(path)
        self.shards = _find_shards(self.path, split)
        self.name = f'movi:{self.path}' + (f'[{split}]' if split else '')
        self.num_tracks = int(num_tracks)
        self.seed = int(seed)
        self.records: list[tuple[int, int, int]] = []  # (shard, data offset, length)
        for shard_index, shard in enumerate(self.shards):
            try:
                offsets = _record_offsets(shard)
            except (MoviFormatError, OSError) as err:  # corrupt framing: nothing after it holds
                report_skip(f'MOVi shard {shard}: {err}')
                continue
            self.records += [(shard_index, o, n) for o, n in offsets]
        if not self.records:
            raise MoviFormatError(f'{self.name}: the shards hold no readable record')
        # MOVi videos share one length; read it from the first readable record for the grid.
        for video in range(len(self.records)):
            try:
                self.video_frames = _meta(parse_example(self._record(video),
                                                        self._where(video))).num_frames
                break
            except MoviFormatError as err:
                report_skip(f'MOVi record {self._where(video)}: {err}')
        else:
            raise MoviFormatError(f'{self.name}: no record is readable')
        if window_frames is not None and window_frames < 1:
            raise ValueError(f'window_frames must be >= 1, got {window_frames}')
        self.window_frames = self.video_frames if window_frames is None else int(window_frames)
        self.windows_per_video = max(1, self.video_frames // self.window_frames)

    def _where(self, video: int) -> str:
        shard, offset, _ = self.records[video]
        return f'{self.shards[shard]} (record at byte {offset - 12})'

    def _record(self, video: int) -> bytes:
        shard, offset, length = self.records[video]
        return _read_record_at(self.shards[shard], offset, length)

    @property
    def num_videos(self) -> int:
        """Records (videos) in the shards."""
        return len(self.records)

    def __len__(self) -> int:
        return self.num_videos * self.windows_per_video

    def window(self, index: int, num_frames: int, frame_step: int = 1) -> dict[str, np.ndarray]:
        """Clip-format arrays of one window (tracks, boxes, depth, segmentation, camera)."""
        if not 0 <= index < len(self):
            raise IndexError(f'{self.name}: window {index} out of range [0, {len(self)})')
        if num_frames < 1 or frame_step < 1:
            raise ValueError(f'num_frames and frame_step must be >= 1, got {num_frames}, '
                             f'{frame_step}')
        video, segment = divmod(index, self.windows_per_video)
        data = self._record(video)
        span = (num_frames - 1) * frame_step + 1
        total = _meta(parse_example(data, self._where(video))).num_frames
        if span > total:
            raise ValueError(f'{self._where(video)}: {total} frames, too few for a window of '
                             f'{num_frames} frames with frame_step {frame_step}')
        start = min(segment * self.window_frames, total - span)
        frames = start + frame_step * np.arange(num_frames)
        rng = np.random.default_rng([self.seed, index, num_frames, frame_step])
        arrays = decode_record(data, frames=frames, num_tracks=self.num_tracks, rng=rng,
                               source=self._where(video))
        arrays.pop('fps')  # windows carry stamps_ns instead (fps / frame_step is implied)
        return arrays

    def clips(self) -> Iterator[clips.Clip]:
        """Every video as a whole :class:`moog_ros.clips.Clip`, in shard order."""
        for video in range(self.num_videos):
            rng = np.random.default_rng([self.seed, video])
            arrays = decode_record(self._record(video), num_tracks=self.num_tracks, rng=rng,
                                   source=self._where(video))
            arrays.pop('stamps_ns')
            yield clips.Clip.from_arrays(arrays)

    def __repr__(self) -> str:
        return f'MoviSource({self.name!r}, videos={self.num_videos}, windows={len(self)})'


def iter_clips(path: str | os.PathLike, *, split: str | None = None, num_tracks: int = 256,
               seed: int = 0) -> Iterator[clips.Clip]:
    """Every MOVi video under ``path`` as a clip (see :meth:`MoviSource.clips`)."""
    yield from MoviSource(path, split=split, num_tracks=num_tracks, seed=seed).clips()

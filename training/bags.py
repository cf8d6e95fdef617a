"""rosbag2 recordings as training data, read with the pure-Python ``rosbags`` library (no rclpy).

Reads rosbag2 directories in sqlite3 or MCAP storage and single ``.mcap`` / ``.db3`` files.
An image topic (``sensor_msgs/msg/Image`` or ``CompressedImage``) is chosen by name; frames are
ordered by their **header stamp** (camera time), not by the time the recorder received them.

A bag is indexed once: one pass over the raw messages of the chosen topics records, per message,
the bag timestamp and the header stamp (parsed from the first bytes of the CDR payload, no pixel
decoding). Windows are then read back by bag-time range, so a 10 GB bag never has to fit in
memory and ``window(i)`` is deterministic and random access.

RGB-D: with ``depth_topic``, each colour frame is paired with the depth frame of nearest header
stamp within ``depth_tolerance_s``. The depth camera **must be registered to the colour camera**
(same optical frame and intrinsics up to scale, e.g. ``aligned_depth_to_color``); depth of another
resolution is resized with nearest-neighbour interpolation, only correct for a registered image.

An MCAP file that was cut short (recorder killed, copy interrupted) has no summary section; rosbags
refuses it, so it is read here record by record and its readable prefix is used, with a warning.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
import io
import math
import os
from pathlib import Path
import struct
from typing import Any, NamedTuple
import warnings
import zlib

import cv2
import numpy as np
from tqdm import tqdm

from moog_ros import image_codecs
from moog_ros.training.data import report_skip

__all__ = [
    'CAMERA_INFO_TYPE',
    'COMPRESSED_IMAGE_TYPE',
    'IMAGE_TYPE',
    'BagError',
    'BagFrame',
    'BagSource',
    'CameraInfo',
    'ImageTopic',
    'image_topics',
    'read_camera_info',
    'read_frames',
]

IMAGE_TYPE = 'sensor_msgs/msg/Image'
COMPRESSED_IMAGE_TYPE = 'sensor_msgs/msg/CompressedImage'
CAMERA_INFO_TYPE = 'sensor_msgs/msg/CameraInfo'
_IMAGE_TYPES = (IMAGE_TYPE, COMPRESSED_IMAGE_TYPE)


class BagError(RuntimeError):
    """A bag cannot be read or does not hold what was asked for; the message names the file."""


class ImageTopic(NamedTuple):
    """An image topic of a bag: name, message type and message count (summed over bags)."""

    topic: str
    msgtype: str
    count: int


@dataclass(frozen=True)
class BagFrame:
    """One decoded colour frame, as streamed by :func:`read_frames`."""

    stamp_ns: int  # header stamp (camera time)
    log_ns: int  # bag timestamp (when the recorder received it)
    frame_id: str  # header frame_id
    rgb: np.ndarray  # uint8 [H, W, 3]


# ---------------------------------------------------------------------------------------------
# Storage access: rosbags for intact bags, a record-by-record MCAP scanner for truncated ones.


def _default_typestore() -> Any:
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_KILTED)


class _RosbagsReader:
    """An intact rosbag2 directory or single storage file, opened with rosbags' AnyReader."""

    salvaged = False

    def __init__(self, path: Path) -> None:
        from rosbags.highlevel import AnyReader

        self.path = path
        self._reader = AnyReader([path], default_typestore=_default_typestore())
        self._reader.open()
        self.cdr = bool(self._reader.is2)  # ROS 1 bags are not CDR (no header-stamp fast path)
        self.topics = {name: (info.msgtype or '?', int(info.msgcount))
                       for name, info in self._reader.topics.items()}

    def raw(self, topic: str, start: int | None = None,
            stop: int | None = None) -> Iterator[tuple[int, bytes]]:
        conns = [c for c in self._reader.connections if c.topic == topic]
        if not conns:
            return
        for _, log_ns, raw in self._reader.messages(connections=conns, start=start, stop=stop):
            yield log_ns, raw

    def deserialize(self, raw: bytes, msgtype: str) -> Any:
        return self._reader.deserialize(raw, msgtype)

    def close(self) -> None:
        self._reader.close()


_MCAP_MAGIC = b'\x89MCAP0\r\n'
_OP_SCHEMA, _OP_CHANNEL, _OP_MESSAGE, _OP_CHUNK = 0x03, 0x04, 0x05, 0x06
_OP_FOOTER, _OP_DATA_END = 0x02, 0x0F


def _mcap_string(buf: memoryview, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from('<I', buf, pos)
    return bytes(buf[pos + 4: pos + 4 + n]).decode(), pos + 4 + n


def _decompress_chunk(data: bytes, compression: str, size: int, crc: int, where: str) -> bytes:
    if compression == '':
        out = data
    elif compression == 'zstd':
        try:
            from compression import zstd  # Python >= 3.14
        except ImportError:
            from backports import zstd
        out = zstd.decompress(data)
    elif compression == 'lz4':
        import lz4.frame

        out = lz4.frame.decompress(data)
    else:
        raise BagError(f'{where}: unsupported MCAP chunk compression {compression!r}')
    if len(out) != size or (crc and zlib.crc32(out) != crc):
        raise BagError(f'{where}: MCAP chunk is corrupt (size or CRC mismatch)')
    return out


class _SalvagedMcap:
    """MCAP files read record by record, without the summary section that a truncated file lacks.

    One scan of the files indexes every message (file, chunk offset, byte range); reading a message
    decompresses its chunk again (the last two chunks are cached). Everything after the first
    incomplete record is unreadable and ignored.
    """

    salvaged = True
    cdr = True

    def __init__(self, path: Path, files: Sequence[Path]) -> None:
        self.path = path
        self.files = list(files)
        self._schemas: dict[tuple[int, int], tuple[str, str, str]] = {}  # (file, id) -> schema
        self._channels: dict[tuple[int, int], tuple[str, str]] = {}  # (file, id) -> topic, type
        # topic -> list of (log_ns, file index, chunk offset or -1, data offset, data length)
        self._index: dict[str, list[tuple[int, int, int, int, int]]] = {}
        self._chunk_cache: dict[tuple[int, int], bytes] = {}
        self.truncated_at: list[tuple[Path, int, int]] = []  # (file, readable bytes, file size)
        for file_index, file in enumerate(self.files):
            self._scan(file_index, file)
        self._typestore = self._build_typestore()
        for entries in self._index.values():
            entries.sort(key=lambda e: e[0])
        self._logs = {topic: np.array([e[0] for e in entries], dtype=np.int64)
                      for topic, entries in self._index.items()}
        self.topics = {topic: (msgtype, len(self._index.get(topic, ())))
                       for topic, msgtype in self._channels.values()}

    def _scan(self, file_index: int, file: Path) -> None:
        size = file.stat().st_size
        with file.open('rb') as f:
            if f.read(8) != _MCAP_MAGIC:
                raise BagError(f'{file} is not an MCAP file (bad magic)')
            pos = 8
            while True:
                head = f.read(9)
                if len(head) < 9:  # cut inside a record header, or right after a record
                    self.truncated_at.append((file, pos, size))
                    return
                op, length = head[0], struct.unpack('<Q', head[1:])[0]
                if op in (_OP_DATA_END, _OP_FOOTER):
                    return
                if pos + 9 + length > size:
                    self.truncated_at.append((file, pos, size))
                    return
                if op in (_OP_SCHEMA, _OP_CHANNEL, _OP_MESSAGE, _OP_CHUNK):
                    body = memoryview(f.read(length))
                    self._record(file_index, op, body, pos + 9, -1)
                else:
                    f.seek(length, io.SEEK_CUR)
                pos += 9 + length

    def _record(self, file_index: int, op: int, body: memoryview, body_offset: int,
                chunk_offset: int) -> None:
        where = f'{self.files[file_index]} at byte {body_offset}'
        if op == _OP_SCHEMA:
            (sid,) = struct.unpack_from('<H', body, 0)
            name, p = _mcap_string(body, 2)
            encoding, p = _mcap_string(body, p)
            (n,) = struct.unpack_from('<I', body, p)
            text = bytes(body[p + 4: p + 4 + n]).decode()
            self._schemas[(file_index, sid)] = (name, encoding, text)
        elif op == _OP_CHANNEL:
            cid, sid = struct.unpack_from('<HH', body, 0)
            topic, _ = _mcap_string(body, 4)
            msgtype = self._schemas.get((file_index, sid), ('?', '', ''))[0]
            self._channels[(file_index, cid)] = (topic, msgtype)
        elif op == _OP_MESSAGE:
            cid, _, log_ns, _ = struct.unpack_from('<HIQQ', body, 0)
            channel = self._channels.get((file_index, cid))
            if channel is None:
                raise BagError(f'{where}: message on unknown MCAP channel {cid}')
            self._index.setdefault(channel[0], []).append(
                (log_ns, file_index, chunk_offset, body_offset + 22, len(body) - 22))
        elif op == _OP_CHUNK:
            _, _, usize, crc = struct.unpack_from('<QQQI', body, 0)
            compression, p = _mcap_string(body, 28)
            (csize,) = struct.unpack_from('<Q', body, p)
            records = _decompress_chunk(bytes(body[p + 8: p + 8 + csize]), compression, usize,
                                        crc, where)
            self._chunk_cache = {(file_index, body_offset): records}
            inner = memoryview(records)
            q = 0
            while q + 9 <= len(inner):
                op_in = inner[q]
                (length,) = struct.unpack_from('<Q', inner, q + 1)
                if op_in in (_OP_SCHEMA, _OP_CHANNEL, _OP_MESSAGE):
                    self._record(file_index, op_in, inner[q + 9: q + 9 + length], q + 9,
                                 body_offset)
                q += 9 + length

    def _build_typestore(self) -> Any:
        from rosbags.typesys import Stores, get_types_from_msg, get_typestore

        types: dict[str, Any] = {}
        for name, encoding, text in self._schemas.values():
            if encoding == 'ros2msg' and text:
                types.update(get_types_from_msg(text, name))
        if not types:
            return _default_typestore()
        store = get_typestore(Stores.EMPTY)
        store.register(types)
        return store

    def _chunk(self, file_index: int, chunk_offset: int) -> bytes:
        key = (file_index, chunk_offset)
        if key not in self._chunk_cache:
            with self.files[file_index].open('rb') as f:
                f.seek(chunk_offset)
                head = f.read(28)
                _, _, usize, crc = struct.unpack('<QQQI', head)
                (n,) = struct.unpack('<I', f.read(4))
                compression = f.read(n).decode()
                (csize,) = struct.unpack('<Q', f.read(8))
                data = f.read(csize)
            if len(self._chunk_cache) >= 2:
                self._chunk_cache.pop(next(iter(self._chunk_cache)))
            self._chunk_cache[key] = _decompress_chunk(
                data, compression, usize, crc, f'{self.files[file_index]} at byte {chunk_offset}')
        return self._chunk_cache[key]

    def raw(self, topic: str, start: int | None = None,
            stop: int | None = None) -> Iterator[tuple[int, bytes]]:
        entries = self._index.get(topic, [])
        logs = self._logs.get(topic, np.zeros(0, dtype=np.int64))
        lo = 0 if start is None else int(np.searchsorted(logs, start, side='left'))
        hi = len(entries) if stop is None else int(np.searchsorted(logs, stop, side='left'))
        for log_ns, file_index, chunk_offset, offset, length in entries[lo:hi]:
            if chunk_offset >= 0:
                data = self._chunk(file_index, chunk_offset)[offset: offset + length]
            else:
                with self.files[file_index].open('rb') as f:
                    f.seek(offset)
                    data = f.read(length)
            yield log_ns, data

    def deserialize(self, raw: bytes, msgtype: str) -> Any:
        return self._typestore.deserialize_cdr(raw, msgtype)

    def close(self) -> None:
        self._chunk_cache.clear()


def _mcap_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path] if path.suffix == '.mcap' else []
    if path.is_dir():
        return sorted(path.glob('*.mcap'))
    return []


def _open_bag(path: Path) -> _RosbagsReader | _SalvagedMcap:
    """Open a bag; fall back to record-by-record reading for a cut-short MCAP (with a warning)."""
    if not path.exists():
        raise BagError(f'bag {path} does not exist')
    try:
        return _RosbagsReader(path)
    except Exception as err:  # rosbags raises several types (ReaderError, apsw, OSError, ...)
        first_error = err
    files = _mcap_files(path)
    if not files:
        raise BagError(f'cannot read bag {path}: {first_error}') from first_error
    try:
        salvaged = _SalvagedMcap(path, files)
    except BagError:
        raise
    except Exception as err:
        raise BagError(f'cannot read bag {path}: {first_error}; record-by-record reading also '
                       f'failed: {err}') from err
    count = sum(n for _, n in salvaged.topics.values())
    if not count:
        raise BagError(f'cannot read bag {path}: {first_error}; no complete message found')
    cut = ', '.join(f'{f.name} readable up to byte {n} of {size}'
                    for f, n, size in salvaged.truncated_at)
    warnings.warn(f'bag {path} is truncated or lacks its index ({first_error}); using the '
                  f'readable prefix: {count} messages ({cut})', stacklevel=3)
    return salvaged


def _header_stamp_ns(raw: bytes | memoryview) -> int | None:
    """Header stamp of a CDR-serialised message that starts with ``std_msgs/Header``.

    The stamp is the first field: int32 sec, uint32 nanosec right after the 4-byte encapsulation
    header (byte 1 gives the endianness). Returns None for other representations.
    """
    if len(raw) < 12 or raw[0] != 0 or raw[1] not in (0, 1):
        return None
    sec, nanosec = struct.unpack_from('<iI' if raw[1] == 1 else '>iI', raw, 4)
    return sec * 1_000_000_000 + nanosec


def _message_stamp_ns(reader: Any, raw: bytes, msgtype: str) -> int:
    stamp = _header_stamp_ns(raw) if reader.cdr else None
    if stamp is None:
        stamp_msg = reader.deserialize(raw, msgtype).header.stamp
        stamp = int(stamp_msg.sec) * 1_000_000_000 + int(stamp_msg.nanosec)
    return stamp


def _decode_colour(msg: Any, msgtype: str) -> np.ndarray:
    if msgtype == COMPRESSED_IMAGE_TYPE:
        return image_codecs.compressed_msg_to_rgb(msg)
    return image_codecs.image_msg_to_rgb(msg)


def _decode_depth(msg: Any, msgtype: str) -> np.ndarray:
    if msgtype == COMPRESSED_IMAGE_TYPE:
        return image_codecs.compressed_msg_to_depth_m(msg)
    return image_codecs.image_msg_to_depth_m(msg)


# ---------------------------------------------------------------------------------------------
# Topic discovery.


def _as_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = [Path(p) for p in paths]
    if not out:
        raise BagError('no bag paths given')
    return out


def image_topics(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[ImageTopic]:
    """List the image topics (Image and CompressedImage) of one or more bags.

    Args:
        paths: Bag directories or single ``.mcap``/``.db3`` files.

    Returns:
        ``[(topic, msgtype, count)]`` sorted by topic, counts summed over the bags.

    Raises:
        BagError: a bag cannot be opened.
    """
    totals: dict[tuple[str, str], int] = {}
    for path in _as_paths(paths):
        reader = _open_bag(path)
        try:
            for topic, (msgtype, count) in reader.topics.items():
                if msgtype in _IMAGE_TYPES:
                    totals[(topic, msgtype)] = totals.get((topic, msgtype), 0) + count
        finally:
            reader.close()
    return [ImageTopic(t, m, c) for (t, m), c in sorted(totals.items())]


def _listing(topics: dict[str, tuple[str, int]]) -> str:
    rows = [f'  {t}  [{m}]  {c} messages' for t, (m, c) in sorted(topics.items())
            if m in _IMAGE_TYPES]
    return '\n'.join(rows) if rows else '  (none)'


def _choose_topic(path: Path, topics: dict[str, tuple[str, int]], topic: str | None,
                  what: str = 'image') -> str:
    images = sorted(t for t, (m, _) in topics.items() if m in _IMAGE_TYPES)
    if topic is None:
        if len(images) == 1:
            return images[0]
        problem = 'has no image topic' if not images else 'has several image topics; pass topic='
        raise BagError(f'bag {path} {problem}. Image topics:\n{_listing(topics)}')
    if topic not in topics:
        raise BagError(f'bag {path} has no {what} topic {topic!r}. Image topics:\n'
                       f'{_listing(topics)}')
    if topics[topic][0] not in _IMAGE_TYPES:
        raise BagError(f'bag {path}: topic {topic!r} has type {topics[topic][0]}, not an image. '
                       f'Image topics:\n{_listing(topics)}')
    return topic


def _sibling_camera_info(topics: dict[str, tuple[str, int]], image_topic: str) -> str | None:
    """The ``camera_info`` topic beside an image topic (image_transport naming), if recorded."""
    parent = image_topic.rsplit('/', 1)[0]
    # '/cam/image_raw/compressed' -> '/cam/camera_info' as well as '/cam/image_raw' -> same.
    for ns in (parent, parent.rsplit('/', 1)[0]):
        candidate = f'{ns}/camera_info'
        if topics.get(candidate, ('', 0))[0] == CAMERA_INFO_TYPE:
            return candidate
    return None


# ---------------------------------------------------------------------------------------------
# Streaming without an index (bag order), for inference over a whole bag.


def read_frames(path: str | os.PathLike, topic: str | None = None, *,
                start_ns: int | None = None, stop_ns: int | None = None) -> Iterator[BagFrame]:
    """Stream decoded colour frames of one bag in recording (bag-time) order, no index pass.

    A truncated MCAP yields its readable prefix (after a warning).

    Args:
        path: Bag directory or single storage file.
        topic: Image topic; None picks the only one (error listing them otherwise).
        start_ns: Only messages with bag time >= this.
        stop_ns: Only messages with bag time < this.

    Yields:
        :class:`BagFrame` per message.

    Raises:
        BagError: unreadable bag, unknown topic, undecodable image (naming file, topic and stamp).
    """
    path = Path(path)
    reader = _open_bag(path)
    try:
        topic = _choose_topic(path, reader.topics, topic)
        msgtype = reader.topics[topic][0]
        try:
            for log_ns, raw in reader.raw(topic, start_ns, stop_ns):
                msg = reader.deserialize(raw, msgtype)
                stamp = int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec)
                try:
                    rgb = _decode_colour(msg, msgtype)
                except image_codecs.ImageDecodeError as err:
                    raise BagError(f'bag {path}, topic {topic}, stamp {stamp} ns: {err}') from err
                yield BagFrame(stamp, log_ns, str(msg.header.frame_id), rgb)
        except BagError:
            raise
        except Exception as err:
            raise BagError(f'error while reading bag {path}, topic {topic}: {err}') from err
    finally:
        reader.close()


@dataclass(frozen=True)
class CameraInfo:
    """The parts of ``sensor_msgs/CameraInfo`` the training side needs."""

    intrinsics: np.ndarray  # float64 [3, 3], pixels, pixel centres at integer coordinates
    width: int
    height: int
    frame_id: str


def _camera_info_from_msg(msg: Any) -> CameraInfo:
    k = np.asarray(msg.k, dtype=np.float64).reshape(3, 3)
    return CameraInfo(k, int(msg.width), int(msg.height), str(msg.header.frame_id))


def read_camera_info(path: str | os.PathLike, topic: str) -> CameraInfo:
    """The first ``sensor_msgs/CameraInfo`` on ``topic`` of a bag.

    Raises:
        BagError: the topic is missing, has another type, has no message or a zero focal length.
    """
    path = Path(path)
    reader = _open_bag(path)
    try:
        msgtype, _ = reader.topics.get(topic, ('', 0))
        if msgtype != CAMERA_INFO_TYPE:
            found = sorted(t for t, (m, _) in reader.topics.items() if m == CAMERA_INFO_TYPE)
            raise BagError(f'bag {path} has no CameraInfo topic {topic!r} '
                           f'(CameraInfo topics: {found or "none"})')
        for _, raw in reader.raw(topic):
            info = _camera_info_from_msg(reader.deserialize(raw, msgtype))
            if not (info.intrinsics[0, 0] > 0 and info.intrinsics[1, 1] > 0):
                raise BagError(f'bag {path}, topic {topic}: CameraInfo K has no focal length '
                               f'(uncalibrated camera): {info.intrinsics.ravel().tolist()}')
            return info
        raise BagError(f'bag {path}: CameraInfo topic {topic!r} has no message')
    finally:
        reader.close()


# ---------------------------------------------------------------------------------------------
# Indexed, random-access windows.


@dataclass
class _TopicIndex:
    """Messages of one topic in header-stamp order."""

    topic: str
    msgtype: str
    stamp_ns: np.ndarray  # int64 [M], ascending
    log_ns: np.ndarray  # int64 [M] bag time of the same messages
    log_sorted: np.ndarray  # int64 [M] log_ns ascending (for range sizes)


def _index_topic(reader: Any, path: Path, topic: str, progress: bool) -> _TopicIndex:
    msgtype, count = reader.topics[topic]
    stamps: list[int] = []
    logs: list[int] = []
    try:
        for log_ns, raw in tqdm(reader.raw(topic), total=count, desc=f'index {path.name} {topic}',
                                unit='msg', leave=False, disable=not progress or count < 1000):
            logs.append(log_ns)
            stamps.append(_message_stamp_ns(reader, raw, msgtype))
    except Exception as err:
        raise BagError(f'error while indexing bag {path}, topic {topic}: {err}') from err
    stamp_ns = np.asarray(stamps, dtype=np.int64)
    log_ns = np.asarray(logs, dtype=np.int64)
    if stamp_ns.size and not stamp_ns.any():
        warnings.warn(f'bag {path}, topic {topic}: every header stamp is zero; ordering frames by '
                      f'bag time instead', stacklevel=4)
        stamp_ns = log_ns.copy()
    order = np.lexsort((log_ns, stamp_ns))  # by stamp, ties by bag time
    return _TopicIndex(topic, msgtype, stamp_ns[order], log_ns[order], np.sort(log_ns))


@dataclass
class _Bag:
    path: Path
    colour: _TopicIndex
    depth: _TopicIndex | None
    depth_match: np.ndarray | None  # int64 [M] index into depth, -1 where unmatched
    height: int  # colour image size, from the first frame
    width: int
    intrinsics: np.ndarray | None  # float64 [3, 3] for the colour resolution
    salvaged: bool


def _match_nearest(stamps: np.ndarray, targets: np.ndarray, tolerance_ns: int) -> np.ndarray:
    """For each stamp, the index of the nearest target within tolerance, else -1."""
    if targets.size == 0:
        return np.full(stamps.shape, -1, dtype=np.int64)
    right = np.clip(np.searchsorted(targets, stamps), 0, targets.size - 1)
    left = np.clip(right - 1, 0, targets.size - 1)
    pick = np.where(np.abs(targets[left] - stamps) <= np.abs(targets[right] - stamps), left, right)
    ok = np.abs(targets[pick] - stamps) <= tolerance_ns
    return np.where(ok, pick, -1).astype(np.int64)


class BagSource:
    """rosbag2 bags as a training ``WindowSource`` (see ``docs/architecture.md``).

    Each bag's frames (header-stamp order) are cut into consecutive segments of ``window_frames``
    frames; ``len(source)`` is the number of whole segments over all bags (windows never span two
    bags). ``window(i, num_frames, frame_step)`` starts at segment ``i``'s first frame and takes
    every ``frame_step``-th frame; a window that would run past the end of its bag is shifted back
    to end at the bag's last frame.

    Args:
        paths: Bag directories or ``.mcap``/``.db3`` files; concatenated in the given order.
        topic: Colour image topic (Image or CompressedImage). None picks the only image topic.
        depth_topic: Optional depth topic registered to the colour camera (16UC1 mm, 32FC1 m,
            or compressedDepth).
        camera_info_topic: CameraInfo for ``intrinsics``; None uses ``<namespace>/camera_info``
            beside the image topic when the bag has it.
        depth_tolerance_s: Largest stamp difference for a colour/depth pair.
        window_frames: Segment length that defines the window grid (and ``len``).
        progress: Show a progress bar while indexing.

    Raises:
        BagError: unreadable bag, missing or ambiguous topic (with a listing of image topics).
    """

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], *,
                 topic: str | None = None, depth_topic: str | None = None,
                 camera_info_topic: str | None = None, depth_tolerance_s: float = 0.02,
                 window_frames: int = 24, progress: bool = True) -> None:
        if window_frames < 1:
            raise ValueError(f'window_frames must be >= 1, got {window_frames}')
        if depth_tolerance_s < 0:
            raise ValueError(f'depth_tolerance_s must be >= 0, got {depth_tolerance_s}')
        self.paths = _as_paths(paths)
        self.name = 'bag:' + ','.join(str(p) for p in self.paths)
        self.window_frames = int(window_frames)
        self.depth_tolerance_s = float(depth_tolerance_s)
        self.bags: list[_Bag] = []
        self._readers: dict[int, Any] = {}
        self._pid = os.getpid()
        tolerance_ns = round(depth_tolerance_s * 1e9)
        for path in self.paths:
            try:
                reader = _open_bag(path)
                try:
                    self.bags.append(self._index_bag(path, reader, topic, depth_topic,
                                                     camera_info_topic, tolerance_ns, progress))
                finally:
                    reader.close()
            except BagError as err:
                if len(self.paths) == 1:
                    raise
                report_skip(f'bag {path}: {err}')  # one corrupt bag of several is left out
        if not self.bags:
            raise BagError(f'{self.name}: no bag is readable (see the skipped files above)')
        counts = [len(b.colour.stamp_ns) // self.window_frames for b in self.bags]
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        for bag, n in zip(self.bags, counts):
            if n == 0:
                warnings.warn(f'bag {bag.path} has {len(bag.colour.stamp_ns)} frames on '
                              f'{bag.colour.topic}, fewer than window_frames='
                              f'{self.window_frames}: no window comes from it', stacklevel=2)

    @staticmethod
    def _index_bag(path: Path, reader: Any, topic: str | None, depth_topic: str | None,
                   camera_info_topic: str | None, tolerance_ns: int, progress: bool) -> _Bag:
        colour_topic = _choose_topic(path, reader.topics, topic)
        colour = _index_topic(reader, path, colour_topic, progress)
        if colour.stamp_ns.size == 0:
            raise BagError(f'bag {path}: image topic {colour_topic} has no message')
        # Decode one frame now: the image size is needed for the intrinsics, and an unsupported
        # encoding should fail here rather than in the middle of training.
        first = BagSource._read(reader, path, colour, np.zeros(1, dtype=np.int64),
                                _decode_colour)[0]
        height, width = first.shape[:2]
        depth = match = None
        if depth_topic is not None:
            _choose_topic(path, reader.topics, depth_topic, what='depth')
            depth = _index_topic(reader, path, depth_topic, progress)
            match = _match_nearest(colour.stamp_ns, depth.stamp_ns, tolerance_ns)
            unmatched = int((match < 0).sum())
            if unmatched:
                warnings.warn(f'bag {path}: {unmatched} of {match.size} colour frames have no '
                              f'depth frame on {depth_topic} within {tolerance_ns / 1e6:g} ms '
                              f'(their depth is NaN)', stacklevel=3)
        info_topic = camera_info_topic or _sibling_camera_info(reader.topics, colour_topic)
        info = None
        if info_topic is not None:
            if reader.topics.get(info_topic, ('', 0))[0] != CAMERA_INFO_TYPE:
                raise BagError(f'bag {path} has no CameraInfo topic {info_topic!r}')
            info = _read_stable_camera_info(reader, path, info_topic)
        intrinsics = None if info is None else _scaled_intrinsics(info, height, width, path)
        return _Bag(path, colour, depth, match, height, width, intrinsics, reader.salvaged)

    # -- WindowSource -------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def num_frames(self) -> int:
        """Colour frames over all bags."""
        return sum(len(b.colour.stamp_ns) for b in self.bags)

    @property
    def unmatched_depth(self) -> int:
        """Colour frames without a depth partner (0 without a depth topic)."""
        return sum(int((b.depth_match < 0).sum()) for b in self.bags if b.depth_match is not None)

    def window_rows(self, index: int, num_frames: int,
                         frame_step: int = 1) -> tuple[int, np.ndarray]:
        """(bag index, frame indices ``[T]`` in stamp order) that ``window(index, ...)`` reads."""
        if not 0 <= index < len(self):
            raise IndexError(f'{self.name}: window {index} out of range [0, {len(self)})')
        if num_frames < 1 or frame_step < 1:
            raise ValueError(f'num_frames and frame_step must be >= 1, got {num_frames}, '
                             f'{frame_step}')
        b = int(np.searchsorted(self._offsets, index, side='right') - 1)
        total = len(self.bags[b].colour.stamp_ns)
        span = (num_frames - 1) * frame_step + 1
        if span > total:
            raise ValueError(f'bag {self.bags[b].path} has {total} frames, too few for a window '
                             f'of {num_frames} frames with frame_step {frame_step}')
        start = min((index - int(self._offsets[b])) * self.window_frames, total - span)
        return b, start + frame_step * np.arange(num_frames)

    def window(self, index: int, num_frames: int, frame_step: int = 1) -> dict[str, np.ndarray]:
        """Read one window.

        Returns:
            ``video`` uint8 ``[T, H, W, 3]``, ``stamps_ns`` int64 ``[T]`` (header stamps); with a
            depth topic ``depth`` float32 ``[T, H, W]`` metres (NaN unknown or unmatched); with
            camera info ``intrinsics`` float32 ``[3, 3]`` for the colour resolution.
        """
        b, frames = self.window_rows(index, num_frames, frame_step)
        bag = self.bags[b]
        reader = self._reader(b)
        video = self._read(reader, bag.path, bag.colour, frames, _decode_colour)
        shapes = {v.shape for v in video}
        if len(shapes) > 1:
            raise BagError(f'bag {bag.path}, topic {bag.colour.topic}: image size changes inside '
                           f'window {index}: {sorted(shapes)}')
        out: dict[str, np.ndarray] = {
            'video': np.stack(video),
            'stamps_ns': bag.colour.stamp_ns[frames].copy(),
        }
        H, W = out['video'].shape[1:3]
        if bag.depth is not None and bag.depth_match is not None:
            depth = np.full((len(frames), H, W), np.nan, dtype=np.float32)
            match = bag.depth_match[frames]
            have = np.flatnonzero(match >= 0)
            if have.size:
                maps = self._read(reader, bag.path, bag.depth, match[have], _decode_depth)
                for t, depth_m in zip(have, maps):
                    if depth_m.shape != (H, W):
                        # Nearest keeps NaN holes as they are; valid only for registered depth.
                        depth_m = cv2.resize(depth_m, (W, H), interpolation=cv2.INTER_NEAREST)
                    depth[t] = depth_m
            out['depth'] = depth
        if bag.intrinsics is not None:
            if (bag.height, bag.width) != (H, W):
                raise BagError(f'bag {bag.path}, topic {bag.colour.topic}: image size {W}x{H} in '
                               f'window {index} differs from the first frame '
                               f'({bag.width}x{bag.height}) that the intrinsics were set for')
            out['intrinsics'] = bag.intrinsics.astype(np.float32)
        return out

    # -- reading ------------------------------------------------------------------------------

    def _reader(self, b: int) -> Any:
        # Readers hold file handles (sqlite connections, MCAP files) that must not be shared with
        # forked DataLoader workers: reopen per process.
        if self._pid != os.getpid():
            self._readers = {}
            self._pid = os.getpid()
        if b not in self._readers:
            self._readers[b] = _open_bag_quietly(self.bags[b].path, self.bags[b].salvaged)
        return self._readers[b]

    @staticmethod
    def _read(reader: Any, path: Path, index: _TopicIndex, rows: np.ndarray,
              decode: Any) -> list[np.ndarray]:
        """Decode messages ``rows`` (positions in the stamp-ordered index), in that order."""
        wanted: dict[tuple[int, int], list[int]] = {}
        for pos, row in enumerate(rows):
            key = (int(index.log_ns[row]), int(index.stamp_ns[row]))
            wanted.setdefault(key, []).append(pos)
        wanted_logs = {k[0] for k in wanted}
        logs = sorted(wanted_logs)
        out: list[np.ndarray | None] = [None] * len(rows)
        # One bag-time range read when the window is dense in it, else one read per message
        # (e.g. a large frame_step), so we never scan far more messages than we decode.
        in_range = int(np.searchsorted(index.log_sorted, logs[-1], side='right')
                       - np.searchsorted(index.log_sorted, logs[0], side='left'))
        ranges = [(logs[0], logs[-1] + 1)] if in_range <= 4 * len(logs) + 16 else [
            (t, t + 1) for t in logs]
        try:
            for start, stop in ranges:
                for log_ns, raw in reader.raw(index.topic, start, stop):
                    if log_ns not in wanted_logs:
                        continue
                    key = (log_ns, _message_stamp_ns(reader, raw, index.msgtype))
                    slots = wanted.get(key)
                    if not slots or out[slots[0]] is not None:
                        continue
                    msg = reader.deserialize(raw, index.msgtype)
                    try:
                        image = decode(msg, index.msgtype)
                    except image_codecs.ImageDecodeError as err:
                        raise BagError(f'bag {path}, topic {index.topic}, stamp {key[1]} ns: '
                                       f'{err}') from err
                    for pos in slots:
                        out[pos] = image
        except BagError:
            raise
        except Exception as err:
            raise BagError(f'error while reading bag {path}, topic {index.topic}: {err}') \
                from err
        missing = [int(rows[i]) for i, v in enumerate(out) if v is None]
        if missing:
            raise BagError(f'bag {path}, topic {index.topic}: {len(missing)} indexed messages '
                           f'could not be read back (was the bag modified after indexing?)')
        return out  # type: ignore[return-value]

    def close(self) -> None:
        """Close the open bag readers (they reopen on the next ``window``)."""
        for reader in self._readers.values():
            reader.close()
        self._readers = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state['_readers'] = {}
        return state

    def __enter__(self) -> BagSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f'BagSource({self.name!r}, bags={len(self.bags)}, frames={self.num_frames}, '
                f'windows={len(self)})')


def _open_bag_quietly(path: Path, salvaged: bool) -> Any:
    # The truncation warning was already given while indexing.
    if not salvaged:
        return _open_bag(path)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return _open_bag(path)


def _read_stable_camera_info(reader: Any, path: Path, topic: str) -> CameraInfo:
    first: CameraInfo | None = None
    changed = False
    try:
        for _, raw in reader.raw(topic):
            info = _camera_info_from_msg(reader.deserialize(raw, CAMERA_INFO_TYPE))
            if first is None:
                first = info
            elif not np.allclose(first.intrinsics, info.intrinsics):
                changed = True
                break
    except Exception as err:
        raise BagError(f'error while reading bag {path}, topic {topic}: {err}') from err
    if first is None:
        raise BagError(f'bag {path}: CameraInfo topic {topic!r} has no message')
    if not (first.intrinsics[0, 0] > 0 and first.intrinsics[1, 1] > 0):
        raise BagError(f'bag {path}, topic {topic}: CameraInfo K has no focal length '
                       f'(uncalibrated camera): {first.intrinsics.ravel().tolist()}')
    if changed:
        warnings.warn(f'bag {path}, topic {topic}: camera intrinsics change during the recording; '
                      f'using the first CameraInfo', stacklevel=4)
    return first


def _scaled_intrinsics(info: CameraInfo, height: int, width: int, path: Path) -> np.ndarray:
    """K for the image size; CameraInfo of another resolution is rescaled (with a warning)."""
    K = info.intrinsics.copy()
    if (info.width, info.height) in ((width, height), (0, 0)):
        return K
    sx, sy = width / info.width, height / info.height
    if not math.isclose(sx, sy, rel_tol=1e-3):
        raise BagError(f'bag {path}: CameraInfo is {info.width}x{info.height} but images are '
                       f'{width}x{height} (different aspect ratio)')
    warnings.warn(f'bag {path}: CameraInfo is for {info.width}x{info.height} but images are '
                  f'{width}x{height}; scaling the intrinsics by {sx:g}', stacklevel=4)
    # Pixel centres sit at integer coordinates: scale about the image corner at -0.5.
    K[0, 0] *= sx
    K[1, 1] *= sy
    K[0, 2] = (K[0, 2] + 0.5) * sx - 0.5
    K[1, 2] = (K[1, 2] + 0.5) * sy - 0.5
    return K

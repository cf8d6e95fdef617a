"""What the tools write: MCAP bags of rclpy messages (via rosbags) and overlay videos.

No ROS installation is needed to write a bag: rclpy messages are serialised with
``rclpy.serialization.serialize_message`` (CDR, the same bytes a ROS 2 recorder stores) and
written with rosbags' MCAP writer. rosbags needs each type's definition for the bag's schema;
its Kilted typestore has the common packages, and ``vision_msgs`` is registered from the
project's own interface definitions (``interfaces/vision_msgs/msg/*.msg``, the files the venv's
``vision_msgs`` is built from), so the schema matches the messages byte for byte.

Bags are rosbag2 directories (``NAME/NAME.mcap`` + ``metadata.yaml``) with zstd-compressed
chunks, readable by ``ros2 bag``, rosbags and ``moog_ros.training.bags``.
"""
from __future__ import annotations

from collections.abc import Mapping
from fractions import Fraction
import functools
import os
from pathlib import Path
import shutil
import sys
import threading
from typing import Any
import warnings

import cv2
import numpy as np

PACKAGE = 'moog_ros'
VISION_MSGS = 'vision_msgs'


class BagWriteError(RuntimeError):
    """An output bag cannot be created or written; the message names the path."""


# ------------------------------------------------------------------------------------------------
# Types.
# ------------------------------------------------------------------------------------------------

def interface_msg_dir(package: str = VISION_MSGS) -> Path:
    """The ``msg/`` folder of one of the project's interface packages.

    Looks in the source tree first (editable installs, tests), then in the installed share
    directory (``share/moog_ros/interfaces``, found through the ament index).

    Raises:
        FileNotFoundError: neither exists (names both places).
    """
    source = Path(__file__).resolve().parents[2] / 'interfaces' / package / 'msg'
    candidates = [source]
    try:
        from ament_index_python.packages import get_package_share_directory

        candidates.append(Path(get_package_share_directory(PACKAGE)) / 'interfaces' / package
                          / 'msg')
    except Exception:  # not in the ament index: only the source tree can have it
        pass
    for candidate in candidates:
        if any(candidate.glob('*.msg')):
            return candidate
    raise FileNotFoundError(f'no {package} interface definitions (*.msg) in any of '
                            f'{[str(c) for c in candidates]}')


@functools.lru_cache(maxsize=1)
def output_typestore() -> Any:
    """A rosbags typestore with ROS 2 Kilted's types plus the project's ``vision_msgs``.

    A private store (the shared Kilted store is not modified), built once per process.
    """
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    store = get_typestore(Stores.EMPTY)
    store.register(get_typestore(Stores.ROS2_KILTED).fielddefs)
    types: dict[str, Any] = {}
    for path in sorted(interface_msg_dir().glob('*.msg')):
        types.update(get_types_from_msg(path.read_text(), f'{VISION_MSGS}/msg/{path.stem}'))
    store.register(types)
    return store


def msgtype_of(msg_or_class: Any) -> str:
    """``'pkg/msg/Name'`` of an rclpy message or message class (``sensor_msgs/msg/Image``)."""
    cls = msg_or_class if isinstance(msg_or_class, type) else type(msg_or_class)
    package, kind = cls.__module__.split('.')[:2]  # 'sensor_msgs.msg._image'
    return f'{package}/{kind}/{cls.__name__}'


def ros_header(stamp_ns: int, frame_id: str) -> Any:
    """An rclpy ``std_msgs/Header`` for a stamp in integer nanoseconds."""
    from builtin_interfaces.msg import Time
    from std_msgs.msg import Header

    sec, nanosec = divmod(int(stamp_ns), 1_000_000_000)
    return Header(stamp=Time(sec=sec, nanosec=nanosec), frame_id=frame_id)


# ------------------------------------------------------------------------------------------------
# Bags.
# ------------------------------------------------------------------------------------------------

def remove_bag(path: str | os.PathLike) -> None:
    """Deletes a rosbag2 directory written earlier (to overwrite it); refuses anything else.

    Only a directory holding nothing but ``metadata.yaml`` and ``*.mcap``/``*.db3`` files is
    removed, so a mistyped ``--out`` can never delete unrelated data.

    Raises:
        BagWriteError: ``path`` exists and is not such a directory.
    """
    path = Path(path)
    if not path.exists():
        return
    entries = list(path.iterdir()) if path.is_dir() else None
    if entries is None or any(
            e.is_dir() or not (e.name == 'metadata.yaml' or e.suffix in ('.mcap', '.db3'))
            for e in entries):
        raise BagWriteError(f'{path} exists and is not a bag directory written by this tool; '
                            'remove it yourself or choose another output path')
    shutil.rmtree(path)


class BagWriter:
    """A thread-safe MCAP rosbag2 writer for rclpy messages (or their CDR bytes).

    Topics are added on first use. Use as a context manager: the bag is only complete (index,
    ``metadata.yaml``) after :meth:`close`, which also runs when an exception leaves the block.

    Args:
        path: the bag directory to create (must not exist; see :func:`remove_bag`).
        compress: zstd-compress the MCAP chunks (readers decompress transparently).
    """

    def __init__(self, path: str | os.PathLike, *, compress: bool = True) -> None:
        from rosbags.rosbag2 import CompressionFormat, CompressionMode, StoragePlugin, Writer

        self.path = Path(path)
        if self.path.exists():
            raise BagWriteError(f'output bag {self.path} exists already; remove it or choose '
                                'another path')
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._typestore = output_typestore()
        self._writer = Writer(self.path, version=9, storage_plugin=StoragePlugin.MCAP)
        if compress:
            # STORAGE mode = compressed MCAP chunks, the form `ros2 bag record` writes.
            self._writer.set_compression(CompressionMode.STORAGE, CompressionFormat.ZSTD)
        self._writer.open()
        self._lock = threading.Lock()
        self._connections: dict[str, Any] = {}
        self.counts: dict[str, int] = {}
        self._closed = False

    def _connection(self, topic: str, msgtype: str) -> Any:
        conn = self._connections.get(topic)
        if conn is None:
            if msgtype not in self._typestore.types:
                raise BagWriteError(f'{self.path}: no definition of {msgtype} for topic {topic}')
            conn = self._writer.add_connection(topic, msgtype, typestore=self._typestore)
            self._connections[topic] = conn
            self.counts[topic] = 0
        elif conn.msgtype != msgtype:
            raise BagWriteError(f'{self.path}: topic {topic} is {conn.msgtype}, got a {msgtype}')
        return conn

    def write_raw(self, topic: str, msgtype: str, log_ns: int, data: bytes) -> None:
        """Writes serialised CDR bytes of type ``msgtype`` at bag time ``log_ns``."""
        with self._lock:
            if self._closed:
                raise BagWriteError(f'{self.path}: write after close')
            self._writer.write(self._connection(topic, msgtype), int(log_ns), data)
            self.counts[topic] += 1

    def write(self, topic: str, log_ns: int, msg: Any) -> None:
        """Serialises an rclpy message and writes it at bag time ``log_ns``."""
        from rclpy.serialization import serialize_message

        self.write_raw(topic, msgtype_of(msg), log_ns, serialize_message(msg))

    def write_all(self, log_ns: int, messages: Mapping[str, Any]) -> None:
        """Writes ``{topic: rclpy msg}`` at one bag time."""
        for topic, msg in messages.items():
            self.write(topic, log_ns, msg)

    def write_typed(self, topic: str, log_ns: int, msg: Any) -> None:
        """Writes a message object of :attr:`typestore` (rosbags' own message classes).

        rosbags zeroes CDR alignment padding while rclpy leaves whatever was in memory there,
        so files that must be reproducible byte for byte (the sample bag) are written this way.
        """
        self.write_raw(topic, msg.__msgtype__, log_ns,
                       bytes(self._typestore.serialize_cdr(msg, msg.__msgtype__)))

    @property
    def typestore(self) -> Any:
        """The rosbags typestore of this bag (Kilted + vision_msgs); its ``types`` build
        messages for :meth:`write_typed`."""
        return self._typestore

    def close(self) -> None:
        """Writes the index and ``metadata.yaml``; the bag is valid afterwards. Idempotent."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._writer.close()

    def __enter__(self) -> BagWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def mcap_file(bag: str | os.PathLike) -> Path:
    """The ``.mcap`` storage file of a bag directory written by :class:`BagWriter`."""
    bag = Path(bag)
    return bag / f'{bag.name}.mcap'


# ------------------------------------------------------------------------------------------------
# Videos and pictures.
# ------------------------------------------------------------------------------------------------

class VideoWriter:
    """MP4 from RGB frames: H.264 through PyAV (plays in browsers), else OpenCV's MPEG-4.

    The size is fixed by the first frame (padded to even sides, as yuv420p needs); later
    frames of another size are resized to it. Without ``fps`` the rate is the median frame
    period of the first frames' stamps (they are held back until it is known).

    Args:
        path: the ``.mp4`` to write (replaced if it exists).
        fps: frame rate written into the file, or None to take it from the stamps.
    """

    _FPS_SAMPLES = 8  # frames whose stamps set the rate when fps is not given
    _FALLBACK_FPS = 10.0

    def __init__(self, path: str | os.PathLike, fps: float | None = None) -> None:
        if fps is not None and not fps > 0:
            raise ValueError(f'VideoWriter: fps must be > 0, got {fps}')
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fps = float(fps) if fps is not None else None
        self.frames = 0
        self.codec = ''
        self._held: list[tuple[np.ndarray, int | None]] = []
        self._size: tuple[int, int] | None = None  # (W, H) written
        self._av: tuple[Any, Any, Any] | None = None  # (av module, container, stream)
        self._cv: cv2.VideoWriter | None = None

    def _estimate_fps(self) -> float:
        stamps = np.array([s for _, s in self._held if s is not None], dtype=np.int64)
        periods = np.diff(stamps)
        periods = periods[periods > 0]
        if not len(periods):
            return self._FALLBACK_FPS
        return float(np.clip(1e9 / np.median(periods), 1.0, 240.0))

    def _open(self, width: int, height: int) -> None:
        self._size = (width + width % 2, height + height % 2)
        try:  # PyAV is optional (a robot install may lack it): OpenCV writes MPEG-4 instead
            import av
        except ImportError:
            av = None
        if av is not None:
            try:
                container = av.open(str(self.path), mode='w')
                stream = container.add_stream(
                    'libx264', rate=Fraction(self.fps).limit_denominator(1001))
                stream.width, stream.height = self._size
                stream.pix_fmt = 'yuv420p'
                stream.options = {'crf': '20', 'preset': 'veryfast'}
                self._av = (av, container, stream)
                self.codec = 'h264'
                return
            except (av.FFmpegError, ValueError) as err:  # an FFmpeg build without libx264
                warnings.warn(f'{self.path}: no H.264 encoder in PyAV ({err}); writing MPEG-4 '
                              'with OpenCV', stacklevel=3)
        self._cv = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*'mp4v'), self.fps,
                                   self._size)
        if not self._cv.isOpened():
            raise OSError(f'{self.path}: OpenCV cannot open an mp4v video writer')
        self.codec = 'mp4v'

    def write(self, rgb: np.ndarray, stamp_ns: int | None = None) -> None:
        """Appends one uint8 ``[H, W, 3]`` RGB frame (``stamp_ns`` sets the rate if needed)."""
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f'VideoWriter.write: expected uint8 [H, W, 3], got {rgb.dtype} '
                             f'{list(rgb.shape)}')
        if self.fps is None:
            self._held.append((rgb.copy(), stamp_ns))
            if len(self._held) >= self._FPS_SAMPLES:
                self._flush_held()
            return
        self._encode(rgb)

    def _flush_held(self) -> None:
        self.fps = self._estimate_fps()
        held, self._held = self._held, []
        for rgb, _ in held:
            self._encode(rgb)

    def _encode(self, rgb: np.ndarray) -> None:
        if self._size is None:
            self._open(rgb.shape[1], rgb.shape[0])
        W, H = self._size
        if rgb.shape[:2] != (H, W):
            pad_y, pad_x = H - rgb.shape[0], W - rgb.shape[1]
            if pad_y in (0, 1) and pad_x in (0, 1):  # odd sides: repeat the last row/column
                rgb = cv2.copyMakeBorder(rgb, 0, pad_y, 0, pad_x, cv2.BORDER_REPLICATE)
            else:
                rgb = cv2.resize(rgb, (W, H), interpolation=cv2.INTER_AREA)
        if self._av is not None:
            av, container, stream = self._av
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format='rgb24')
            for packet in stream.encode(frame):
                container.mux(packet)
        else:
            self._cv.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        self.frames += 1

    def close(self) -> None:
        """Flushes and closes the file (idempotent)."""
        if self._held:
            self._flush_held()
        if self._av is not None:
            _, container, stream = self._av
            for packet in stream.encode(None):
                container.mux(packet)
            container.close()
            self._av = None
        if self._cv is not None:
            self._cv.release()
            self._cv = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def depth_range(maps: list[np.ndarray], percentiles: tuple[float, float] = (2.0, 98.0)
                ) -> tuple[float, float]:
    """A robust common colour range (metres) over depth maps, ignoring NaN; (0, 1) if empty."""
    finite = [m[np.isfinite(m)] for m in maps]
    values = np.concatenate(finite) if finite else np.zeros(0, np.float32)
    if values.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(values, percentiles)
    if not high > low:
        high = low + 1e-3
    return float(low), float(high)


def colourise_depth(depth_m: np.ndarray, range_m: tuple[float, float]) -> np.ndarray:
    """RGB uint8 ``[H, W, 3]`` of a depth map: turbo colours, near = red, far = blue, NaN black.

    Inverse depth is coloured (near structure gets most of the colour range, as people expect).
    """
    low = max(float(range_m[0]), 1e-3)  # metres; inverse depth needs low > 0
    high = max(float(range_m[1]), low * 1.001)
    clipped = np.clip(np.nan_to_num(depth_m, nan=high), low, high)
    t = (1.0 / clipped - 1.0 / high) / (1.0 / low - 1.0 / high)  # 1 near, 0 far
    t8 = np.clip(t * 255.0 + 0.5, 0, 255).astype(np.uint8)
    rgb = cv2.cvtColor(cv2.applyColorMap(t8, cv2.COLORMAP_TURBO), cv2.COLOR_BGR2RGB)
    rgb[~np.isfinite(depth_m)] = 0
    return rgb


def print_err(*parts: object) -> None:
    """Status lines for people go to stderr (stdout stays for machine-readable summaries)."""
    print(*parts, file=sys.stderr, flush=True)

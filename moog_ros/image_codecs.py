"""ROS image payloads <-> numpy: the one decoder of ``sensor_msgs/Image`` and ``CompressedImage``.

Pure numpy + OpenCV (no rclpy), so the live node (``moog_ros/ros/conversions.py`` wraps it),
``moog_infer``, the demo and the bag readers of training (``training/bags.py``) all decode
exactly the same pixels. The functions take the plain message fields (``encoding``, ``height``,
``width``, ``step``, ``is_bigendian``, ``data``; ``format``, ``data``) or any object carrying them
(rclpy and rosbags messages alike) and return channels-last arrays:

* colour: RGB uint8 ``[H, W, 3]``;
* depth: float32 metres ``[H, W]`` along the optical axis (REP 118), NaN where unknown.

Every problem raises :class:`ImageDecodeError` (a ``ValueError``) whose message names the
message type, the encoding or format, the size and the step.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import tempfile
import threading
from typing import Any
import zlib

import cv2
import numpy as np

__all__ = [
    'COLOUR_ENCODINGS',
    'DEFAULT_MAX_PIXELS',
    'DEPTH_ENCODINGS',
    'ImageDecodeError',
    'check_image_layout',
    'compressed_size',
    'compressed_msg_to_depth_m',
    'compressed_msg_to_rgb',
    'decode_compressed_depth_m',
    'decode_compressed_rgb',
    'decode_depth_m',
    'decode_rgb',
    'image_msg_to_depth_m',
    'image_msg_to_rgb',
]


class ImageDecodeError(ValueError):
    """An image payload cannot be decoded (unknown encoding, short buffer, bad codec data)."""


# Most pixels a decoded image may have unless the caller says otherwise (4096 x 4096 = 16.8 M,
# about 50 MB as RGB). Checked from the header before anything is allocated or decoded: a
# 400 KB PNG or a 300-byte JPEG header can claim 20000 x 20000 (1.2 GB of RGB).
DEFAULT_MAX_PIXELS = 4096 * 4096


def _check_pixels(where: str, width: int, height: int, max_pixels: int | None) -> None:
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else int(max_pixels)
    if width * height > limit:
        raise ImageDecodeError(f'{where}: {width}x{height} = {width * height} pixels is over '
                               f'the limit of {limit} (max_image_pixels)')


# ------------------------------------------------------------------------------------------------
# Raw images.
# ------------------------------------------------------------------------------------------------

# encoding -> (channels, numpy dtype of one channel). Multi-byte data honours is_bigendian.
_PACKED = {
    'rgb8': (3, np.uint8), 'bgr8': (3, np.uint8), 'rgba8': (4, np.uint8),
    'bgra8': (4, np.uint8), 'mono8': (1, np.uint8), '8UC1': (1, np.uint8),
    'rgb16': (3, np.uint16), 'bgr16': (3, np.uint16), 'rgba16': (4, np.uint16),
    'bgra16': (4, np.uint16), 'mono16': (1, np.uint16), '16UC1': (1, np.uint16),
    '32FC1': (1, np.float32),
    'bayer_rggb8': (1, np.uint8), 'bayer_bggr8': (1, np.uint8),
    'bayer_gbrg8': (1, np.uint8), 'bayer_grbg8': (1, np.uint8),
    'bayer_rggb16': (1, np.uint16), 'bayer_bggr16': (1, np.uint16),
    'bayer_gbrg16': (1, np.uint16), 'bayer_grbg16': (1, np.uint16),
}
# 4:2:2 packed YUV: 2 bytes per pixel. ROS's legacy 'yuv422' is UYVY and 'yuv422_yuy2' is YUYV
# (sensor_msgs/image_encodings.hpp); the fourcc names are the current spelling.
_YUV422 = {
    'uyvy': cv2.COLOR_YUV2RGB_UYVY, 'yuv422': cv2.COLOR_YUV2RGB_UYVY,
    'yuyv': cv2.COLOR_YUV2RGB_YUYV, 'yuv422_yuy2': cv2.COLOR_YUV2RGB_YUYV,
}
# 4:2:0 semi-planar: a full-resolution Y plane followed by a half-height interleaved UV plane.
_YUV420SP = {'nv12': cv2.COLOR_YUV2RGB_NV12, 'nv21': cv2.COLOR_YUV2RGB_NV21}
# OpenCV names Bayer patterns by the second row's first two pixels, so RGGB is its "BG".
_BAYER = {
    'rggb': cv2.COLOR_BayerBG2RGB, 'bggr': cv2.COLOR_BayerRG2RGB,
    'gbrg': cv2.COLOR_BayerGR2RGB, 'grbg': cv2.COLOR_BayerGB2RGB,
}
_TO_RGB = {'bgr': cv2.COLOR_BGR2RGB, 'rgba': cv2.COLOR_RGBA2RGB, 'bgra': cv2.COLOR_BGRA2RGB}

COLOUR_ENCODINGS = tuple(sorted([*_PACKED, *_YUV422, *_YUV420SP]))
DEPTH_ENCODINGS = ('16UC1', 'mono16', '32FC1')


def _bytes_view(data: Any) -> np.ndarray:
    """Flat uint8 view of a payload (bytes, memoryview, array.array, ndarray) without copying."""
    if isinstance(data, np.ndarray):  # rosbags messages
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    if isinstance(data, list | tuple):  # only hand-built messages; the middleware gives buffers
        return np.asarray(data, dtype=np.uint8)
    return np.frombuffer(data, dtype=np.uint8)


def _where(encoding: str, height: int, width: int, step: int) -> str:
    return f'Image (encoding {encoding!r}, {width}x{height}, step {step})'


def _check_layout(where: str, raw: np.ndarray, step: int, row_bytes: int, rows: int) -> None:
    if step < row_bytes:
        raise ImageDecodeError(
            f'{where}: step {step} is smaller than one row ({row_bytes} bytes)')
    # The last row only needs its pixels, not the padding after them.
    needed = step * (rows - 1) + row_bytes
    if raw.size < needed:
        raise ImageDecodeError(
            f'{where}: data has {raw.size} bytes, needs {needed} bytes (expected step * rows = '
            f'{step * rows}; only the last row may lack its padding)')


def _packed_layout(where: str, encoding: str, height: int, width: int, step: int,
                   is_bigendian: Any, raw: np.ndarray) -> tuple[int, np.dtype]:
    """(channels, sample dtype with its byte order) of a packed encoding, layout checked."""
    channels, dtype = _PACKED[encoding]
    dtype = np.dtype(dtype)
    if dtype.itemsize > 1:
        dtype = dtype.newbyteorder('>' if is_bigendian else '<')
    _check_layout(where, raw, step, width * channels * dtype.itemsize, height)
    return channels, dtype


def _samples(raw: np.ndarray, height: int, width: int, step: int, channels: int,
             dtype: np.dtype) -> np.ndarray:
    """Zero-copy ``[H, W, C]`` view of the samples; row padding is skipped by the strides."""
    return np.ndarray((height, width, channels), dtype, raw,
                      strides=(step, channels * dtype.itemsize, dtype.itemsize))


def _to_8bit(samples: np.ndarray) -> np.ndarray:
    """16-bit samples -> uint8 by keeping the top 8 bits (``v >> 8``), a new contiguous array.

    Decision (the node used ``v >> 8``, the old training codec rounded ``(v + 128) // 257``):
    ``>> 8`` is kept. It is the node's live behaviour, exact on the ``v * 257`` round trip and
    the cheapest on the hot path (no 32-bit temporaries; measured faster than both the rounding
    and a strided copy of the high bytes). The two differ by at most one grey level; what
    matters is that training and the node now decode the same bags identically. 12-bit cameras
    look dark with full-range scaling, but the mapping is the same on every frame, which a
    recurrent model needs.
    """
    return (samples >> 8).astype(np.uint8)


def _yuv_rows(encoding: str, height: int, width: int) -> tuple[int, int]:
    """(bytes per row, rows) of a YUV encoding's planes."""
    if encoding in _YUV420SP:
        return width, height * 3 // 2
    return 2 * width, height


def check_image_layout(encoding: str, height: int, width: int, step: int, data: Any,
                       max_pixels: int | None = None) -> np.ndarray:
    """Checks a colour ``sensor_msgs/Image`` payload without converting a pixel.

    Cheap (arithmetic on the header fields), so a receiver can drop a bad frame before it
    displaces a good one waiting for inference.

    Returns:
        The flat uint8 view of ``data``.

    Raises:
        ImageDecodeError: unsupported encoding, zero size, more than ``max_pixels``, odd sizes
            for YUV, ``step`` too small or data too short.
    """
    H, W, step = int(height), int(width), int(step)
    where = _where(encoding, H, W, step)
    if W <= 0 or H <= 0:
        raise ImageDecodeError(f'{where}: zero size')
    if encoding not in _PACKED and encoding not in _YUV422 and encoding not in _YUV420SP:
        raise ImageDecodeError(f'{where}: unsupported encoding; supported: '
                               f'{", ".join(COLOUR_ENCODINGS)}')
    _check_pixels(where, W, H, max_pixels)
    raw = _bytes_view(data)
    if encoding in _YUV420SP and (W % 2 or H % 2):
        raise ImageDecodeError(f'{where}: nv12/nv21 need an even width and height')
    if encoding in _YUV422 and W % 2:
        raise ImageDecodeError(f'{where}: 4:2:2 YUV needs an even width')
    if encoding in _PACKED:
        channels, dtype = _PACKED[encoding]
        _check_layout(where, raw, step, W * channels * np.dtype(dtype).itemsize, H)
    else:
        _check_layout(where, raw, step, *_yuv_rows(encoding, H, W))
    return raw


def decode_rgb(encoding: str, height: int, width: int, step: int, is_bigendian: Any,
               data: Any, max_pixels: int | None = None) -> np.ndarray:
    """Decodes a ``sensor_msgs/Image`` payload to RGB uint8 ``[H, W, 3]``.

    ``rgb8`` returns a zero-copy (possibly read-only, row-strided) view of ``data``; every other
    encoding costs one OpenCV conversion. 16-bit data keeps its top 8 bits (see
    :func:`_to_8bit`), mono is replicated to three channels, alpha is dropped, Bayer is
    demosaiced, ``32FC1`` is intensity in [0, 1] (see the comment in the body).

    Args:
        encoding: ROS encoding string (see ``COLOUR_ENCODINGS``).
        height: Rows.
        width: Columns.
        step: Bytes per row including padding.
        is_bigendian: Byte order of multi-byte samples.
        data: The raw bytes (bytes, memoryview, array.array or uint8 array).
        max_pixels: most ``width * height`` accepted (None: ``DEFAULT_MAX_PIXELS``).

    Raises:
        ImageDecodeError: unsupported encoding, zero size, more than ``max_pixels``, ``step``
            too small, data shorter than ``step * height`` (less the last row's padding), odd
            sizes for YUV, or non-finite values in a float image.
    """
    H, W, step = int(height), int(width), int(step)
    where = _where(encoding, H, W, step)
    raw = check_image_layout(encoding, H, W, step, data, max_pixels)
    if encoding in _YUV422 or encoding in _YUV420SP:
        row_bytes, rows = _yuv_rows(encoding, H, W)
        planes = np.ndarray((rows, row_bytes), np.uint8, raw, strides=(step, 1))
        if encoding in _YUV422:
            return cv2.cvtColor(planes.reshape(rows, W, 2), _YUV422[encoding])
        return cv2.cvtColor(np.ascontiguousarray(planes), _YUV420SP[encoding])
    channels, dtype = _packed_layout(where, encoding, H, W, step, is_bigendian, raw)
    if dtype.kind == 'f':
        # Decision (the node took 32FC1 as intensity, the old training codec refused it as
        # depth): intensity in [0, 1] is kept. Float mono cameras exist, the node's users rely on
        # it, and depth is never ambiguous here: depth topics go through decode_depth_m.
        pixels = _samples(raw, H, W, step, channels, dtype)
        if not np.isfinite(pixels).all():
            raise ImageDecodeError(f'{where}: data contains NaN or Inf')
        pixels = (np.clip(pixels, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif dtype.itemsize == 2:
        pixels = _to_8bit(_samples(raw, H, W, step, channels, dtype))
    else:
        pixels = _samples(raw, H, W, step, channels, dtype)
    if encoding.startswith('bayer_'):
        return cv2.cvtColor(np.ascontiguousarray(pixels[..., 0]), _BAYER[encoding[6:10]])
    if encoding in ('rgb8', 'rgb16'):
        return pixels
    if pixels.shape[2] == 1:
        return cv2.cvtColor(pixels, cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(pixels, _TO_RGB[encoding.rstrip('0123456789')])


def decode_depth_m(encoding: str, height: int, width: int, step: int, is_bigendian: Any,
                   data: Any, max_pixels: int | None = None) -> np.ndarray:
    """Decodes a depth ``sensor_msgs/Image`` payload to metres.

    ``16UC1``/``mono16`` hold millimetres (0 = no return); ``32FC1`` holds metres (0, NaN, +-inf
    and negatives = no valid return). Invalid pixels become NaN.

    Returns:
        float32 ``[H, W]`` metres along the optical axis (a new array).

    Raises:
        ImageDecodeError: a non-depth encoding, zero size, more than ``max_pixels`` (None:
            ``DEFAULT_MAX_PIXELS``) or a bad layout.
    """
    H, W, step = int(height), int(width), int(step)
    where = _where(encoding, H, W, step)
    if encoding not in DEPTH_ENCODINGS:
        raise ImageDecodeError(f'{where}: unsupported depth encoding; supported: '
                               f'{", ".join(DEPTH_ENCODINGS)}')
    if W <= 0 or H <= 0:
        raise ImageDecodeError(f'{where}: zero size')
    _check_pixels(where, W, H, max_pixels)
    raw = _bytes_view(data)
    channels, dtype = _packed_layout(where, encoding, H, W, step, is_bigendian, raw)
    return _depth_to_metres(_samples(raw, H, W, step, channels, dtype)[:, :, 0])


def _depth_to_metres(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype.kind == 'u':
        depth_m = pixels.astype(np.float32) * np.float32(1e-3)
        depth_m[pixels == 0] = np.nan
        return depth_m
    depth_m = pixels.astype(np.float32)  # always a copy: native byte order, writable
    with np.errstate(invalid='ignore'):
        depth_m[~(np.isfinite(depth_m) & (depth_m > 0))] = np.nan
    return depth_m


# ------------------------------------------------------------------------------------------------
# Compressed images.
# ------------------------------------------------------------------------------------------------

def _format_parts(fmt: str) -> tuple[str, str, str]:
    """Splits a CompressedImage format into (original encoding, codec, compressed channel order).

    Examples: ``'jpeg'`` -> ('', 'jpeg', ''); ``'rgb8; jpeg compressed bgr8'`` ->
    ('rgb8', 'jpeg', 'bgr8'); ``'16UC1; compressedDepth png'`` -> ('16UC1', 'compresseddepth', '').
    """
    original, _, rest = fmt.partition(';') if ';' in fmt else ('', '', fmt)
    lower = rest.lower()
    codec = ''
    if 'compresseddepth' in lower:
        codec = 'compresseddepth'
    elif 'jpeg' in lower or 'jpg' in lower:
        codec = 'jpeg'
    elif 'png' in lower:
        codec = 'png'
    words = lower.split()
    target = ''
    if 'compressed' in words and words.index('compressed') + 1 < len(words):
        target = words[words.index('compressed') + 1]
    return original.strip(), codec, target


_PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
_PNG_IEND = b'\x00\x00\x00\x00IEND\xaeB`\x82'  # the (always identical) last chunk
# JPEG start-of-frame markers (every SOFn but DHT C4, JPG C8 and DAC CC); they carry the size.
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE,
                       0xCF})
# Markers without a length field: TEM and the restart markers RST0..7.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})


def _corrupt(where: str, size: int, detail: str) -> ImageDecodeError:
    return ImageDecodeError(f'{where}: could not decode the {size}-byte payload (corrupt?): '
                            f'{detail}')


def _png_size(raw: bytes, where: str) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR (CRC checked); the file must end with IEND."""
    if len(raw) < 8 + 25 + 12:
        raise _corrupt(where, len(raw), 'shorter than a PNG header')
    length, kind = int.from_bytes(raw[8:12], 'big'), raw[12:16]
    if length != 13 or kind != b'IHDR':
        raise _corrupt(where, len(raw), 'PNG without an IHDR chunk first')
    if zlib.crc32(raw[12:29]) != int.from_bytes(raw[29:33], 'big'):
        raise _corrupt(where, len(raw), 'PNG IHDR checksum mismatch')
    width, height = int.from_bytes(raw[16:20], 'big'), int.from_bytes(raw[20:24], 'big')
    bit_depth, colour_type = raw[24], raw[25]
    if bit_depth not in (1, 2, 4, 8, 16) or colour_type not in (0, 2, 3, 4, 6):
        raise _corrupt(where, len(raw), f'PNG bit depth {bit_depth}, colour type {colour_type}')
    if not raw.endswith(_PNG_IEND):
        raise _corrupt(where, len(raw), 'PNG truncated (no IEND chunk at the end)')
    return width, height


def _jpeg_size(raw: bytes, where: str) -> tuple[int, int]:
    """(width, height) from a JPEG's frame header (SOFn); the file must end with EOI."""
    pos, n = 2, len(raw)
    while True:
        if pos + 4 > n or raw[pos] != 0xFF:
            raise _corrupt(where, n, 'JPEG ends or breaks before its frame header')
        while pos < n and raw[pos] == 0xFF:  # fill bytes may pad any marker
            pos += 1
        if pos >= n:
            raise _corrupt(where, n, 'JPEG ends before its frame header')
        marker = raw[pos]
        pos += 1
        if marker in _JPEG_STANDALONE:
            continue
        if marker in (0xD8, 0xD9, 0xDA) or pos + 2 > n:
            raise _corrupt(where, n, f'JPEG marker 0x{marker:02X} before any frame header')
        length = int.from_bytes(raw[pos:pos + 2], 'big')
        if length < 2 or pos + length > n:
            raise _corrupt(where, n, f'JPEG segment 0x{marker:02X} of length {length} runs '
                           'past the data')
        if marker in _JPEG_SOF:
            if length < 8:
                raise _corrupt(where, n, 'JPEG frame header too short')
            height = int.from_bytes(raw[pos + 3:pos + 5], 'big')
            width = int.from_bytes(raw[pos + 5:pos + 7], 'big')
            break
        pos += length
    # Encoders end with EOI; some camera drivers pad the buffer with zeros after it.
    if not raw.rstrip(b'\x00').endswith(b'\xff\xd9'):
        raise _corrupt(where, n, 'JPEG truncated (no end-of-image marker)')
    return width, height


def compressed_size(fmt: str, data: Any, max_pixels: int | None = None) -> tuple[int, int]:
    """(width, height) of a CompressedImage's PNG or JPEG from its header alone.

    Nothing is decoded: the PNG IHDR (checksum verified) or the JPEG frame header gives the
    size, a missing PNG IEND or JPEG EOI marks a truncated file, and the size is checked
    against ``max_pixels`` (None: ``DEFAULT_MAX_PIXELS``). The container is sniffed from the
    bytes, not trusted from ``fmt``.

    Raises:
        ImageDecodeError: empty data, neither PNG nor JPEG, a damaged or truncated header, a
            zero size, or more than ``max_pixels``.
    """
    return _compressed_size(_bytes_view(data), f'CompressedImage (format {fmt!r})', max_pixels)


def _compressed_size(raw: np.ndarray, where: str, max_pixels: int | None) -> tuple[int, int]:
    if raw.size == 0:
        raise ImageDecodeError(f'{where}: empty data')
    head = raw[:8].tobytes()
    if head == _PNG_MAGIC:
        width, height = _png_size(raw.tobytes(), where)
    elif head[:2] == b'\xff\xd8':
        width, height = _jpeg_size(raw.tobytes(), where)
    else:
        raise _corrupt(where, int(raw.size), 'neither a PNG nor a JPEG signature')
    if width <= 0 or height <= 0:
        raise _corrupt(where, int(raw.size), f'header claims a {width}x{height} image')
    _check_pixels(where, width, height, max_pixels)
    return width, height


# OpenCV's log level and file descriptor 2 are process-wide: one lock keeps concurrent decoders
# from restoring them under each other.
_QUIET_LOCK = threading.Lock()
_CV_LOG = cv2.utils.logging
_capture_file = None  # one temporary file per process, reused for every decode
# What libjpeg and libpng write to stderr themselves (bypassing OpenCV's logger): warnings such as
# "Corrupt JPEG data: 12 extraneous bytes before marker 0xd9" and "libpng error: ...".
_CODEC_NOISE = (b'Corrupt JPEG data', b'Premature end of JPEG', b'Invalid JPEG', b'Bogus',
                b'Unsupported marker', b'libpng', b'[ WARN:', b'[ERROR:', b'JPEG datastream')


@contextlib.contextmanager
def _quiet_codecs(notes: list[str]):
    """Decoding without native stderr noise; the codecs' own messages land in ``notes``.

    OpenCV's logger is set silent, and file descriptor 2 points at a temporary file for the
    duration of the call, because libjpeg and libpng print warnings with ``fprintf(stderr)``.
    Whatever else reached descriptor 2 meanwhile (another thread's log line) is written back to
    the real stderr afterwards, so nothing but codec noise is lost.
    """
    global _capture_file
    with _QUIET_LOCK:
        if _capture_file is None:
            _capture_file = tempfile.TemporaryFile()  # noqa: SIM115 (lives for the process)
            atexit.register(_capture_file.close)
        capture = _capture_file
        previous_level = _CV_LOG.getLogLevel()
        _CV_LOG.setLogLevel(_CV_LOG.LOG_LEVEL_SILENT)
        saved = os.dup(2)
        try:
            os.dup2(capture.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
        finally:
            os.close(saved)
            _CV_LOG.setLogLevel(previous_level)
            size = os.lseek(capture.fileno(), 0, os.SEEK_END)
            captured = os.pread(capture.fileno(), size, 0) if size else b''
            if size:
                os.ftruncate(capture.fileno(), 0)
                os.lseek(capture.fileno(), 0, os.SEEK_SET)
            other = []
            for line in captured.splitlines(keepends=True):
                if any(marker in line for marker in _CODEC_NOISE):
                    notes.append(line.decode('utf-8', 'replace').strip()[:200])
                else:
                    other.append(line)
            if other:
                os.write(2, b''.join(other))


def _imdecode(raw: np.ndarray, where: str, max_pixels: int | None = None) -> np.ndarray:
    if raw.size == 0:
        raise ImageDecodeError(f'{where}: empty data')
    _compressed_size(raw, where, max_pixels)  # header first: no decoding of bombs or garbage
    # IMREAD_UNCHANGED keeps 16-bit PNGs at full precision and alpha/mono as they are; for an
    # 8-bit colour JPEG it is the same decode as IMREAD_COLOR.
    notes: list[str] = []
    try:
        with _quiet_codecs(notes):
            image = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED)
    except cv2.error as err:  # e.g. a header OpenCV refuses; text is OpenCV's, kept short
        raise _corrupt(where, int(raw.size), f'OpenCV: {str(err).strip()[-200:]}') from err
    # A frame its own decoder calls corrupt is garbage pixels (libjpeg fills what it lost with
    # grey): refused rather than fed to a recurrent model.
    if image is None or image.size == 0 or notes:
        detail = f': {notes[0]}' if notes else ''
        raise ImageDecodeError(
            f'{where}: OpenCV could not decode the {raw.size}-byte payload (corrupt?){detail}')
    return image


def decode_compressed_rgb(fmt: str, data: Any, max_pixels: int | None = None) -> np.ndarray:
    """Decodes a ``sensor_msgs/CompressedImage`` (jpeg or png) to RGB uint8 ``[H, W, 3]``.

    ``fmt`` may be a bare ``'jpeg'``/``'png'`` (taken as BGR, the order OpenCV and
    image_transport compress) or image_transport's ``'<encoding>; jpeg compressed <order>'``, whose
    ``<order>`` (``bgr8``, ``rgb8``, ``mono8``, ...) is the channel order inside the codec.
    16-bit PNGs keep their top 8 bits, as raw images do.

    Raises:
        ImageDecodeError: compressedDepth or another unsupported format, empty or undecodable
            data.
    """
    where = f'CompressedImage (format {fmt!r})'
    _, codec, target = _format_parts(fmt)
    if codec == 'compresseddepth':
        raise ImageDecodeError(f'{where}: unsupported format (compressedDepth is a depth image); '
                               'expected jpeg or png')
    if not codec:
        raise ImageDecodeError(f'{where}: unsupported format; expected jpeg or png')
    image = _imdecode(_bytes_view(data), where, max_pixels)
    if image.dtype == np.uint16:
        image = _to_8bit(image)
    elif image.dtype != np.uint8:
        raise ImageDecodeError(f'{where}: decoded to {image.dtype}, expected 8 or 16 bits')
    if image.ndim == 2 or image.shape[2] == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    rgb_inside = target.startswith('rgb')
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_RGBA2RGB if rgb_inside else cv2.COLOR_BGRA2RGB)
    return image if rgb_inside else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def decode_compressed_depth_m(fmt: str, data: Any, max_pixels: int | None = None
                              ) -> np.ndarray:
    """Decodes a compressed depth image to float32 metres ``[H, W]`` (NaN invalid).

    Accepts the ``compressedDepth`` transport (a 12-byte config header, then a PNG: raw
    millimetres for 16UC1, quantised inverse depth ``depth = a / (v - b)`` for 32FC1) and plain
    16-bit PNGs in millimetres (format ``'16UC1; png compressed 16UC1'`` or ``'png'``).

    Raises:
        ImageDecodeError: RVL or other unsupported variants, empty or undecodable bytes.
    """
    where = f'CompressedImage (format {fmt!r})'
    original, codec, _ = _format_parts(fmt)
    if 'rvl' in fmt.lower():
        raise ImageDecodeError(f'{where}: compressedDepth RVL is not supported')
    raw = _bytes_view(data)
    quant = None
    head = raw[:20].tobytes()
    if codec == 'compresseddepth' or (head[:8] != _PNG_MAGIC and head[12:20] == _PNG_MAGIC):
        if head[12:20] != _PNG_MAGIC:
            raise ImageDecodeError(f'{where}: compressedDepth without a PNG after the header')
        # struct ConfigHeader { int32 format; float32 depthParam[2]; } (little-endian).
        quant = raw[4:12].view('<f4').astype(np.float64)
        raw = raw[12:]
    image = _imdecode(raw, where, max_pixels)
    if image.ndim != 2:
        raise ImageDecodeError(
            f'{where}: decoded to shape {list(image.shape)}, expected one channel')
    if original == '32FC1' and quant is not None:
        a, b = quant
        valid = image > 0
        depth_m = np.full(image.shape, np.nan, dtype=np.float32)
        depth_m[valid] = (a / (image[valid].astype(np.float64) - b)).astype(np.float32)
        return _depth_to_metres(depth_m)
    if image.dtype != np.uint16:
        raise ImageDecodeError(f'{where}: decoded to {image.dtype}, expected uint16 millimetres')
    return _depth_to_metres(image)


# ------------------------------------------------------------------------------------------------
# Whole messages (rclpy or rosbags).
# ------------------------------------------------------------------------------------------------

def image_msg_to_rgb(msg: Any, max_pixels: int | None = None) -> np.ndarray:
    """:func:`decode_rgb` on any object with the ``sensor_msgs/Image`` fields."""
    return decode_rgb(msg.encoding, msg.height, msg.width, msg.step, msg.is_bigendian, msg.data,
                      max_pixels)


def image_msg_to_depth_m(msg: Any, max_pixels: int | None = None) -> np.ndarray:
    """:func:`decode_depth_m` on any object with the ``sensor_msgs/Image`` fields."""
    return decode_depth_m(msg.encoding, msg.height, msg.width, msg.step, msg.is_bigendian,
                          msg.data, max_pixels)


def compressed_msg_to_rgb(msg: Any, max_pixels: int | None = None) -> np.ndarray:
    """:func:`decode_compressed_rgb` on any object with ``format`` and ``data``."""
    return decode_compressed_rgb(msg.format, msg.data, max_pixels)


def compressed_msg_to_depth_m(msg: Any, max_pixels: int | None = None) -> np.ndarray:
    """:func:`decode_compressed_depth_m` on any object with ``format`` and ``data``."""
    return decode_compressed_depth_m(msg.format, msg.data, max_pixels)

"""Pure numpy (+ cv2 for codecs) decoding of ROS image message payloads.

Used by the offline readers (``training/bags.py``) so that training never needs rclpy. The
functions take the plain message fields (``encoding``, ``height``, ``width``, ``step``,
``is_bigendian``, ``data``) or any object carrying them (rosbags and rclpy messages alike), and
return channels-last arrays:

* colour: RGB uint8 ``[H, W, 3]``;
* depth: float32 metres ``[H, W]`` along the optical axis (REP 118), NaN where unknown.

The live node has its own msg conversions (``moog_ros/ros/conversions.py``); this module is the
training-side twin and deliberately depends on nothing but numpy and OpenCV.
"""
from __future__ import annotations

from typing import Any

import cv2
import numpy as np

__all__ = [
    'COLOUR_ENCODINGS',
    'DEPTH_ENCODINGS',
    'ImageDecodeError',
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


# encoding -> (numpy dtype without byte order, channels). The byte order comes from is_bigendian.
_LAYOUTS: dict[str, tuple[str, int]] = {
    'rgb8': ('u1', 3), 'bgr8': ('u1', 3), 'rgba8': ('u1', 4), 'bgra8': ('u1', 4),
    'rgb16': ('u2', 3), 'bgr16': ('u2', 3), 'rgba16': ('u2', 4), 'bgra16': ('u2', 4),
    'mono8': ('u1', 1), '8UC1': ('u1', 1), 'mono16': ('u2', 1), '16UC1': ('u2', 1),
    '32FC1': ('f4', 1),
    # Packed 4:2:2, two bytes per pixel. ROS 'yuv422' is UYVY byte order; 'yuv422_yuy2' is YUYV.
    'yuv422': ('u1', 2), 'uyvy': ('u1', 2), 'yuv422_yuy2': ('u1', 2), 'yuyv': ('u1', 2),
}
_YUV_TO_RGB = {
    'yuv422': cv2.COLOR_YUV2RGB_UYVY, 'uyvy': cv2.COLOR_YUV2RGB_UYVY,
    'yuv422_yuy2': cv2.COLOR_YUV2RGB_YUY2, 'yuyv': cv2.COLOR_YUV2RGB_YUY2,
}
COLOUR_ENCODINGS = tuple(k for k in _LAYOUTS if k != '32FC1')
DEPTH_ENCODINGS = ('16UC1', 'mono16', '32FC1')


def _pixels(encoding: str, height: int, width: int, step: int, is_bigendian: int | bool,
            data: Any) -> np.ndarray:
    """View the payload as ``[H, W, C]`` in native byte order, honouring row padding (``step``)."""
    if encoding not in _LAYOUTS:
        raise ImageDecodeError(
            f'unsupported image encoding {encoding!r}; supported: {", ".join(_LAYOUTS)}')
    kind, channels = _LAYOUTS[encoding]
    dtype = np.dtype(kind).newbyteorder('>' if is_bigendian else '<')
    row_bytes = width * channels * dtype.itemsize
    if height <= 0 or width <= 0:
        raise ImageDecodeError(f'image has an empty size {width}x{height} ({encoding})')
    if step < row_bytes:
        raise ImageDecodeError(
            f'{encoding} image {width}x{height}: step {step} is smaller than a row '
            f'({row_bytes} bytes)')
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    buf = buf.reshape(-1).view(np.uint8)
    if buf.size < height * step:
        raise ImageDecodeError(
            f'{encoding} image {width}x{height} with step {step} needs {height * step} bytes, '
            f'got {buf.size}')
    # Rows may be padded to `step` bytes: cut the padding before reinterpreting the bytes.
    rows = buf[: height * step].reshape(height, step)[:, :row_bytes]
    pixels = np.ascontiguousarray(rows).view(dtype).reshape(height, width, channels)
    return pixels.astype(dtype.newbyteorder('='), copy=False)


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype == np.uint8:
        return pixels
    # 16-bit -> 8-bit with rounding (65535 maps to 255).
    return ((pixels.astype(np.uint32) + 128) // 257).astype(np.uint8)


def decode_rgb(encoding: str, height: int, width: int, step: int, is_bigendian: int | bool,
               data: Any) -> np.ndarray:
    """Decode a ``sensor_msgs/Image`` payload to RGB.

    Args:
        encoding: ROS encoding string (see ``COLOUR_ENCODINGS``; 16-bit ones are scaled to 8 bits,
            mono is replicated to three channels, alpha is dropped).
        height: Rows.
        width: Columns.
        step: Bytes per row including padding.
        is_bigendian: Byte order of multi-byte samples.
        data: The raw bytes (bytes, memoryview or uint8 array).

    Returns:
        uint8 ``[H, W, 3]`` RGB (a new, contiguous array).

    Raises:
        ImageDecodeError: unknown or non-colour encoding, or a buffer that is too short.
    """
    if encoding == '32FC1':
        raise ImageDecodeError('32FC1 is a depth encoding, not a colour image')
    pixels = _pixels(encoding, height, width, step, is_bigendian, data)
    if encoding in _YUV_TO_RGB:
        if width % 2:
            raise ImageDecodeError(f'{encoding} needs an even width, got {width}')
        return cv2.cvtColor(np.ascontiguousarray(pixels), _YUV_TO_RGB[encoding])
    pixels = _to_uint8(pixels)
    if pixels.shape[2] == 1:
        return np.ascontiguousarray(np.repeat(pixels, 3, axis=2))
    if encoding.startswith('bgr'):
        return np.ascontiguousarray(pixels[:, :, 2::-1])
    return np.ascontiguousarray(pixels[:, :, :3])


def decode_depth_m(encoding: str, height: int, width: int, step: int, is_bigendian: int | bool,
                   data: Any) -> np.ndarray:
    """Decode a depth ``sensor_msgs/Image`` payload to metres.

    ``16UC1``/``mono16`` hold millimetres (0 = no return); ``32FC1`` holds metres (0, NaN, +-inf
    and negatives = no valid return). Invalid pixels become NaN.

    Returns:
        float32 ``[H, W]`` metres along the optical axis.

    Raises:
        ImageDecodeError: a non-depth encoding or a short buffer.
    """
    if encoding not in DEPTH_ENCODINGS:
        raise ImageDecodeError(
            f'unsupported depth encoding {encoding!r}; supported: {", ".join(DEPTH_ENCODINGS)}')
    pixels = _pixels(encoding, height, width, step, is_bigendian, data)[:, :, 0]
    return _depth_to_metres(pixels)


def _depth_to_metres(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype == np.uint16:
        depth_m = pixels.astype(np.float32) * np.float32(1e-3)
        depth_m[pixels == 0] = np.nan
        return depth_m
    depth_m = pixels.astype(np.float32, copy=True)
    depth_m[~(np.isfinite(depth_m) & (depth_m > 0))] = np.nan
    return depth_m


def _format_parts(fmt: str) -> tuple[str, str, str]:
    """Split a CompressedImage format into (original encoding, codec, compressed channel order).

    Examples: ``'jpeg'`` -> ('', 'jpeg', ''); ``'rgb8; jpeg compressed bgr8'`` ->
    ('rgb8', 'jpeg', 'bgr8'); ``'16UC1; compressedDepth png'`` -> ('16UC1', 'compresseddepth', '').
    """
    original, _, rest = fmt.partition(';') if ';' in fmt else ('', '', fmt)
    words = rest.lower().split()
    codec = ''
    if 'compresseddepth' in words:
        codec = 'compresseddepth'
    elif any(w in ('jpeg', 'jpg') for w in words):
        codec = 'jpeg'
    elif 'png' in words:
        codec = 'png'
    target = ''
    if 'compressed' in words and words.index('compressed') + 1 < len(words):
        target = rest.split()[words.index('compressed') + 1]
    return original.strip(), codec, target


def _imdecode(data: Any, what: str) -> np.ndarray:
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    buf = buf.reshape(-1).view(np.uint8)
    if buf.size == 0:
        raise ImageDecodeError(f'{what}: empty compressed payload')
    # IMREAD_UNCHANGED keeps 16-bit PNGs at full precision and keeps alpha/mono as they are.
    image = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageDecodeError(f'{what}: OpenCV could not decode the {buf.size}-byte payload')
    return image


def decode_compressed_rgb(fmt: str, data: Any) -> np.ndarray:
    """Decode a ``sensor_msgs/CompressedImage`` (jpeg or png) to RGB uint8 ``[H, W, 3]``.

    The decoded channel order is the "compressed <order>" part of the format string
    (``'rgb8; jpeg compressed bgr8'``: the codec holds BGR, as image_transport writes it); a bare
    ``'jpeg'``/``'png'`` is taken as BGR, OpenCV's order.

    Raises:
        ImageDecodeError: a compressedDepth payload or undecodable bytes.
    """
    _, codec, target = _format_parts(fmt)
    if codec == 'compresseddepth':
        raise ImageDecodeError(f'format {fmt!r} is a compressedDepth image, not colour')
    image = _imdecode(data, f'CompressedImage format {fmt!r}')
    if image.ndim == 2:
        image = image[:, :, None]
    image = _to_uint8(image)
    if image.shape[2] == 1:
        return np.ascontiguousarray(np.repeat(image, 3, axis=2))
    if target.startswith(('rgb', 'RGB')):
        return np.ascontiguousarray(image[:, :, :3])
    return np.ascontiguousarray(image[:, :, 2::-1])


_PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def decode_compressed_depth_m(fmt: str, data: Any) -> np.ndarray:
    """Decode a compressed depth image to float32 metres ``[H, W]`` (NaN invalid).

    Accepts the ``compressedDepth`` transport (a 12-byte config header, then a PNG: raw millimetres
    for 16UC1, quantised inverse depth ``depth = a / (v - b)`` for 32FC1) and plain 16-bit PNGs in
    millimetres (format ``'16UC1; png compressed 16UC1'`` or ``'png'``).

    Raises:
        ImageDecodeError: RVL or other unsupported variants, or undecodable bytes.
    """
    original, codec, _ = _format_parts(fmt)
    raw = bytes(data) if not isinstance(data, bytes) else data
    if 'rvl' in fmt.lower():
        raise ImageDecodeError(f'compressedDepth RVL is not supported (format {fmt!r})')
    quant = None
    if codec == 'compresseddepth' or (raw[:8] != _PNG_MAGIC and raw[12:20] == _PNG_MAGIC):
        if len(raw) < 20 or raw[12:20] != _PNG_MAGIC:
            raise ImageDecodeError(f'compressedDepth format {fmt!r}: no PNG after the header')
        # struct ConfigHeader { int32 format; float32 depthParam[2]; } (little-endian).
        quant = np.frombuffer(raw[4:12], dtype='<f4').astype(np.float64)
        raw = raw[12:]
    image = _imdecode(raw, f'CompressedImage format {fmt!r}')
    if image.ndim != 2:
        raise ImageDecodeError(
            f'depth format {fmt!r} decoded to shape {image.shape}, expected one channel')
    if original == '32FC1' and quant is not None:
        a, b = quant
        valid = image > 0
        depth_m = np.full(image.shape, np.nan, dtype=np.float32)
        depth_m[valid] = (a / (image[valid].astype(np.float64) - b)).astype(np.float32)
        return _depth_to_metres(depth_m)
    if image.dtype != np.uint16:
        raise ImageDecodeError(
            f'depth format {fmt!r} decoded to {image.dtype}, expected uint16 millimetres')
    return _depth_to_metres(image)


def image_msg_to_rgb(msg: Any) -> np.ndarray:
    """:func:`decode_rgb` on any object with the ``sensor_msgs/Image`` fields."""
    return decode_rgb(msg.encoding, int(msg.height), int(msg.width), int(msg.step),
                      msg.is_bigendian, msg.data)


def image_msg_to_depth_m(msg: Any) -> np.ndarray:
    """:func:`decode_depth_m` on any object with the ``sensor_msgs/Image`` fields."""
    return decode_depth_m(msg.encoding, int(msg.height), int(msg.width), int(msg.step),
                          msg.is_bigendian, msg.data)


def compressed_msg_to_rgb(msg: Any) -> np.ndarray:
    """:func:`decode_compressed_rgb` on any object with ``format`` and ``data``."""
    return decode_compressed_rgb(msg.format, msg.data)


def compressed_msg_to_depth_m(msg: Any) -> np.ndarray:
    """:func:`decode_compressed_depth_m` on any object with ``format`` and ``data``."""
    return decode_compressed_depth_m(msg.format, msg.data)

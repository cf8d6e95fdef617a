"""The clip format: one ``.npz`` file per video clip with its ground truth (numpy only).

Every part of moog_ros reads and writes clips through this module (see ``docs/architecture.md``).

Keys (``T`` frames, ``H x W`` pixels, ``N`` point tracks, ``K`` objects):

===================  ========  ===============  ==============================================
key                  dtype     shape            meaning
===================  ========  ===============  ==============================================
``video``            uint8     ``[T, H, W, 3]`` RGB frames
``depth``            float32   ``[T, H, W]``    metric z-depth (metres along the optical axis),
                                                NaN where unknown
``intrinsics``       float32   ``[3, 3]``       pinhole K, pixel centres at integer coordinates
``tracks_xy``        float32   ``[N, T, 2]``    point tracks, (x, y) pixels
``tracks_visible``   bool      ``[N, T]``       True where the track point is visible
``boxes_xyxy``       float32   ``[K, T, 4]``    object boxes (x_min, y_min, x_max, y_max) pixels
``boxes_valid``      bool      ``[K, T]``       True where object k is visible in frame t
``segmentation``     uint16    ``[T, H, W]``    optional; 0 background, k + 1 = object k
``camera_pose``      float32   ``[T, 4, 4]``    optional; camera-to-world, OpenCV camera axes
                                                (x right, y down, z forward)
``fps``              float32   ``[]``           optional; frame rate
===================  ========  ===============  ==============================================

Coordinates follow the project convention: ``xy`` pixels with pixel centres at integer
coordinates, so an image spans ``[-0.5, W - 0.5] x [-0.5, H - 0.5]``.
"""
from __future__ import annotations

from collections.abc import Mapping
import dataclasses
from dataclasses import dataclass
import os
from pathlib import Path
import tempfile
import zipfile
import zlib

import numpy as np

__all__ = [
    'OPTIONAL_KEYS',
    'REQUIRED_KEYS',
    'Clip',
    'ClipFormatError',
    'list_clips',
    'load_clip',
    'save_clip',
    'validate',
]

# key -> (dtype, symbolic shape). Letters are dimensions that must agree across keys.
_SPEC: dict[str, tuple[np.dtype, tuple[str | int, ...]]] = {
    'video': (np.dtype(np.uint8), ('T', 'H', 'W', 3)),
    'depth': (np.dtype(np.float32), ('T', 'H', 'W')),
    'intrinsics': (np.dtype(np.float32), (3, 3)),
    'tracks_xy': (np.dtype(np.float32), ('N', 'T', 2)),
    'tracks_visible': (np.dtype(np.bool_), ('N', 'T')),
    'boxes_xyxy': (np.dtype(np.float32), ('K', 'T', 4)),
    'boxes_valid': (np.dtype(np.bool_), ('K', 'T')),
    'segmentation': (np.dtype(np.uint16), ('T', 'H', 'W')),
    'camera_pose': (np.dtype(np.float32), ('T', 4, 4)),
    'fps': (np.dtype(np.float32), ()),
}
REQUIRED_KEYS: tuple[str, ...] = (
    'video', 'depth', 'intrinsics', 'tracks_xy', 'tracks_visible', 'boxes_xyxy', 'boxes_valid',
)
OPTIONAL_KEYS: tuple[str, ...] = ('segmentation', 'camera_pose', 'fps')

# Fixed zip member timestamp: np.savez stamps the wall-clock time, which would make two writes
# of the same clip differ byte for byte (and defeat content hashing of generated data sets).
_ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)


class ClipFormatError(ValueError):
    """A clip file or array dict breaks the clip format; the message names the file and key."""


@dataclass(frozen=True)
class Clip:
    """One clip in memory; fields are named as the npz keys (see the module docstring).

    ``fps`` is a plain float here and a float32 scalar array on disk.
    """

    video: np.ndarray  # [T, H, W, 3] uint8 RGB
    depth: np.ndarray  # [T, H, W] float32 metres (z), NaN unknown
    intrinsics: np.ndarray  # [3, 3] float32
    tracks_xy: np.ndarray  # [N, T, 2] float32 pixels
    tracks_visible: np.ndarray  # [N, T] bool
    boxes_xyxy: np.ndarray  # [K, T, 4] float32 pixels
    boxes_valid: np.ndarray  # [K, T] bool
    segmentation: np.ndarray | None = None  # [T, H, W] uint16, 0 background, k + 1 object k
    camera_pose: np.ndarray | None = None  # [T, 4, 4] float32 camera-to-world (OpenCV axes)
    fps: float | None = None

    @property
    def num_frames(self) -> int:
        """Number of frames T."""
        return int(self.video.shape[0])

    @property
    def height(self) -> int:
        """Image height H in pixels."""
        return int(self.video.shape[1])

    @property
    def width(self) -> int:
        """Image width W in pixels."""
        return int(self.video.shape[2])

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The npz key -> array dict of this clip (optional keys only when present)."""
        arrays = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None:
                continue
            is_fps = field.name == 'fps'
            arrays[field.name] = np.asarray(value, np.float32) if is_fps else value
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> Clip:
        """Build a clip from a key -> array mapping (not validated; see ``validate``)."""
        kwargs = {key: arrays[key] for key in _SPEC if key in arrays}
        if 'fps' in kwargs:
            kwargs['fps'] = float(kwargs['fps'])
        return cls(**kwargs)


def _fail(source: object, key: str | None, problem: str) -> ClipFormatError:
    where = f'clip {source}' if key is None else f'clip {source}, key {key!r}'
    return ClipFormatError(f'{where}: {problem}')


def validate(arrays: Mapping[str, np.ndarray], source: object = '<memory>') -> None:
    """Check keys, dtypes, shapes, cross-key sizes and value sanity of one clip.

    Args:
        arrays: npz key -> array (as read by ``np.load`` or ``Clip.to_arrays``).
        source: the file (or a description) named in error messages.

    Raises:
        ClipFormatError: on the first problem found, naming ``source`` and the key.
    """
    unknown = sorted(set(arrays) - set(_SPEC))
    if unknown:
        raise _fail(source, unknown[0], f'unexpected key (known keys: {", ".join(_SPEC)})')
    for key in REQUIRED_KEYS:
        if key not in arrays:
            raise _fail(source, key, 'missing required key')

    # Dtype and rank first, then bind the size letters (T, H, W, N, K) in spec order so the
    # message for a mismatch names the key that disagrees with the earlier ones.
    sizes: dict[str, tuple[int, str]] = {}
    for key, (dtype, shape) in _SPEC.items():
        if key not in arrays:
            continue
        value = arrays[key]
        if not isinstance(value, np.ndarray):
            raise _fail(source, key, f'expected a numpy array, got {type(value).__name__}')
        if value.dtype != dtype:
            raise _fail(source, key, f'dtype is {value.dtype}, expected {dtype}')
        if value.ndim != len(shape):
            raise _fail(source, key, f'shape is {value.shape}, expected rank {len(shape)} '
                                     f'{_shape_text(shape)}')
        for axis, (size, want) in enumerate(zip(value.shape, shape)):
            if isinstance(want, int):
                if size != want:
                    raise _fail(source, key, f'shape is {value.shape}, expected '
                                             f'{_shape_text(shape)} (axis {axis} must be {want})')
            elif want in sizes and sizes[want][0] != size:
                first_size, first_key = sizes[want]
                raise _fail(source, key, f'shape is {value.shape}: {want}={size} disagrees with '
                                         f'{want}={first_size} of {first_key!r}')
            elif want in 'THW' and size == 0:
                raise _fail(source, key, f'shape is {value.shape}: {want} must be positive')
            else:
                sizes.setdefault(want, (size, key))

    _check_values(arrays, source)


def _shape_text(shape: tuple[str | int, ...]) -> str:
    return '[' + ', '.join(str(s) for s in shape) + ']'


def _check_values(arrays: Mapping[str, np.ndarray], source: object) -> None:
    depth = arrays['depth']
    # NaN marks unknown depth; anything else must be a real distance in front of the camera.
    known = ~np.isnan(depth)
    if not np.all(np.isfinite(depth[known]) & (depth[known] > 0)):
        raise _fail(source, 'depth', 'values must be positive finite metres or NaN')

    intrinsics = arrays['intrinsics']
    if not np.all(np.isfinite(intrinsics)):
        raise _fail(source, 'intrinsics', 'contains non-finite values')
    if not (intrinsics[0, 0] > 0 and intrinsics[1, 1] > 0):
        raise _fail(source, 'intrinsics', f'focal lengths must be positive, got '
                                          f'fx={intrinsics[0, 0]}, fy={intrinsics[1, 1]}')
    if not np.array_equal(intrinsics[2], np.array([0, 0, 1], np.float32)):
        raise _fail(source, 'intrinsics', f'last row must be [0, 0, 1], got {intrinsics[2]}')

    visible = arrays['tracks_visible']
    if not np.all(np.isfinite(arrays['tracks_xy'][visible])):
        raise _fail(source, 'tracks_xy', 'non-finite coordinates where tracks_visible is True')

    valid = arrays['boxes_valid']
    boxes = arrays['boxes_xyxy'][valid]  # [M, 4]
    if not np.all(np.isfinite(boxes)):
        raise _fail(source, 'boxes_xyxy', 'non-finite coordinates where boxes_valid is True')
    if not np.all((boxes[:, 2] >= boxes[:, 0]) & (boxes[:, 3] >= boxes[:, 1])):
        raise _fail(source, 'boxes_xyxy', 'x_max < x_min or y_max < y_min where boxes_valid')

    if 'segmentation' in arrays:
        num_boxes = arrays['boxes_xyxy'].shape[0]
        seg_max = int(arrays['segmentation'].max())
        if seg_max > num_boxes:
            raise _fail(source, 'segmentation', f'id {seg_max} has no box: ids must be 0 '
                                                f'(background) or k + 1 with k < K={num_boxes}')
    if 'camera_pose' in arrays:
        pose = arrays['camera_pose']
        if not np.all(np.isfinite(pose)):
            raise _fail(source, 'camera_pose', 'contains non-finite values')
        if not np.allclose(pose[:, 3], np.array([0, 0, 0, 1], np.float32)):
            raise _fail(source, 'camera_pose', 'last row of every pose must be [0, 0, 0, 1]')
    if 'fps' in arrays:
        fps = float(arrays['fps'])
        if not (np.isfinite(fps) and fps > 0):
            raise _fail(source, 'fps', f'must be a positive finite frame rate, got {fps}')


def load_clip(path: str | os.PathLike) -> Clip:
    """Read and validate one clip file.

    Raises:
        ClipFormatError: the file is missing, not a readable npz, or breaks the format.
    """
    path = Path(path)
    if not path.is_file():
        raise ClipFormatError(f'clip file {path} does not exist')
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError) as err:
        # A truncated or corrupt archive fails at open or at the first damaged member.
        raise ClipFormatError(f'clip file {path} is not a valid npz: '
                              f'{type(err).__name__}: {err}') from err
    validate(arrays, source=path)
    return Clip.from_arrays(arrays)


def save_clip(path: str | os.PathLike, clip: Clip) -> None:
    """Validate ``clip`` and write it to ``path`` (``.npz``) atomically.

    The archive is written to a hidden temporary file in the same directory and moved into place
    with ``os.replace``, so readers never see a partial clip. Identical clips give identical bytes.

    Raises:
        ClipFormatError: the clip breaks the format (nothing is written).
        ValueError: ``path`` does not end in ``.npz``.
    """
    path = Path(path)
    if path.suffix != '.npz':
        raise ValueError(f'clip path {path} must end in .npz')
    arrays = clip.to_arrays()
    validate(arrays, source=path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as handle:
            # The same archive layout np.savez_compressed writes (one .npy member per key),
            # minus its wall-clock member timestamps.
            with zipfile.ZipFile(handle, mode='w', compression=zipfile.ZIP_DEFLATED) as archive:
                for key, value in arrays.items():
                    info = zipfile.ZipInfo(f'{key}.npy', date_time=_ZIP_DATE_TIME)
                    info.compress_type = zipfile.ZIP_DEFLATED
                    with archive.open(info, mode='w', force_zip64=True) as member:
                        np.lib.format.write_array(member, np.asanyarray(value),
                                                  allow_pickle=False)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; clips are shared data
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def list_clips(directory: str | os.PathLike) -> list[Path]:
    """Sorted ``*.npz`` clip paths directly inside ``directory``.

    Raises:
        FileNotFoundError: the directory does not exist or holds no ``*.npz`` file.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f'clip directory {directory} does not exist')
    paths = sorted(directory.glob('*.npz'))
    if not paths:
        raise FileNotFoundError(f'clip directory {directory} has no *.npz clip files')
    return paths

"""Training data: window sources, the crop/resize/flip transform, datasets and loaders.

Every data path is a *window source* (see ``docs/architecture.md``, "Training data sources"): an
object with a ``name``, a length (number of windows) and random access
``window(index, num_frames, frame_step)`` returning clip-format arrays sliced to ``num_frames``
frames taken every ``frame_step`` frames. Generated clip directories are read here
(:class:`ClipDirSource`); rosbag2 bags (``training/bags.py``) and Kubric MOVi shards
(``training/movi.py``) are imported lazily by :func:`open_source`.

Training samples are a pure function of ``(seed, slot)``, where ``slot`` counts samples over the
whole run (``step * global_batch + rank * batch + b``): the slot picks an epoch and a position in
that epoch's permutation of all windows, and seeds the crop and flip. Ranks therefore read
disjoint windows, DataLoader workers need no seeding, and resuming at step ``k`` replays exactly
the samples an uninterrupted run would have seen (:class:`TrainWindows`,
:class:`StepBatchSampler`).

Geometry follows the project convention (pixel centres at integer coordinates). One function,
:func:`crop_resize_flip`, moves every array of a window — video, depth, segmentation,
intrinsics, tracks, boxes, camera pose — through the same crop, resize and optional horizontal
flip, so labels stay consistent with the pixels.
"""
from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
import inspect
import os
from pathlib import Path
import sys
from typing import Any, Protocol, runtime_checkable
import zipfile
import zlib

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from moog_ros import clips, image_codecs
from moog_ros.imaging import FrameGeometry

# Keys whose first axis is time [T, ...] and that are sliced/warped per frame.
_FRAME_KEYS = ('video', 'depth', 'segmentation', 'camera_pose', 'stamps_ns')
# Keys with time on the second axis [N or K, T, ...].
_TRACK_KEYS = ('tracks_xy', 'tracks_visible', 'boxes_xyxy', 'boxes_valid')

# ------------------------------------------------------------------------------------------------
# Corrupt data: one clear line naming it, never a crash mid-run.
# ------------------------------------------------------------------------------------------------

_SKIPPED: set[str] = set()  # what this process has already said it skips
_FALLBACK_STRIDE = 7919  # a prime: the next window tried lies far away (outside a bad clip)
_FALLBACK_TRIES = 16


def data_errors() -> tuple[type[BaseException], ...]:
    """Exceptions meaning "this file of the data set is unreadable" (corrupt, truncated).

    Clip, image-codec and archive errors always; the bag and MOVi errors once their modules
    are loaded (they are imported lazily, and cannot raise before).
    """
    errors: list[type[BaseException]] = [clips.ClipFormatError, image_codecs.ImageDecodeError,
                                          OSError, EOFError, zipfile.BadZipFile, zlib.error]
    for module, name in (('moog_ros.training.movi', 'MoviFormatError'),
                         ('moog_ros.training.bags', 'BagError')):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def report_skip(what: str) -> None:
    """Says once per process (on stderr) that ``what`` is skipped."""
    if what in _SKIPPED:
        return
    _SKIPPED.add(what)
    print(f'[data] skipping {what}', file=sys.stderr, flush=True)


def read_window(source: WindowSource, index: int, num_frames: int,
                frame_step: int) -> tuple[int, dict[str, np.ndarray]]:
    """``(index read, window)``: window ``index``, or, if its file is corrupt, the first
    readable of a fixed sequence of others (``index + k * 7919`` mod the length), so a sample
    stays a pure function of its slot and the data.

    Raises:
        RuntimeError: 16 windows in a row unreadable (the data set is broken, not one file).
    """
    errors = data_errors()
    for k in range(_FALLBACK_TRIES):
        candidate = (index + k * _FALLBACK_STRIDE) % len(source)
        try:
            return candidate, source.window(candidate, num_frames, frame_step)
        except errors as err:
            report_skip(f'{source.name}: {type(err).__name__}: {err}')
            errors = data_errors()  # reading may have imported a source module
    raise RuntimeError(f'{source.name}: {_FALLBACK_TRIES} windows in a row from window {index} '
                       'are unreadable (see the skipped files above)')


@runtime_checkable
class WindowSource(Protocol):
    """Random-access windows of video (plus any labels) from one data set.

    ``len(source)`` counts the windows of the geometry (``num_frames``, ``frame_step``) the
    source was opened with; ``window`` returns clip-format keys sliced to the window: ``video``
    uint8 ``[T, H, W, 3]`` always, and when known ``depth`` ``[T, H, W]``, ``intrinsics``
    ``[3, 3]``, ``tracks_xy`` ``[N, T, 2]``, ``tracks_visible`` ``[N, T]``, ``boxes_xyxy``
    ``[K, T, 4]``, ``boxes_valid`` ``[K, T]``, ``segmentation``, ``camera_pose`` ``[T, 4, 4]``,
    ``stamps_ns`` int64 ``[T]``. Windows are deterministic: the same index gives the same arrays.
    """

    name: str

    def __len__(self) -> int: ...

    def window(self, index: int, num_frames: int, frame_step: int) -> dict[str, np.ndarray]: ...


def _window_starts(length: int, num_frames: int, frame_step: int, stride: int) -> int:
    """Number of windows of ``num_frames`` frames every ``frame_step`` in ``length`` frames."""
    span = (num_frames - 1) * frame_step + 1
    return 0 if length < span else (length - span) // stride + 1


def _npz_shape(path: Path, key: str) -> tuple[int, ...]:
    """Shape of one array in an ``.npz`` from its header alone (no decompression of the data)."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open(f'{key}.npy') as member:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, _, _ = np.lib.format.read_array_header_1_0(member)
            else:
                shape, _, _ = np.lib.format.read_array_header_2_0(member)
    except KeyError:
        raise clips.ClipFormatError(f'clip {path}, key {key!r}: missing required key') from None
    except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError) as error:
        raise clips.ClipFormatError(f'clip file {path} is not a valid npz: '
                                    f'{type(error).__name__}: {error}') from error
    return tuple(int(s) for s in shape)


def _load_video_only(path: Path) -> dict[str, np.ndarray]:
    """Read just ``video`` (and ``fps``) of a clip, checking what is read."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in ('video', 'fps') if key in npz.files}
    except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError) as error:
        raise clips.ClipFormatError(f'clip file {path} is not a valid npz: '
                                    f'{type(error).__name__}: {error}') from error
    if 'video' not in arrays:
        raise clips.ClipFormatError(f"clip {path}, key 'video': missing required key")
    video = arrays['video']
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise clips.ClipFormatError(f"clip {path}, key 'video': expected uint8 [T, H, W, 3], "
                                    f'got {video.dtype} {list(video.shape)}')
    return arrays


class ClipDirSource:
    """Windows from a directory (or list) of clip-format ``.npz`` files.

    Construction reads only the ``video`` array header of each file (the frame count); a clip
    is loaded when one of its windows is asked for, and kept in a small LRU cache (per process:
    each DataLoader worker has its own).

    Args:
        paths: a clip directory, or an explicit list of clip files.
        num_frames, frame_step: the window geometry ``len()`` counts.
        window_stride: frames between the starts of consecutive windows of a clip.
        labels: load and validate every key (False: only ``video``; faster for pretraining).
        cache_size: clips kept in memory.
        name: for messages; defaults to the directory.
    """

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], *,
                 num_frames: int = 8, frame_step: int = 1, window_stride: int = 1,
                 labels: bool = True, cache_size: int = 8, name: str | None = None) -> None:
        if isinstance(paths, str | os.PathLike):
            self.files = clips.list_clips(paths)
            default_name = str(paths)
        else:
            self.files = [Path(p) for p in paths]
            default_name = f'{len(self.files)} clips'
        if num_frames < 1 or frame_step < 1 or window_stride < 1:
            raise ValueError(f'num_frames ({num_frames}), frame_step ({frame_step}) and '
                             f'window_stride ({window_stride}) must be >= 1')
        self.name = name or default_name
        self.num_frames, self.frame_step = num_frames, frame_step
        self.window_stride = window_stride
        self.labels = labels
        self.cache_size = cache_size
        # A clip whose header cannot be read (truncated, not a zip) is left out with one line.
        lengths, readable = [], []
        for path in self.files:
            try:
                lengths.append(_npz_shape(path, 'video')[0])   # T per clip
                readable.append(path)
            except clips.ClipFormatError as err:
                report_skip(f'clip {path}: {err}')
        if not readable:
            raise clips.ClipFormatError(f'{self.name}: none of the {len(self.files)} clips is '
                                        'readable (see the skipped files above)')
        self.files, self.clip_lengths = readable, lengths
        self._offsets: dict[tuple[int, int], list[int]] = {}
        self._cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._bad: dict[int, str] = {}  # clips found corrupt on reading (index -> why)

    def _cumulative(self, num_frames: int, frame_step: int) -> list[int]:
        """Window count before each clip (and the total at the end) for one geometry."""
        key = (num_frames, frame_step)
        if key not in self._offsets:
            counts = [_window_starts(n, num_frames, frame_step, self.window_stride)
                      for n in self.clip_lengths]
            self._offsets[key] = np.concatenate([[0], np.cumsum(counts)]).astype(int).tolist()
        return self._offsets[key]

    def __len__(self) -> int:
        return self._cumulative(self.num_frames, self.frame_step)[-1]

    def _clip(self, clip_index: int) -> dict[str, np.ndarray]:
        if clip_index in self._cache:
            self._cache.move_to_end(clip_index)
            return self._cache[clip_index]
        if clip_index in self._bad:  # known bad: fail fast, without reading it again
            raise clips.ClipFormatError(self._bad[clip_index])
        path = self.files[clip_index]
        try:
            arrays = (clips.load_clip(path).to_arrays() if self.labels
                      else _load_video_only(path))
        except (clips.ClipFormatError, OSError, EOFError, zipfile.BadZipFile,
                zlib.error) as err:
            # A corrupt member (bad CRC, truncated data) only shows when it is read.
            why = str(err) if isinstance(err, clips.ClipFormatError) else (
                f'clip file {path} is not a valid npz: {type(err).__name__}: {err}')
            self._bad[clip_index] = why
            raise clips.ClipFormatError(why) from err
        self._cache[clip_index] = arrays
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return arrays

    def locate(self, index: int, num_frames: int, frame_step: int) -> tuple[Path, int]:
        """The clip file and first frame of window ``index``."""
        offsets = self._cumulative(num_frames, frame_step)
        if not 0 <= index < offsets[-1]:
            raise IndexError(f'{self.name}: window {index} out of range [0, {offsets[-1]})')
        clip_index = bisect.bisect_right(offsets, index) - 1
        return self.files[clip_index], (index - offsets[clip_index]) * self.window_stride

    def window(self, index: int, num_frames: int, frame_step: int) -> dict[str, np.ndarray]:
        """Clip-format arrays of one window (see :class:`WindowSource`)."""
        offsets = self._cumulative(num_frames, frame_step)
        if not 0 <= index < offsets[-1]:
            raise IndexError(f'{self.name}: window {index} out of range [0, {offsets[-1]})')
        clip_index = bisect.bisect_right(offsets, index) - 1
        start = (index - offsets[clip_index]) * self.window_stride
        frames = slice(start, start + (num_frames - 1) * frame_step + 1, frame_step)
        arrays = self._clip(clip_index)
        out: dict[str, np.ndarray] = {}
        for key, value in arrays.items():
            if key in _FRAME_KEYS:
                out[key] = value[frames]
            elif key in _TRACK_KEYS:
                out[key] = value[:, frames]
            elif key == 'intrinsics':
                out[key] = value
        if 'fps' in arrays:
            frame_ids = np.arange(frames.start, frames.stop, frame_step, dtype=np.float64)
            out['stamps_ns'] = np.round(frame_ids / float(arrays['fps']) * 1e9).astype(np.int64)
        return out

    def holdout(self, fraction: float) -> tuple[ClipDirSource, ClipDirSource]:
        """Split by whole clips (windows of one clip overlap, so never split inside a clip).

        ``round(fraction * clips)`` clips, evenly spread over the sorted list (generators name
        clips in seed order), go to validation; the rest to training.
        """
        if not 0.0 < fraction < 1.0:
            raise ValueError(f'{self.name}: holdout fraction must be in (0, 1), got {fraction}')
        if len(self.files) < 2:
            raise ValueError(f'{self.name}: need at least 2 clips to hold some out for '
                             f'validation, found {len(self.files)}')
        num_val = min(len(self.files) - 1, max(1, round(len(self.files) * fraction)))
        val_ids = set(np.linspace(0, len(self.files) - 1, num_val).round().astype(int).tolist())
        kwargs = {'num_frames': self.num_frames, 'frame_step': self.frame_step,
                  'window_stride': self.window_stride, 'labels': self.labels,
                  'cache_size': self.cache_size}
        train = ClipDirSource([f for i, f in enumerate(self.files) if i not in val_ids],
                              name=f'{self.name}[train]', **kwargs)
        val = ClipDirSource([f for i, f in enumerate(self.files) if i in val_ids],
                            name=f'{self.name}[val]', **kwargs)
        return train, val


class ConcatSource:
    """Several window sources as one: windows of the first, then of the second, and so on."""

    def __init__(self, sources: Sequence[WindowSource]) -> None:
        if not sources:
            raise ValueError('ConcatSource needs at least one source')
        self.sources = list(sources)
        self.name = ' + '.join(source.name for source in self.sources)
        self._offsets = np.concatenate([[0], np.cumsum([len(s) for s in self.sources])]).tolist()

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def window(self, index: int, num_frames: int, frame_step: int) -> dict[str, np.ndarray]:
        """Window ``index`` of the concatenation."""
        if not 0 <= index < len(self):
            raise IndexError(f'{self.name}: window {index} out of range [0, {len(self)})')
        which = bisect.bisect_right(self._offsets, index) - 1
        return self.sources[which].window(index - int(self._offsets[which]), num_frames,
                                          frame_step)

    def holdout(self, fraction: float) -> tuple[ConcatSource, ConcatSource]:
        """Hold out ``fraction`` of each part (each part splits its own way)."""
        pairs = [holdout_split(source, fraction) for source in self.sources]
        return ConcatSource([p[0] for p in pairs]), ConcatSource([p[1] for p in pairs])


class WindowRange:
    """A contiguous range of another source's windows (the generic hold-out split)."""

    def __init__(self, source: WindowSource, start: int, stop: int, name: str) -> None:
        if not 0 <= start <= stop <= len(source):
            raise ValueError(f'{source.name}: bad window range [{start}, {stop})')
        self.source, self.start, self.stop, self.name = source, start, stop, name

    def __len__(self) -> int:
        return self.stop - self.start

    def window(self, index: int, num_frames: int, frame_step: int) -> dict[str, np.ndarray]:
        """Window ``start + index`` of the underlying source."""
        if not 0 <= index < len(self):
            raise IndexError(f'{self.name}: window {index} out of range [0, {len(self)})')
        return self.source.window(self.start + index, num_frames, frame_step)


def holdout_split(source: WindowSource, fraction: float, *,
                  gap: int = 0) -> tuple[WindowSource, WindowSource]:
    """Split off a validation part of ``source``.

    Sources that know their structure provide ``holdout(fraction)`` (clip directories split by
    clip). Otherwise the last ``fraction`` of the windows is held out, with ``gap`` windows
    dropped in between so that overlapping windows of a continuous stream (a bag) do not leak.
    """
    if hasattr(source, 'holdout'):
        return source.holdout(fraction)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f'{source.name}: holdout fraction must be in (0, 1), got {fraction}')
    total = len(source)
    num_val = max(1, round(total * fraction))
    train_stop = total - num_val - gap
    if train_stop < 1:
        raise ValueError(f'{source.name}: {total} windows are too few to hold out {fraction:.0%}'
                         f' with a gap of {gap}')
    return (WindowRange(source, 0, train_stop, f'{source.name}[train]'),
            WindowRange(source, total - num_val, total, f'{source.name}[val]'))


_SCHEMES = ('clips', 'bag', 'movi')
# Options of one source kind that a mixed --data list may pass to the others too.
_CLIP_OPTIONS = frozenset({'labels', 'window_stride', 'cache_size'})
_BAG_OPTIONS = frozenset({'topic', 'depth_topic', 'camera_info_topic', 'depth_tolerance_s',
                          'window_frames', 'progress'})
_MOVI_OPTIONS = frozenset({'split', 'num_tracks', 'seed', 'window_frames'})


def _source_class(scheme: str) -> type:
    if scheme == 'clips':
        return ClipDirSource
    if scheme == 'bag':
        from moog_ros.training.bags import BagSource  # heavy optional dependencies: lazy
        return BagSource
    from moog_ros.training.movi import MoviSource
    return MoviSource


def _accepted(cls: type) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {'self', 'paths', 'path'}


def open_source(spec: str, *, num_frames: int = 8, frame_step: int = 1,
                **kwargs: Any) -> WindowSource:
    """Open one data source from its spec.

    Args:
        spec: ``DIR`` or ``clips:DIR`` (clip-format directory), ``bag:PATH[,PATH...]`` (rosbag2
            directories or ``.mcap``/``.db3`` files, concatenated), ``movi:PATH`` (MOVi TFDS
            tfrecord shards).
        num_frames, frame_step: the window geometry. Clip directories count every window of
            this geometry (``window_stride`` apart); bags and MOVi videos are cut into
            segments of ``window_frames`` frames (default: one window span, so windows do not
            overlap).
        **kwargs: options of the source classes: ``ClipDirSource`` (``labels``,
            ``window_stride``, ``cache_size``), ``BagSource`` (``topic``, ``depth_topic``,
            ``camera_info_topic``, ``depth_tolerance_s``, ``window_frames``, ``progress``),
            ``MoviSource`` (``split``, ``num_tracks``, ``seed``, ``window_frames``). Each source
            gets the ones it takes (so one set of options serves a mixed ``--data`` list); None
            values are dropped. ``labels=False`` also turns off MOVi point-track sampling.

    Raises:
        ValueError: unknown scheme, empty path, or an option no source takes.
    """
    scheme, sep, rest = spec.partition(':')
    if not sep or scheme not in _SCHEMES:
        scheme, rest = 'clips', spec
    if not rest:
        raise ValueError(f'data spec {spec!r}: empty path')
    cls = _source_class(scheme)
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    accepted = _accepted(cls)
    unknown = sorted(set(kwargs) - accepted - _CLIP_OPTIONS - _BAG_OPTIONS - _MOVI_OPTIONS)
    if unknown:
        raise ValueError(f'data spec {spec!r}: unknown source option(s) {unknown}')
    options = {key: value for key, value in kwargs.items() if key in accepted}
    span = (num_frames - 1) * frame_step + 1
    if scheme == 'clips':
        return ClipDirSource(rest, num_frames=num_frames, frame_step=frame_step, **options)
    if scheme == 'bag':
        options.setdefault('window_frames', span)
        return cls([p for p in rest.split(',') if p], **options)
    options.setdefault('window_frames', span)
    if kwargs.get('labels') is False:
        options.setdefault('num_tracks', 0)   # pretraining reads pixels only: skip track labels
    return cls(rest, **options)


def split_data_specs(data: str | Sequence[str]) -> list[str]:
    """Split ``--data a,b,...`` into source specs.

    Items are comma-separated; an item with no scheme directly after a ``bag:`` item is one more
    path of that bag (the documented ``bag:PATH[,PATH...]`` form), so write ``clips:DIR`` for a
    clip directory that follows a bag.
    """
    if not isinstance(data, str):
        return [spec for item in data for spec in split_data_specs(item)]
    specs: list[str] = []
    for item in (part.strip() for part in data.split(',')):
        if not item:
            continue
        has_scheme = item.partition(':')[0] in _SCHEMES and ':' in item
        if not has_scheme and specs and specs[-1].startswith('bag:'):
            specs[-1] += f',{item}'
        else:
            specs.append(item)
    if not specs:
        raise ValueError(f'no data source in {data!r}')
    return specs


def open_sources(data: str | Sequence[str], **kwargs: Any) -> WindowSource:
    """Open ``--data`` (one spec, a comma-separated list, or a list) as one source."""
    sources = [open_source(spec, **kwargs) for spec in split_data_specs(data)]
    for source in sources:
        if len(source) == 0:
            raise ValueError(f'data source {source.name} has no window of '
                             f'{kwargs.get("num_frames", 8)} frames every '
                             f'{kwargs.get("frame_step", 1)} (clips too short?)')
    return sources[0] if len(sources) == 1 else ConcatSource(sources)


# ----------------------------------------------------------------------------------------------
# Geometry: crop rectangle -> resize -> optional horizontal flip

def sample_crop_xywh(rng: np.random.Generator, src_hw: tuple[int, int],
                     out_hw: tuple[int, int],
                     scale_range: tuple[float, float] = (0.6, 1.0)) -> tuple[int, int, int, int]:
    """A random crop with the output's aspect ratio (no distortion on resize).

    The side lengths are ``scale`` times those of the largest such crop (for a square output,
    the short side of the frame), ``scale ~ U(scale_range)``; the position is uniform.

    Returns:
        ``(x0, y0, w, h)`` in whole pixels.
    """
    H, W = src_hw
    out_h, out_w = out_hw
    max_w = min(float(W), H * out_w / out_h)
    scale = rng.uniform(*scale_range)
    w = int(np.clip(round(max_w * scale), 1, W))
    h = int(np.clip(round(max_w * scale * out_h / out_w), 1, H))
    x0 = int(rng.integers(0, W - w + 1))
    y0 = int(rng.integers(0, H - h + 1))
    return x0, y0, w, h


def centre_crop_xywh(src_hw: tuple[int, int], out_hw: tuple[int, int]) -> tuple[int, int, int,
                                                                                 int]:
    """The largest centred crop with the output's aspect ratio (same as the runtime's 'crop')."""
    geometry = FrameGeometry.fit((src_hw[1], src_hw[0]), (out_hw[1], out_hw[0]), 'crop')
    return geometry.crop_xywh


def _resize_frames(frames: np.ndarray, out_wh: tuple[int, int], interpolation: int) -> np.ndarray:
    """cv2.resize over the leading time axis of ``[T, h, w, ...]``."""
    return np.stack([cv2.resize(frame, out_wh, interpolation=interpolation) for frame in frames])


def crop_resize_flip(window: Mapping[str, np.ndarray], crop_xywh: tuple[int, int, int, int],
                     out_hw: tuple[int, int], flip: bool) -> dict[str, np.ndarray]:
    """Crop every array of a window to ``crop_xywh``, resize to ``out_hw``, optionally mirror.

    Pixels: ``video`` is resized with INTER_AREA when shrinking (INTER_LINEAR when enlarging);
    ``depth`` and ``segmentation`` with exact nearest neighbour (no mixed depths or ids).
    Coordinates use the map of :class:`moog_ros.imaging.FrameGeometry`
    (``x' = (x - x0 + 0.5) * w_out / w - 0.5``), then ``x'' = w_out - 1 - x'`` when flipped.

    - ``tracks_xy`` move with the map; ``tracks_visible`` turns False outside the output image.
    - ``boxes_xyxy`` move with the map (x_min/x_max swap under the flip) and are clipped to the
      image; ``boxes_valid`` turns False for boxes left with no area.
    - ``intrinsics``: ``K' = A @ K``. A flip mirrors the scene about the camera's y-z plane
      (``X -> -X``) so that K keeps ``fx > 0`` with ``cx -> w_out - 1 - cx``: projecting the
      mirrored point ``(-X, Y, Z)`` with the new K lands on the flipped pixel.
    - ``camera_pose`` (camera-to-world) is conjugated by that mirror, ``F @ pose @ F`` with
      ``F = diag(-1, 1, 1, 1)``: a proper rigid motion of the mirrored world.

    Args:
        window: clip-format arrays of one window (``video`` required).
        crop_xywh: integer crop ``(x0, y0, w, h)`` in the source frame.
        out_hw: output ``(height, width)``.
        flip: mirror horizontally after the resize.

    Returns:
        The transformed arrays (same keys; dtypes kept).
    """
    video = window['video']
    T, H, W = video.shape[:3]
    out_h, out_w = out_hw
    geometry = FrameGeometry((W, H), (out_w, out_h), 'crop', tuple(int(v) for v in crop_xywh),
                             (0, 0, out_w, out_h))
    x0, y0, cw, ch = geometry.crop_xywh
    if not (min(x0, y0) >= 0 and min(cw, ch) >= 1 and x0 + cw <= W and y0 + ch <= H):
        raise ValueError(f'crop {crop_xywh} does not fit a {W}x{H} frame')
    crop = (slice(None), slice(y0, y0 + ch), slice(x0, x0 + cw))
    out: dict[str, np.ndarray] = dict(window)

    shrinking = out_w <= cw and out_h <= ch
    out['video'] = _resize_frames(video[crop], (out_w, out_h),
                                  cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    for key in ('depth', 'segmentation'):
        if key in window:
            out[key] = _resize_frames(window[key][crop], (out_w, out_h), cv2.INTER_NEAREST_EXACT)
    if 'intrinsics' in window:
        out['intrinsics'] = geometry.scale_intrinsics(window['intrinsics'])
    if 'tracks_xy' in window:
        out['tracks_xy'] = geometry.to_model_xy(window['tracks_xy'])
    if 'boxes_xyxy' in window:
        out['boxes_xyxy'] = geometry.to_model_xyxy(window['boxes_xyxy'])

    if flip:
        for key in ('video', 'depth', 'segmentation'):
            if key in out:
                out[key] = out[key][:, :, ::-1]
        if 'tracks_xy' in out:
            out['tracks_xy'][..., 0] = out_w - 1 - out['tracks_xy'][..., 0]
        if 'boxes_xyxy' in out:
            boxes = out['boxes_xyxy']
            boxes[..., [0, 2]] = out_w - 1 - boxes[..., [2, 0]]
        if 'intrinsics' in out:
            mirror = np.array([[-1.0, 0.0, out_w - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
            out['intrinsics'] = mirror @ out['intrinsics'] @ np.diag([-1.0, 1.0, 1.0])
        if 'camera_pose' in out:
            mirror4 = np.diag([-1.0, 1.0, 1.0, 1.0])
            out['camera_pose'] = (mirror4 @ out['camera_pose'] @ mirror4).astype(np.float32)

    if 'intrinsics' in out:
        out['intrinsics'] = out['intrinsics'].astype(np.float32)
    if 'tracks_xy' in out and 'tracks_visible' in out:
        xy = out['tracks_xy']
        with np.errstate(invalid='ignore'):
            inside = ((xy[..., 0] >= -0.5) & (xy[..., 0] <= out_w - 0.5)
                      & (xy[..., 1] >= -0.5) & (xy[..., 1] <= out_h - 0.5))
        out['tracks_visible'] = window['tracks_visible'] & inside
    if 'boxes_xyxy' in out:
        boxes = out['boxes_xyxy']
        boxes[..., [0, 2]] = np.clip(boxes[..., [0, 2]], -0.5, out_w - 0.5)
        boxes[..., [1, 3]] = np.clip(boxes[..., [1, 3]], -0.5, out_h - 0.5)
        if 'boxes_valid' in out:
            with np.errstate(invalid='ignore'):
                has_area = (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
            out['boxes_valid'] = window['boxes_valid'] & has_area
    for key in ('video', 'depth', 'segmentation'):
        if key in out:
            out[key] = np.ascontiguousarray(out[key])
    return out


def window_to_tensors(window: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Arrays -> tensors; ``video`` becomes float32 ``[T, H, W, 3]`` in [0, 1]."""
    out = {}
    for key, value in window.items():
        if key == 'video':
            out[key] = torch.from_numpy(np.ascontiguousarray(value)).float().div_(255.0)
        else:
            out[key] = torch.from_numpy(np.ascontiguousarray(value))
    return out


# ----------------------------------------------------------------------------------------------
# Datasets, sampler, collation, loader

class TrainWindows(Dataset):
    """Augmented training samples indexed by *slot* (the run-wide sample counter).

    ``dataset[slot]``: the epoch is ``slot // len(source)``; the window is that epoch's
    permutation (seeded by ``(seed, epoch)``) at ``slot % len(source)``; the crop scale,
    position and flip come from a generator seeded by ``(seed, slot)``. So every sample is a
    pure function of ``(seed, slot)``.

    Args:
        source: the windows.
        num_frames, frame_step: window geometry.
        image_size: output ``(H, W)`` (the model resolution).
        seed: data seed.
        crop_scale: range of the random crop side (relative to the largest crop).
        flip: random horizontal flips (p = 0.5).
    """

    def __init__(self, source: WindowSource, *, num_frames: int, frame_step: int,
                 image_size: tuple[int, int], seed: int,
                 crop_scale: tuple[float, float] = (0.6, 1.0), flip: bool = True) -> None:
        if len(source) == 0:
            raise ValueError(f'data source {source.name} has no windows')
        if not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
            raise ValueError(f'crop_scale must satisfy 0 < low <= high <= 1, got {crop_scale}')
        self.source = source
        self.num_frames, self.frame_step = num_frames, frame_step
        self.image_size = tuple(image_size)
        self.seed, self.crop_scale, self.flip = seed, tuple(crop_scale), flip
        self._permutations: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        """Windows per epoch (slots beyond it wrap into later epochs)."""
        return len(self.source)

    def window_index(self, slot: int) -> int:
        """The source window that ``slot`` reads."""
        epoch, position = divmod(slot, len(self.source))
        if epoch not in self._permutations:
            rng = np.random.default_rng([self.seed, 0x5EED, epoch])
            self._permutations[epoch] = rng.permutation(len(self.source))
            while len(self._permutations) > 2:   # consecutive epochs at most overlap in a batch
                self._permutations.popitem(last=False)
        return int(self._permutations[epoch][position])

    def __getitem__(self, slot: int) -> dict[str, torch.Tensor]:
        index, window = read_window(self.source, self.window_index(slot), self.num_frames,
                                    self.frame_step)
        rng = np.random.default_rng([self.seed, 0xC409, slot])
        src_hw = window['video'].shape[1:3]
        crop = sample_crop_xywh(rng, src_hw, self.image_size, self.crop_scale)
        flip = bool(self.flip and rng.random() < 0.5)
        sample = window_to_tensors(crop_resize_flip(window, crop, self.image_size, flip))
        sample['window_index'] = torch.tensor(index)
        return sample


class EvalWindows(Dataset):
    """A fixed validation set: evenly spaced windows, centre crop, no flip.

    Args:
        source: the validation windows.
        num_frames, frame_step, image_size: as for :class:`TrainWindows`.
        max_windows: at most this many windows (spread over the whole source).
    """

    def __init__(self, source: WindowSource, *, num_frames: int, frame_step: int,
                 image_size: tuple[int, int], max_windows: int = 64) -> None:
        if len(source) == 0:
            raise ValueError(f'validation source {source.name} has no windows')
        count = min(len(source), max_windows)
        self.indices = np.unique(np.linspace(0, len(source) - 1, count).round().astype(int))
        self.source = source
        self.num_frames, self.frame_step = num_frames, frame_step
        self.image_size = tuple(image_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        index, window = read_window(self.source, int(self.indices[i]), self.num_frames,
                                    self.frame_step)
        crop = centre_crop_xywh(window['video'].shape[1:3], self.image_size)
        sample = window_to_tensors(crop_resize_flip(window, crop, self.image_size, flip=False))
        sample['window_index'] = torch.tensor(index)
        return sample


class StepBatchSampler(Sampler[list[int]]):
    """Yields this rank's slot indices for steps ``start_step, start_step + 1, ...``.

    Step ``s`` of rank ``r`` gets slots ``s * B * world + r * B + [0, B)``: disjoint across
    ranks, and a resumed run continues the exact sequence.
    """

    def __init__(self, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 start_step: int = 0, num_steps: int | None = None) -> None:
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.start_step, self.num_steps = start_step, num_steps

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while self.num_steps is None or step < self.start_step + self.num_steps:
            base = (step * self.world_size + self.rank) * self.batch_size
            yield list(range(base, base + self.batch_size))
            step += 1

    def __len__(self) -> int:
        if self.num_steps is None:
            raise TypeError('an endless StepBatchSampler has no length')
        return self.num_steps


def collate_windows(samples: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack samples into a batch.

    Fixed-size keys are stacked. Tracks and boxes (``N`` and ``K`` differ per clip) are padded
    to the largest in the batch with ``tracks_mask`` / ``boxes_mask`` ``[B, N]`` marking real
    entries (padding is never visible/valid). Samples without a label get an empty one: depth
    NaN, intrinsics NaN, zero tracks/boxes, so label-less and labelled sources can be mixed
    (the losses skip what is unknown). Other keys are kept only if every sample has them.
    """
    first = samples[0]
    T, H, W = first['video'].shape[:3]
    keys = set().union(*(sample.keys() for sample in samples))
    batch: dict[str, torch.Tensor] = {}
    fills = {'depth': lambda: torch.full((T, H, W), float('nan')),
             'intrinsics': lambda: torch.full((3, 3), float('nan'))}
    for key in sorted(keys - set(_TRACK_KEYS)):
        if all(key in sample for sample in samples):
            batch[key] = torch.stack([sample[key] for sample in samples])
        elif key in fills:
            batch[key] = torch.stack([sample[key] if key in sample else fills[key]()
                                      for sample in samples])
    for prefix, coords_key, flag_key, width in (('tracks', 'tracks_xy', 'tracks_visible', 2),
                                                 ('boxes', 'boxes_xyxy', 'boxes_valid', 4)):
        if not any(coords_key in sample for sample in samples):
            continue
        counts = [sample[coords_key].shape[0] if coords_key in sample else 0
                  for sample in samples]
        size = max(counts)
        coords = torch.zeros(len(samples), size, T, width)
        flags = torch.zeros(len(samples), size, T, dtype=torch.bool)
        mask = torch.zeros(len(samples), size, dtype=torch.bool)
        for b, (sample, count) in enumerate(zip(samples, counts)):
            if count:
                coords[b, :count] = sample[coords_key]
                flags[b, :count] = sample[flag_key]
                mask[b, :count] = True
        batch[coords_key], batch[flag_key], batch[f'{prefix}_mask'] = coords, flags, mask
    return batch


def make_loader(dataset: Dataset, *, batch_sampler: Sampler | None = None,
                batch_size: int | None = None, num_workers: int = 0,
                device: torch.device | None = None) -> DataLoader:
    """A DataLoader with :func:`collate_windows`, pinned memory on CUDA, persistent workers.

    Pass ``batch_sampler`` (training: :class:`StepBatchSampler`) or ``batch_size`` (evaluation,
    in order).
    """
    pin = device is not None and device.type == 'cuda'
    kwargs: dict[str, Any] = {'num_workers': num_workers, 'collate_fn': collate_windows,
                              'pin_memory': pin, 'persistent_workers': num_workers > 0}
    if num_workers > 0:
        kwargs['prefetch_factor'] = 2
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, **kwargs)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False, **kwargs)

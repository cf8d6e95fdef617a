"""The clip format: round trip, validation errors naming file and key, damaged files."""
from pathlib import Path

import numpy as np
import pytest

from moog_ros import clips

T, H, W, N, K = 3, 6, 8, 5, 2


def make_arrays(optional: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    depth = rng.uniform(0.5, 9.0, (T, H, W)).astype(np.float32)
    depth[0, 0, 0] = np.nan  # unknown depth is allowed
    visible = rng.uniform(size=(N, T)) > 0.3
    tracks = rng.uniform(0, W - 1, (N, T, 2)).astype(np.float32)
    tracks[~visible] = np.nan  # anything goes where not visible
    boxes = np.tile(np.array([1.5, 0.5, 4.5, 3.5], np.float32), (K, T, 1))
    valid = np.ones((K, T), bool)
    valid[1, 2] = False
    boxes[1, 2] = np.inf
    arrays = {
        'video': rng.integers(0, 256, (T, H, W, 3), dtype=np.uint8),
        'depth': depth,
        'intrinsics': np.array([[10, 0, 4], [0, 10, 2], [0, 0, 1]], np.float32),
        'tracks_xy': tracks,
        'tracks_visible': visible,
        'boxes_xyxy': boxes,
        'boxes_valid': valid,
    }
    if optional:
        pose = np.tile(np.eye(4, dtype=np.float32), (T, 1, 1))
        pose[:, :3, 3] = rng.normal(size=(T, 3))
        arrays.update(segmentation=rng.integers(0, K + 1, (T, H, W)).astype(np.uint16),
                      camera_pose=pose, fps=np.asarray(12.0, np.float32))
    return arrays


def assert_arrays_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        assert np.asarray(a[key]).dtype == np.asarray(b[key]).dtype, key


@pytest.mark.parametrize('optional', [True, False])
def test_round_trip(tmp_path: Path, optional: bool) -> None:
    arrays = make_arrays(optional)
    path = tmp_path / 'a.npz'
    clips.save_clip(path, clips.Clip.from_arrays(arrays))
    clip = clips.load_clip(path)
    assert_arrays_equal(clip.to_arrays(), arrays)
    assert (clip.num_frames, clip.height, clip.width) == (T, H, W)
    assert (clip.fps == 12.0) if optional else (clip.fps is None and clip.segmentation is None)
    # np.load reads the same archive (it is a plain npz).
    with np.load(path) as npz:
        assert_arrays_equal(dict(npz), arrays)


def test_save_is_byte_identical_and_leaves_no_temp_files(tmp_path: Path) -> None:
    clip = clips.Clip.from_arrays(make_arrays())
    clips.save_clip(tmp_path / 'a.npz', clip)
    clips.save_clip(tmp_path / 'b.npz', clip)
    assert (tmp_path / 'a.npz').read_bytes() == (tmp_path / 'b.npz').read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a.npz', 'b.npz']


def _drop(key):
    def edit(a):
        del a[key]
    return edit


def _set(key, fn):
    def edit(a):
        a[key] = fn(a[key])
    return edit


def _poke(key, index, value):
    def edit(a):
        a[key] = a[key].copy()
        a[key][index] = value
    return edit


BAD_CASES = {
    'missing video': ('video', _drop('video'), 'missing'),
    'missing boxes_valid': ('boxes_valid', _drop('boxes_valid'), 'missing'),
    'unknown key': ('depth_mm', lambda a: a.update(depth_mm=a['depth']), 'unexpected'),
    'video dtype': ('video', _set('video', lambda v: v.astype(np.float32)), 'dtype'),
    'depth dtype': ('depth', _set('depth', lambda v: v.astype(np.float64)), 'dtype'),
    'visible dtype': ('tracks_visible', _set('tracks_visible', lambda v: v.astype(np.uint8)),
                      'dtype'),
    'segmentation dtype': ('segmentation', _set('segmentation', lambda v: v.astype(np.int32)),
                           'dtype'),
    'video rank': ('video', _set('video', lambda v: v[..., 0]), 'rank'),
    'video channels': ('video', _set('video', lambda v: v[..., :2]), 'axis 3 must be 3'),
    'intrinsics shape': ('intrinsics', _set('intrinsics', lambda v: v[:2]), 'axis 0 must be 3'),
    'fps not scalar': ('fps', _set('fps', lambda v: v[None]), 'rank'),
    'depth T': ('depth', _set('depth', lambda v: v[:-1]), "T=2 disagrees with T=3 of 'video'"),
    'depth W': ('depth', _set('depth', lambda v: v[..., :-1]), 'W=7'),
    'segmentation H': ('segmentation', _set('segmentation', lambda v: v[:, :-1]), 'H=5'),
    'tracks T': ('tracks_xy', _set('tracks_xy', lambda v: v[:, :-1]), 'T=2'),
    'visible N': ('tracks_visible', _set('tracks_visible', lambda v: v[:-1]),
                  "N=4 disagrees with N=5 of 'tracks_xy'"),
    'boxes_valid K': ('boxes_valid', _set('boxes_valid', lambda v: v[:-1]), 'K=1'),
    'camera_pose T': ('camera_pose', _set('camera_pose', lambda v: v[:-1]), 'T=2'),
    'empty video': ('video', _set('video', lambda v: v[:0]), 'T must be positive'),
    'depth inf': ('depth', _poke('depth', (1, 2, 3), np.inf), 'positive finite'),
    'depth negative': ('depth', _poke('depth', (1, 2, 3), -1.0), 'positive finite'),
    'intrinsics nan': ('intrinsics', _poke('intrinsics', (0, 2), np.nan), 'non-finite'),
    'intrinsics zero focal': ('intrinsics', _poke('intrinsics', (1, 1), 0.0), 'focal'),
    'intrinsics last row': ('intrinsics', _poke('intrinsics', (2, 0), 0.5), 'last row'),
    'visible track nan': ('tracks_xy', _poke('tracks_xy', (0, 0), np.nan), 'tracks_visible'),
    'valid box inf': ('boxes_xyxy', _poke('boxes_xyxy', (0, 1, 2), np.inf), 'boxes_valid'),
    'box inverted': ('boxes_xyxy', _poke('boxes_xyxy', (0, 1, 2), 0.0), 'x_max < x_min'),
    'segment without box': ('segmentation', _poke('segmentation', (0, 0, 0), K + 1), 'no box'),
    'pose nan': ('camera_pose', _poke('camera_pose', (0, 0, 0), np.nan), 'non-finite'),
    'pose last row': ('camera_pose', _poke('camera_pose', (1, 3, 3), 2.0), 'last row'),
    'fps zero': ('fps', _set('fps', lambda v: np.zeros_like(v)), 'positive'),
}


@pytest.mark.parametrize('case', sorted(BAD_CASES))
def test_malformed_file_names_file_and_key(tmp_path: Path, case: str) -> None:
    key, arrays, problem = bad_arrays(case)
    path = tmp_path / 'bad.npz'
    np.savez(path, **arrays)  # raw write: bypasses save_clip's validation
    with pytest.raises(clips.ClipFormatError) as info:
        clips.load_clip(path)
    message = str(info.value)
    assert str(path) in message
    assert repr(key) in message
    assert problem in message


def bad_arrays(case: str) -> tuple[str, dict, str]:
    key, edit, problem = BAD_CASES[case]
    arrays = make_arrays()
    # Make track 0 visible at frame 0 with finite coordinates, so poking it is a real error.
    arrays['tracks_visible'][0, 0] = True
    arrays['tracks_xy'][0, 0] = (1.0, 2.0)
    clips.validate(arrays, source='baseline')  # the unedited arrays are fine
    edit(arrays)
    return key, arrays, problem


# Cases a Clip can hold (it has no slot for unknown keys, and fps is a plain float).
@pytest.mark.parametrize('case', sorted(c for c in BAD_CASES if not c.startswith(
    ('missing', 'unknown', 'fps not scalar'))))
def test_save_refuses_invalid_clip(tmp_path: Path, case: str) -> None:
    key, arrays, problem = bad_arrays(case)
    out = tmp_path / 'out.npz'
    with pytest.raises(clips.ClipFormatError, match=problem.replace('*', '\\*')) as info:
        clips.save_clip(out, clips.Clip.from_arrays(arrays))
    assert str(out) in str(info.value) and repr(key) in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_invalid_values_allowed_where_masked() -> None:
    arrays = make_arrays()
    arrays['depth'][:] = np.nan  # depth may be all unknown
    arrays['tracks_visible'][:] = False
    arrays['tracks_xy'][:] = np.inf  # invisible tracks carry no constraint
    arrays['boxes_valid'][:] = False
    arrays['boxes_xyxy'][:] = np.nan
    clips.validate(arrays, source='x')


@pytest.mark.parametrize('cut', [0.0, 0.5, 0.97])
def test_truncated_file(tmp_path: Path, cut: float) -> None:
    path = tmp_path / 'cut.npz'
    clips.save_clip(path, clips.Clip.from_arrays(make_arrays()))
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * cut)])
    with pytest.raises(clips.ClipFormatError, match=f'clip file {path} is not a valid npz'):
        clips.load_clip(path)


def test_not_an_npz_and_pickled_objects(tmp_path: Path) -> None:
    text = tmp_path / 'text.npz'
    text.write_text('hello')
    with pytest.raises(clips.ClipFormatError, match='not a valid npz'):
        clips.load_clip(text)
    pickled = tmp_path / 'pickled.npz'
    arrays = make_arrays()
    arrays['video'] = np.array([{'evil': 1}], dtype=object)
    np.savez(pickled, **arrays)
    with pytest.raises(clips.ClipFormatError, match='not a valid npz'):
        clips.load_clip(pickled)
    with pytest.raises(clips.ClipFormatError, match='does not exist'):
        clips.load_clip(tmp_path / 'missing.npz')


def test_save_requires_npz_suffix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match='must end in .npz'):
        clips.save_clip(tmp_path / 'a.np', clips.Clip.from_arrays(make_arrays()))


def test_list_clips(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match='does not exist'):
        clips.list_clips(tmp_path / 'nope')
    (tmp_path / 'notes.txt').write_text('x')
    (tmp_path / '.clip_b.npz.123.tmp').write_bytes(b'')  # an interrupted write
    with pytest.raises(FileNotFoundError, match='no \\*.npz'):
        clips.list_clips(tmp_path)
    for name in ('clip_2.npz', 'clip_10.npz', 'clip_1.npz'):
        (tmp_path / name).write_bytes(b'')
    assert [p.name for p in clips.list_clips(tmp_path)] == [
        'clip_1.npz', 'clip_10.npz', 'clip_2.npz']

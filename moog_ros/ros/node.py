"""The live node: camera frames in, MooG depth / point tracks / boxes out (rclpy LifecycleNode).

The node is thin: message -> ``conversions`` -> ``MoogRuntime.process`` -> ``conversions`` ->
publish. Everything about tracks, seeding and resets lives in :mod:`moog_ros.runtime`.

Lifecycle:

- **configure**: read the parameters into a :class:`~moog_ros.ros.params.NodeConfig`, load the
  checkpoint onto the device, warm the model up, create the publishers. Any failure (missing or
  corrupt checkpoint, unavailable device) logs the reason and returns FAILURE.
- **activate**: create the subscriptions, services, the diagnostics timer and the inference
  thread.
- **deactivate**: destroy them (the inference thread finishes its frame; the model stays
  loaded).
- **cleanup**: destroy the publishers, drop the model and free its GPU memory.

Frames never queue: the image callback only checks the header and parks the newest good
message in a one-slot mailbox (replacing, and counting, one still waiting) and returns. A
dedicated inference thread takes frames from the mailbox; the executor never runs the model,
so it is free to take the next camera frame at once, and any executor works (``main`` spins a
``SingleThreadedExecutor``). The previous design woke a callback in a ``MultiThreadedExecutor``
through a guard condition; rclpy 9.1.2 (the newest Kilted wheel) re-submits a task to its thread
pool for as long as the task has not started (ros2/rclpy#1452, fixed upstream by #1547), so each
wake-up became a burst of duplicate pool tasks and a spinning executor thread that held the GIL
against the inference callback: lost frames and step times swinging 10x. The reader keeps a
few frames (``input_depth``) so that a stall of the executor does not overwrite good ones.

A frame's age is measured from its arrival at the middleware (the reception timestamp rclpy
passes as message info), not from its header stamp: a frame that waited in the node longer
than ``max_frame_age`` (in the callback, or when inference would start) is dropped and
counted, and latency in ``/diagnostics`` starts there too. Header stamps from another clock (a
bag replayed without ``--clock``, a camera stamping with its own clock) are processed as usual,
with one warning. Frames lost before the callback (overwritten in the reader) show as gaps in
the publisher's sequence numbers and are counted as ``frames_missed``.

Hostile input: every callback survives every message (a message that cannot be used is counted
by kind in ``/diagnostics`` and logged at most once per kind per 5 s, lines under 1 KB). An
image is checked from its header before it may displace the frame waiting for inference (size
limit, layout; PNG/JPEG header, so decompression bombs are never decoded) and goes through
:class:`~moog_ros.input_policy.InputPolicy`: a frame of another encoding or size, or stamped
far from the stream, is dropped without touching the state unless the change is sustained for
``stream_change_frames`` frames. A newest frame that passes the header checks but cannot be
decoded falls back to the good frame it replaced.

Run directly (``moog_node``), the node configures and activates itself (parameter
``autostart``, default true); the launch file sets ``autostart: false`` and lets
``launch_ros.actions.LifecycleNode(autostart=True)`` drive the transitions.
"""
from __future__ import annotations

from collections import deque
import contextlib
import dataclasses
import gc
import os
from pathlib import Path
import sys
import threading
import time
from typing import Any, NamedTuple

from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PointStamped
import numpy as np
import rclpy
from rclpy.exceptions import ParameterException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.serialization import deserialize_message
from rclpy.subscription import MessageInfo
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from std_srvs.srv import Trigger
import torch
from vision_msgs.msg import Detection2D, Detection2DArray
from visualization_msgs.msg import MarkerArray

from moog_ros.input_policy import InputPolicy
from moog_ros.logtext import LogLimiter, clip_text, short_list
from moog_ros.ros import conversions as conv
from moog_ros.ros.diagnostics import PipelineMonitor, diagnostic_array
from moog_ros.ros.params import (
    FIELDS,
    NodeConfig,
    declare_parameters,
    qos_profile,
    read_config,
    resolve_checkpoint,
)
from moog_ros.runtime import FrameResult, MoogRuntime, load_runtime, resolve_device

NODE_NAME = 'moog'
# Commands (clicked points, boxes) must not be lost: reliable with a small queue.
_COMMAND_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10,
                          reliability=ReliabilityPolicy.RELIABLE)
# Detector output: best effort accepts reliable and best-effort detectors alike.
_DETECTIONS_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=5,
                             reliability=ReliabilityPolicy.BEST_EFFORT)
_LOG_EVERY_S = 5.0  # at most one log line per kind per this many seconds
_OUTPUT_TYPES = {'depth': Image, 'depth_info': CameraInfo, 'tracks': PointCloud2,
                 'track_markers': MarkerArray, 'detections': Detection2DArray,
                 'box_markers': MarkerArray, 'overlay': Image}
# (publisher key, type, relative topic) of every per-frame output.
OUTPUTS = tuple((key, _OUTPUT_TYPES[key], topic) for key, topic in conv.OUTPUT_TOPICS.items())


class FrameTiming(NamedTuple):
    """Where one frame's time went (milliseconds); kept for diagnostics and the benchmark."""

    convert_ms: float  # message -> RGB array
    runtime_ms: float  # MoogRuntime.process (includes step_ms)
    step_ms: float  # model step + device-to-host copy
    publish_ms: float  # building and publishing every output
    latency_ms: float  # frame arrived at the middleware -> last output published
    wait_ms: float = 0.0  # frame arrived at the middleware -> inference started on it


class Arrival(NamedTuple):
    """A camera message waiting for inference, with when it arrived."""

    msg: Image | CompressedImage
    arrived_s: float  # time.monotonic() of its arrival at the middleware
    reset: str | None = None  # reason of a sustained stream change (InputPolicy), else None


class Mailbox:
    """One slot for the newest frame: ``put`` replaces, ``take`` blocks until a frame or close.

    The camera callback and the inference thread meet only here, under one condition
    variable, so a frame is handed over without waking the executor. The frame a ``put``
    replaced is kept as the fallback of the new one (a JPEG whose header is fine but whose body
    is garbage must not cost the good frame it displaced), and a stream-change reset carried by
    the replaced frame moves to the new one (it must not be lost).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: Arrival | None = None
        self._replaced: Arrival | None = None
        self._closed = False

    def put(self, item: Arrival) -> bool:
        """Parks ``item``; True when it replaced a frame that was still waiting."""
        with self._cond:
            old = self._item
            replaced = old is not None
            if replaced:
                if item.reset is None and old.reset is not None:
                    item = item._replace(reset=old.reset)
                self._replaced = old._replace(reset=None)  # the reset now rides on ``item``
            self._item = item
            self._cond.notify()
            return replaced

    def take_with_fallback(self) -> tuple[Arrival | None, Arrival | None]:
        """(the waiting frame, the frame it replaced or None), emptying the slot; blocks while
        empty; (None, None) once closed."""
        with self._cond:
            while self._item is None and not self._closed:
                self._cond.wait()
            item, self._item = self._item, None
            fallback, self._replaced = self._replaced, None
            return (None, None) if self._closed else (item, fallback)

    def take(self) -> Arrival | None:
        """The waiting frame (emptying the slot); blocks while empty; None once closed."""
        return self.take_with_fallback()[0]

    def close(self) -> None:
        """Wakes ``take`` for good and drops a waiting frame."""
        with self._cond:
            self._closed = True
            self._item = self._replaced = None
            self._cond.notify_all()


class MoogNode(LifecycleNode):
    """MooG on a camera stream as a managed (lifecycle) node; see the module docstring.

    Args:
        **kwargs: passed to ``rclpy.lifecycle.LifecycleNode`` (context, parameter_overrides,
            namespace, cli_args, ...).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        declare_parameters(self)
        self.add_post_set_parameters_callback(self._on_parameters_set)
        self.config: NodeConfig | None = None
        self.runtime: MoogRuntime | None = None
        self.monitor: PipelineMonitor | None = None
        self.timings: deque[FrameTiming] = deque(maxlen=2000)
        self._model_name = ''
        self._pubs: dict[str, Any] = {}
        self._subs: list = []
        self._own_services: list = []
        self._timer = None
        self._mailbox: Mailbox | None = None
        self._inference: threading.Thread | None = None
        # Guards the runtime against cleanup while a frame is in flight.
        self._runtime_lock = threading.Lock()
        self._active = False
        self._stamp_warned = False
        self._next_visual_s = 0.0  # monotonic time from which overlay and markers are due
        # Last publication sequence number per publisher (gaps = frames lost before us).
        self._last_sequence: dict[bytes, int] = {}
        self._camera_info: CameraInfo | None = None
        self._policy: InputPolicy | None = None
        self._limiter = LogLimiter(_LOG_EVERY_S)
        self._builder: conv.FrameMessageBuilder | None = None
        self._state_start_ns: int | None = None
        self._last_result: FrameResult | None = None

    # --------------------------------------------------------------------------- lifecycle

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Loads and warms up the model, creates the publishers; FAILURE with the reason."""
        log = self.get_logger()
        try:
            config = read_config(self)
            device = resolve_device(config.device)
            checkpoint = resolve_checkpoint(config.checkpoint)
            threads = apply_num_threads(config.num_threads)
            log.info(f'loading {checkpoint} on {device}')
            start = time.perf_counter()
            runtime = load_runtime(checkpoint, config.runtime_config(), device)
            runtime.warmup(config.warmup_steps)
        except Exception as err:  # any failure must be a clean FAILURE
            log.error(clip_text(f'configure failed: {type(err).__name__}: {err}'))
            return TransitionCallbackReturn.FAILURE
        self.config, self.runtime = config, runtime
        self._policy = InputPolicy(config.input_policy_config())
        self._model_name = Path(checkpoint).name
        self._stamp_warned = False
        self.monitor = PipelineMonitor(f'{self.get_name()}: pipeline', str(device))
        out_qos = qos_profile(config.output_reliability, config.output_depth)
        for key, msg_type, topic in OUTPUTS:
            self._pubs[key] = self.create_lifecycle_publisher(msg_type, topic, out_qos)
        self._builder = conv.FrameMessageBuilder(config.depth_resolution)
        self._pubs['diagnostics'] = self.create_lifecycle_publisher(
            DiagnosticArray, '/diagnostics', 1)
        W, H = runtime.model_wh
        precision = 'bf16' if runtime.autocast_dtype is not None else 'fp32'
        log.info(f'configured in {time.perf_counter() - start:.1f} s: {self._model_name} '
                 f'({W}x{H}, resize {config.resize_mode}) on {device}, {precision}, '
                 f'{threads} torch threads')
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Starts the inference thread; creates subscriptions, services, diagnostics timer."""
        config = self.config
        in_qos = qos_profile(config.input_reliability, config.input_depth)
        self._mailbox = Mailbox()
        self._last_sequence = {}
        self._active = True
        self._inference = threading.Thread(target=self._inference_loop, args=(self._mailbox,),
                                           name='moog_inference', daemon=True)
        self._inference.start()
        # The image callback takes the message info (arrival time, sequence number).
        if config.input_transport == 'compressed':
            self._subs.append(self.create_subscription(
                CompressedImage, 'image/compressed',
                self._guard_with_info('image', self._on_image), in_qos))
        else:
            self._subs.append(self.create_subscription(
                Image, 'image', self._guard_with_info('image', self._on_image), in_qos))
        self._subs += [
            self.create_subscription(CameraInfo, 'camera_info',
                                     self._guard('camera_info', self._on_camera_info),
                                     qos_profile(config.input_reliability, 1)),
            # Serialised: the size limit is checked before anything is deserialised.
            self.create_subscription(Detection2DArray, 'detections_in',
                                     self._guard('detections_in', self._on_detections_raw),
                                     _DETECTIONS_QOS, raw=True),
            self.create_subscription(Detection2D, '~/add_box',
                                     self._guard('add_box', self._on_add_box), _COMMAND_QOS),
            self.create_subscription(PointStamped, '~/add_points',
                                     self._guard('add_points', self._on_add_point),
                                     _COMMAND_QOS),
            self.create_subscription(PointCloud2, '~/add_points_batch',
                                     self._guard('add_points_batch', self._on_add_points),
                                     _COMMAND_QOS),
        ]
        self._own_services = [
            self.create_service(Trigger, '~/reset', self._guard_service('reset', self._on_reset)),
            self.create_service(Trigger, '~/clear_points',
                                self._guard_service('clear_points', self._on_clear_points)),
        ]
        self._timer = self.create_timer(config.diagnostics_period, self._publish_diagnostics)
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Stops input and services; the model and its state stay loaded."""
        self._stop_io()
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Destroys publishers and frees the model (and its GPU memory)."""
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_io()
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.get_logger().error(f'error in state {state.label}; releasing everything')
        self._stop_io()
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def _stop_io(self) -> None:
        self._active = False
        for sub in self._subs:
            self.destroy_subscription(sub)
        for srv in self._own_services:
            self.destroy_service(srv)
        self._subs, self._own_services = [], []
        if self._timer is not None:
            self.destroy_timer(self._timer)
            self._timer = None
        if self._mailbox is not None:
            self._mailbox.close()
            self._mailbox = None
        if self._inference is not None:
            self._inference.join()  # at most the frame in flight
            self._inference = None

    def _release(self) -> None:
        for pub in self._pubs.values():
            self.destroy_lifecycle_publisher(pub)
        self._pubs = {}
        with self._runtime_lock:  # waits for a frame in flight
            runtime, self.runtime = self.runtime, None
            if runtime is not None:
                runtime.close()
                device = runtime.device
                del runtime
                gc.collect()
                if device.type == 'cuda':
                    torch.cuda.empty_cache()
        self.config = None
        self._camera_info = None
        self._policy = None
        self._builder = None

    # ------------------------------------------------------------------------ parameters

    def _on_parameters_set(self, params: list[Parameter]) -> None:
        """Applies accepted runtime changes (validation happened in the on-set callback)."""
        changed = {p.name: p.value for p in params if p.name in FIELDS}
        if not changed or self.config is None:
            return  # not configured: read_config picks the values up at configure
        changed = {k: float(v) if isinstance(FIELDS[k].default, float) else v
                   for k, v in changed.items()}
        with self._runtime_lock:
            if self.config is None or self.runtime is None:
                return
            self.config = dataclasses.replace(self.config, **changed)
            self.runtime.update_config(self.config.runtime_config())
            if self._policy is not None:
                self._policy.configure(self.config.input_policy_config())
        self.get_logger().info(clip_text(f'parameters changed: {changed}'))

    # ---------------------------------------------------------------------- logs and drops

    def _log(self, kind: str, text: str, level: str = 'warning') -> None:
        """One line per ``kind`` per 5 s at most, never over 1 KB (see ``LogLimiter``)."""
        # Lines start with their kind (greppable, as /diagnostics counts them). One call site
        # per severity: rclpy refuses a call site whose severity changes.
        logger = self.get_logger()
        if level == 'info':
            self._limiter.emit(kind, text, lambda line: logger.info(f'[{kind}] {line}'))
        elif level == 'error':
            self._limiter.emit(kind, text, lambda line: logger.error(f'[{kind}] {line}'))
        else:
            self._limiter.emit(kind, text, lambda line: logger.warning(f'[{kind}] {line}'))

    def _drop(self, kind: str, text: str) -> None:
        """A message refused by the input policy or a limit: counted by kind and logged."""
        if self.monitor is not None:
            self.monitor.dropped(kind, clip_text(text, 200))
        self._log(kind, text)

    def _guard(self, name: str, callback):
        """``callback`` that never raises: an exception from a message is counted and logged
        (an exception escaping a callback would end ``executor.spin`` and the node)."""
        def guarded(msg) -> None:
            try:
                callback(msg)
            except Exception as err:  # every message must be survivable
                with contextlib.suppress(Exception):  # not even a failing log may escape
                    self._drop(f'{name}_error', f'{name}: callback failed on a message: '
                               f'{type(err).__name__}: {err}')
        return guarded

    def _guard_with_info(self, name: str, callback):
        """``_guard`` for a callback of ``(msg, info)``: rclpy passes the message info to a
        callable of two parameters, so the wrapper must have exactly two."""
        def guarded(msg, info: MessageInfo) -> None:
            try:
                callback(msg, info)
            except Exception as err:  # every message must be survivable
                with contextlib.suppress(Exception):
                    self._drop(f'{name}_error', f'{name}: callback failed on a message: '
                               f'{type(err).__name__}: {err}')
        return guarded

    def _guard_service(self, name: str, callback):
        def guarded(request, response):
            try:
                return callback(request, response)
            except Exception as err:
                with contextlib.suppress(Exception):
                    self._drop(f'{name}_error', f'~/{name} failed: {type(err).__name__}: {err}')
                response.success, response.message = False, clip_text(
                    f'{type(err).__name__}: {err}', 200)
                return response
        return guarded

    # --------------------------------------------------------------------------- inputs

    def _on_image(self, msg: Image | CompressedImage, info: MessageInfo) -> None:
        now = time.monotonic()
        monitor, config, policy = self.monitor, self.config, self._policy
        if monitor is None or config is None or policy is None:
            return  # cleaned up while the message was in flight
        # The middleware's reception time (system clock, ns); the time the message spent in
        # the reader and the executor before this callback counts towards its age.
        received_ns = info.get('received_timestamp') or 0
        waited_s = (time.time_ns() - received_ns) / 1e9 if received_ns > 0 else 0.0
        waited_s = min(max(waited_s, 0.0), 60.0)  # a wild value (clock step) is ignored
        arrived = now - waited_s
        monitor.received(now)
        self._count_missed(info)
        if 0 < config.max_frame_age < waited_s:
            # Waited too long in the reader already (an executor stall): stale, and it must
            # not count towards a timeline change either. Frames that grow old in the mailbox
            # are caught again in _process.
            monitor.stale()
            self._log('stale_frame', f'dropping a frame that waited {waited_s:.3f} s in the '
                      f'node (max_frame_age {config.max_frame_age:g} s)')
            return
        # Header checks first: a frame that cannot be used must not displace a good one
        # waiting for inference (under bad traffic most good frames would be lost).
        try:
            if isinstance(msg, CompressedImage):
                encoding, width, height = conv.compressed_header(msg, config.max_image_pixels)
            else:
                encoding, width, height = conv.image_header(msg, config.max_image_pixels)
        except conv.ConversionError as err:
            kind = 'image_too_large' if 'max_image_pixels' in str(err) else 'invalid_frame'
            monitor.invalid(clip_text(str(err), 200), kind)
            self._log(kind, f'dropping a frame: {err}')
            return
        stamp_ns = conv.stamp_to_ns(msg.header.stamp)
        now_ns = self.get_clock().now().nanoseconds
        verdict = policy.check(encoding, width, height, stamp_ns, now_ns or None)
        if not verdict.accept:
            self._drop(verdict.drop, f'dropping a frame: {verdict.detail} (the state is kept; '
                       f'only {config.stream_change_frames} such frames in a row, with the '
                       'stream silent, switch it)')
            return
        mailbox = self._mailbox
        if (mailbox is not None and self._active
                and mailbox.put(Arrival(msg, arrived, verdict.reset))):
            monitor.replaced()

    def _count_missed(self, info: MessageInfo) -> None:
        """Counts gaps in a publisher's sequence numbers: frames that never reached us."""
        sequence = info.get('publication_sequence_number')
        gid = info.get('publisher_gid')
        if not sequence or not gid:
            return  # this middleware does not report them
        key = bytes(gid.get('data', b''))
        last = self._last_sequence.get(key)
        self._last_sequence[key] = sequence
        if last is not None and sequence > last + 1:
            self.monitor.missed(sequence - last - 1)

    def _on_camera_info(self, msg: CameraInfo) -> None:
        try:
            conv.camera_info_k(msg)
        except conv.ConversionError as err:
            self._drop('bad_camera_info', f'ignoring camera_info (the last good one stays in '
                       f'use): {err}')
            return
        self._camera_info = msg

    def _on_detections_raw(self, raw: bytes) -> None:
        config = self.config
        if config is None:
            return
        count = conv.cdr_header_sequence_length(raw)
        if count is not None and count > config.max_detections:
            self._drop('detections_over_limit', f'ignoring detections_in: {count} detections '
                       f'is over the limit of {config.max_detections} (max_detections)')
            return
        self._on_detections(deserialize_message(raw, Detection2DArray))

    def _on_detections(self, msg: Detection2DArray) -> None:
        runtime, config = self.runtime, self.config
        if runtime is None or config is None:
            return
        try:
            xyxy, labels = conv.detections_to_xyxy(msg, config.max_detections)
            if len(xyxy):
                runtime.add_boxes(xyxy, labels)
        except ValueError as err:  # ConversionError is a ValueError
            kind = ('detections_over_limit' if 'max_detections' in str(err)
                    else 'bad_detections')
            self._drop(kind, f'ignoring detections_in: {err}')

    def _on_add_box(self, msg: Detection2D) -> None:
        runtime = self.runtime
        if runtime is None:
            return
        try:
            xyxy = conv.bbox_to_xyxy(msg.bbox, 'add_box Detection2D.bbox')
            ids = runtime.add_boxes(xyxy[None], [conv.detection_label(msg)])
        except ValueError as err:
            self._drop('bad_add_box', f'ignoring ~/add_box: {err}')
            return
        self._log('add_box', f'box track {int(ids[0])} from ~/add_box '
                  f'{xyxy.round(1).tolist()}', 'info')

    def _on_add_point(self, msg: PointStamped) -> None:
        self._add_points(conv.point_to_xy(msg), '~/add_points')

    def _on_add_points(self, msg: PointCloud2) -> None:
        config = self.config
        if config is None:
            return
        try:
            xy = conv.cloud_to_xy(msg, config.max_points_per_message)
        except conv.ConversionError as err:
            kind = ('points_over_limit' if 'max_points_per_message' in str(err)
                    else 'bad_points')
            self._drop(kind, f'ignoring ~/add_points_batch: {err}')
            return
        self._add_points(xy, '~/add_points_batch')

    def _add_points(self, xy: np.ndarray, source: str) -> None:
        runtime = self.runtime
        if runtime is None:
            return
        try:
            ids = runtime.add_points(xy)
        except ValueError as err:
            self._drop('bad_points', f'ignoring {source}: {err}')
            return
        # One click is one line; a thousand clicks a second must not be a thousand lines.
        self._log('points_added', f'point tracks {short_list(ids.tolist())} from {source}',
                  'info')

    def _on_reset(self, request: Trigger.Request, response: Trigger.Response
                  ) -> Trigger.Response:
        runtime = self.runtime
        if runtime is None:
            response.success, response.message = False, 'not configured'
            return response
        runtime.reset('requested on ~/reset')
        self._log('reset_request', '~/reset: the state resets at the next frame', 'info')
        response.success, response.message = True, 'state resets at the next frame'
        return response

    def _on_clear_points(self, request: Trigger.Request, response: Trigger.Response
                         ) -> Trigger.Response:
        runtime = self.runtime
        if runtime is None:
            response.success, response.message = False, 'not configured'
            return response
        runtime.clear_points()
        self._log('clear_points_request', '~/clear_points: point tracks end at the next frame',
                  'info')
        response.success, response.message = True, 'point tracks end at the next frame'
        return response

    # ------------------------------------------------------------------------ inference

    def _inference_loop(self, mailbox: Mailbox) -> None:
        """The inference thread: the newest waiting frame, one at a time, until closed."""
        while True:
            item, fallback = mailbox.take_with_fallback()
            if item is None:
                return
            with self._runtime_lock:
                if self.runtime is None:
                    return
                try:
                    if not self._process(item) and fallback is not None:
                        self._process(fallback)
                except Exception as err:  # one bad frame must not stop the node
                    with contextlib.suppress(Exception):  # nor may its report end the thread
                        self.monitor.error(clip_text(f'{type(err).__name__}: {err}', 200))
                        self._log('frame_failed', f'frame failed: {type(err).__name__}: {err}',
                                  'error')
                    self.runtime.reset(f'recovering from {type(err).__name__}')

    def _check_stamp(self, stamp_ns: int) -> None:
        """Warns once when header stamps and the node clock disagree (a replay, another clock)."""
        threshold = self.config.stamp_skew_warning
        if self._stamp_warned or threshold <= 0:
            return
        now_ns = self.get_clock().now().nanoseconds
        if now_ns == 0:
            return  # use_sim_time before the first /clock: there is no node time to compare
        skew_s = (now_ns - stamp_ns) / 1e9
        if abs(skew_s) > threshold:
            self._stamp_warned = True
            self.get_logger().warning(
                f'image header stamps are {abs(skew_s):.1f} s '
                f'{"behind" if skew_s > 0 else "ahead of"} the node clock: they look like a '
                'replay (a bag played without --clock) or a camera stamping with another clock. '
                'Processing continues; stamps still drive state resets and output headers. '
                '(Warned once.)')

    def _process(self, item: Arrival) -> bool:
        """Runs one frame; False if it could not be decoded (the caller may try another)."""
        config, runtime = self.config, self.runtime
        msg = item.msg
        if item.reset is not None:  # a sustained change of stream (the policy said so)
            runtime.reset(item.reset)  # even if this very frame is dropped below
        stamp_ns = conv.stamp_to_ns(msg.header.stamp)
        self._check_stamp(stamp_ns)
        wait_s = time.monotonic() - item.arrived_s
        if 0 < config.max_frame_age < wait_s:
            self.monitor.stale()
            self._log('stale_frame', f'dropping a frame that waited {wait_s:.3f} s in the node '
                      f'(max_frame_age {config.max_frame_age:g} s)')
            return True  # an older fallback would be staler still
        start = time.perf_counter()
        try:
            if isinstance(msg, CompressedImage):
                rgb = conv.compressed_to_rgb(msg, config.max_image_pixels)
            else:
                rgb = conv.image_to_rgb(msg, config.max_image_pixels)
        except conv.ConversionError as err:
            self.monitor.invalid(clip_text(str(err), 200), 'undecodable_frame')
            self._log('undecodable_frame', f'dropping a frame: {err}')
            return False
        converted = time.perf_counter()
        result = runtime.process(rgb, stamp_ns)
        processed = time.perf_counter()
        if result.reset_reason is not None:
            self.monitor.reset(result.reset_reason)
            self._log('state_reset', f'state reset: {result.reset_reason}', 'info')
        if result.frame_index == 0:
            self._state_start_ns = stamp_ns
        for note in result.notes:
            self._log('note: ' + ' '.join(note.split()[:2]), note)
        self._publish(msg.header, rgb, result)
        done = time.perf_counter()
        latency_ms = (time.monotonic() - item.arrived_s) * 1e3
        self.timings.append(FrameTiming(
            convert_ms=(converted - start) * 1e3, runtime_ms=(processed - converted) * 1e3,
            step_ms=result.step_ms, publish_ms=(done - processed) * 1e3, latency_ms=latency_ms,
            wait_ms=wait_s * 1e3))
        self._last_result = result
        self.monitor.processed(time.monotonic(), result.step_ms, latency_ms)
        return True

    # --------------------------------------------------------------------------- outputs

    def _publish(self, header, rgb: np.ndarray, result: FrameResult) -> None:
        pubs = self._pubs
        info = self._camera_info
        if info is not None and conv.matching_intrinsics(info, result.geometry.input_wh) is None:
            self._log('camera_info_size',
                      f'camera_info is {info.width}x{info.height} but images are '
                      f'{result.geometry.input_wh[0]}x{result.geometry.input_wh[1]}; no '
                      'depth/camera_info and no 3-D positions until they match')
        # What machines read goes out first: the visual outputs below must not delay it.
        messages = self._builder.build(header, rgb, result, info, None,
                                       ('depth', 'depth_info', 'tracks', 'detections'))
        for key, msg in messages.items():
            pubs[key].publish(msg)
        # Overlay and markers are for people: built only while someone subscribes, and at
        # most visual_rate times a second (hundreds of tracks cost about a model step).
        now = time.monotonic()
        rate = self.config.visual_rate
        if rate > 0 and now < self._next_visual_s:
            return
        wanted = {key for key in ('overlay', 'track_markers', 'box_markers')
                  if pubs[key].get_subscription_count() > 0}
        if not wanted:
            return
        # Due times advance by whole periods, so a camera slightly slower than a multiple of
        # the period still gets about visual_rate updates; after a pause the schedule restarts.
        if rate > 0:
            period = 1.0 / rate
            due = self._next_visual_s if now - self._next_visual_s < period else now
            self._next_visual_s = due + period
        trails = (self.runtime.trails(result.track_ids)  # [N, L, 3] (u, v, depth)
                  if wanted & {'overlay', 'track_markers'} else None)
        messages = self._builder.build(header, rgb, result, info, trails, wanted)
        for key, msg in messages.items():
            pubs[key].publish(msg)

    def _publish_diagnostics(self) -> None:
        result, runtime = self._last_result, self.runtime
        extra: dict[str, object] = {'model': self._model_name, 'device': str(
            runtime.device) if runtime else 'none'}
        if runtime is not None:
            extra['model_resolution'] = '{}x{}'.format(*runtime.model_wh)
            extra['precision'] = 'bf16' if runtime.autocast_dtype is not None else 'fp32'
            extra['torch_threads'] = torch.get_num_threads()
            extra['point_tracks'] = runtime.num_points
            extra['box_tracks'] = runtime.num_boxes
        if result is not None:
            extra['input_resolution'] = '{}x{}'.format(*result.geometry.input_wh)
            extra['state_age_frames'] = result.frame_index + 1
            if self._state_start_ns is not None:
                extra['state_age_s'] = (result.stamp_ns - self._state_start_ns) / 1e9
        status = self.monitor.status(time.monotonic(), extra)
        self._pubs['diagnostics'].publish(
            diagnostic_array(self.get_clock().now().to_msg(), [status]))


def apply_num_threads(num_threads: int) -> int:
    """Sets torch's intra-op threads; returns the count. Process-wide (one pool per process).

    0 means one fewer than the cores this process may run on, at least 1: the executor thread
    taking frames, the middleware's threads and usually the camera driver need a core too. A
    torch thread that loses its core stalls every step at the next barrier: on the 2-core
    development machine, 1 thread processed 98.7-100 % of a 15 Hz camera with step p95/p50
    <= 1.8, 2 threads 92.7-98 % with p95/p50 up to 2.8 (bench/bench_node.py, load ~4.5).
    """
    if num_threads <= 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') \
            else (os.cpu_count() or 1)
        num_threads = max(1, cores - 1)
    torch.set_num_threads(num_threads)
    return torch.get_num_threads()


def _autostart(node: MoogNode) -> bool:
    """configure + activate; False (reason logged) if either fails."""
    if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
        node.get_logger().fatal('autostart: configure failed (reason above); exiting')
        return False
    if node.trigger_activate() != TransitionCallbackReturn.SUCCESS:
        node.get_logger().fatal('autostart: activate failed; exiting')
        return False
    node.get_logger().info('autostart: active')
    return True


def main(args: list[str] | None = None) -> None:
    """Console entry point ``moog_node`` (ROS arguments go after ``--ros-args``).

    Exits with status 1 when a parameter is invalid or, with ``autostart``, when configure or
    activate fails.
    """
    rclpy.init(args=args)
    node = None
    ok = True
    try:
        node = MoogNode()
        # One executor thread is enough: callbacks only park frames and queue requests, the
        # model runs on the node's own inference thread.
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        ok = not node.get_parameter('autostart').value or _autostart(node)
        if ok:
            executor.spin()
    except ParameterException as err:  # a bad value from the command line or a params file
        rclpy.logging.get_logger(NODE_NAME).fatal(f'invalid parameters: {err}')
        ok = False
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception:
        # SIGINT/SIGTERM shut the context down under a spinning executor, which may then
        # raise RCLError instead of ExternalShutdownException: a clean stop, not a failure.
        if rclpy.ok():
            raise
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    if not ok:
        sys.exit(1)


if __name__ == '__main__':
    main()

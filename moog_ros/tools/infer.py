"""``moog_infer``: run MooG over a recorded bag and record its outputs into a new MCAP bag.

    moog_infer --bag IN --topic /camera/image_raw --out OUT [--video overlay.mp4]

Every frame of the image topic (``Image`` or ``CompressedImage``) goes through the node's own
pipeline: :class:`moog_ros.runtime.MoogRuntime` and
:class:`moog_ros.ros.conversions.FrameMessageBuilder`. The output bag holds the node's per-frame
topics under ``--namespace`` (default ``/moog``): ``depth/image``, ``depth/camera_info``,
``tracks``, ``tracks/markers``, ``detections``, ``detections/markers`` and ``overlay`` (marker
arrays only when there is something to draw or delete). Each message carries its input frame's
header, and its bag time is the input message's bag time, so the output lines up with the input
bag in any player. ``depth/camera_info`` and the 3-D markers need the camera's intrinsics
(``--camera-info-topic``, by default ``camera_info`` beside the image topic).

Unlike the live node, nothing is dropped: every frame is processed, however long it takes.
No ROS installation is needed (rclpy messages are serialised with the venv's rclpy and written
with rosbags). A truncated input bag is read up to its last complete message; the output is a
complete bag of what was read, and the tool says so.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
import contextlib
from pathlib import Path
import sys
import time
from typing import Any
import warnings

import numpy as np
from tqdm import tqdm

from moog_ros.tools.bagio import (
    BagWriteError,
    BagWriter,
    VideoWriter,
    print_err,
    remove_bag,
    ros_header,
)

PROG = 'moog_infer'


# ------------------------------------------------------------------------------------------------
# Messages and topics.
# ------------------------------------------------------------------------------------------------

def camera_info_msg(intrinsics: np.ndarray, width: int, height: int, frame_id: str) -> Any:
    """An rclpy ``CameraInfo`` for a pinhole camera ``K`` (P = [K | 0], R = I, no distortion).

    ``moog_ros.training.bags.read_camera_info`` gives K and the size only, so this is what the
    recorded CameraInfo says about projection; distortion is not carried over (the outputs, like
    ``depth_image_proc``, treat the image as rectified).
    """
    from sensor_msgs.msg import CameraInfo

    K = np.asarray(intrinsics, np.float64).reshape(3, 3)
    msg = CameraInfo()
    msg.header.frame_id = frame_id
    msg.width, msg.height = int(width), int(height)
    msg.distortion_model = 'plumb_bob'
    msg.d = [0.0] * 5
    msg.k = K.ravel().tolist()
    msg.r = np.eye(3).ravel().tolist()
    msg.p = np.hstack([K, np.zeros((3, 1))]).ravel().tolist()
    return msg


def output_topics(namespace: str) -> dict[str, str]:
    """Output key -> absolute topic: the node's relative names under ``namespace``."""
    from moog_ros.ros.conversions import OUTPUT_TOPICS

    prefix = '/' + namespace.strip('/') if namespace.strip('/') else ''
    return {key: f'{prefix}/{topic}' for key, topic in OUTPUT_TOPICS.items()}


# ------------------------------------------------------------------------------------------------
# The command.
# ------------------------------------------------------------------------------------------------

def _sibling_info_topic(image_topic: str) -> list[str]:
    """image_transport's ``camera_info`` beside an image topic (raw or ``.../compressed``)."""
    parent = image_topic.rsplit('/', 1)[0]
    return [f'{ns}/camera_info' for ns in (parent, parent.rsplit('/', 1)[0])]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from moog_ros.imaging import RESIZE_MODES
    from moog_ros.runtime import PRECISIONS, RUNTIME_PRESETS

    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split('\n\n')[0].split(': ', 1)[1],
        epilog='Example: moog_infer --bag samples/moog_sample.mcap '
               '--topic /camera/image_raw/compressed --out out/infer_bag --video out/infer.mp4')
    parser.add_argument('--bag', type=Path, required=True,
                        help='input bag: rosbag2 directory or a single .mcap/.db3 file')
    parser.add_argument('--topic', default=None,
                        help='image topic (sensor_msgs/Image or CompressedImage); default: the '
                             "bag's only image topic")
    parser.add_argument('--camera-info-topic', default=None,
                        help='CameraInfo topic for depth/camera_info and 3-D markers; default: '
                             'camera_info beside the image topic, if recorded')
    parser.add_argument('--out', type=Path, required=True,
                        help='output bag directory to create (MCAP)')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace --out (and --video) if they exist (only a bag directory '
                             'is ever removed)')
    parser.add_argument('--video', type=Path, default=None,
                        help='also write the overlay as an MP4 video here')
    parser.add_argument('--checkpoint', type=Path, default=None,
                        help="perception checkpoint directory; default: the node's default, "
                             'share/moog_ros/models/moog_small')
    parser.add_argument('--device', default='auto',
                        help="torch device: 'auto' (cuda if available), 'cpu', 'cuda', 'cuda:N'")
    parser.add_argument('--max-frames', type=int, default=None,
                        help='stop after this many frames (default: all)')
    parser.add_argument('--preset', default='default', choices=sorted(RUNTIME_PRESETS),
                        help="runtime preset (tracking density and policy); default 'default', "
                             'the node defaults')
    parser.add_argument('--resize-mode', default=None, choices=RESIZE_MODES,
                        help='override the aspect policy (crop, pad, stretch)')
    parser.add_argument('--depth-resolution', default=None, choices=('model', 'input'),
                        help='size of depth/image: model canvas (default) or input image')
    parser.add_argument('--precision', default=None, choices=PRECISIONS,
                        help="arithmetic of the model step: fp32 (default, the same results on "
                             "every machine), bf16, or auto (bf16 where it is faster, as the "
                             "node's default)")
    parser.add_argument('--namespace', default='/moog',
                        help='namespace of the output topics (default /moog)')
    parser.add_argument('--no-progress', action='store_true', help='hide the progress bar')
    args = parser.parse_args(argv)
    if args.max_frames is not None and args.max_frames < 1:
        parser.error('--max-frames must be >= 1')
    return args


def bag_camera_info(bag: Path, image_topic: str, explicit: str | None = None,
                    prog: str = PROG) -> Any | None:
    """The rclpy CameraInfo of a bag's camera, or None (with a note) when it has none.

    Args:
        bag: the bag.
        image_topic: the image topic; its image_transport sibling ``camera_info`` is used
            unless ``explicit`` names the CameraInfo topic.
        explicit: a CameraInfo topic that must exist.
        prog: prefix of the printed notes.

    Raises:
        moog_ros.training.bags.BagError: ``explicit`` is missing, empty or uncalibrated.
    """
    from moog_ros.training import bags

    candidates = [explicit] if explicit else _sibling_info_topic(image_topic)
    for topic in candidates:
        try:
            info = bags.read_camera_info(bag, topic)
        except bags.BagError:
            if explicit:
                raise
            continue
        print_err(f'{prog}: intrinsics from {topic}: {info.width}x{info.height}, '
                  f'fx {info.intrinsics[0, 0]:.1f} fy {info.intrinsics[1, 1]:.1f}')
        return camera_info_msg(info.intrinsics, info.width, info.height, info.frame_id)
    print_err(f'{prog}: no usable CameraInfo beside {image_topic} ({" / ".join(candidates)}): '
              'depth/camera_info and the 3-D markers are left out')
    return None


def run(args: argparse.Namespace) -> int:
    """Runs the tool; returns the exit status (0, 1 on an input error part-way, 2 on bad
    arguments, 130 on Ctrl-C). Warnings about the input are collected and printed once."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        status = _run(args, caught)
    return status


def _run(args: argparse.Namespace, caught: list[warnings.WarningMessage]) -> int:
    import dataclasses

    from moog_ros.model.checkpoint import CheckpointError
    from moog_ros.ros import conversions as conv
    from moog_ros.ros.params import resolve_checkpoint
    from moog_ros.runtime import get_runtime_config, load_runtime, resolve_device
    from moog_ros.training import bags

    # Everything that can be checked before loading a model is checked first.
    try:
        topics = bags.image_topics(args.bag)
    except bags.BagError as err:
        print_err(f'{PROG}: {err}')
        return 2
    image_topic = args.topic
    if image_topic is None:
        if len(topics) != 1:
            listing = '\n'.join(f'  {t.topic}  [{t.msgtype}]  {t.count}' for t in topics)
            print_err(f'{PROG}: {args.bag} has {len(topics)} image topics; choose one with '
                      f'--topic:\n{listing or "  (none)"}')
            return 2
        image_topic = topics[0].topic
    counts = {t.topic: t.count for t in topics}
    if image_topic not in counts:
        listing = '\n'.join(f'  {t.topic}  [{t.msgtype}]' for t in topics) or '  (none)'
        print_err(f'{PROG}: {args.bag} has no image topic {image_topic!r}; image topics:\n'
                  f'{listing}')
        return 2
    try:
        camera_info = bag_camera_info(args.bag, image_topic, args.camera_info_topic)
    except bags.BagError as err:
        print_err(f'{PROG}: {err}')
        return 2
    for path, kind in ((args.out, 'output bag'), (args.video, 'video')):
        if path is not None and path.exists() and not args.overwrite:
            print_err(f'{PROG}: {kind} {path} exists; pass --overwrite or choose another path')
            return 2
    config = get_runtime_config(args.preset)
    overrides = {k: v for k, v in (('resize_mode', args.resize_mode),
                                   ('depth_resolution', args.depth_resolution),
                                   ('precision', args.precision)) if v}
    config = dataclasses.replace(config, **overrides)
    try:
        device = resolve_device(args.device)
        checkpoint = args.checkpoint or resolve_checkpoint('')
        runtime = load_runtime(checkpoint, config, device)
    except (CheckpointError, FileNotFoundError, RuntimeError, ValueError) as err:
        print_err(f'{PROG}: cannot load the model: {err}')
        return 2
    W, H = runtime.model_wh
    print_err(f'{PROG}: {checkpoint} ({W}x{H}) on {device}; {args.bag} {image_topic} '
              f'({counts[image_topic]} frames) -> {args.out}')

    if args.overwrite:
        try:
            remove_bag(args.out)
        except BagWriteError as err:
            print_err(f'{PROG}: {err}')
            return 2
    topics_out = output_topics(args.namespace)
    total = counts[image_topic] if args.max_frames is None else min(args.max_frames,
                                                                     counts[image_topic])
    builder = conv.FrameMessageBuilder(config.depth_resolution)
    status, frames, resets = 0, 0, 0
    size_mismatch: tuple[int, int] | None = None  # an input size the CameraInfo does not fit
    input_warnings: list[str] = []
    step_ms: list[float] = []
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        writer = stack.enter_context(BagWriter(args.out))
        video = stack.enter_context(VideoWriter(args.video)) if args.video else None
        progress = stack.enter_context(tqdm(total=total, unit='frame', desc=PROG,
                                            disable=args.no_progress, dynamic_ncols=True))
        try:
            for frame in bags.read_frames(args.bag, image_topic):
                if args.max_frames is not None and frames >= args.max_frames:
                    break
                result = runtime.process(frame.rgb, frame.stamp_ns)
                if result.reset_reason is not None and frames > 0:
                    resets += 1
                if camera_info is not None and conv.matching_intrinsics(
                        camera_info, result.geometry.input_wh) is None:
                    size_mismatch = result.geometry.input_wh
                header = ros_header(frame.stamp_ns, frame.frame_id)
                messages = builder.build(header, frame.rgb, result, camera_info,
                                         runtime.trails(result.track_ids))
                for key, msg in messages.items():
                    writer.write(topics_out[key], frame.log_ns, msg)
                if video is not None:
                    video.write(builder.overlay_rgb, frame.stamp_ns)
                step_ms.append(result.step_ms)
                frames += 1
                progress.update()
        except bags.BagError as err:
            status = 1
            input_warnings.append(f'the input ended early: {err}')
        except KeyboardInterrupt:
            status = 130
            input_warnings.append('interrupted')
    # Each distinct warning once (a truncated bag warns on every open); library deprecation
    # notices are not about the input.
    input_warnings[:0] = list(dict.fromkeys(
        str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)))
    seconds = time.perf_counter() - start
    for text in input_warnings:
        print_err(f'{PROG}: warning: {text}')
    if status or any('truncated' in text for text in input_warnings):
        print_err(f'{PROG}: {args.out} is a complete bag of the {frames} frames read')
    if size_mismatch is not None:
        print_err(f'{PROG}: CameraInfo is {camera_info.width}x{camera_info.height} but frames '
                  f'are {size_mismatch[0]}x{size_mismatch[1]}: those frames have no '
                  'depth/camera_info or 3-D markers')
    rate = frames / seconds if seconds > 0 else 0.0
    median_step = float(np.median(step_ms)) if step_ms else float('nan')
    print_err(f'{PROG}: {frames} frames in {seconds:.1f} s ({rate:.1f} frames/s, model step '
              f'p50 {median_step:.1f} ms), {resets} state resets')
    print_err(f'{PROG}: wrote {args.out}: ' + ', '.join(
        f'{topic} {count}' for topic, count in writer.counts.items()))
    if video is not None and video.frames:
        print_err(f'{PROG}: wrote {args.video} ({video.frames} frames, {video.codec}, '
                  f'{video.fps:.1f} fps)')
    return status


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point ``moog_infer``."""
    sys.exit(run(parse_args(argv)))


if __name__ == '__main__':
    main()

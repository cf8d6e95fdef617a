"""moog_infer (bag -> bag through the node's pipeline) and its writing helpers (tools/bagio.py).

Input bags are written here with rosbags' own message classes; the tool runs in-process on a
tiny random-weight checkpoint, and its output is read back with rosbags and rclpy.
"""
from pathlib import Path

import av
import numpy as np
import pytest
from rclpy.serialization import deserialize_message
from rosbags.highlevel import AnyReader
import torch

from moog_ros.model import MoogPerception, get_perception_config, save_checkpoint
from moog_ros.tools import bagio, infer

W, H = 48, 40  # input frames; the tiny model's canvas is 32x32 (centre crop 40x40 of the input)
K = np.array([[50.0, 0.0, 23.5], [0.0, 50.0, 19.5], [0.0, 0.0, 1.0]])
START_NS = 1_700_000_000 * 10**9
PERIOD_NS = 100_000_000
LOG_DELAY_NS = 7_000_000  # the recorder received each frame 7 ms after its stamp
NS = '/moog'
EVERY_FRAME = ('depth/image', 'depth/camera_info', 'tracks', 'detections', 'overlay')


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp('ckpt') / 'tiny',
                           MoogPerception(get_perception_config('tiny')))


def write_input_bag(path: Path, frames: np.ndarray, *, camera_info: bool = True) -> list[int]:
    """rgb8 frames on /cam/image_raw (+ /cam/camera_info); returns the header stamps."""
    stamps = []
    with bagio.BagWriter(path, compress=False) as writer:
        types = writer.typestore.types
        Header, Time = types['std_msgs/msg/Header'], types['builtin_interfaces/msg/Time']
        Image, CameraInfo = types['sensor_msgs/msg/Image'], types['sensor_msgs/msg/CameraInfo']
        Roi = types['sensor_msgs/msg/RegionOfInterest']
        for k, rgb in enumerate(frames):
            stamp = START_NS + k * PERIOD_NS
            header = Header(stamp=Time(sec=stamp // 10**9, nanosec=stamp % 10**9),
                            frame_id='cam_optical')
            h, w = rgb.shape[:2]
            if camera_info:
                writer.write_typed('/cam/camera_info', stamp + LOG_DELAY_NS, CameraInfo(
                    header=header, height=h, width=w, distortion_model='plumb_bob',
                    d=np.zeros(5), k=K.ravel(), r=np.eye(3).ravel(),
                    p=np.hstack([K, np.zeros((3, 1))]).ravel(), binning_x=0, binning_y=0,
                    roi=Roi(x_offset=0, y_offset=0, height=0, width=0, do_rectify=False)))
            writer.write_typed('/cam/image_raw', stamp + LOG_DELAY_NS, Image(
                header=header, height=h, width=w, encoding='rgb8', is_bigendian=0, step=3 * w,
                data=rgb.reshape(-1)))
            stamps.append(stamp)
    return stamps


def frames(count: int, h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, h, w, 3), dtype=np.uint8)


def read_bag(path: Path) -> dict[str, list[tuple[int, str, bytes]]]:
    """topic -> [(bag time, msgtype, raw CDR)] in bag order."""
    out: dict[str, list] = {}
    with AnyReader([path]) as reader:
        for connection, log_ns, raw in reader.messages():
            out.setdefault(connection.topic, []).append((log_ns, connection.msgtype, bytes(raw)))
    return out


def rclpy_type(msgtype: str) -> type:
    import importlib

    package, kind, name = msgtype.split('/')
    return getattr(importlib.import_module(f'{package}.{kind}'), name)


def run_infer(*argv: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        infer.main([*map(str, argv), '--no-progress'])
    return exit_info.value.code


def test_output_bag_holds_every_topic_with_input_stamps(tmp_path, checkpoint, capsys):
    stamps = write_input_bag(tmp_path / 'in', frames(5))
    out, video = tmp_path / 'out', tmp_path / 'overlay.mp4'
    assert run_infer('--bag', tmp_path / 'in', '--topic', '/cam/image_raw', '--out', out,
                     '--video', video, '--checkpoint', checkpoint, '--device', 'cpu') == 0
    err = capsys.readouterr().err
    assert 'intrinsics from /cam/camera_info' in err and '5 frames' in err

    recorded = read_bag(out)
    for name in EVERY_FRAME:
        assert len(recorded[f'{NS}/{name}']) == 5, name
    assert set(recorded) <= set(infer.output_topics(NS).values())
    for topic, messages in recorded.items():
        # One message of every topic deserialises into the real rclpy type.
        msg = deserialize_message(messages[-1][2], rclpy_type(messages[-1][1]))
        log_times = [log_ns for log_ns, _, _ in messages]
        assert set(log_times) <= {s + LOG_DELAY_NS for s in stamps}, topic
        if topic.endswith('markers'):
            assert msg.markers, topic
            continue
        # Header stamps are the input's and bag times are the input's bag times, frame by frame.
        for (log_ns, msgtype, raw), stamp in zip(messages, stamps):
            header = deserialize_message(raw, rclpy_type(msgtype)).header
            assert header.stamp.sec * 10**9 + header.stamp.nanosec == stamp
            assert header.frame_id == 'cam_optical'
            assert log_ns == stamp + LOG_DELAY_NS

    depth = deserialize_message(recorded[f'{NS}/depth/image'][0][2], rclpy_type(
        'sensor_msgs/msg/Image'))
    assert (depth.encoding, depth.width, depth.height) == ('32FC1', 32, 32)
    info = deserialize_message(recorded[f'{NS}/depth/camera_info'][0][2], rclpy_type(
        'sensor_msgs/msg/CameraInfo'))
    # Centre crop x0 = 4 of 48 -> 40x40, scaled by 32/40: fx 50 -> 40, cx 23.5 -> (19.5+.5)*.8-.5
    np.testing.assert_allclose(np.reshape(info.k, (3, 3))[0], [40.0, 0.0, 15.5], atol=1e-6)
    assert (info.width, info.height) == (32, 32)
    overlay = deserialize_message(recorded[f'{NS}/overlay'][0][2], rclpy_type(
        'sensor_msgs/msg/Image'))
    assert (overlay.width, overlay.height, overlay.encoding) == (W, H, 'rgb8')

    with av.open(str(video)) as container:
        decoded = [f.to_ndarray(format='rgb24') for f in container.decode(video=0)]
        rate = container.streams.video[0].average_rate
    assert len(decoded) == 5 and decoded[0].shape == (H, W, 3)
    assert float(rate) == pytest.approx(10.0)  # from the stamps' 100 ms period


def test_truncated_input_gives_a_valid_partial_output(tmp_path, checkpoint, capsys):
    n = 60
    stamps = write_input_bag(tmp_path / 'in', frames(n, 96, 128, seed=1))  # ~37 KB per frame
    mcap = bagio.mcap_file(tmp_path / 'in')
    data = mcap.read_bytes()
    mcap.write_bytes(data[: int(len(data) * 0.7)])  # cut inside the second of three chunks

    out = tmp_path / 'out'
    assert run_infer('--bag', mcap, '--topic', '/cam/image_raw', '--out', out,
                     '--checkpoint', checkpoint, '--device', 'cpu') == 0
    err = capsys.readouterr().err
    assert 'truncated' in err and 'complete bag of the' in err
    recorded = read_bag(out)  # the output is a complete, indexed bag
    read = len(recorded[f'{NS}/depth/image'])
    assert 0 < read < n
    assert f'complete bag of the {read} frames read' in err
    header = deserialize_message(recorded[f'{NS}/tracks'][-1][2],
                                 rclpy_type('sensor_msgs/msg/PointCloud2')).header
    assert header.stamp.sec * 10**9 + header.stamp.nanosec == stamps[read - 1]


def test_max_frames_and_no_camera_info(tmp_path, checkpoint, capsys):
    write_input_bag(tmp_path / 'in', frames(4), camera_info=False)
    out = tmp_path / 'out'
    assert run_infer('--bag', tmp_path / 'in', '--out', out, '--checkpoint', checkpoint,
                     '--max-frames', '2', '--namespace', 'cam/moog') == 0
    assert 'no usable CameraInfo beside /cam/image_raw' in capsys.readouterr().err
    recorded = read_bag(out)
    assert len(recorded['/cam/moog/depth/image']) == 2
    # Without intrinsics there is no depth/camera_info and nothing to draw in 3-D.
    assert '/cam/moog/depth/camera_info' not in recorded
    from visualization_msgs.msg import Marker, MarkerArray

    for _, _, raw in recorded.get('/cam/moog/tracks/markers', []):
        assert all(m.action != Marker.ADD for m in deserialize_message(raw, MarkerArray).markers)
    cloud = deserialize_message(recorded['/cam/moog/tracks'][0][2],
                                rclpy_type('sensor_msgs/msg/PointCloud2'))
    assert cloud.width > 0


def test_bad_arguments_are_named(tmp_path, checkpoint, capsys):
    assert run_infer('--bag', tmp_path / 'missing', '--out', tmp_path / 'o') == 2
    assert 'missing' in capsys.readouterr().err
    write_input_bag(tmp_path / 'in', frames(2))
    assert run_infer('--bag', tmp_path / 'in', '--topic', '/nope', '--out', tmp_path / 'o',
                     '--checkpoint', checkpoint) == 2
    assert "no image topic '/nope'" in capsys.readouterr().err
    assert run_infer('--bag', tmp_path / 'in', '--camera-info-topic', '/cam/image_raw',
                     '--out', tmp_path / 'o', '--checkpoint', checkpoint) == 2
    assert 'CameraInfo topic' in capsys.readouterr().err
    assert run_infer('--bag', tmp_path / 'in', '--out', tmp_path / 'o',
                     '--checkpoint', tmp_path / 'no_ckpt') == 2
    assert 'cannot load the model' in capsys.readouterr().err
    (tmp_path / 'o').mkdir()
    assert run_infer('--bag', tmp_path / 'in', '--out', tmp_path / 'o',
                     '--checkpoint', checkpoint) == 2
    assert 'exists; pass --overwrite' in capsys.readouterr().err
    assert run_infer('--bag', tmp_path / 'in', '--out', tmp_path / 'o', '--overwrite',
                     '--checkpoint', checkpoint) == 0  # an empty folder is replaced
    (tmp_path / 'o' / 'notes.txt').write_text('keep me')
    assert run_infer('--bag', tmp_path / 'in', '--out', tmp_path / 'o', '--overwrite',
                     '--checkpoint', checkpoint) == 2
    assert 'not a bag directory' in capsys.readouterr().err
    assert (tmp_path / 'o' / 'notes.txt').read_text() == 'keep me'


# -- bagio ------------------------------------------------------------------------------------

def test_vision_msgs_schema_matches_upstream_and_msgtypes():
    store = bagio.output_typestore()
    # RIHS01 of vision_msgs 4.1.1 Detection2DArray (see test_vision_msgs.py): same wire type.
    assert store.hash_rihs01('vision_msgs/msg/Detection2DArray') == (
        'RIHS01_214274120007f4a683866481336b70310268cfa107aebe9d594a6acf75bda968')
    from sensor_msgs.msg import Image
    from vision_msgs.msg import Detection2DArray

    assert bagio.msgtype_of(Image) == 'sensor_msgs/msg/Image'
    assert bagio.msgtype_of(Detection2DArray()) == 'vision_msgs/msg/Detection2DArray'


def test_bag_writer_checks_types_and_closing(tmp_path):
    from std_msgs.msg import String

    with bagio.BagWriter(tmp_path / 'b') as writer:
        writer.write('/s', 5, String(data='x'))
        with pytest.raises(bagio.BagWriteError, match='topic /s is std_msgs/msg/String'):
            writer.write('/s', 6, bagio.ros_header(1, 'f'))
        with pytest.raises(bagio.BagWriteError, match='no definition of nope/msg/X'):
            writer.write_raw('/x', 'nope/msg/X', 7, b'')
    with pytest.raises(bagio.BagWriteError, match='write after close'):
        writer.write('/s', 8, String(data='y'))
    with pytest.raises(bagio.BagWriteError, match='exists already'):
        bagio.BagWriter(tmp_path / 'b')
    assert read_bag(tmp_path / 'b')['/s'][0][0] == 5


def test_colourise_depth_and_video_rate(tmp_path):
    depth = np.array([[1.0, 10.0, np.nan]], np.float32)
    rgb = bagio.colourise_depth(depth, (1.0, 10.0))
    assert rgb[0, 0, 0] > rgb[0, 0, 2]  # near is red
    assert rgb[0, 1, 2] > rgb[0, 1, 0]  # far is blue
    assert (rgb[0, 2] == 0).all()  # unknown is black
    assert bagio.depth_range([depth]) == pytest.approx((1.18, 9.82))

    with bagio.VideoWriter(tmp_path / 'v.mp4') as video:  # odd sizes are padded to even
        for k in range(3):
            video.write(np.full((9, 11, 3), 40 * k, np.uint8), k * 40_000_000)
    assert video.fps == pytest.approx(25.0) and video.frames == 3
    with av.open(str(tmp_path / 'v.mp4')) as container:
        shapes = [f.to_ndarray(format='rgb24').shape for f in container.decode(video=0)]
    assert shapes == [(10, 12, 3)] * 3

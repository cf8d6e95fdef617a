"""moog_demo end to end (real moog_node subprocess, loopback DDS) and the bundled sample bag."""
import hashlib
import json
import os
from pathlib import Path
import subprocess
import sys

import av
import cv2
import numpy as np
import pytest
from rosbags.highlevel import AnyReader
import torch

from moog_ros.model import MoogPerception, get_perception_config, load_checkpoint, save_checkpoint
from moog_ros.tools import demo
from moog_ros.training import bags

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / 'samples' / 'moog_sample.mcap'


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp('ckpt') / 'tiny',
                           MoogPerception(get_perception_config('tiny')))


# -- the sample bag -----------------------------------------------------------------------------

def test_sample_bag_is_small_calibrated_and_has_ground_truth():
    assert SAMPLE.stat().st_size < 3_000_000
    topics = {t.topic: t for t in bags.image_topics(SAMPLE)}
    assert topics[demo.SAMPLE_TOPIC].msgtype == bags.COMPRESSED_IMAGE_TYPE
    assert topics[demo.SAMPLE_TOPIC].count == topics[demo.SAMPLE_DEPTH_TOPIC].count == 108
    info = bags.read_camera_info(SAMPLE, '/camera/camera_info')
    assert (info.width, info.height, info.frame_id) == (160, 120, demo.FRAME_ID)
    assert info.intrinsics[0, 0] > 0
    frames = list(bags.read_frames(SAMPLE, demo.SAMPLE_TOPIC))
    assert frames[0].rgb.shape == (120, 160, 3)
    stamps = np.array([f.stamp_ns for f in frames])
    gaps = np.diff(stamps) / 1e9
    # Three 3 s scenes at 12 fps, separated by pauses longer than the node's reset_gap (2 s).
    assert np.allclose(gaps[gaps < 1.0], 1 / 12, atol=1e-6)
    assert (gaps > 2.0).sum() == 2
    depth = demo.bag_gt_depth(SAMPLE, demo.SAMPLE_TOPIC, demo.SAMPLE_DEPTH_TOPIC)(
        {int(stamps[0])})[int(stamps[0])]
    assert depth.shape == (120, 160) and np.nanmin(depth) > 1.0 and np.nanmax(depth) < 60.0


def test_sample_bag_seeds_each_scene_with_its_first_frame_boxes():
    gt = demo.bag_gt_boxes(SAMPLE, demo.SAMPLE_BOXES_TOPIC)()
    stamps = [f.stamp_ns for f in bags.read_frames(SAMPLE, demo.SAMPLE_TOPIC)]
    assert sorted(gt) == stamps  # one ground-truth message per frame, same header stamps
    seeds = demo.scene_seeds(stamps, gt)
    scenes = demo.scene_of(stamps)
    assert sorted(seeds) == sorted(set(scenes.values())) and len(seeds) == 3
    for boxes in seeds.values():
        assert boxes and all(label.startswith(demo.SEED_LABEL_PREFIX) for label in boxes)
        for xyxy in boxes.values():  # input pixels of the 160x120 camera, non-empty
            assert xyxy[2] > xyxy[0] and xyxy[3] > xyxy[1]
            assert xyxy[0] >= -1 and xyxy[1] >= -1 and xyxy[2] <= 161 and xyxy[3] <= 121


def test_seeded_box_miou_scores_tracks_by_label_after_the_seed_frame():
    s = 10**9
    box = np.array([10.0, 10.0, 30.0, 30.0])
    gt = {0: {'gt0': box, 'gt1': box + 50}, s // 12: {'gt0': box + [10, 0, 10, 0], 'gt1': box,
                                                      'gt2': box},
          5 * s: {'gt0': box}, 5 * s + s // 12: {'gt0': box}}
    seeds = demo.scene_seeds(sorted(gt), gt)
    assert sorted(seeds) == [0, 5 * s]
    frames = [demo.RecordedFrame(0, boxes={'gt0': box}),  # the seed frame: not scored
              # gt0 5 px behind (IoU 0.6), gt1 lost (0), gt2 never seeded (not scored)
              demo.RecordedFrame(s // 12, boxes={'gt0': box + [5, 0, 5, 0]}),
              demo.RecordedFrame(5 * s + s // 12, boxes={'gt0': box})]  # next scene: exact
    result = demo.seeded_box_miou(frames, gt, seeds)
    assert result['boxes_scored'] == 3 and result['seeded'] == 3
    assert result['miou'] == pytest.approx((0.6 + 0 + 1) / 3)


@pytest.mark.slow
def test_sample_script_is_deterministic(tmp_path):
    outputs = []
    for name in ('a', 'b'):
        out = tmp_path / f'{name}.mcap'
        subprocess.run([sys.executable, str(REPO / 'scripts' / 'make_sample_bag.py'), '--out',
                        str(out), '--clips', '1', '--frames', '3'], check=True,
                       capture_output=True, env=dict(os.environ, OMP_NUM_THREADS='1'))
        # The embedded rosbag2 metadata names the file; make the names equal before comparing.
        outputs.append(out.read_bytes().replace(f'{name}.mcap'.encode(), b'x.mcap'))
    assert hashlib.sha256(outputs[0]).digest() == hashlib.sha256(outputs[1]).digest()
    assert len(list(bags.read_frames(tmp_path / 'a.mcap', demo.SAMPLE_TOPIC))) == 3


# -- set-up ---------------------------------------------------------------------------------------

def test_missing_model_needs_an_explicit_opt_in(tmp_path):
    def missing() -> Path:
        return tmp_path / 'share' / 'models' / 'moog_small'

    with pytest.raises(FileNotFoundError, match='--allow-random-weights'):
        demo.resolve_model(None, False, tmp_path, default=missing)
    path, random_weights = demo.resolve_model(None, True, tmp_path, default=missing)
    assert random_weights and path == (tmp_path / 'random_small').resolve()
    assert load_checkpoint(path).model.moog.config.image_size == (128, 128)
    assert demo.resolve_model(path, False, tmp_path) == (path, False)
    with pytest.raises(FileNotFoundError, match='no config.json'):
        demo.resolve_model(tmp_path, False, tmp_path)


def test_names_match_the_node():
    from moog_ros.ros import node

    assert demo.NODE_NAME == node.NODE_NAME


def test_bad_checkpoint_is_reported_before_anything_starts(tmp_path, capsys, monkeypatch):
    # run() exports the ROS variables; these make monkeypatch restore them afterwards.
    monkeypatch.setenv('ROS_DOMAIN_ID', '3')
    monkeypatch.setenv('ROS_AUTOMATIC_DISCOVERY_RANGE', 'SUBNET')
    args = demo.parse_args(['--out', str(tmp_path / 'out'), '--checkpoint',
                            str(tmp_path / 'nope'), '--domain-id', '3'])
    assert demo.run(args) == 2
    assert f'--checkpoint {tmp_path / "nope"}: no config.json' in capsys.readouterr().err
    assert os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] == 'LOCALHOST'  # enforced


def test_bikes_input_is_a_real_video_without_ground_truth():
    source = demo.open_input('bikes', None)
    assert source.camera_info is None and source.gt_depth is None
    assert 'without calibration or ground truth' in source.ground_truth
    frames = source.frames()
    first, second = next(frames), next(frames)
    frames.close()
    assert first.rgb.shape == (136, 320, 3)
    assert second.stamp_ns - first.stamp_ns == 40_000_000  # 25 fps


# -- end to end -----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.ros
def test_demo_short_run_end_to_end(tmp_path, checkpoint, ros_domain_id):
    out = tmp_path / 'demo'
    command = [str(Path(sys.executable).with_name('moog_demo')), '--short', '--out', str(out),
               '--checkpoint', str(checkpoint), '--device', 'cpu', '--domain-id',
               str(ros_domain_id), '--no-progress']
    done = subprocess.run(command, capture_output=True, text=True, timeout=280,
                          env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    assert 'moog_demo summary' in done.stdout and 'latency' in done.stdout

    summary = json.loads((out / 'summary.json').read_text())
    assert summary['frames_in'] == 36  # the first scene: 3 s at 12 fps
    assert 0 < summary['frames_out'] <= summary['frames_in']
    assert summary['node_exit_code'] == 0 and not summary['random_weights']
    assert summary['node']['frames_processed'] == summary['frames_out']
    assert summary['latency_ms']['end_to_end_p50'] > 0
    assert summary['depth_metrics']['frames'] == summary['frames_out']
    # The first scene's boxes were seeded on detections_in and scored afterwards.
    boxes = summary['boxes_seeded_from_ground_truth']
    assert boxes['seeded'] == 8 and boxes['boxes_scored'] > 0 and 0 <= boxes['miou'] <= 1
    cycle = summary['points_cycle_check']
    assert cycle['windows'] == 36 // demo.CYCLE_WINDOW and cycle['tracks'] == 64 * cycle['windows']
    for name in ('moog', 'lk'):
        assert cycle[name]['median_return_px'] >= 0 and 0 <= cycle[name]['within_2px'] <= 1
    assert 'forward-backward' in done.stdout and 'mIoU' in done.stdout

    played = {f.stamp_ns for f in bags.read_frames(SAMPLE, demo.SAMPLE_TOPIC)}
    with AnyReader([out / 'outputs_bag']) as reader:
        counts = {c.topic: c.msgcount for c in reader.connections}
        depth = [c for c in reader.connections if c.topic == '/moog/depth/image']
        stamps = {reader.deserialize(raw, c.msgtype).header.stamp.sec * 10**9
                  + reader.deserialize(raw, c.msgtype).header.stamp.nanosec
                  for c, _, raw in reader.messages(connections=depth)}
    for topic in ('depth/image', 'depth/camera_info', 'tracks', 'detections', 'overlay'):
        assert counts[f'/moog/{topic}'] == summary['frames_out'], topic
    assert counts['/diagnostics'] >= 1
    assert stamps <= played and len(stamps) == summary['frames_out']

    with av.open(str(out / 'overlay.mp4')) as container:
        assert sum(1 for _ in container.decode(video=0)) == summary['frames_out']
    sheet = cv2.imread(str(out / 'contact_sheet.png'))
    assert sheet is not None and sheet.shape[0] > 400 and sheet.shape[1] > 1000
    assert (out / 'node.log').read_text().count('autostart: active') == 1

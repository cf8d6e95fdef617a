"""The shipped default model: loads from config.json alone, runs online, and its depth is metric.

These run the real `models/moog_small` on the bundled sample bag (seeds never used in training)
through the same runtime the node uses, and compare with the bag's ground-truth depth.
"""
from pathlib import Path

import numpy as np
import pytest

from moog_ros import metrics
from moog_ros.model import load_checkpoint
from moog_ros.runtime import MoogRuntime, RuntimeConfig
from moog_ros.training.bags import BagSource

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / 'models' / 'moog_small'
SAMPLE = REPO / 'samples' / 'moog_sample.mcap'
SCENE_FRAMES = 36   # the sample bag holds three 3-second scenes


@pytest.fixture(scope='module')
def shipped():
    return load_checkpoint(SHIPPED, expected_kind='perception')


@pytest.fixture(scope='module')
def sample_scenes():
    source = BagSource([SAMPLE], topic='/camera/image_raw/compressed',
                       depth_topic='/camera/depth/image_raw', window_frames=SCENE_FRAMES,
                       progress=False)
    return [source.window(i, SCENE_FRAMES, 1) for i in range(len(source))]


def test_shipped_checkpoint_is_small_and_self_describing(shipped):
    files = sorted(p.name for p in SHIPPED.iterdir())
    assert files == ['config.json', 'model.safetensors']
    assert sum(p.stat().st_size for p in SHIPPED.iterdir()) <= 25 * 2**20
    assert shipped.model.config.moog.image_size == (128, 128)
    assert 'provenance' in shipped.meta


@pytest.mark.slow
def test_shipped_depth_is_metric_on_unseen_scenes(shipped, sample_scenes):
    assert len(sample_scenes) == 3
    preds, gts = [], []
    for scene in sample_scenes:   # a fresh runtime per scene, as the node resets between them
        runtime = MoogRuntime(shipped.model, RuntimeConfig(resize_mode='stretch',
                                                           depth_resolution='input'), 'cpu')
        preds.append(np.stack([runtime.process(frame, int(stamp)).depth_m
                               for frame, stamp in zip(scene['video'], scene['stamps_ns'])]))
        gts.append(scene['depth'])
    pred, gt_depth = np.concatenate(preds), np.concatenate(gts)   # [T, H, W] metres
    assert pred.shape == gt_depth.shape
    assert np.isfinite(pred).mean() > 0.99
    # Metric scale without any alignment: the median ratio stays near 1.
    ratio = np.nanmedian(pred) / np.nanmedian(gt_depth)
    assert 0.67 < ratio < 1.5, ratio
    scores = metrics.depth_metrics(gt_depth, pred)
    # Better than the constant a model without vision would predict: the training-set median
    # depth (the readout's log-depth offset; the evaluation's 'median_depth' baseline).
    train_median = shipped.model.config.depth.median_depth_m
    constant = metrics.depth_metrics(gt_depth, np.full_like(gt_depth, train_median))
    assert scores['absrel'] < constant['absrel'], (scores, constant)

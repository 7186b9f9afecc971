"""Small backbones suited to CPU training: a compact ResNet with an FPN."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool


def _stage(cin: int, cout: int, blocks: int) -> nn.Sequential:
    down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=2, bias=False), nn.BatchNorm2d(cout))
    layers = [BasicBlock(cin, cout, stride=2, downsample=down)]
    layers += [BasicBlock(cout, cout) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class SmallResNetFPN(nn.Module):
    """ResNet-style stages at strides 4, 8, 16, 32 plus an FPN and a max-pooled level.

    Input [B, 3, H, W] float; output OrderedDict '0','1','2','3','pool' of [B, C, H/s, W/s] with
    C = ``fpn_channels`` and s = 4, 8, 16, 32, 64.
    """

    def __init__(self, *, channels: list[int], blocks_per_stage: int, fpn_channels: int) -> None:
        super().__init__()
        c0 = channels[0]
        self.stem = nn.Sequential(
            nn.Conv2d(3, c0, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(c0),
            nn.ReLU(inplace=True),
            nn.Conv2d(c0, c0, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(c0),
            nn.ReLU(inplace=True),
        )
        ins = [c0] + list(channels[:-1])
        self.stages = nn.ModuleList(_stage(i, o, blocks_per_stage) for i, o in zip(ins, channels))
        self.fpn = FeaturePyramidNetwork(list(channels), fpn_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = fpn_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        x = self.stem(x)
        feats = OrderedDict()
        for i, stage in enumerate(self.stages):
            x = stage(x)
            feats[str(i)] = x
        return self.fpn(feats)

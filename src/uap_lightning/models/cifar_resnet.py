"""CIFAR residual networks: ResNet-20/56 (He et al. 2016, option-A shortcuts) and a
CIFAR ResNet-18 (3×3 stem, no max-pool, projection shortcuts)."""

from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import nn


class _PadShortcut(nn.Module):
    """Option-A identity shortcut: subsample H, W by ``stride`` and zero-pad channels."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra = out_ch - in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        front = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, front, self.extra - front))


class _BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with a residual connection (``option`` "A" or "B")."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, option: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        if stride == 1 and in_ch == out_ch:
            self.shortcut: nn.Module = nn.Identity()
        elif option == "A":
            self.shortcut = _PadShortcut(in_ch, out_ch, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """3×3 stem conv, stages of basic blocks, global average pooling, linear.

    ``widths[i]`` channels and ``blocks[i]`` blocks in stage i; every stage after the
    first halves H and W. N×C×H×W → N×num_classes for any H, W ≥ 1.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        widths: List[int],
        blocks: List[int],
        option: str,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers = []
        in_ch = widths[0]
        for i, (width, n) in enumerate(zip(widths, blocks)):
            stage = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                stage.append(_BasicBlock(in_ch, width, stride, option))
                in_ch = width
            layers.append(nn.Sequential(*stage))
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.pool(self.layers(out))
        return self.fc(torch.flatten(out, 1))


def resnet_cifar(depth: int, in_channels: int, num_classes: int) -> CifarResNet:
    """ResNet-``depth`` of He et al. (depth = 6n+2): 16/32/64 channels, n blocks each,
    option-A shortcuts. depth 20 → 0.27 M parameters, 56 → 0.85 M (10 classes)."""
    if (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    return CifarResNet(in_channels, num_classes, [16, 32, 64], [n, n, n], option="A")


def resnet18_cifar(in_channels: int, num_classes: int) -> CifarResNet:
    """ResNet-18 for small images: 64/128/256/512 channels, 2 blocks each, projection
    shortcuts (about 11.2 M parameters)."""
    return CifarResNet(in_channels, num_classes, [64, 128, 256, 512], [2, 2, 2, 2], option="B")

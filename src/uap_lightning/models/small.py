"""Small CPU-friendly classifiers: a two-block CNN and a LeNet-5 style network."""

from __future__ import annotations

import torch
from torch import nn


def _conv_block(in_ch: int, out_ch: int) -> nn.Sequential:
    """3×3 conv → BN → ReLU → 2×2 max-pool (halves H and W)."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class SmallCNN(nn.Module):
    """Two conv blocks (``width`` and ``2·width`` channels), 2×2 adaptive pooling, linear.

    Takes N×C×H×W with H, W ≥ 4 (8 px digits, 28 px MNIST, 32 px CIFAR) → N×num_classes.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_block(in_channels, width),
            _conv_block(width, 2 * width),
            nn.AdaptiveAvgPool2d(2),
        )
        self.classifier = nn.Linear(2 * width * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class LeNet(nn.Module):
    """LeNet-5 style: two 5×5 conv + max-pool stages (``width``, ``2·width`` channels),
    then fully connected 120 → 84 → num_classes.

    Both convolutions are padded to keep their input size, and the feature map is
    pooled adaptively to at most 5×5, so 8, 28 and 32 px inputs all work.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int, width: int = 6) -> None:
        super().__init__()
        side = max(1, min(5, image_size // 4))
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(side),
        )
        self.classifier = nn.Sequential(
            nn.Linear(2 * width * side * side, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))

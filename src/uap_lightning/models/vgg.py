"""VGG-11/16 with batch norm for small images: conv stack, global pooling, linear."""

from __future__ import annotations

from typing import Dict, List, Union

import torch
from torch import nn

_LAYOUTS: Dict[int, List[Union[int, str]]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """VGG-BN: 3×3 conv-BN-ReLU layers with 2×2 max-pools, then a linear classifier.

    A max-pool is left out once the feature map is down to 1×1, and the last map is
    averaged to 1×1, so any image size ≥ 1 px works (32 px CIFAR gives 512×1×1 as in
    the usual CIFAR variant). N×C×H×W → N×num_classes.
    """

    def __init__(self, depth: int, in_channels: int, num_classes: int, image_size: int) -> None:
        super().__init__()
        if depth not in _LAYOUTS:
            raise ValueError(f"VGG depth must be one of {sorted(_LAYOUTS)}, got {depth}")
        layers: List[nn.Module] = []
        in_ch, side = in_channels, image_size
        for item in _LAYOUTS[depth]:
            if item == "M":
                if side >= 2:
                    layers.append(nn.MaxPool2d(2))
                    side //= 2
                continue
            layers += [
                nn.Conv2d(in_ch, int(item), 3, padding=1, bias=False),
                nn.BatchNorm2d(int(item)),
                nn.ReLU(inplace=True),
            ]
            in_ch = int(item)
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))

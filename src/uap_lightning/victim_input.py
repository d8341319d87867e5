"""Image-file data decoded at the input a pretrained victim was evaluated on.

A pretrained timm model or EfficientNet-Lite declares its input (side S, centre-crop share c): image-folder data then
takes ``data.image_size`` = S and ``data.resize`` = ⌊S / c⌋ (when the preset resizes), unless the
command line sets them. :func:`victim_input` tells them (the settings checks use it, changing
nothing); :func:`fit_data_to_victim` sets them, once, when the run is prepared, before any data is read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Collection, FrozenSet, Optional

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

from uap_lightning.data import ImageFolderDataModule, dataset_class
from uap_lightning.models.preprocessing import Preprocessing
from uap_lightning.models.zoo import model_preprocessing

log = logging.getLogger(__name__)

_DATA_DECODE_FILTER = "bilinear"  # the resize filter image-file data is decoded with (data/decode.py)


def command_line_keys() -> FrozenSet[str]:
    """The keys this Hydra job's command line sets (``data.image_size=288`` → ``data.image_size``);
    empty outside a Hydra job (configs composed in Python)."""
    if not HydraConfig.initialized():
        return frozenset()
    overrides = OverridesParser.create().parse_overrides([str(o) for o in HydraConfig.get().overrides.task])
    return frozenset(override.key_or_group for override in overrides)


def victim_label(model_cfg: DictConfig) -> str:
    """``model.arch=NAME`` for a model built by name (timm, torchvision), else ``model=PRESET``."""
    return f"model.arch={model_cfg.arch}" if model_cfg.get("arch") else f"model={model_cfg.name}"


@dataclass(frozen=True)
class VictimInput:
    """The image-file data settings a pretrained victim asks for: ``data.image_size`` and
    ``data.resize``, and the input the victim declares."""

    image_size: int
    resize: Optional[int]
    declared: Preprocessing


def victim_input(cfg: DictConfig, given: Collection[str] = ()) -> Optional[VictimInput]:
    """The ``data.image_size`` and ``data.resize`` the run's pretrained victim was evaluated on, when the
    data is decoded from image files; keys in ``given`` (see :func:`command_line_keys`) keep their
    values. None when the victim declares no input or the data is not image files. ``cfg`` is only read."""
    declared = model_preprocessing(cfg.model)
    if declared is None or not issubclass(dataset_class(cfg.data.name), ImageFolderDataModule):
        return None
    image_size = cfg.data.image_size if "data.image_size" in given else declared.image_size
    resize = cfg.data.resize
    if "data.resize" not in given and resize is not None:
        resize = declared.resize_for(image_size)
    return VictimInput(image_size, resize, declared)


def fit_data_to_victim(cfg: DictConfig, given: Collection[str] = ()) -> Optional[Preprocessing]:
    """Set ``cfg.data.image_size`` and ``cfg.data.resize`` (in place) to :func:`victim_input`, and log
    them; part of preparing the run, after its settings were checked. The victim's declared input,
    or None when it declares none or the data is not image files (nothing changes then)."""
    fitted = victim_input(cfg, given)
    if fitted is None:
        return None
    declared = fitted.declared
    cfg.data.image_size = fitted.image_size
    cfg.data.resize = fitted.resize
    filters = (
        ""
        if declared.interpolation == _DATA_DECODE_FILTER
        else (
            f"; it was evaluated on {declared.interpolation}-resized images, the data is resized {_DATA_DECODE_FILTER}"
        )
    )
    log.info(
        "data.image_size=%d, data.resize=%s for %s (its pretrained input: %d px, centre crop %.3f%s)",
        cfg.data.image_size,
        cfg.data.resize,
        victim_label(cfg.model),
        declared.image_size,
        declared.crop_pct,
        filters,
    )
    return declared

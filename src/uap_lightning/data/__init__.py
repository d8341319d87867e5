"""Datamodules yielding float images in [0,1], N×C×H×W, and the attack and evaluation sets."""

from __future__ import annotations

from typing import Any, Dict, Optional, Type

from uap_lightning.errors import ConfigError, DataNotFoundError

from .base import Splits, UAPDataModule, config_value
from .digits import DigitsDataModule
from .imagefolder import ImageFolderDataModule
from .torchvision_sets import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    FashionMNISTDataModule,
    MNISTDataModule,
)

IN_MEMORY_DATASETS: Dict[str, Type[UAPDataModule]] = {
    "digits": DigitsDataModule,
    "mnist": MNISTDataModule,
    "fashion_mnist": FashionMNISTDataModule,
    "cifar10": CIFAR10DataModule,
    "cifar100": CIFAR100DataModule,
}
DATASET_NAMES = tuple(IN_MEMORY_DATASETS) + ("imagefolder",)


def build_datamodule(cfg: Any, *, cache_dir: Optional[str] = None) -> UAPDataModule:
    """The datamodule named by ``cfg.name`` (a DataConfig or its DictConfig).

    ``cache_dir`` holds decoded imagefolder datasets. Training augmentation belongs to the
    victim (``model.augment``), which applies it on the device.
    """
    name = config_value(cfg, "name")
    if name == "imagefolder":
        return ImageFolderDataModule(cfg, cache_dir=cache_dir)
    if name not in IN_MEMORY_DATASETS:
        raise ConfigError(f"unknown data.name={name!r}; known: {', '.join(DATASET_NAMES)}")
    return IN_MEMORY_DATASETS[name](cfg)


__all__ = [
    "CIFAR100DataModule",
    "CIFAR10DataModule",
    "DATASET_NAMES",
    "DataNotFoundError",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "MNISTDataModule",
    "Splits",
    "UAPDataModule",
    "build_datamodule",
]

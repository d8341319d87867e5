"""Datamodules yielding float images in [0,1], N×C×H×W, and the attack and evaluation sets."""

from __future__ import annotations

from typing import Any, Dict, Optional, Type

from uap_lightning.errors import ConfigError, DataNotFoundError

from .base import Splits, UAPDataModule, config_value
from .digits import DigitsDataModule
from .imagefolder import ImageFolderDataModule
from .sample_folder import SampleFolderDataModule
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
FOLDER_DATASETS: Dict[str, Type[ImageFolderDataModule]] = {
    "imagefolder": ImageFolderDataModule,
    "sample_folder": SampleFolderDataModule,
}
DATASET_NAMES = tuple(IN_MEMORY_DATASETS) + tuple(FOLDER_DATASETS)


def dataset_class(name: str) -> Type[UAPDataModule]:
    """The datamodule class of ``data.name``; ConfigError listing the known names otherwise."""
    if name in FOLDER_DATASETS:
        return FOLDER_DATASETS[name]
    if name not in IN_MEMORY_DATASETS:
        raise ConfigError(f"unknown data.name={name!r}; known: {', '.join(DATASET_NAMES)}")
    return IN_MEMORY_DATASETS[name]


def build_datamodule(cfg: Any, *, cache_dir: Optional[str] = None) -> UAPDataModule:
    """The datamodule named by ``cfg.name`` (a DataConfig or its DictConfig).

    ``cache_dir`` holds decoded imagefolder datasets. Training augmentation belongs to the
    victim (``model.augment``), which applies it on the device.
    """
    name = config_value(cfg, "name")
    if name in FOLDER_DATASETS:
        return FOLDER_DATASETS[name](cfg, cache_dir=cache_dir)
    return dataset_class(name)(cfg)


__all__ = [
    "CIFAR100DataModule",
    "CIFAR10DataModule",
    "DATASET_NAMES",
    "DataNotFoundError",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "MNISTDataModule",
    "SampleFolderDataModule",
    "Splits",
    "UAPDataModule",
    "build_datamodule",
    "dataset_class",
]

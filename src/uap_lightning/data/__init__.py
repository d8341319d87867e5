"""Datamodules yielding float images in [0,1], N×C×H×W, and the attack and evaluation sets.

Every module of this package is imported and each datamodule class registers itself under its
``data.name`` (:func:`register_dataset`), so adding a dataset is adding its module (and its
``conf/data/<preset>.yaml``).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Optional, Type

from uap_lightning.errors import ConfigError, DataNotFoundError

from .base import DATASETS, Splits, UAPDataModule, config_value, register_dataset
from .digits import DigitsDataModule
from .imagefolder import ImageFolderDataModule
from .sample_folder import SampleFolderDataModule
from .torchvision_sets import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    FashionMNISTDataModule,
    MNISTDataModule,
)

for _module in pkgutil.iter_modules(__path__):  # a datamodule added to this package registers itself
    importlib.import_module(f"{__name__}.{_module.name}")


def dataset_class(name: str) -> Type[UAPDataModule]:
    """The datamodule class of ``data.name``; ConfigError listing the known names otherwise."""
    if name not in DATASETS:
        raise ConfigError(f"unknown data.name={name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[name]


def build_datamodule(cfg: Any, *, cache_dir: Optional[str] = None) -> UAPDataModule:
    """The datamodule named by ``cfg.name`` (a DataConfig or its DictConfig).

    ``cache_dir`` holds datasets decoded from image files. Training augmentation belongs to the
    victim (``model.augment``), which applies it on the device.
    """
    return dataset_class(config_value(cfg, "name"))(cfg, cache_dir=cache_dir)


__all__ = [
    "CIFAR100DataModule",
    "CIFAR10DataModule",
    "DATASETS",
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
    "register_dataset",
]

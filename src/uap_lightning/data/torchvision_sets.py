"""MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100 read through torchvision's dataset classes.

Files live under ``data.root`` in torchvision's layout; ``data.download=true`` fetches
them where a network exists. Arrays are converted to uint8 N×C×H×W tensors at once.
"""

from __future__ import annotations

import abc
import os
from pathlib import Path
from typing import Any, List, Tuple

import torch
from torch import Tensor
from torchvision import datasets

from uap_lightning.errors import ConfigError, DataNotFoundError

from .base import Splits, UAPDataModule, config_value


class TorchvisionDataModule(UAPDataModule):
    """A torchvision dataset class read from ``data.root``; subclasses name the class."""

    dataset_cls: Any
    title: str

    @abc.abstractmethod
    def expected_files(self, root: Path) -> List[Path]:
        """Every file torchvision reads, under ``root``."""

    @abc.abstractmethod
    def to_tensors(self, dataset: Any) -> Tuple[Tensor, Tensor]:
        """(uint8 N×C×H×W images, int64 N labels) of one torchvision split."""

    def _root(self) -> Path:
        root = config_value(self.cfg, "root")
        if root is None:
            raise ConfigError(
                f"data.root is not set: point it at the folder holding the {self.title} files"
            )
        return Path(os.path.expanduser(str(root)))

    def _missing(self, root: Path) -> List[Path]:
        return [path for path in self.expected_files(root) if not path.is_file()]

    def _not_found(self, root: Path, detail: str) -> DataNotFoundError:
        expected = "\n  ".join(str(p) for p in self.expected_files(root))
        return DataNotFoundError(
            f"{self.title} {detail}. Expected these files (torchvision's layout) in "
            f"{root}:\n  {expected}\nPut them there, or set data.download=true to fetch "
            "them where a network exists."
        )

    def prepare_data(self) -> None:
        """Download the files when they are absent and ``data.download`` is true."""
        root = self._root()
        if not self._missing(root):
            return
        if not config_value(self.cfg, "download", False):
            missing = ", ".join(p.name for p in self._missing(root))
            raise self._not_found(
                root, f"files not found (missing: {missing}) and data.download=false"
            )
        try:
            self.dataset_cls(str(root), train=True, download=True)
        except (OSError, RuntimeError) as err:
            raise self._not_found(root, f"download failed ({err})") from err
        if self._missing(root):
            raise self._not_found(root, "files still missing after the download")

    def load_splits(self) -> Splits:
        self.prepare_data()
        root = str(self._root())
        try:
            train = self.dataset_cls(root, train=True, download=False)
            test = self.dataset_cls(root, train=False, download=False)
        except RuntimeError as err:
            raise self._not_found(Path(root), f"files could not be read ({err})") from err
        train_images, train_labels = self.to_tensors(train)
        test_images, test_labels = self.to_tensors(test)
        return Splits(train_images, train_labels, test_images, test_labels, list(train.classes))


class _MNISTFamily(TorchvisionDataModule):
    """28×28 grey images stored as idx files in ``root/<ClassName>/raw/``."""

    def expected_files(self, root: Path) -> List[Path]:
        raw = root / self.dataset_cls.__name__ / "raw"
        return [raw / Path(name).stem for name, _ in self.dataset_cls.resources]

    def to_tensors(self, dataset: Any) -> Tuple[Tensor, Tensor]:
        images = torch.as_tensor(dataset.data, dtype=torch.uint8).unsqueeze(1)
        return images, torch.as_tensor(dataset.targets, dtype=torch.int64)


class _CIFARFamily(TorchvisionDataModule):
    """32×32 RGB images stored as pickled batches in ``root/<base_folder>/``."""

    def expected_files(self, root: Path) -> List[Path]:
        folder = root / self.dataset_cls.base_folder
        names = [name for name, _ in self.dataset_cls.train_list + self.dataset_cls.test_list]
        return [folder / name for name in names + [self.dataset_cls.meta["filename"]]]

    def to_tensors(self, dataset: Any) -> Tuple[Tensor, Tensor]:
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
        return images, torch.as_tensor(dataset.targets, dtype=torch.int64)


class MNISTDataModule(_MNISTFamily):
    """MNIST: 60,000 train and 10,000 test handwritten digits, 1×28×28."""

    dataset_cls = datasets.MNIST
    title = "MNIST"


class FashionMNISTDataModule(_MNISTFamily):
    """Fashion-MNIST: 60,000 train and 10,000 test clothing images, 1×28×28."""

    dataset_cls = datasets.FashionMNIST
    title = "Fashion-MNIST"


class CIFAR10DataModule(_CIFARFamily):
    """CIFAR-10: 50,000 train and 10,000 test images, 3×32×32, 10 classes."""

    dataset_cls = datasets.CIFAR10
    title = "CIFAR-10"


class CIFAR100DataModule(_CIFARFamily):
    """CIFAR-100: 50,000 train and 10,000 test images, 3×32×32, 100 fine classes."""

    dataset_cls = datasets.CIFAR100
    title = "CIFAR-100"

"""MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100 read through torchvision's dataset classes.

Files live under ``data.root`` in torchvision's layout; ``data.download=true`` fetches
them where a network exists. Arrays are converted to uint8 N×C×H×W tensors at once.
"""

from __future__ import annotations

import abc
import os
import pickle
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor
from torchvision import datasets
from torchvision.datasets.utils import check_integrity

from uap_lightning.errors import (
    ConfigError,
    DamagedFileError,
    DataNotFoundError,
    UntrustedFileError,
)

from .base import Splits, UAPDataModule, config_value, register_dataset


class TorchvisionDataModule(UAPDataModule):
    """A torchvision dataset class read from ``data.root``; subclasses name the class."""

    dataset_cls: Any
    title: str

    @abc.abstractmethod
    def expected_files(self, root: Path) -> List[Path]:
        """Every file torchvision reads, under ``root``."""

    def _root(self) -> Path:
        root = config_value(self.cfg, "root")
        if root is None:
            raise ConfigError(f"data.root is not set: point it at the folder holding the {self.title} files")
        return Path(os.path.expanduser(str(root)))

    def _missing(self, root: Path) -> List[Path]:
        return [path for path in self.expected_files(root) if not path.is_file()]

    def _not_found(self, root: Path, detail: str) -> DataNotFoundError:
        expected = "\n  ".join(str(p) for p in self.expected_files(root))
        return DataNotFoundError(
            f"{self.title} {detail}. Expected these files (torchvision's layout) in "
            f"{root}:\n  {expected}\nPut them there, or set data.download=true to fetch "
            f"them where a network exists.{self._image_folder_hint(root)}"
        )

    def _image_folder_hint(self, root: Path) -> str:
        """A line pointing at a copy of this data as image files beside ``root`` (``<name>-jpeg``,
        ``<name>-png``, ``<name>``, holding train/ and test/ class folders), or ""."""
        name = str(config_value(self.cfg, "name", ""))
        for candidate in (root / f"{name}-jpeg", root / f"{name}-png", root / name):
            if (candidate / "train").is_dir() and any((candidate / split).is_dir() for split in ("test", "val")):
                return (
                    f"\n{candidate} holds {self.title} as image files: use them with "
                    f"data=imagefolder data.root={candidate}"
                )
        return ""

    def prepare_data(self) -> None:
        """Download the files when they are absent and ``data.download`` is true."""
        root = self._root()
        if not self._missing(root):
            return
        if not config_value(self.cfg, "download", False):
            missing = ", ".join(p.name for p in self._missing(root))
            raise self._not_found(root, f"files not found (missing: {missing}) and data.download=false")
        try:
            self.dataset_cls(str(root), train=True, download=True)
        except (OSError, RuntimeError) as err:
            raise self._not_found(root, f"download failed ({err})") from err
        if self._missing(root):
            raise self._not_found(root, "files still missing after the download")


class _MNISTFamily(TorchvisionDataModule):
    """28×28 grey images stored as idx files in ``root/<ClassName>/raw/``."""

    def expected_files(self, root: Path) -> List[Path]:
        raw = root / self.dataset_cls.__name__ / "raw"
        return [raw / Path(name).stem for name, _ in self.dataset_cls.resources]

    def load_splits(self) -> Splits:
        """Both splits through torchvision's reader of the idx files (plain binary arrays)."""
        self.prepare_data()
        root = str(self._root())
        try:
            train = self.dataset_cls(root, train=True, download=False)
            test = self.dataset_cls(root, train=False, download=False)
        except RuntimeError as err:
            raise self._not_found(Path(root), f"files could not be read ({err})") from err
        return Splits(*self._tensors(train), *self._tensors(test), list(train.classes))

    @staticmethod
    def _tensors(dataset: Any) -> Tuple[Tensor, Tensor]:
        images = torch.as_tensor(dataset.data, dtype=torch.uint8).unsqueeze(1)
        return images, torch.as_tensor(dataset.targets, dtype=torch.int64)


class _ArraysOnly(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays, nothing else: a CIFAR batch
    needs no more, and a file asking for any other class is refused instead of run."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise UntrustedFileError(f"{self.path} asks to load {module}.{name}: not a CIFAR batch, refused")

    def __init__(self, handle: Any, path: Path) -> None:
        super().__init__(handle, encoding="latin1")
        self.path = path


def read_cifar_pickle(path: Path) -> Dict[str, Any]:
    """One CIFAR python file (a pickled dict of arrays and lists) read without running code."""
    try:
        with open(path, "rb") as handle:
            content = _ArraysOnly(handle, path).load()
    except UntrustedFileError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise DamagedFileError(f"cannot read {path}: {err}") from None
    if not isinstance(content, dict):
        raise DamagedFileError(f"{path} holds a {type(content).__name__}, not a CIFAR batch")
    return {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in content.items()}


class _CIFARFamily(TorchvisionDataModule):
    """32×32 RGB images stored as pickled batches in ``root/<base_folder>/``, read as arrays only."""

    label_key: str

    def expected_files(self, root: Path) -> List[Path]:
        folder = root / self.dataset_cls.base_folder
        names = [name for name, _ in self.dataset_cls.train_list + self.dataset_cls.test_list]
        return [folder / name for name in names + [self.dataset_cls.meta["filename"]]]

    def _split(self, folder: Path, files: List[Tuple[str, Optional[str]]]) -> Tuple[Tensor, Tensor]:
        images, labels = [], []
        for name, md5 in files:
            if not check_integrity(str(folder / name), md5):
                raise self._not_found(folder.parent, f"file {folder / name} is missing or corrupted")
            batch = read_cifar_pickle(folder / name)
            images.append(torch.as_tensor(batch["data"], dtype=torch.uint8).reshape(-1, 3, 32, 32))
            labels.append(torch.as_tensor(batch[self.label_key], dtype=torch.int64))
        return torch.cat(images).contiguous(), torch.cat(labels)

    def load_splits(self) -> Splits:
        self.prepare_data()
        cls = self.dataset_cls
        folder = self._root() / cls.base_folder
        meta = read_cifar_pickle(folder / cls.meta["filename"])
        train_images, train_labels = self._split(folder, cls.train_list)
        test_images, test_labels = self._split(folder, cls.test_list)
        return Splits(train_images, train_labels, test_images, test_labels, [str(n) for n in meta[cls.meta["key"]]])


@register_dataset
class MNISTDataModule(_MNISTFamily):
    """MNIST: 60,000 train and 10,000 test handwritten digits, 1×28×28."""

    name = "mnist"
    dataset_cls = datasets.MNIST
    title = "MNIST"


@register_dataset
class FashionMNISTDataModule(_MNISTFamily):
    """Fashion-MNIST: 60,000 train and 10,000 test clothing images, 1×28×28."""

    name = "fashion_mnist"
    dataset_cls = datasets.FashionMNIST
    title = "Fashion-MNIST"


@register_dataset
class CIFAR10DataModule(_CIFARFamily):
    """CIFAR-10: 50,000 train and 10,000 test images, 3×32×32, 10 classes."""

    name = "cifar10"
    dataset_cls = datasets.CIFAR10
    title = "CIFAR-10"
    label_key = "labels"


@register_dataset
class CIFAR100DataModule(_CIFARFamily):
    """CIFAR-100: 50,000 train and 10,000 test images, 3×32×32, 100 fine classes."""

    name = "cifar100"
    dataset_cls = datasets.CIFAR100
    title = "CIFAR-100"
    label_key = "fine_labels"

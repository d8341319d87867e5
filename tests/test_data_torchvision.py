"""torchvision formats (MNIST idx files, CIFAR pickles) on tiny generated files, offline."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from torchvision import datasets

from uap_lightning.config import DataConfig
from uap_lightning.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    DataNotFoundError,
    FashionMNISTDataModule,
    MNISTDataModule,
    build_datamodule,
)

NUM_TRAIN, NUM_TEST = 30, 20


def write_idx(path: Path, array: np.ndarray) -> None:
    """An idx file of uint8 values (big-endian header: magic 0x08, ndim; then each dimension)."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, folder: str, rng: np.random.Generator) -> dict:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    arrays = {}
    for prefix, count in (("train", NUM_TRAIN), ("t10k", NUM_TEST)):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = np.arange(count, dtype=np.uint8) % 10
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        arrays[prefix] = (images, labels)
    return arrays


@pytest.mark.parametrize(
    "name, module, folder",
    [
        ("mnist", MNISTDataModule, "MNIST"),
        ("fashion_mnist", FashionMNISTDataModule, "FashionMNIST"),
    ],
)
def test_mnist_family_reads_idx_files(tmp_path, name, module, folder):
    arrays = write_mnist(tmp_path, folder, np.random.default_rng(0))
    cfg = DataConfig(name=name, root=str(tmp_path), num_classes=10, in_channels=1, image_size=28, attack_images=10)
    dm = build_datamodule(cfg)
    assert type(dm) is module
    assert dm.image_shape == (1, 28, 28) and dm.num_classes == 10
    assert dm.class_names == list(module.dataset_cls.classes)
    splits = dm.splits
    assert splits.train_images.dtype == torch.uint8
    assert torch.equal(splits.train_images[:, 0], torch.from_numpy(arrays["train"][0]))
    assert torch.equal(splits.test_labels, torch.from_numpy(arrays["t10k"][1]).long())
    images, labels = dm.attack_set()
    assert images.shape == (10, 1, 28, 28) and labels.bincount().tolist() == [1] * 10
    test_images, _ = dm.eval_set()
    assert torch.allclose(test_images[:, 0] * 255, torch.from_numpy(arrays["t10k"][0]).float())


class _UncheckedCIFAR10(datasets.CIFAR10):
    """CIFAR-10 without md5 checks, so generated batches pass ``check_integrity``."""

    train_list = [[name, None] for name, _ in datasets.CIFAR10.train_list]
    test_list = [[name, None] for name, _ in datasets.CIFAR10.test_list]
    meta = {**datasets.CIFAR10.meta, "md5": None}


class _UncheckedCIFAR100(datasets.CIFAR100):
    """CIFAR-100 without md5 checks."""

    train_list = [[name, None] for name, _ in datasets.CIFAR100.train_list]
    test_list = [[name, None] for name, _ in datasets.CIFAR100.test_list]
    meta = {**datasets.CIFAR100.meta, "md5": None}


def write_cifar(root: Path, cls, label_key: str, num_classes: int, rng) -> np.ndarray:
    """Pickled batches in ``root/<base_folder>``; returns all train rows (N×3072, uint8)."""
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    names = [n for n, _ in cls.train_list] + [n for n, _ in cls.test_list]
    counts = [NUM_TRAIN // len(cls.train_list)] * len(cls.train_list) + [NUM_TEST]
    train_rows = []
    for index, (file_name, count) in enumerate(zip(names, counts)):
        data = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
        labels = [i % num_classes for i in range(count)]
        with open(folder / file_name, "wb") as handle:
            pickle.dump({"data": data, label_key: labels}, handle)
        if index < len(cls.train_list):
            train_rows.append(data)
    with open(folder / cls.meta["filename"], "wb") as handle:
        pickle.dump({cls.meta["key"]: [f"class{i}" for i in range(num_classes)]}, handle)
    return np.concatenate(train_rows)


@pytest.mark.parametrize(
    "name, module, fake, label_key, num_classes",
    [
        ("cifar10", CIFAR10DataModule, _UncheckedCIFAR10, "labels", 10),
        ("cifar100", CIFAR100DataModule, _UncheckedCIFAR100, "fine_labels", 100),
    ],
)
def test_cifar_family_reads_pickled_batches(tmp_path, monkeypatch, name, module, fake, label_key, num_classes):
    monkeypatch.setattr(module, "dataset_cls", fake)
    train_rows = write_cifar(tmp_path, fake, label_key, num_classes, np.random.default_rng(1))
    cfg = DataConfig(
        name=name, root=str(tmp_path), num_classes=num_classes, in_channels=3, image_size=32, attack_images=5
    )
    dm = build_datamodule(cfg)
    assert dm.image_shape == (3, 32, 32) and dm.num_classes == num_classes
    assert dm.class_names[:2] == ["class0", "class1"]
    splits = dm.splits
    assert splits.train_images.shape == (NUM_TRAIN, 3, 32, 32)
    assert splits.train_images.is_contiguous()
    assert torch.equal(splits.train_images.flatten(1), torch.from_numpy(train_rows))
    assert splits.test_images.shape == (NUM_TEST, 3, 32, 32)
    images, _ = dm.attack_set()
    assert images.shape == (5, 3, 32, 32) and 0.0 <= images.min() and images.max() <= 1.0


@pytest.mark.parametrize(
    "name, expected",
    [
        ("mnist", "MNIST/raw/train-images-idx3-ubyte"),
        ("cifar10", "cifar-10-batches-py/data_batch_1"),
    ],
)
def test_missing_files_raise_a_clear_error(tmp_path, name, expected):
    cfg = DataConfig(name=name, root=str(tmp_path / "nowhere"), download=False)
    with pytest.raises(DataNotFoundError) as caught:
        build_datamodule(cfg).setup()
    message = str(caught.value)
    assert isinstance(caught.value, FileNotFoundError)
    assert str(tmp_path / "nowhere" / expected) in message
    assert "data.download=true" in message


def test_missing_files_point_at_an_image_folder_copy_beside_them(tmp_path):
    for split in ("train", "test"):
        (tmp_path / "cifar10-jpeg" / split / "cat").mkdir(parents=True)
    cfg = DataConfig(name="cifar10", root=str(tmp_path), download=False)
    with pytest.raises(DataNotFoundError) as caught:
        build_datamodule(cfg).setup()
    assert f"use them with data=imagefolder data.root={tmp_path / 'cifar10-jpeg'}" in str(caught.value)
    with pytest.raises(DataNotFoundError) as without:
        build_datamodule(DataConfig(name="cifar10", root=str(tmp_path / "nowhere"), download=False)).setup()
    assert "data=imagefolder" not in str(without.value)


def test_failed_download_raises_the_same_error(tmp_path, monkeypatch):
    class _Offline(datasets.MNIST):
        def download(self) -> None:
            raise URLError("no network")

    monkeypatch.setattr(MNISTDataModule, "dataset_cls", _Offline)
    cfg = DataConfig(name="mnist", root=str(tmp_path), download=True)
    with pytest.raises(DataNotFoundError, match=r"download failed \(<urlopen error no network>\)"):
        build_datamodule(cfg).setup()


def test_unset_root_is_reported(tmp_path):
    with pytest.raises(ValueError, match="data.root is not set"):
        build_datamodule(DataConfig(name="cifar100")).setup()

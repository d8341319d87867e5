"""The datamodule every dataset shares: splits, loaders, the attack set X and the eval set.

Images are float tensors in [0,1], N×C×H×W; labels are int64. Normalisation is not
applied here: ``mean`` and ``std`` are exposed for the model's own normalisation layer.
"""

from __future__ import annotations

import abc
import hashlib
import json
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Optional, Tuple, Type, TypeVar

import lightning as L
import torch
from omegaconf import MISSING
from omegaconf.errors import MissingMandatoryValue
from torch import Tensor
from torch.utils.data import DataLoader

from uap_lightning.errors import ConfigError

from .sampling import balanced_indices
from .tensor_dataset import TensorImageDataset, keep_batch, to_float


def config_value(cfg: Any, key: str, default: Any = None) -> Any:
    """``cfg.key`` from a DictConfig or a dataclass; ``default`` when absent or missing (???)."""
    try:
        value = getattr(cfg, key)
    except (AttributeError, MissingMandatoryValue):
        return default
    return default if value is None or value == MISSING else value


# Every registered datamodule class, by data.name.
DATASETS: Dict[str, Type["UAPDataModule"]] = {}


@dataclass
class Splits:
    """A dataset's full train and test splits, kept in memory.

    Images: N×C×H×W, uint8 (0–255) or float (in [0,1]); labels: int64 N, in
    ``range(len(class_names))``.
    """

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    class_names: List[str]


class UAPDataModule(L.LightningDataModule, abc.ABC):
    """Base datamodule: subclasses implement :meth:`load_splits`, this class does the rest.

    ``val_fraction`` of the training split is held out for validation (seeded by
    ``split_seed``); the rest is the fit set used for training and for the attack set.
    """

    name: str  # data.name (a class attribute of each dataset)
    has_training_split: ClassVar[bool] = True  # False: victims cannot be trained on it (pretrained or checkpoint only)

    def __init__(self, cfg: Any, *, cache_dir: Optional[str] = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.cache_dir = cache_dir  # where datasets decoded from files are cached (None: nowhere)
        self.attack_images = int(config_value(cfg, "attack_images", 500))
        eval_images = config_value(cfg, "eval_images")
        self.eval_images: Optional[int] = None if eval_images is None else int(eval_images)
        self.val_fraction = float(config_value(cfg, "val_fraction", 0.1))
        self.batch_size = int(config_value(cfg, "batch_size", 128))
        self.num_workers = int(config_value(cfg, "num_workers", 0))
        self.split_seed = int(config_value(cfg, "split_seed", 0))
        self._check_settings()
        self._splits: Optional[Splits] = None
        self._fit_index: Optional[Tensor] = None
        self._val_index: Optional[Tensor] = None
        self._fingerprint: Optional[str] = None

    @abc.abstractmethod
    def load_splits(self) -> Splits:
        """Read the full train and test splits and the class names."""

    # -- validation ---------------------------------------------------------------------

    def _check_settings(self) -> None:
        if self.attack_images <= 0:
            raise ConfigError(f"data.attack_images must be positive, got {self.attack_images}")
        if self.eval_images is not None and self.eval_images <= 0:
            raise ConfigError(f"data.eval_images must be positive or null (all of test), got {self.eval_images}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.batch_size <= 0:
            raise ConfigError(f"data.batch_size must be positive, got {self.batch_size}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")

    def _num_val(self, num_train: int) -> int:
        return int(round(self.val_fraction * num_train))

    def check_sizes(self, num_train: int, num_test: int) -> None:
        """Fail fast when the requested attack/eval sets exceed the splits' sizes (images)."""
        num_val = self._num_val(num_train)
        num_fit = num_train - num_val
        if num_fit < 1:
            raise ConfigError(
                f"data.val_fraction={self.val_fraction} leaves no training images "
                f"out of {num_train}; lower data.val_fraction"
            )
        if self.attack_images > num_fit:
            raise ConfigError(
                f"data.attack_images={self.attack_images} exceeds the {num_fit} training images "
                f"available ({num_train} in the training split minus {num_val} held out by "
                f"data.val_fraction={self.val_fraction}); set data.attack_images<={num_fit}"
            )
        if self.eval_images is not None and self.eval_images > num_test:
            raise ConfigError(
                f"data.eval_images={self.eval_images} exceeds the {num_test} images of the test "
                f"split; set data.eval_images<={num_test} or null for all of test"
            )

    def _check_matches_config(self, splits: Splits) -> None:
        channels, height, width = splits.train_images.shape[1:]
        actual = {
            "num_classes": len(splits.class_names),
            "in_channels": channels,
            "image_size": height if height == width else None,
        }
        for key, value in actual.items():
            expected = config_value(self.cfg, key)
            if expected is not None and value != expected:
                raise ConfigError(
                    f"data.{key}={expected} does not match the data of data.name="
                    f"{config_value(self.cfg, 'name')} ({key}={value}, images "
                    f"{channels}×{height}×{width}); set data.{key}={value}"
                )
        for key in ("mean", "std"):
            values = config_value(self.cfg, key, [])
            if len(values) not in (0, channels):
                raise ConfigError(f"data.{key} has {len(values)} values but the images have {channels} channels")

    @staticmethod
    def _check_splits(splits: Splits) -> None:
        for split in ("train", "test"):
            images = getattr(splits, f"{split}_images")
            labels = getattr(splits, f"{split}_labels")
            if images.ndim != 4 or images.shape[0] != labels.shape[0]:
                raise ConfigError(
                    f"{split} images {tuple(images.shape)} and labels {tuple(labels.shape)} "
                    "do not form an N×C×H×W split"
                )
            if labels.dtype != torch.int64:
                raise ConfigError(f"{split} labels must be int64, got {labels.dtype}")
        if len(splits.class_names) < 2:
            raise ConfigError(
                f"the data has {len(splits.class_names)} class ({', '.join(map(str, splits.class_names))}): "
                "a classifier and its fooling rate need at least 2; add class folders (or drop data.class_subset)"
            )
        if splits.train_images.shape[1:] != splits.test_images.shape[1:]:
            raise ConfigError(
                f"train images are {tuple(splits.train_images.shape[1:])} but test images are "
                f"{tuple(splits.test_images.shape[1:])}"
            )

    # -- Lightning hooks ----------------------------------------------------------------

    def setup(self, stage: Optional[str] = None) -> None:
        """Load the splits once and draw the validation hold-out (seed ``split_seed``)."""
        if self._splits is not None:
            return
        splits = self.load_splits()
        self._check_splits(splits)
        num_train = splits.train_labels.numel()
        self.check_sizes(num_train, splits.test_labels.numel())
        self._check_matches_config(splits)
        generator = torch.Generator().manual_seed(self.split_seed)
        order = torch.randperm(num_train, generator=generator)
        num_val = self._num_val(num_train)
        self._val_index = order[:num_val].sort().values
        self._fit_index = order[num_val:].sort().values
        self._splits = splits

    @property
    def splits(self) -> Splits:
        """The loaded splits (loads them on first use)."""
        self.setup()
        assert self._splits is not None
        return self._splits

    def _loader(self, dataset: TensorImageDataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=keep_batch,  # type: ignore[arg-type]  # batches come from __getitems__, not a list
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches of the fit set: (float B×C×H×W in [0,1], int64 B)."""
        splits = self.splits
        dataset = TensorImageDataset(splits.train_images, splits.train_labels, self._fit_index)
        return self._loader(dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Batches of the validation hold-out, in file order."""
        splits = self.splits
        dataset = TensorImageDataset(splits.train_images, splits.train_labels, self._val_index)
        return self._loader(dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Batches of the whole test split, in file order."""
        splits = self.splits
        return self._loader(TensorImageDataset(splits.test_images, splits.test_labels), False)

    # -- attack and evaluation sets -----------------------------------------------------

    def attack_set_capacity(self) -> int:
        """The most images X can hold: the training split outside the validation hold-out."""
        self.setup()
        assert self._fit_index is not None
        return int(self._fit_index.numel())

    def attack_set(self, count: Optional[int] = None, seed: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        """The attack set X: ``count`` (default ``data.attack_images``) fit-set images,
        class-balanced, drawn with ``seed`` (default ``split_seed``); a smaller draw with the
        same seed is a subset of a larger one.

        Returns (float N×C×H×W in [0,1], int64 N), in file order.
        """
        splits = self.splits
        count = self.attack_images if count is None else int(count)
        available = self.attack_set_capacity()
        assert self._fit_index is not None  # set up by attack_set_capacity
        if not 0 < count <= available:
            raise ConfigError(
                f"the attack set cannot hold {count} images: the training split has {available} "
                f"outside the validation hold-out; choose between 1 and {available}"
            )
        chosen = balanced_indices(
            splits.train_labels[self._fit_index], count, self.split_seed if seed is None else int(seed)
        )
        rows = self._fit_index[chosen]
        return to_float(splits.train_images[rows]), splits.train_labels[rows]

    def eval_set(self, attack_seed: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        """The evaluation set: all of test, or ``eval_images`` drawn class-balanced (seeded).
        ``attack_seed`` matters only to datasets without a test split, whose evaluation set is what
        X (drawn with that seed) leaves.

        Returns (float N×C×H×W in [0,1], int64 N), in file order.
        """
        splits = self.splits
        if self.eval_images is None:
            rows = torch.arange(splits.test_labels.numel())
        else:
            rows = balanced_indices(splits.test_labels, self.eval_images, self.split_seed)
        return to_float(splits.test_images[rows]), splits.test_labels[rows]

    # -- descriptive attributes ---------------------------------------------------------

    def fingerprint(self) -> str:
        """Hex SHA-256 of the decoded splits (images, labels, class names): changes whenever
        the data a victim is trained and tested on changes, whatever its files are called."""
        if self._fingerprint is None:
            splits = self.splits
            digest = hashlib.sha256(json.dumps(splits.class_names).encode())
            for tensor in (splits.train_images, splits.train_labels, splits.test_images, splits.test_labels):
                digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
                digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    @property
    def eval_source(self) -> str:
        """Where the evaluation set comes from, for metrics.json."""
        return "test split"

    @property
    def class_names(self) -> List[str]:
        """Class names, indexed by label."""
        return list(self.splits.class_names)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.splits.class_names)

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        """(C, H, W) of every image, in pixels."""
        channels, height, width = self.splits.train_images.shape[1:]
        return int(channels), int(height), int(width)

    @property
    def mean(self) -> Tuple[float, ...]:
        """Per-channel mean for the model's normalisation, [0,1] scale (0 when not configured)."""
        values = config_value(self.cfg, "mean", [])
        return tuple(float(v) for v in values) or (0.0,) * self.image_shape[0]

    @property
    def std(self) -> Tuple[float, ...]:
        """Per-channel std for the model's normalisation, [0,1] scale (1 when not configured)."""
        values = config_value(self.cfg, "std", [])
        return tuple(float(v) for v in values) or (1.0,) * self.image_shape[0]


DataModuleClass = TypeVar("DataModuleClass", bound=Type[UAPDataModule])


def register_dataset(cls: DataModuleClass) -> DataModuleClass:
    """Class decorator: make ``cls`` available as ``data.name=<cls.name>``."""
    DATASETS[cls.name] = cls
    return cls

"""Images in class folders with no training split, such as one ImageNet photograph per class.

Layout: ``root/val/<class>/*`` (or ``root/<class>/*`` when there is no ``val/``), with an
optional ``data.class_names_file`` (a TSV of ``index``, ``wnid``/folder and ``name``) for
readable class names. Labels are the positions of the class folders in sorted order, which for
ImageNet's synset folders is the standard 0–999 index.

There is nothing to train on: the attack set X (``data.attack_images``) is drawn from all the
images with the attack seed, class-balanced, and the evaluation set is the rest (or
``data.eval_images`` of the rest), so the two never overlap. Victims come pretrained or from
a checkpoint.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from uap_lightning.errors import ConfigError, DamagedFileError, DataNotFoundError

from .base import Splits, config_value, register_dataset
from .imagefolder import ImageFolderDataModule, is_folder
from .sampling import balanced_indices
from .tensor_dataset import to_float

SPLIT_FOLDER = "val"
LAYOUT = "root/val/<class>/*.JPEG (or root/<class>/*.JPEG)"


@register_dataset
class SampleFolderDataModule(ImageFolderDataModule):
    """Class folders without a training split, held in memory as uint8 3×S×S tensors.

    All images form one pool (kept as the ``train`` split, with an empty ``test`` split); X and
    the evaluation set are drawn from it per attack seed (:meth:`attack_set`, :meth:`eval_set`).
    """

    name = "sample_folder"
    has_training_split = False
    layout = LAYOUT

    def _split_folder(self, root: Path) -> Path:
        return root / SPLIT_FOLDER if is_folder(root / SPLIT_FOLDER) else root

    def load_splits(self) -> Splits:
        root = self._root()
        folder = self._split_folder(root)
        classes = self._classes(folder, folder)
        files = self._list_split(root, folder, classes)
        self.check_sizes(len(files), 0)
        names = self._readable_names(root, classes)
        tensors = self._decoded(root, {"train": files}, classes)
        images, labels = tensors["train_images"], tensors["train_labels"]
        return Splits(images, labels, images[:0], labels[:0], names)

    def _readable_names(self, root: Path, folders: List[str]) -> List[str]:
        """Class names from ``data.class_names_file`` (folder → name), else the folder names.
        DamagedFileError when the file names a folder (wnid) or an index on two lines."""
        file_name = config_value(self.cfg, "class_names_file")
        if file_name is None:
            return list(folders)
        path = root / str(file_name)
        if not path.is_file():
            raise DataNotFoundError(
                f"data.class_names_file: {path} does not exist; set it to null to name classes by folder"
            )
        try:
            with open(path, newline="", encoding="utf-8") as handle:
                rows = list(csv.reader(handle, delimiter="\t"))
        except (OSError, UnicodeDecodeError) as err:
            raise DamagedFileError(f"cannot read data.class_names_file {path}: {err}") from None
        entries = [(line, row) for line, row in enumerate(rows[1:], start=2) if len(row) >= 3]
        for column, what in ((0, "index"), (1, "wnid")):
            _refuse_duplicates(path, [(row[column], line) for line, row in entries], what)
        names = {row[1]: row[2] for _, row in entries}
        missing = [folder for folder in folders if folder not in names]
        if missing:
            raise DamagedFileError(
                f"data.class_names_file {path} names no class for the folder(s) {', '.join(missing[:5])}; "
                "fix the file or set data.class_names_file=null"
            )
        return [names[folder] for folder in folders]

    # -- sizes ------------------------------------------------------------------------------

    def _num_val(self, num_train: int) -> int:
        return 0  # nothing is trained, so nothing is held out for validation

    def check_sizes(self, num_train: int, num_test: int) -> None:
        """X must leave at least one image to evaluate on; the eval set fits in the rest."""
        rest = num_train - self.attack_images
        if rest < 1:
            raise ConfigError(
                f"data.attack_images={self.attack_images} leaves no evaluation images out of the {num_train} "
                f"images (the evaluation set is the images not in X); set data.attack_images<={num_train - 1}"
            )
        if self.eval_images is not None and self.eval_images > rest:
            raise ConfigError(
                f"data.eval_images={self.eval_images} exceeds the {rest} images left after X "
                f"(data.attack_images={self.attack_images}); set data.eval_images<={rest} or null"
            )

    def attack_set_capacity(self) -> int:
        """X and every smaller attack set come from the ``data.attack_images`` images drawn for X,
        so that none of them overlaps the evaluation set."""
        self.setup()
        return self.attack_images

    # -- attack and evaluation sets ---------------------------------------------------------

    def _attack_rows(self, count: int, seed: Optional[int]) -> Tensor:
        labels = self.splits.train_labels
        return balanced_indices(labels, count, self.split_seed if seed is None else int(seed))

    def eval_set(self, attack_seed: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        """The images not in X (X drawn with ``attack_seed``), or ``data.eval_images`` of them
        drawn class-balanced with ``data.split_seed``. Returns (float N×C×H×W in [0,1], int64 N)."""
        splits = self.splits
        in_x = torch.zeros(splits.train_labels.numel(), dtype=torch.bool)
        in_x[self._attack_rows(self.attack_images, attack_seed)] = True
        rows = (~in_x).nonzero().squeeze(1)
        if self.eval_images is not None:
            rows = rows[balanced_indices(splits.train_labels[rows], self.eval_images, self.split_seed)]
        return to_float(splits.train_images[rows]), splits.train_labels[rows]

    def train_dataloader(self) -> DataLoader:
        raise ConfigError(no_training_split_message(self.cfg))

    @property
    def eval_source(self) -> str:
        return "images not in X"


def _refuse_duplicates(path: Path, ids: List[Tuple[str, int]], what: str) -> None:
    """DamagedFileError naming the first ``what`` (an index or a wnid) that two lines of ``path`` share;
    ``ids`` holds (id, line number) pairs."""
    first_line: Dict[str, int] = {}
    for value, line in ids:
        if value in first_line:
            raise DamagedFileError(
                f"data.class_names_file {path} names {what} {value} on lines {first_line[value]} and {line}; "
                f"keep one line per {what} (fix the file or set data.class_names_file=null)"
            )
        first_line[value] = line


def no_training_split_message(data_cfg: Any) -> str:
    """Why a victim cannot be trained on ``data_cfg`` and what to use instead."""
    return (
        f"data={config_value(data_cfg, 'name')} has no training split (the images are split into X and the "
        "evaluation set): attack a pretrained victim (model=efficientnet_lite0, or model=torchvision "
        "model.pretrained=true) or your own weights (model.checkpoint=PATH)"
    )

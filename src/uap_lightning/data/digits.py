"""scikit-learn's bundled 8×8 handwritten digits: offline, 1,797 images, 10 classes."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from .base import Splits, UAPDataModule, register_dataset

TEST_FRACTION = 0.2
SPLIT_SEED = 0  # fixed so every run shares one test split, whatever data.split_seed says


@register_dataset
class DigitsDataModule(UAPDataModule):
    """Digits as float 1×8×8 images in [0,1] (pixel values 0–16 divided by 16).

    The train/test split is 80/20, stratified by class, with a fixed seed.
    """

    name = "digits"

    def load_splits(self) -> Splits:
        images, labels = load_digits(return_X_y=True)
        train_rows, test_rows = train_test_split(
            np.arange(len(labels)),
            test_size=TEST_FRACTION,
            stratify=labels,
            random_state=SPLIT_SEED,
        )
        images = torch.from_numpy(images.reshape(-1, 1, 8, 8) / 16.0).to(torch.float32)
        labels = torch.from_numpy(labels).to(torch.int64)
        train = torch.from_numpy(np.sort(train_rows))
        test = torch.from_numpy(np.sort(test_rows))
        return Splits(
            train_images=images[train],
            train_labels=labels[train],
            test_images=images[test],
            test_labels=labels[test],
            class_names=[str(digit) for digit in range(10)],
        )

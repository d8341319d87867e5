"""An in-memory image dataset that converts to float in [0,1] one batch at a time."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils.data import Dataset


def to_float(images: Tensor) -> Tensor:
    """uint8 (0–255) or float images → float32 in [0,1], same shape."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    return images.to(torch.float32)


class TensorImageDataset(Dataset):
    """Images stored as one N×C×H×W tensor (uint8 or float) with int64 labels.

    ``indices`` restricts the dataset to those rows. ``dataset[i]`` gives one C×H×W float
    image and an int label; a DataLoader fetches a whole batch through ``__getitems__``
    (float B×C×H×W, int64 B) and must use :func:`keep_batch` as its ``collate_fn``.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        indices: Optional[Tensor] = None,
    ) -> None:
        self.images = images
        self.labels = labels
        self.indices = torch.arange(len(labels)) if indices is None else indices

    def __len__(self) -> int:
        return self.indices.numel()

    def __getitem__(self, index: int) -> Tuple[Tensor, int]:
        images, labels = self.__getitems__([index])
        return images[0], int(labels[0])

    def __getitems__(self, indices: Sequence[int]) -> Tuple[Tensor, Tensor]:
        rows = self.indices[torch.as_tensor(indices, dtype=torch.int64)]
        return to_float(self.images[rows]), self.labels[rows]


def keep_batch(batch: Tuple[Tensor, Tensor]) -> Tuple[Tensor, Tensor]:
    """Collate function for :class:`TensorImageDataset`: the batch is already stacked."""
    return batch

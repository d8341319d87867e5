"""Light training augmentation applied to whole batches of image tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def random_crop_flip(images: Tensor, padding: int = 4) -> Tensor:
    """Random crop of the zero-padded images plus a random horizontal flip, per image.

    ``images``: N×C×H×W float in [0,1]; ``padding`` in pixels. Returns a new N×C×H×W tensor.
    Draws from torch's global generator.
    """
    n, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (n, 1))
    left = torch.randint(0, 2 * padding + 1, (n, 1))
    rows = top + torch.arange(h)
    flip = torch.rand(n, 1) < 0.5
    cols = left + torch.where(flip, torch.arange(w - 1, -1, -1), torch.arange(w))
    batch = torch.arange(n)[:, None, None, None]
    channel = torch.arange(c)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]

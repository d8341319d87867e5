"""Batched training augmentation on [0,1] image tensors: random crop and horizontal flip."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop_flip(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad N×C×H×W by ``pad`` px, crop a random H×W window per image, and flip
    each image left-right with probability 1/2. Returns N×C×H×W on x's device."""
    n, c, h, w = x.shape
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad))
        top = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device)
        left = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device)
        rows = (top + torch.arange(h, device=x.device)).view(n, 1, h, 1)
        cols = (left + torch.arange(w, device=x.device)).view(n, 1, 1, w)
        batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
        chan = torch.arange(c, device=x.device).view(1, c, 1, 1)
        x = padded[batch, chan, rows, cols]
    flip = torch.rand(n, device=x.device) < 0.5
    return torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)

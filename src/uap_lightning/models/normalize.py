"""Per-channel mean/std normalisation as a layer, so a victim takes [0,1] images."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """Map N×C×H×W images in [0,1] to ``(x - mean) / std`` per channel.

    ``mean`` and ``std`` are in [0,1] scale, one value per channel (or a single value
    for all channels). They are non-persistent buffers: they follow the module across
    devices but are not part of its state dict, so checkpoints hold only the weights.
    """

    mean: torch.Tensor  # buffers, registered in __init__
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.as_tensor([float(m) for m in mean], dtype=torch.float32)
        std_t = torch.as_tensor([float(s) for s in std], dtype=torch.float32)
        if mean_t.numel() == 0 or mean_t.shape != std_t.shape:
            raise ValueError(f"mean and std need the same non-zero length, got {mean_t.tolist()} and {std_t.tolist()}")
        if bool((std_t <= 0).any()):
            raise ValueError(f"std must be positive, got {std_t.tolist()}")
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std_t.view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: N×C×H×W in [0,1] → N×C×H×W normalised."""
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"

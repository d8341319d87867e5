"""Deterministic, class-balanced draws of image indices."""

from __future__ import annotations

import torch
from torch import Tensor


def balanced_indices(labels: Tensor, count: int, seed: int) -> Tensor:
    """``count`` positions into ``labels`` (int64, N), balanced across classes where possible.

    Classes are visited round-robin, each giving its next image from a seeded random order;
    within a round the classes come in a seeded random order, and exhausted classes are
    skipped. The first ``count`` of that fixed sequence are chosen, so a smaller draw is a subset
    of a larger one with the same seed, and a draw of whole rounds holds the same images
    whatever the order within rounds (with one image per class, the random order within the
    round is what draws X). Returns the chosen positions sorted ascending (int64, ``count``).
    """
    if count > labels.numel():
        raise ValueError(f"cannot draw {count} images from {labels.numel()}")
    generator = torch.Generator().manual_seed(seed)
    queues, ranks = [], []
    for label in torch.unique(labels).tolist():
        members = (labels == label).nonzero().flatten()
        queues.append(members[torch.randperm(members.numel(), generator=generator)])
        ranks.append(torch.arange(members.numel(), dtype=torch.float64))
    rank = torch.cat(ranks)
    within_round = torch.rand(rank.numel(), generator=generator, dtype=torch.float64)  # in [0, 1)
    order = torch.argsort(rank + within_round)
    return torch.cat(queues)[order[:count]].sort().values

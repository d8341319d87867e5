"""Deterministic, class-balanced draws of image indices."""

from __future__ import annotations

import torch
from torch import Tensor


def balanced_indices(labels: Tensor, count: int, seed: int) -> Tensor:
    """``count`` positions into ``labels`` (int64, N), balanced across classes where possible.

    Classes are visited round-robin in label order, each giving its next image from a
    seeded random order; exhausted classes are skipped. The first ``count`` of that fixed
    sequence are chosen, so a smaller draw is a subset of a larger one with the same seed.
    Returns the chosen positions sorted ascending (int64, ``count``).
    """
    if count > labels.numel():
        raise ValueError(f"cannot draw {count} images from {labels.numel()}")
    generator = torch.Generator().manual_seed(seed)
    queues, ranks, classes = [], [], []
    for position, label in enumerate(torch.unique(labels).tolist()):
        members = (labels == label).nonzero().flatten()
        queues.append(members[torch.randperm(members.numel(), generator=generator)])
        ranks.append(torch.arange(members.numel()))
        classes.append(torch.full((members.numel(),), position))
    num_classes = len(queues)
    order = torch.argsort(torch.cat(ranks) * num_classes + torch.cat(classes))
    return torch.cat(queues)[order[:count]].sort().values

"""Augmented copies of the attack set: random resized crops and horizontal flips (``attack.augment``).

A universal perturbation fitted to a few hundred images can learn them rather than the network;
showing the engine a new crop and flip of every image each pass asks v to work on the images'
neighbourhood instead. Pure torch, batched, seeded by the attack's generator.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

CROP_AREA = (0.5, 1.0)  # share of the image area a crop keeps
CROP_ASPECT = (3 / 4, 4 / 3)  # width / height of a crop
CHUNK = 64  # images resampled at once


def crop_flip_parameters(n: int, generator: torch.Generator) -> Tensor:
    """N×2×3 affine matrices (normalised coordinates) of random crops and flips: each keeps a share
    of the area drawn from ``CROP_AREA`` with an aspect ratio drawn log-uniformly from
    ``CROP_ASPECT``, at a uniform position inside the image, mirrored with probability 1/2."""
    area = torch.empty(n).uniform_(*CROP_AREA, generator=generator)
    log_aspect = torch.empty(n).uniform_(math.log(CROP_ASPECT[0]), math.log(CROP_ASPECT[1]), generator=generator)
    width = (area * log_aspect.exp()).sqrt().clamp(max=1.0)
    height = (area / log_aspect.exp()).sqrt().clamp(max=1.0)
    centre_x = (torch.rand(n, generator=generator) * 2 - 1) * (1 - width)
    centre_y = (torch.rand(n, generator=generator) * 2 - 1) * (1 - height)
    mirror = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = width * mirror
    theta[:, 0, 2] = centre_x
    theta[:, 1, 1] = height
    theta[:, 1, 2] = centre_y
    return theta


def crop_flip(images: Tensor, generator: torch.Generator) -> Tensor:
    """A random resized crop and flip of each image (N×C×H×W in [0,1] → same shape, bilinear),
    drawn from ``generator`` (CPU)."""
    theta = crop_flip_parameters(images.shape[0], generator).to(images.device, images.dtype)
    out = torch.empty_like(images)
    for start in range(0, images.shape[0], CHUNK):
        rows = slice(start, start + CHUNK)
        grid = F.affine_grid(theta[rows], list(images[rows].shape), align_corners=False)
        out[rows] = F.grid_sample(images[rows], grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.clamp_(0.0, 1.0)

"""The paper's baseline: a random perturbation of the same ℓp norm as the universal one."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from uap_lightning.units import to_image_scale


def random_perturbation(shape: Sequence[int], eps: float, p: float, generator: torch.Generator) -> Tensor:
    """A random C×H×W perturbation in [0,1] scale with ℓp norm ``eps`` (0–255 units).

    ℓ∞: a uniformly random ±ξ sign pattern (every pixel at the bound). ℓ2 and ℓ1: a
    Gaussian direction rescaled to the ball's surface.
    """
    radius = to_image_scale(eps)
    if math.isinf(p):
        signs = torch.randint(0, 2, tuple(shape), generator=generator).float() * 2 - 1
        return signs * radius
    direction = torch.randn(tuple(shape), generator=generator)
    norm: Tensor = torch.linalg.vector_norm(direction.flatten(), ord=p)
    return direction * (radius / norm)

"""What the engines that optimise δ without data share: the uniform start and how far δ has grown."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from uap_lightning.attacks.threat import ThreatModel


def uniform_start(v: Tensor, threat: ThreatModel, generator: Optional[torch.Generator]) -> Tensor:
    """δ of v's shape, uniform in [−ε, ε] per entry ([0,1] scale), drawn from ``generator`` (CPU)."""
    draw = torch.rand(v.shape, generator=generator, dtype=v.dtype)
    return ((draw * 2 - 1) * threat.radius).to(v.device)


def saturation_of(v: Tensor, threat: ThreatModel) -> float:
    """How far δ has grown: for ℓ∞ the share of entries at the bound, else ‖δ‖_p / radius."""
    if math.isinf(threat.p):
        return float((v.abs() >= threat.radius * (1 - 1e-3)).float().mean())
    return float(torch.linalg.vector_norm(v.flatten(), ord=threat.p)) / threat.radius

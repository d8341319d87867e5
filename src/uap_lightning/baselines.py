"""The paper's baselines: random perturbations, scored like the universal one.

Two of them, each the mean fooling rate over ``draws`` seeded draws: a random point of the
ℓp sphere of radius ξ (a ±ξ sign pattern for ℓ∞), and a random direction with the ℓ2 norm of
the computed perturbation (the paper's comparison). A universal perturbation "beats random"
when its fooling rate exceeds the stronger baseline by at least ``MARGIN``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from uap_lightning import metrics
from uap_lightning.attacks.random_noise import random_perturbation
from uap_lightning.attacks.threat import ThreatModel

DRAWS = 5
MARGIN = 0.05


@dataclass(frozen=True)
class RandomBaselines:
    """Mean fooling rates of random perturbations (shares in [0,1])."""

    same_norm: float  # a random point of the ℓp sphere of radius ξ
    same_l2: float  # a random direction with the ℓ2 norm of the universal perturbation
    draws: int

    @property
    def strongest(self) -> float:
        return max(self.same_norm, self.same_l2)

    def beaten_by(self, fooling_rate: float) -> bool:
        """Whether ``fooling_rate`` exceeds the stronger baseline by at least MARGIN."""
        return fooling_rate >= self.strongest + MARGIN


def mean_fooling_rate(
    perturbed_labels: Callable[[Tensor], Tensor],
    clean_labels: Tensor,
    shape: Sequence[int],
    eps: float,
    p: float,
    generator: torch.Generator,
    draws: int = DRAWS,
) -> float:
    """Mean fooling rate of ``draws`` random perturbations of ℓp norm ``eps`` (0–255 units).

    ``perturbed_labels(noise)`` predicts the evaluation images with ``noise`` (C×H×W) added;
    ``clean_labels`` (N,) are their clean predictions. 0 when ``eps`` is 0.
    """
    if not eps > 0 or not math.isfinite(eps):
        return 0.0
    rates = [
        metrics.fooling_rate(clean_labels, perturbed_labels(random_perturbation(shape, eps, p, generator)).cpu())
        for _ in range(draws)
    ]
    return sum(rates) / len(rates)


def random_baselines(
    perturbed_labels: Callable[[Tensor], Tensor],
    clean_labels: Tensor,
    shape: Sequence[int],
    threat: ThreatModel,
    perturbation: Tensor,
    *,
    seed: int,
    draws: int = DRAWS,
) -> RandomBaselines:
    """Both baselines for ``perturbation`` (C×H×W, [0,1] scale) under ``threat``, drawn from one
    generator seeded with ``seed`` (arguments as in :func:`mean_fooling_rate`)."""
    generator = torch.Generator().manual_seed(int(seed))
    same_norm = mean_fooling_rate(perturbed_labels, clean_labels, shape, threat.eps, threat.p, generator, draws)
    l2 = metrics.norm_255(perturbation, 2.0)
    same_l2 = mean_fooling_rate(perturbed_labels, clean_labels, shape, l2, 2.0, generator, draws)
    return RandomBaselines(same_norm=same_norm, same_l2=same_l2, draws=draws)

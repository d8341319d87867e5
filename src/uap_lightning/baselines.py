"""The paper's baselines: random perturbations, scored like the universal one.

Two of them, each the mean fooling rate over ``draws`` seeded draws: a random point of the
ℓp sphere of radius ξ (a ±ξ sign pattern for ℓ∞), and a random direction with the ℓ2 norm of
the computed perturbation (the paper's comparison). A universal perturbation "beats random"
when its fooling rate exceeds the stronger baseline by at least ``MARGIN``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from uap_lightning import metrics
from uap_lightning.attacks.random_noise import random_perturbation
from uap_lightning.attacks.threat import ThreatModel
from uap_lightning.progress import Phase

log = logging.getLogger(__name__)

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
    threat: ThreatModel,
    generator: torch.Generator,
    draws: int = DRAWS,
    on_draw: Optional[Callable[[int], None]] = None,
) -> float:
    """Mean fooling rate of ``draws`` random perturbations on the sphere of ``threat``'s norm and ε.

    ``perturbed_labels(noise)`` predicts the evaluation images with ``noise`` (C×H×W) added;
    ``clean_labels`` (N,) are their clean predictions; ``on_draw(i)`` is called before draw i
    (from 0).
    """
    rates = []
    for index in range(draws):
        if on_draw is not None:
            on_draw(index)
        noise = random_perturbation(shape, threat.eps, threat.p, generator)
        rates.append(metrics.fooling_rate(clean_labels, perturbed_labels(noise).cpu()))
    return sum(rates) / len(rates)


def same_l2_fooling_rate(
    perturbed_labels: Callable[[Tensor], Tensor],
    clean_labels: Tensor,
    shape: Sequence[int],
    norm_l2: float,
    generator: torch.Generator,
    draws: int = DRAWS,
    on_draw: Optional[Callable[[int], None]] = None,
) -> float:
    """:func:`mean_fooling_rate` of random directions of ℓ2 norm ``norm_l2`` (0–255 units; a
    perturbation's own), 0 when it is 0 (a zero perturbation has no direction to compare)."""
    if not norm_l2 > 0:
        return 0.0
    threat = ThreatModel(float(norm_l2), 2.0)
    return mean_fooling_rate(perturbed_labels, clean_labels, shape, threat, generator, draws, on_draw)


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
    generator seeded with ``seed`` (arguments as in :func:`mean_fooling_rate`). While they take
    long, a log line every few seconds names the draw (:class:`~uap_lightning.progress.Phase`)."""
    generator = torch.Generator().manual_seed(int(seed))
    l2 = metrics.norm_255(perturbation, 2.0)
    kinds = (f"random {threat.symbol} noise of norm ε={threat.eps:g}", f"a random direction of ℓ2 norm {l2:.1f}")
    with Phase(log, f"random baselines ({2 * draws} draws on {len(clean_labels)} eval images)") as phase:

        def on_draw(kind: int) -> Callable[[int], None]:
            return lambda index: phase.part(f"draw {kind * draws + index + 1} of {2 * draws}, {kinds[kind]}")

        same_norm = mean_fooling_rate(perturbed_labels, clean_labels, shape, threat, generator, draws, on_draw(0))
        same_l2 = same_l2_fooling_rate(perturbed_labels, clean_labels, shape, l2, generator, draws, on_draw(1))
    return RandomBaselines(same_norm=same_norm, same_l2=same_l2, draws=draws)

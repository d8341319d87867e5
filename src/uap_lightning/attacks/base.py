"""The interface every universal attack engine implements: one pass over the attack set."""

from __future__ import annotations

import abc
import numbers
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from uap_lightning.attacks.distributed import Reducer
from uap_lightning.attacks.projections import project_lp
from uap_lightning.attacks.threat import ThreatModel


@dataclass
class PassStats:
    """What one pass did: ``updates`` (DeepFool steps added to v, or SGD steps) and the mean
    DeepFool iterations of those steps (0 for SGD)."""

    updates: int
    mean_iterations: float


class UniversalAttack(abc.ABC):
    """An engine that improves a universal perturbation v (C×H×W, [0,1] scale) one pass at a time.

    A pass visits the attack set X once in the order ``torch.randperm(N, generator=generator)``.
    The model is expected in eval mode with frozen parameters (see ``frozen_eval``).

    On several processes (a ``reducer`` of world size > 1) every rank is given the same X, v and
    generator state and returns the same v: the engine shares the work of each global batch
    among the ranks (see :mod:`uap_lightning.attacks.distributed`).
    """

    name: str

    def __init__(self, threat: ThreatModel, *, clip: bool = True, target_class: Optional[int] = None) -> None:
        if not isinstance(threat, ThreatModel):
            raise TypeError(f"threat must be a ThreatModel; got {type(threat).__name__}")
        if target_class is not None and (
            isinstance(target_class, bool) or not isinstance(target_class, numbers.Integral) or target_class < 0
        ):
            raise ValueError(f"attack.target_class must be a class index >= 0 or null; got {target_class!r}")
        self.threat = threat
        self.clip = bool(clip)
        self.target_class = None if target_class is None else int(target_class)

    def project(self, v: Tensor) -> Tensor:
        """v projected onto the threat model's ℓp ball (radius eps/255)."""
        return project_lp(v, self.threat.radius, self.threat.p)

    def still_to_fool(self, predicted: Tensor, clean_labels: Tensor) -> Tensor:
        """Bool mask of images v has yet to work on: label unchanged, or (targeted) not at the
        target; targeted attacks skip images whose clean label already is the target."""
        if self.target_class is None:
            return predicted == clean_labels
        return (predicted != self.target_class) & (clean_labels != self.target_class)

    @abc.abstractmethod
    def run_pass(
        self,
        model: nn.Module,
        v: Tensor,
        images: Tensor,
        clean_labels: Tensor,
        generator: Optional[torch.Generator],
        pass_index: Optional[int] = None,
        reducer: Optional[Reducer] = None,
    ) -> Tuple[Tensor, PassStats]:
        """One pass over ``images`` (N×C×H×W in [0,1]) with their clean predictions (N,).

        Returns the new v (C×H×W, on v's device) and the pass's statistics (over all ranks).
        ``pass_index`` (0-based) drives step-size schedules; engines without one ignore it.
        ``reducer`` (None: one process) joins the processes that run the pass together.
        """


"""SGA: Stochastic Gradient Aggregation (Liu, Feng, Zhang, Yang, "Enhancing Generalization of
Universal Adversarial Perturbation through Gradient Aggregation", ICCV 2023, Algorithm 1).

SGD-UAP's gradient on a small batch is noisy and its large-batch gradient overfits the batch;
SGA takes, for every outer batch B of X (``batch_size``, 250 in the paper):

1. an inner copy δ' ← v, then T = K·|B|/m inner steps (``inner_steps`` K = 4, ``minibatch``
   m = 10): each draws m images of B without replacement, computes g_t = ∇ L(clip(x + δ'))
   on them and takes δ' ← Proj(δ' + α·sign(g_t));
2. one outer step with the aggregated gradient ḡ = (1/T) Σ_t g_t: v ← Proj(v + α·sign(ḡ)),
   or, with ``momentum`` μ > 0, m_v ← μ·m_v + ḡ/‖ḡ‖₁ and v ← Proj(v + α·sign(m_v)).

The step α is ε/10 (``step_size`` in 0–255 units), constant; L is the clipped cross-entropy
min(CE, β = 9) by default (``loss``, see :mod:`uap_lightning.attacks.losses`); the paper runs
20 epochs (passes) over 10,000 images. For p other than ∞ the sign is the steepest-ascent
direction of unit ℓp norm and Proj the projection onto the ℓp ball. With K = 1 and m = |B|
the inner loop is one step on the whole batch and SGA is SGD-UAP's constant sign step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch
from torch import Tensor, nn

from uap_lightning.attacks.base import PassStats, UniversalAttack, register_engine
from uap_lightning.attacks.distributed import SINGLE_PROCESS, Reducer
from uap_lightning.attacks.losses import LossOptions, check_targeted, sharded_gradient
from uap_lightning.attacks.projections import lp_norm, unit_direction
from uap_lightning.attacks.threat import ThreatModel
from uap_lightning.units import to_image_scale


@dataclass(frozen=True)
class SGAOptions(LossOptions):
    """SGA's settings (the ``attack`` keys of ``attack=sga``), see :class:`SGA`."""

    batch_size: int = 250  # outer batch |B|
    minibatch: int = 10  # inner batch m
    inner_steps: int = 4  # K: K·|B|/m inner steps per outer batch
    step_size: Optional[float] = None  # α, 0–255 units; None: ε / 10
    momentum: float = 0.0  # μ; 0: plain aggregated sign step (the paper's default), e.g. 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size < 1:
            raise ValueError(f"attack.batch_size must be at least 1; got {self.batch_size}")
        if self.minibatch < 1:
            raise ValueError(f"attack.minibatch must be at least 1; got {self.minibatch}")
        if self.minibatch > self.batch_size:
            raise ValueError(
                f"attack.minibatch ({self.minibatch}) must be at most attack.batch_size ({self.batch_size}): "
                "the inner batches are drawn from the outer one"
            )
        if self.inner_steps < 1:
            raise ValueError(f"attack.inner_steps (K) must be at least 1; got {self.inner_steps}")
        if self.step_size is not None and not (math.isfinite(self.step_size) and self.step_size > 0):
            raise ValueError(
                f"attack.step_size must be a positive number in 0-255 units or null; got {self.step_size!r}"
            )
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"attack.momentum must lie in [0, 1), e.g. 0.9 (0: off); got {self.momentum}")


@register_engine
class SGA(UniversalAttack):
    """SGA: per outer batch of X, K·|B|/m inner sign steps on mini-batches from a copy of v; their
    gradients averaged into one outer sign step on v, projected onto the ℓp ball of radius ε.

    Arguments:
        threat: the ℓp ball, ``ThreatModel.parse(eps, p)`` with ε in 0–255 pixel units.
        clip (bool, True): clip x + v to [0,1].
        target_class (int or None, None): targeted mode (lower the loss to this class).
        batch_size (int, 250): the outer batch |B|.
        minibatch (int, 10): the inner batch m, drawn without replacement from the outer batch.
        inner_steps (int, 4): K; an outer batch takes max(1, K·|B| // m) inner steps.
        step_size (float or None, None): α in 0–255 units, inner and outer; None: ε/10.
        momentum (float, 0.0): μ of the outer step on ℓ1-normalised aggregated gradients; its
        buffer restarts every pass, so that a pass depends only on v and the generator.
        loss (str, "ce"), beta (float, 9.0), kappa (float, 10.0): the objective, see
        :mod:`uap_lightning.attacks.losses`.

    Shape:
        ``run_pass(model, v, images, clean_labels, generator, pass_index)``: v C×H×W and images
        N×C×H×W in [0,1] scale, clean_labels (N,) int64; returns the new v and :class:`PassStats`
        (``updates``: outer steps; ``mean_iterations``: inner steps per outer step).

    Example::

        engine = SGA(ThreatModel.parse(10, "inf"), batch_size=250, minibatch=10, inner_steps=4)
        v, stats = engine.run_pass(model, torch.zeros(3, 224, 224), X, clean, torch.Generator())
    """

    name = "sga"
    Options = SGAOptions
    averages_loss = True

    def __init__(self, threat: ThreatModel, **options: Any) -> None:
        super().__init__(threat, **options)
        check_targeted(self.options.loss, self.target_class)
        step = self.options.step_size
        self.step = to_image_scale(float(step) if step is not None else threat.eps / 10.0)  # [0,1] scale

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
        reducer = reducer or SINGLE_PROCESS
        order = torch.randperm(images.shape[0], generator=generator)
        v = v.detach().clone()
        velocity = torch.zeros_like(v)
        outer_steps = inner_total = 0
        for batch in torch.split(order, self.options.batch_size):
            aggregated, inner = self._aggregated_gradient(model, v, images, clean_labels, batch, generator, reducer)
            if self.options.momentum > 0:
                velocity = self.options.momentum * velocity + aggregated / lp_norm(
                    aggregated.unsqueeze(0), 1.0
                ).clamp_min(torch.finfo(aggregated.dtype).tiny)
                aggregated = velocity
            v = self.project(v - self.step * unit_direction(self.low_pass(aggregated), self.threat.p))
            outer_steps += 1
            inner_total += inner
        return v, PassStats.of_steps(outer_steps, inner_total)

    def _aggregated_gradient(
        self,
        model: nn.Module,
        v: Tensor,
        images: Tensor,
        clean_labels: Tensor,
        batch: Tensor,
        generator: Optional[torch.Generator],
        reducer: Reducer,
    ) -> Tuple[Tensor, int]:
        """The mean of the inner gradients of the loss (to minimise) taken on a copy of v over the
        outer ``batch`` (indices into X), and how many inner steps were taken."""
        size = min(self.options.minibatch, batch.numel())
        steps = max(1, self.options.inner_steps * batch.numel() // self.options.minibatch)
        inner_v = v.clone()
        total = torch.zeros_like(v)
        for _ in range(steps):
            chosen = (
                batch if size == batch.numel() else batch[torch.randperm(batch.numel(), generator=generator)[:size]]
            )
            grad = sharded_gradient(
                model,
                inner_v,
                images,
                clean_labels,
                chosen,
                self.options,
                reducer,
                target_class=self.target_class,
                clip=self.clip,
            )
            total += grad
            inner_v = self.project(inner_v - self.step * unit_direction(self.low_pass(grad), self.threat.p))
        return total / steps, steps

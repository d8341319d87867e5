"""SGD-UAP (Shafahi et al., "Universal Adversarial Training", AAAI 2020).

Per mini-batch, v follows the gradient of an objective on clip(x + v) (``attack.loss``, see
:mod:`uap_lightning.attacks.losses`): by default the paper's clipped cross-entropy: untargeted,
it raises mean(min(CE(logits, clean label), beta)), so images already far past the boundary stop
pulling; targeted, it lowers mean(max(CE(logits, target), floor)), so images already confidently
at the target stop pulling. Step sizes are in 0–255 units; v is projected onto the ℓp ball after
every step.

On several processes each rank takes its shard of every global batch of ``batch_size`` images
and the gradients of v are summed over the ranks: the loss is a sum over the rank's images
divided by the global batch size, so the summed gradient is the one-process gradient of the
batch mean (up to float rounding) and every rank takes the same step.
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
from uap_lightning.attacks.projections import unit_direction
from uap_lightning.attacks.settings import AttackSettings
from uap_lightning.attacks.threat import ThreatModel
from uap_lightning.units import to_image_scale

OPTIMIZERS = ("sign", "adam")
SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class SGDOptions(LossOptions):
    """SGD-UAP's settings (the ``attack`` keys of ``attack=sgd_uap``), see :class:`SGDUAP`."""

    batch_size: int = 32
    optimizer: str = "sign"
    step_size: Optional[float] = None  # 0–255 units; None: ε / 10
    lr_schedule: str = "cosine"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size < 1:
            raise ValueError(f"attack.batch_size must be at least 1; got {self.batch_size}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"attack.optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"attack.lr_schedule must be one of {', '.join(SCHEDULES)}; got {self.lr_schedule!r}")
        if self.step_size is not None and not (math.isfinite(self.step_size) and self.step_size > 0):
            raise ValueError(
                f"attack.step_size must be a positive number in 0-255 units or null; got {self.step_size!r}"
            )


@register_engine
class SGDUAP(UniversalAttack):
    """SGD-UAP: per mini-batch of X, a step on v along the gradient of a clipped cross-entropy
    (or another ``loss``), then v projected onto the ℓp ball of radius ε.

    Arguments:
        threat: the ℓp ball, ``ThreatModel.parse(eps, p)`` with ε in 0–255 pixel units.
        clip (bool, True): clip x + v to [0,1].
        target_class (int or None, None): lower the cross-entropy to this class instead.
        max_passes (int, 10): the passes the step-size schedule spans.
        batch_size (int, 32): images per step.
        optimizer (str, "sign"): "sign" takes steps of ℓp length ``step_size`` along the steepest
        direction (the gradient's sign for ℓ∞, the gradient scaled to unit ℓp norm for ℓ2 and
        ℓ1); "adam" runs torch.optim.Adam on v with lr = step_size/255, its moments restarting
        each pass so that a pass depends only on v, its index and the generator.
        step_size (float or None, None): the first step in 0–255 units; None: ε/10.
        lr_schedule (str, "cosine"): "cosine" decays the step to 0 over ``max_passes`` passes,
        "constant" keeps it.
        loss (str, "ce"): the objective, ce (the paper's), cosine (Cos-UAP) or logit_margin (DF-UAP);
        see :mod:`uap_lightning.attacks.losses`. cosine is untargeted only.
        beta (float, 9.0): the cross-entropy clip; images past it stop pulling.
        kappa (float, 10.0): logit_margin's bound κ; images whose margin passes it stop pulling.

    Shape:
        ``run_pass(model, v, images, clean_labels, generator, pass_index)``: v C×H×W and images
        N×C×H×W in [0,1] scale, clean_labels (N,) int64; returns the new v and :class:`PassStats`.

    Example::

        engine = SGDUAP(ThreatModel.parse(10, "inf"), max_passes=5, batch_size=32)
        for k in range(5):
            v, _ = engine.run_pass(model, v, X, clean, generator, pass_index=k)
    """

    name = "sgd_uap"
    Options = SGDOptions
    averages_loss = True

    def __init__(self, threat: ThreatModel, *, max_passes: int = AttackSettings.max_passes, **options: Any) -> None:
        super().__init__(threat, **options)
        check_targeted(self.options.loss, self.target_class)
        if max_passes < 1:
            raise ValueError(f"attack.max_passes must be at least 1; got {max_passes}")
        step = self.options.step_size
        self.step_size = float(step) if step is not None else threat.eps / 10.0  # 0–255 units
        self.max_passes = int(max_passes)
        self.passes_run = 0

    @classmethod
    def from_settings(cls, settings: AttackSettings) -> "SGDUAP":
        """The engine for ``settings``, its schedule spanning ``settings.max_passes`` passes."""
        return cls(
            settings.threat,
            clip=settings.clip,
            target_class=settings.target_class,
            max_passes=settings.max_passes,
            **settings.options,
        )

    def step_at(self, step: int, total_steps: int) -> float:
        """Step size in [0,1] scale at global step ``step`` of ``total_steps``."""
        base = to_image_scale(self.step_size)
        if self.options.lr_schedule == "constant":
            return base
        return base * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))

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
        index = self.passes_run if pass_index is None else pass_index
        self.passes_run = index + 1
        order = torch.randperm(images.shape[0], generator=generator)
        batches = math.ceil(order.numel() / self.options.batch_size)
        total = self.max_passes * batches
        v = v.detach().clone()
        adam = None
        if self.options.optimizer == "adam":
            v.requires_grad_(True)
            adam = torch.optim.Adam([v], lr=self.step_at(index * batches, total))
        for b in range(batches):
            batch = order[b * self.options.batch_size : (b + 1) * self.options.batch_size]
            lr = self.step_at(index * batches + b, total)
            grad = sharded_gradient(
                model,
                v,
                images,
                clean_labels,
                batch,
                self.options,
                reducer,
                target_class=self.target_class,
                clip=self.clip,
            )
            with torch.no_grad():
                if adam is None:
                    v = self.project(v - lr * unit_direction(self.low_pass(grad), self.threat.p))
                else:
                    v.grad = self.low_pass(grad)
                    for group in adam.param_groups:
                        group["lr"] = lr
                    adam.step()
                    v.copy_(self.project(v))
        return v.detach(), PassStats(updates=batches, mean_iterations=0.0)

"""SGD-UAP (Shafahi et al., "Universal Adversarial Training", AAAI 2020).

Per mini-batch, v follows the gradient of a clipped cross-entropy on clip(x + v):
untargeted, it raises mean(min(CE(logits, clean label), beta)), so images already far past
the boundary stop pulling; targeted, it lowers mean(max(CE(logits, target), TARGET_CE_FLOOR)),
so images already confidently at the target (probability ≥ e^-0.1 ≈ 0.9) stop pulling.
Step sizes are in 0–255 units; v is projected onto the ℓp ball after every step.

On several processes each rank takes its shard of every global batch of ``batch_size`` images
and the gradients of v are summed over the ranks: the loss is a sum over the rank's images
divided by the global batch size, so the summed gradient is the one-process gradient of the
batch mean (up to float rounding) and every rank takes the same step.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uap_lightning.attacks.base import PassStats, UniversalAttack
from uap_lightning.attacks.distributed import SINGLE_PROCESS, Reducer, shard
from uap_lightning.attacks.projections import lp_norm
from uap_lightning.attacks.threat import ThreatModel
from uap_lightning.metrics import perturb

OPTIMIZERS = ("sign", "adam")
SCHEDULES = ("cosine", "constant")
TARGET_CE_FLOOR = 0.1


class SGDUAP(UniversalAttack):
    """Gradient steps on v per batch of ``batch_size`` images.

    ``optimizer="sign"`` takes steps of ℓp length ``step_size`` along the steepest direction
    (sign of the gradient for p=inf, the gradient scaled to unit ℓp norm for p=2 and p=1);
    ``"adam"`` runs torch.optim.Adam on v with lr = step_size/255, its moments restarting each
    pass so that a pass depends only on v, its index and the generator. ``step_size``
    (default eps/10) follows ``lr_schedule``: "cosine" decays to 0 over ``max_passes``
    passes, "constant" keeps it.
    """

    name = "sgd_uap"

    def __init__(
        self,
        threat: ThreatModel,
        *,
        clip: bool = True,
        target_class: Optional[int] = None,
        batch_size: int = 32,
        optimizer: str = "sign",
        step_size: Optional[float] = None,
        lr_schedule: str = "cosine",
        beta: float = 9.0,
        max_passes: int = 10,
    ) -> None:
        super().__init__(threat, clip=clip, target_class=target_class)
        if batch_size < 1:
            raise ValueError(f"attack.batch_size must be at least 1; got {batch_size}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"attack.optimizer must be one of {', '.join(OPTIMIZERS)}; got {optimizer!r}")
        if lr_schedule not in SCHEDULES:
            raise ValueError(f"attack.lr_schedule must be one of {', '.join(SCHEDULES)}; got {lr_schedule!r}")
        if step_size is not None and not (math.isfinite(step_size) and step_size > 0):
            raise ValueError(f"attack.step_size must be a positive number in 0-255 units or null; got {step_size!r}")
        if not beta > 0:
            raise ValueError(f"attack.beta must be > 0; got {beta}")
        if max_passes < 1:
            raise ValueError(f"attack.max_passes must be at least 1; got {max_passes}")
        self.batch_size = int(batch_size)
        self.optimizer = optimizer
        self.step_size = float(step_size) if step_size is not None else threat.eps / 10.0
        self.lr_schedule = lr_schedule
        self.beta = float(beta)
        self.max_passes = int(max_passes)
        self.passes_run = 0

    def step_at(self, step: int, total_steps: int) -> float:
        """Step size in [0,1] scale at global step ``step`` of ``total_steps``."""
        base = self.step_size / 255.0
        if self.lr_schedule == "constant":
            return base
        return base * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))

    def loss(self, logits: Tensor, clean_labels: Tensor, batch_size: Optional[int] = None) -> Tensor:
        """The scalar to minimise: −Σ min(CE, beta), or (targeted) Σ max(CE to target, floor), over
        the images of ``logits`` (B×classes), divided by ``batch_size`` (None: B): the batch mean
        when these are all its images."""
        if self.target_class is None:
            terms = -F.cross_entropy(logits, clean_labels, reduction="none").clamp(max=self.beta)
        else:
            target = torch.full_like(clean_labels, self.target_class)
            terms = F.cross_entropy(logits, target, reduction="none").clamp(min=TARGET_CE_FLOOR)
        return terms.sum() / (logits.shape[0] if batch_size is None else batch_size)

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
        batches = math.ceil(order.numel() / self.batch_size)
        total = self.max_passes * batches
        v = v.detach().clone()
        adam = None
        if self.optimizer == "adam":
            v.requires_grad_(True)
            adam = torch.optim.Adam([v], lr=self.step_at(index * batches, total))
        for b in range(batches):
            batch = order[b * self.batch_size : (b + 1) * self.batch_size]
            local = shard(reducer, batch)
            lr = self.step_at(index * batches + b, total)
            if local.numel() > 0:
                x = images[local].to(v.device)
                y = clean_labels[local].to(v.device)
                with torch.enable_grad():
                    u = v.detach().requires_grad_(True)
                    loss = self.loss(model(perturb(x, u, self.clip)), y, batch_size=batch.numel())
                    grad = torch.autograd.grad(loss, u)[0]
            else:  # a last batch smaller than the world: this rank has no image of it
                grad = torch.zeros_like(v)
            grad = reducer.all_reduce_sum(grad)
            with torch.no_grad():
                if adam is None:
                    v = self.project(v - lr * _unit_direction(grad, self.threat.p))
                else:
                    v.grad = grad
                    for group in adam.param_groups:
                        group["lr"] = lr
                    adam.step()
                    v.copy_(self.project(v))
        return v.detach(), PassStats(updates=batches, mean_iterations=0.0)


def _unit_direction(grad: Tensor, p: float) -> Tensor:
    """The steepest-ascent direction of unit ℓp norm: sign(grad) for p=inf, grad/‖grad‖_p else."""
    if p == math.inf:
        return grad.sign()
    return grad / lp_norm(grad.unsqueeze(0), p).clamp_min(torch.finfo(grad.dtype).tiny)

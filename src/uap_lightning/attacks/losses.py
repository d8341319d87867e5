"""The objectives of the gradient engines (``attack.loss``), each a per-image term to minimise.

- ``ce``: the clipped cross-entropy of SGD-UAP (Shafahi et al., AAAI 2020) and SGA (Liu et
  al., ICCV 2023): untargeted −min(CE(z, c), β) with c the clean prediction, so that images already
  past the boundary stop pulling; targeted max(CE(z, t), floor).
- ``cosine``: Cos-UAP (Zhang et al., "Data-free universal adversarial perturbation and black-box
  attack", ICCV 2021): the cosine similarity of the perturbed logits z(x + v) and the clean
  logits z(x); minimising it turns the logit vector away from the clean one. Untargeted only.
- ``logit_margin``: DF-UAP's bounded logit loss (Zhang et al., "Understanding adversarial examples
  from the mutual influence of images and perturbations", CVPR 2020,
  its "bounded logit" loss with confidence κ, published default 10): untargeted
  max(z_c − max_{i≠c} z_i, −κ), targeted max(max_{i≠t} z_i − z_t, −κ); an image contributes
  nothing once its margin passes κ.

Logits are B×K; labels (B,) int64. Every function returns the B per-image terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uap_lightning.attacks.distributed import Reducer, shard
from uap_lightning.attacks.ensemble import member_outputs
from uap_lightning.metrics import perturb

LOSSES = ("ce", "cosine", "logit_margin")
UNTARGETED_ONLY = ("cosine",)
TARGET_CE_FLOOR = 0.1  # targeted ce: images at the target with probability ≥ e^-0.1 ≈ 0.9 stop pulling


def check_loss(loss: str, beta: float, kappa: float) -> None:
    """ValueError naming the ``attack.`` key of a loss name or parameter out of range."""
    if loss not in LOSSES:
        raise ValueError(f"attack.loss must be one of {', '.join(LOSSES)}; got {loss!r}")
    if not beta > 0:
        raise ValueError(f"attack.beta must be > 0; got {beta}")
    if not kappa >= 0:
        raise ValueError(f"attack.kappa must be >= 0; got {kappa}")


@dataclass(frozen=True)
class LossOptions:
    """The ``attack`` keys that choose a gradient engine's objective: ``loss`` (ce, cosine or
    logit_margin), ``beta`` (the cross-entropy clip of ce) and ``kappa`` (logit_margin's bound)."""

    loss: str = "ce"
    beta: float = 9.0
    kappa: float = 10.0

    def __post_init__(self) -> None:
        check_loss(self.loss, self.beta, self.kappa)


def check_targeted(loss: str, target_class: Optional[int]) -> None:
    """ValueError when ``loss`` has no targeted form and a target class is set."""
    if target_class is not None and loss in UNTARGETED_ONLY:
        raise ValueError(
            f"attack.loss={loss} is untargeted (it turns the logits away from the clean ones, towards no class); "
            "with attack.target_class use attack.loss=ce or attack.loss=logit_margin"
        )


def clipped_cross_entropy(logits: Tensor, labels: Tensor, beta: float, target_class: Optional[int]) -> Tensor:
    """−min(CE(z, labels), β), or (targeted) max(CE(z, target), TARGET_CE_FLOOR)."""
    if target_class is None:
        return -F.cross_entropy(logits, labels, reduction="none").clamp(max=beta)
    target = torch.full_like(labels, target_class)
    return F.cross_entropy(logits, target, reduction="none").clamp(min=TARGET_CE_FLOOR)


def logit_cosine(logits: Tensor, clean_logits: Tensor) -> Tensor:
    """cos(z(x + v), z(x)) per image; ``clean_logits`` carry no gradient."""
    return F.cosine_similarity(logits, clean_logits.detach(), dim=1)


def bounded_logit_margin(logits: Tensor, labels: Tensor, kappa: float, target_class: Optional[int]) -> Tensor:
    """max(z_c − max_{i≠c} z_i, −κ) for the clean label c, or (targeted) max(max_{i≠t} z_i − z_t, −κ)."""
    reference = labels if target_class is None else torch.full_like(labels, target_class)
    own = logits.gather(1, reference.unsqueeze(1)).squeeze(1)
    others = logits.masked_fill(F.one_hot(reference, logits.shape[1]).bool(), -torch.inf).amax(dim=1)
    margin = own - others if target_class is None else others - own
    return margin.clamp(min=-kappa)


def loss_terms(
    loss: str,
    logits: Tensor,
    labels: Tensor,
    *,
    clean_logits: Optional[Tensor] = None,
    beta: float = 9.0,
    kappa: float = 10.0,
    target_class: Optional[int] = None,
) -> Tensor:
    """The B per-image terms of ``loss`` (see the module) for perturbed ``logits`` (B×K), the clean
    predictions ``labels`` (B,) and, for ``cosine``, the clean logits (B×K)."""
    if loss == "ce":
        return clipped_cross_entropy(logits, labels, beta, target_class)
    if loss == "cosine":
        if clean_logits is None:
            raise ValueError("loss=cosine needs the clean logits")
        return logit_cosine(logits, clean_logits)
    if loss == "logit_margin":
        return bounded_logit_margin(logits, labels, kappa, target_class)
    raise ValueError(f"attack.loss must be one of {', '.join(LOSSES)}; got {loss!r}")


def perturbed_loss(
    model: nn.Module,
    images: Tensor,
    v: Tensor,
    labels: Tensor,
    options: LossOptions,
    *,
    target_class: Optional[int],
    clip: bool,
    batch_size: Optional[int] = None,
) -> Tensor:
    """The scalar to minimise on clip(images + v): the per-image terms of ``options.loss`` summed
    and divided by ``batch_size`` (None: B), i.e. the batch mean when these are all its images;
    for an :class:`~uap_lightning.attacks.ensemble.Ensemble` the terms are averaged over its members.
    ``images`` B×C×H×W and v C×H×W in [0,1] scale; ``labels`` the clean predictions (B,)."""
    clean_logits: List[Tensor] = []
    if options.loss == "cosine":
        with torch.no_grad():
            clean_logits = member_outputs(model, images)
    perturbed = member_outputs(model, perturb(images, v, clip))
    terms = cast(
        Tensor,
        sum(
            loss_terms(
                options.loss,
                logits,
                labels,
                clean_logits=clean_logits[m] if clean_logits else None,
                beta=options.beta,
                kappa=options.kappa,
                target_class=target_class,
            )
            for m, logits in enumerate(perturbed)
        ),
    ) / len(perturbed)
    return terms.sum() / (images.shape[0] if batch_size is None else batch_size)


def sharded_gradient(
    model: nn.Module,
    v: Tensor,
    images: Tensor,
    labels: Tensor,
    chosen: Tensor,
    options: LossOptions,
    reducer: Reducer,
    *,
    target_class: Optional[int],
    clip: bool,
) -> Tensor:
    """∇_v (C×H×W) of the mean loss over the images ``chosen`` (indices into ``images``, N×C×H×W,
    with clean predictions ``labels``), each rank taking its shard and the gradients summed over
    the ranks, so that every rank gets the one-process gradient of the mean."""
    local = shard(reducer, chosen)
    if local.numel() > 0:
        x = images[local].to(v.device)
        y = labels[local].to(v.device)
        with torch.enable_grad():
            u = v.detach().requires_grad_(True)
            loss = perturbed_loss(
                model, x, u, y, options, target_class=target_class, clip=clip, batch_size=chosen.numel()
            )
            grad = torch.autograd.grad(loss, u)[0]
    else:  # fewer images than ranks: this rank has none of them
        grad = torch.zeros_like(v)
    return reducer.all_reduce_sum(grad)

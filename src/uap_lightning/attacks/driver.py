"""The pass loop shared by the Python API and the Lightning attack loop.

Runs engine passes over the attack set X until the fooling rate on X (targeted: the
targeted success rate) reaches 1 − delta or ``max_passes`` passes have run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
from torch import Tensor, nn

from uap_lightning import metrics
from uap_lightning.attacks.base import PassStats, UniversalAttack
from uap_lightning.attacks.model_state import folded_copy, frozen_eval, model_device

PassCallback = Callable[[int, Tensor, PassStats, float], None]


@dataclass
class UAPResult:
    """A universal perturbation (C×H×W, [0,1] scale, CPU) and how it was found.

    ``fooling_rate`` is measured on X (targeted: targeted success rate); ``history`` has one
    dict per pass run by this call; ``converged`` means the rate reached 1 − delta.
    """

    perturbation: Tensor
    fooling_rate: float
    history: List[dict] = field(default_factory=list)
    passes: int = 0
    converged: bool = False


def attack_set_rate(
    model: nn.Module,
    images: Tensor,
    clean_labels: Tensor,
    v: Tensor,
    *,
    clip: bool = True,
    target_class: Optional[int] = None,
    batch_size: int = 512,
) -> float:
    """Fooling rate of v on ``images`` (targeted: share of non-target images sent to the target)."""
    perturbed = metrics.predict(model, images, v, batch_size=batch_size, clip=clip)
    clean = clean_labels.to(perturbed.device)
    if target_class is None:
        return metrics.fooling_rate(clean, perturbed)
    return metrics.targeted_success_rate(clean, perturbed, target_class)


def run_passes(
    model: nn.Module,
    engine: UniversalAttack,
    images: Tensor,
    clean_labels: Tensor,
    *,
    delta: float,
    max_passes: int,
    generator: Optional[torch.Generator],
    eval_batch_size: int = 512,
    clip: bool = True,
    target_class: Optional[int] = None,
    initial: Optional[Tensor] = None,
    on_pass_end: Optional[PassCallback] = None,
    start_pass: int = 0,
) -> UAPResult:
    """Run passes of ``engine`` on X = ``images`` (N×C×H×W in [0,1]) with clean predictions (N,).

    v starts at ``initial`` (C×H×W) or zeros; passes are numbered from ``start_pass`` + 1, up to
    ``max_passes`` in all. After each pass the rate on X is measured, a history entry
    (pass, fooling_rate_attack_set, updates, mean_deepfool_iterations, seconds of the pass and
    its evaluation) appended and ``on_pass_end(pass, v, stats, rate)`` called. The model is
    kept in eval mode with frozen parameters meanwhile; the engine runs on its batch-norm-folded
    copy (:func:`folded_copy`).
    """
    if engine.clip != clip or engine.target_class != target_class:
        raise ValueError(
            f"engine built with clip={engine.clip}, target_class={engine.target_class} "
            f"but run_passes called with clip={clip}, target_class={target_class}; pass the same values to both"
        )
    if not 0.0 < delta < 1.0:
        raise ValueError(f"attack.delta must be in (0, 1); got {delta}")
    device = model_device(model)
    if initial is None:
        v = torch.zeros(images.shape[1:], dtype=images.dtype, device=device)
    else:
        if tuple(initial.shape) != tuple(images.shape[1:]):
            raise ValueError(
                f"initial perturbation has shape {tuple(initial.shape)}; expected {tuple(images.shape[1:])}"
            )
        v = initial.detach().to(device=device, dtype=images.dtype).clone()
    history: List[dict] = []
    passes = start_pass
    with frozen_eval(model):
        model = folded_copy(model)
        rate = attack_set_rate(
            model, images, clean_labels, v, clip=clip, target_class=target_class, batch_size=eval_batch_size
        )
        while rate < 1.0 - delta and passes < max_passes:
            started = time.perf_counter()
            v, stats = engine.run_pass(model, v, images, clean_labels, generator, pass_index=passes)
            rate = attack_set_rate(
                model, images, clean_labels, v, clip=clip, target_class=target_class, batch_size=eval_batch_size
            )
            passes += 1
            history.append(
                {
                    "pass": passes,
                    "fooling_rate_attack_set": rate,
                    "updates": stats.updates,
                    "mean_deepfool_iterations": stats.mean_iterations,
                    "seconds": time.perf_counter() - started,
                }
            )
            if on_pass_end is not None:
                on_pass_end(passes, v, stats, rate)
    return UAPResult(
        perturbation=v.detach().cpu(),
        fooling_rate=rate,
        history=history,
        passes=passes,
        converged=rate >= 1.0 - delta,
    )

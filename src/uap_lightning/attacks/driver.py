"""The pass loop shared by the Python API and the Lightning attack loop.

Runs engine passes over the attack set X until the fooling rate on X (targeted: the
targeted success rate) reaches 1 − delta or ``max_passes`` passes have run, in one process or
(with a reducer) on several, each rank running the same loop on the same X.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
from torch import Tensor, nn

from uap_lightning import metrics
from uap_lightning.attacks import distributed
from uap_lightning.attacks.augment import crop_flip
from uap_lightning.attacks.base import PassStats, UniversalAttack
from uap_lightning.attacks.distributed import SINGLE_PROCESS, Reducer
from uap_lightning.attacks.model_state import CompiledPredictions, folded_copy, frozen_eval, model_device

KEEP_CHOICES = ("best", "last")


@dataclass
class KeptPerturbation:
    """The perturbation an attack returns: the best (or last) after a pass, with its rate on X
    and its pass (1-based; 0 for the starting point)."""

    perturbation: Tensor
    fooling_rate: float
    pass_index: int


@dataclass
class PassReport:
    """What ``on_pass_end`` receives after each pass: v after it, the pass's statistics, the
    rate of v on X and the perturbation kept so far."""

    pass_index: int
    perturbation: Tensor
    stats: PassStats
    fooling_rate: float
    kept: KeptPerturbation


PassCallback = Callable[[PassReport], None]


@dataclass
class UAPResult:
    """A universal perturbation (C×H×W, [0,1] scale, CPU) and how it was found.

    ``perturbation`` is the kept one (``keep="best"``: the pass with the highest rate on X,
    the earliest on ties; ``"last"``: the last pass), ``fooling_rate`` its rate on X
    (targeted: targeted success rate) and ``best_pass`` its pass; ``last_perturbation`` is
    v after the last pass. ``history`` has one dict per pass run by this call;
    ``converged`` means the rate reached 1 − delta.
    """

    perturbation: Tensor
    fooling_rate: float
    history: List[dict] = field(default_factory=list)
    passes: int = 0
    converged: bool = False
    best_pass: int = 0
    last_perturbation: Optional[Tensor] = None


def attack_set_rate(
    model: nn.Module,
    images: Tensor,
    clean_labels: Tensor,
    v: Tensor,
    *,
    clip: bool = True,
    target_class: Optional[int] = None,
    batch_size: int = 512,
    reducer: Optional[Reducer] = None,
) -> float:
    """Fooling rate of v on ``images`` (targeted: share of non-target images sent to the target);
    with a ``reducer`` each rank predicts its shard and every rank gets the rate on all images."""
    perturbed = distributed.predict(model, images, v, reducer=reducer, batch_size=batch_size, clip=clip)
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
    keep: str = "best",
    initial: Optional[Tensor] = None,
    start_pass: int = 0,
    kept: Optional[KeptPerturbation] = None,
    on_pass_end: Optional[PassCallback] = None,
    reducer: Optional[Reducer] = None,
    compile: bool = False,
    augment: bool = False,
) -> UAPResult:
    """Run passes of ``engine`` on X = ``images`` (N×C×H×W in [0,1]) with clean predictions (N,).

    v starts at ``initial`` (C×H×W) or zeros; passes are numbered from ``start_pass`` + 1, up to
    ``max_passes`` in all; ``kept`` carries the kept perturbation of earlier passes when
    resuming. After each pass the rate on X is measured, the kept perturbation updated
    (``keep``: "best" or "last"; selection looks at X only), a history entry (pass,
    fooling_rate_attack_set, updates, mean_deepfool_iterations, seconds of the pass and its
    evaluation) appended and ``on_pass_end(PassReport)`` called. The model is kept in eval
    mode with frozen parameters meanwhile; the engine runs on its batch-norm-folded copy
    (:func:`folded_copy`), whose predictions run compiled when ``compile``
    (:class:`CompiledPredictions`; the compilation time counts in the passes' seconds).
    With ``augment`` each pass works on a new random crop and flip of every image of X
    (:func:`~uap_lightning.attacks.augment.crop_flip`, drawn from ``generator``) with the model's
    clean predictions on them; the rate on X, the stop and the kept pass stay on X itself.

    With a ``reducer`` of world size > 1 every rank calls this with the same arguments: the engine
    shares its passes (it gets the reducer; engines whose ``run_pass`` takes none run in one
    process only), the rate on X is shared, and after each pass every rank takes rank 0's v, so
    the ranks agree even where GPU kernels are not bitwise reproducible.
    """
    reducer = reducer or SINGLE_PROCESS
    shared = {} if reducer.world_size == 1 else {"reducer": reducer}
    if engine.clip != clip or engine.target_class != target_class:
        raise ValueError(
            f"engine built with clip={engine.clip}, target_class={engine.target_class} "
            f"but run_passes called with clip={clip}, target_class={target_class}; pass the same values to both"
        )
    if not 0.0 < delta < 1.0:
        raise ValueError(f"attack.delta must be in (0, 1); got {delta}")
    if keep not in KEEP_CHOICES:
        raise ValueError(f"attack.keep must be one of {', '.join(KEEP_CHOICES)}; got {keep!r}")
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
        if compile:
            model = CompiledPredictions(model)

        def rate_on_x(v: Tensor) -> float:
            return attack_set_rate(
                model, images, clean_labels, v, clip=clip, target_class=target_class, batch_size=eval_batch_size,
                reducer=reducer,
            )

        rate = rate_on_x(v)
        if kept is None:
            kept = KeptPerturbation(v.detach().cpu(), rate, passes)
        while rate < 1.0 - delta and passes < max_passes:
            started = time.perf_counter()
            seen, seen_labels = images, clean_labels
            if augment:
                seen = crop_flip(images, generator)
                seen_labels = distributed.predict(model, seen, reducer=reducer, batch_size=eval_batch_size)
            v, stats = engine.run_pass(model, v, seen, seen_labels, generator, pass_index=passes, **shared)
            v = reducer.broadcast(v)
            rate = rate_on_x(v)
            passes += 1
            if keep == "last" or rate > kept.fooling_rate or kept.pass_index == 0:
                kept = KeptPerturbation(v.detach().cpu(), rate, passes)
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
                on_pass_end(PassReport(passes, v, stats, rate, kept))
    return UAPResult(
        perturbation=kept.perturbation,
        fooling_rate=kept.fooling_rate,
        history=history,
        passes=passes,
        converged=rate >= 1.0 - delta,
        best_pass=kept.pass_index,
        last_perturbation=v.detach().cpu(),
    )

"""The pass loop shared by the Python API and the Lightning attack loop.

Runs engine passes over the attack set X until the fooling rate on X (targeted: the
targeted success rate) reaches 1 − delta or ``max_passes`` passes have run, in one process or
(with a reducer) on several, each rank running the same loop on the same X.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, cast

import torch
from torch import Tensor, nn

from uap_lightning import metrics
from uap_lightning.attacks import distributed
from uap_lightning.attacks.augment import crop_flip
from uap_lightning.attacks.base import PassStats, UniversalAttack, ensemble_engines
from uap_lightning.attacks.distributed import SINGLE_PROCESS, Reducer
from uap_lightning.attacks.ensemble import Ensemble
from uap_lightning.attacks.input_diversity import DiverseInputs
from uap_lightning.attacks.model_state import compiled_predictions, folded_copy, frozen_eval, model_device
from uap_lightning.attacks.projections import check_resolution
from uap_lightning.attacks.settings import AttackSettings
from uap_lightning.errors import NonFiniteError


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
    ``converged`` means the rate reached 1 − delta. ``compute_uap`` adds, measured on its images: v's
    fooling rate (also in targeted mode), the random baselines' and ``beats_random``.
    """

    perturbation: Tensor
    fooling_rate: float
    history: List[Dict[str, Any]] = field(default_factory=list)
    passes: int = 0
    converged: bool = False
    best_pass: int = 0
    last_perturbation: Optional[Tensor] = None
    # measured by compute_uap on its images (None where it had none, or was asked not to)
    fooling_rate_attack_set: Optional[float] = None
    random_fooling_rate: Optional[float] = None
    random_same_l2_fooling_rate: Optional[float] = None
    beats_random: Optional[bool] = None


def attack_set_rate(
    model: nn.Module,
    images: Tensor,
    clean_labels: Tensor,
    v: Tensor,
    settings: AttackSettings,
    reducer: Optional[Reducer] = None,
) -> float:
    """Fooling rate of v on ``images`` (targeted: share of non-target images sent to the target);
    with a ``reducer`` each rank predicts its shard and every rank gets the rate on all images."""
    perturbed = distributed.predict(
        model,
        images,
        v,
        reducer=reducer,
        batch_size=settings.eval_batch_size,
        clip=settings.clip,
        precision=settings.precision,
    )
    clean = clean_labels.to(perturbed.device)
    if settings.target_class is None:
        return metrics.fooling_rate(clean, perturbed)
    return metrics.targeted_success_rate(clean, perturbed, settings.target_class)


def check_takes(engine: UniversalAttack, model: nn.Module) -> None:
    """ValueError when ``model`` is an :class:`Ensemble` and ``engine`` cannot attack one."""
    if isinstance(model, Ensemble) and not engine.averages_loss:
        raise ValueError(
            f"attack.method={engine.name} cannot attack an ensemble of victims (its step follows one network); "
            f"use one of {', '.join(ensemble_engines())}, or a single victim"
        )


def with_input_diversity(model: nn.Module, probability: float, generator: torch.Generator) -> nn.Module:
    """``model`` whose gradient passes see diverse inputs (:class:`DiverseInputs`) drawn from
    ``generator``, each member's for an :class:`Ensemble`; ``model`` itself when ``probability`` is 0."""
    if probability <= 0:
        return model
    if isinstance(model, Ensemble):
        return model.map_members(lambda member: DiverseInputs(member, probability, generator))
    return DiverseInputs(model, probability, generator)


def run_passes(
    model: nn.Module,
    settings: AttackSettings,
    images: Optional[Tensor],
    clean_labels: Optional[Tensor],
    *,
    image_shape: Optional[Sequence[int]] = None,
    generator: Optional[torch.Generator] = None,
    initial: Optional[Tensor] = None,
    start_pass: int = 0,
    kept: Optional[KeptPerturbation] = None,
    on_pass_end: Optional[PassCallback] = None,
    reducer: Optional[Reducer] = None,
) -> UAPResult:
    """Run passes of the engine of ``settings`` on X = ``images`` (N×C×H×W in [0,1]) with clean
    predictions (N,), until the rate on X reaches 1 − δ or ``settings.max_passes`` passes ran.

    The order of X and the attack's randomness come from ``generator`` (default: seeded with
    ``settings.seed``; the loop hands over its own to save and restore its state). v starts at
    ``initial`` (C×H×W) or zeros; passes are numbered from ``start_pass`` + 1; ``kept`` carries the
    kept perturbation of earlier passes when resuming. After each pass the rate on X is measured,
    the kept perturbation updated (``settings.keep``: "best" or "last"; selection looks at X
    only), a history entry (pass, the rate on X under ``settings.rate_on_x_key``, updates,
    mean_inner_iterations, seconds of the pass and its evaluation) appended and ``on_pass_end(PassReport)`` called. The
    model is kept in eval mode with frozen parameters meanwhile; the engine runs on its
    batch-norm-folded copy (:func:`folded_copy`), whose predictions run compiled when
    ``settings.compile`` (:class:`CompiledPredictions`; compiling counts in the passes' seconds).
    With ``settings.augment`` each pass works on a new random crop and flip of every image of X
    (:func:`~uap_lightning.attacks.augment.crop_flip`, drawn from the generator) with the model's
    clean predictions on them; the rate on X, the stop and the kept pass stay on X itself. With
    ``settings.input_diversity`` the engine's gradient passes see randomly resized and padded
    batches (:mod:`~uap_lightning.attacks.input_diversity`, drawn from the generator); ``model`` may be an
    :class:`Ensemble` for the engines that take one (ValueError for the others). ``settings.precision``
    runs the victim under autocast in the passes and the rate on X (v stays float32).

    With a ``reducer`` of world size > 1 every rank calls this with the same arguments: the engine
    shares its passes (it gets the reducer; engines whose ``run_pass`` takes none run in one
    process only), the rate on X is shared, and after each pass every rank takes rank 0's v, so
    the ranks agree even where GPU kernels are not bitwise reproducible.

    Without X (``images`` and ``clean_labels`` None, for an engine that reads no images, such as
    ``gd_uap`` with a data-free prior) v is C×H×W = ``image_shape``, there is no rate on X (NaN in
    the history), the last pass is kept, and the attack stops when a pass reports
    ``PassStats.converged`` or after ``settings.max_passes`` passes. An engine that computes v in
    one pass (``one_pass``, such as ``sv_uap``) stops after it.
    """
    engine = settings.engine()
    check_takes(engine, model)
    data_free = images is None
    if data_free and engine.reads_images:
        raise ValueError(f"attack.method={settings.method} reads the attack set X with these options; give images")
    generator = settings.generator() if generator is None else generator
    reducer = reducer or SINGLE_PROCESS
    shared = {} if reducer.world_size == 1 else {"reducer": reducer}
    v = starting_perturbation(images, image_shape, initial, model_device(model))
    check_resolution(settings.resolution, tuple(v.shape))
    stop = StopRule(engine, settings.delta, data_free)
    history: List[Dict[str, Any]] = []
    passes = start_pass
    with frozen_eval(model):
        model = folded_copy(model)
        if settings.compile:
            model = compiled_predictions(model)
        attacked = with_input_diversity(model, settings.input_diversity, generator)

        def rate_on_x(v: Tensor) -> float:
            if images is None:
                return math.nan
            return attack_set_rate(model, images, cast(Tensor, clean_labels), v, settings, reducer)

        rate, stats = rate_on_x(v), None
        if kept is None:
            kept = KeptPerturbation(v.detach().cpu(), rate, passes)
        while not stop(rate, stats) and passes < settings.max_passes:
            started = time.perf_counter()
            seen, seen_labels = pass_images(model, images, clean_labels, settings, generator, reducer)
            with metrics.precision_context(settings.precision, v.device):
                # without X both are None, given to an engine that reads no images
                v, stats = engine.run_pass(
                    attacked, v, cast(Tensor, seen), cast(Tensor, seen_labels), generator, pass_index=passes, **shared
                )
            v = reducer.broadcast(v)
            check_finite(v, settings.method, passes + 1)
            rate = rate_on_x(v)
            passes += 1
            if settings.keep == "last" or data_free or rate > kept.fooling_rate or kept.pass_index == 0:
                kept = KeptPerturbation(v.detach().cpu(), rate, passes)
            history.append(
                {
                    "pass": passes,
                    settings.rate_on_x_key: rate,
                    "updates": stats.updates,
                    "mean_inner_iterations": stats.mean_iterations,
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
        converged=stop(rate, stats),
        best_pass=kept.pass_index,
        last_perturbation=v.detach().cpu(),
    )


def starting_perturbation(
    images: Optional[Tensor], image_shape: Optional[Sequence[int]], initial: Optional[Tensor], device: torch.device
) -> Tensor:
    """v before the first pass, on ``device``: ``initial`` (C×H×W) or zeros, of X's image shape
    (``image_shape`` without X) and dtype (float32 without X); ValueError for another shape."""
    shape = tuple(cast(Sequence[int], image_shape)) if images is None else tuple(images.shape[1:])
    dtype = torch.float32 if images is None else images.dtype
    if initial is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    if tuple(initial.shape) != shape:
        raise ValueError(f"initial perturbation has shape {tuple(initial.shape)}; expected {shape}")
    return initial.detach().to(device=device, dtype=dtype).clone()


@dataclass(frozen=True)
class StopRule:
    """When the passes stop: after the first pass of a ``one_pass`` engine; without X (data-free)
    when a pass reports ``PassStats.converged``; otherwise when the rate on X reaches 1 − ``delta``."""

    engine: UniversalAttack
    delta: float
    data_free: bool

    def __call__(self, rate: float, stats: Optional[PassStats]) -> bool:
        if self.engine.one_pass and stats is not None:
            return True
        if self.data_free:
            return stats is not None and stats.converged
        return rate >= 1.0 - self.delta


def pass_images(
    model: nn.Module,
    images: Optional[Tensor],
    clean_labels: Optional[Tensor],
    settings: AttackSettings,
    generator: torch.Generator,
    reducer: Reducer,
) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """The images a pass works on and the model's clean labels on them: X itself, or with
    ``settings.augment`` a new random crop and flip of every image of X drawn from ``generator``
    (:func:`~uap_lightning.attacks.augment.crop_flip`) with the model's predictions on them."""
    if not settings.augment or images is None:
        return images, clean_labels
    seen = crop_flip(images, generator)
    labels = distributed.predict(
        model, seen, reducer=reducer, batch_size=settings.eval_batch_size, precision=settings.precision
    )
    return seen, labels


def check_finite(v: Tensor, method: str, pass_index: int) -> None:
    """NonFiniteError when ``v`` after pass ``pass_index`` (1-based) holds NaN or infinite values."""
    if not bool(torch.isfinite(v).all()):
        raise NonFiniteError(
            f"attack.method={method} produced a perturbation with NaN or infinite values in pass "
            f"{pass_index}: the victim's outputs or gradients are not finite"
        )

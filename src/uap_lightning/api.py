"""The public Python API: compute a universal perturbation, measure its fooling rate.

Images are float tensors in [0,1], N×C×H×W (or a DataLoader yielding such batches, alone
or as the first item of a tuple); ``eps`` is in 0–255 pixel units for every p; the
perturbation is C×H×W in [0,1] scale.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import re
import warnings
from collections.abc import Iterable
from typing import Any, Iterator, Optional, Sequence, Tuple, Union, cast

import torch
from torch import Tensor, nn

from uap_lightning import metrics
from uap_lightning.attacks.base import checked_target_class
from uap_lightning.attacks.driver import PassCallback, UAPResult, check_takes, run_passes
from uap_lightning.attacks.ensemble import Ensemble, resized
from uap_lightning.attacks.model_state import frozen_eval, model_device
from uap_lightning.attacks.projections import check_resolution
from uap_lightning.attacks.settings import AttackSettings
from uap_lightning.attacks.threat import ThreatModel
from uap_lightning.baselines import MARGIN, random_baselines
from uap_lightning.errors import NonFiniteError
from uap_lightning.progress import PassProgress
from uap_lightning.report.summary import BUDGET_FULL

Images = Union[Tensor, Iterable]
RANGE_TOLERANCE = 1e-4


def compute_uap(
    model: Union[nn.Module, Sequence[nn.Module]],
    images: Optional[Images],
    *,
    eps: float,
    p: Union[str, float] = "inf",
    method: str = AttackSettings.method,
    delta: float = AttackSettings.delta,
    max_passes: int = AttackSettings.max_passes,
    keep: str = AttackSettings.keep,
    seed: int = AttackSettings.seed,
    clip: bool = AttackSettings.clip,
    target_class: Optional[int] = None,
    augment: bool = AttackSettings.augment,
    eval_batch_size: int = AttackSettings.eval_batch_size,
    compile: bool = AttackSettings.compile,
    input_diversity: float = AttackSettings.input_diversity,
    resolution: Optional[int] = AttackSettings.resolution,
    precision: str = AttackSettings.precision,
    image_shape: Optional[Tuple[int, int, int]] = None,
    eps_scale: int = 255,
    verbose: bool = False,
    baselines: bool = True,
    **options,
) -> UAPResult:
    """A universal perturbation of ``model`` (images in [0,1] → logits) on the attack set ``images``.

    ``model`` may be a list of victims (or an :class:`~uap_lightning.attacks.Ensemble`, which also
    gives each member its own input size): one v against all of them, the loss averaged over them,
    for the engines that take an ensemble (``uap_lightning.attacks.ensemble_engines()``).

    ``eps`` is in 0–255 pixel units for every ``p`` (``eps_scale=1``: in [0,1] image scale, the habit
    of other toolkits; an ε below one 8-bit level in 0–255 units warns). Stops when the fooling rate on ``images``
    (targeted: the targeted success rate) reaches 1 − ``delta`` or after ``max_passes`` passes
    and returns the pass with the highest rate on ``images`` (``keep="last"``: the last pass);
    ``augment`` shows each pass a new random crop and flip of every image; ``compile`` runs the
    attack's predictions through ``torch.compile``; ``input_diversity`` (probability, e.g. 0.5) shows
    the gradient steps randomly resized and padded batches and ``resolution`` keeps v a
    resolution×resolution image upsampled (both for transfer; gradient engines only); ``precision``
    ("32", "bf16" or "16") runs the model under autocast (v stays float32); ``verbose`` draws a progress bar over passes
    (on stderr) with the rate on ``images``. ``method`` names an engine
    (``uap_lightning.attacks.ENGINES``: deepfool_uap, deepfool_uap_batched, sgd_uap, ...);
    ``options`` are its own settings (e.g. overshoot, batch_size, step_size). Runs on the model's
    device (images stay where they are and move batch by batch); the model's mode and parameter
    flags are restored afterwards; the result depends only on the inputs and ``seed``.

    With images, the result also carries the random baselines measured on them
    (``random_fooling_rate``: random noise of norm ε; ``random_same_l2_fooling_rate``: a random
    direction with v's ℓ2 norm; means of 5 seeded draws), v's own ``fooling_rate_attack_set`` and
    ``beats_random`` (v beats the stronger by 0.05), and a UserWarning says when it does not, or
    when the model predicts one class for every image (``baselines=False`` skips the 10 extra
    predictions of the images).

    ``images=None`` runs a data-free engine (``method="gd_uap"`` with ``prior`` none or range) on
    the model alone: give ``image_shape`` (C, H, W); it stops when the engine reports that v has
    settled or after ``max_passes`` passes, and returns the last pass.
    """
    keywords = dict(locals())  # the settings' fields by name, for AttackSettings.from_values
    with api_names():
        settings = AttackSettings.from_values(threat_of(eps, p, eps_scale), keywords, options)
        # a list or tuple of victims is the only sequence compute_uap takes
        victim = Ensemble(model) if isinstance(model, (list, tuple)) else cast(nn.Module, model)
        check_takes(settings.engine(), victim)
    if images is None:
        settings.threat.check_fits(image_shape or (), eps_key="eps")
        with pass_bar(settings, verbose) as on_pass_end:
            return _data_free(victim, settings, image_shape, on_pass_end)
    x = as_images(images, victim)
    settings.threat.check_fits(x.shape[1:], eps_key="eps")
    with api_names():
        check_resolution(settings.resolution, x.shape[1:])
    with frozen_eval(victim):
        classes = check_logits(victim, x)
        checked_target_class(target_class, classes, key="target_class")
        clean = metrics.predict(victim, x, batch_size=settings.eval_batch_size, clip=settings.clip)
        warn_constant_victim(clean, classes)
        with pass_bar(settings, verbose) as on_pass_end:
            result = run_passes(victim, settings, x, clean, on_pass_end=on_pass_end)
        if baselines:
            judge_against_random(result, victim, x, clean, settings)
    return result


@contextlib.contextmanager
def api_names() -> Iterator[None]:
    """Inside, a ValueError or TypeError about a setting names it as compute_uap's keyword
    (``step_size``), not as the command line's key (``attack.step_size``)."""
    try:
        yield
    except (ValueError, TypeError) as err:
        message = re.sub(r"\battack\.", "", str(err))
        raise type(err)(message.replace("does not take option(s)", "does not take the keyword(s)")) from None


def warn_constant_victim(clean: Tensor, classes: int) -> None:
    """A UserWarning when ``model`` gives every image of X (``clean``, N predictions) one class:
    an untrained or broken victim, whose fooling rates mean nothing."""
    if clean.numel() >= 10 and bool((clean == clean[0]).all()):
        warnings.warn(
            f"the model predicts class {int(clean[0])} of {classes} for all {clean.numel()} images: an untrained or "
            "broken victim (or images it was not made for), so any fooling rate measured on it means nothing; "
            "attack a trained classifier that takes these [0,1] images (normalisation inside it, e.g. "
            "torch.nn.Sequential(uap_lightning.Normalize(mean, std), net))",
            UserWarning,
            stacklevel=3,
        )


def judge_against_random(
    result: UAPResult, model: nn.Module, x: Tensor, clean: Tensor, settings: AttackSettings
) -> None:
    """Measure the random baselines on X into ``result`` (``random_fooling_rate``,
    ``random_same_l2_fooling_rate``, ``fooling_rate_attack_set``, ``beats_random``) and warn
    (UserWarning) when the perturbation does not beat them, saying what to try with compute_uap's keywords."""

    def predict(noise: Tensor) -> Tensor:
        return metrics.predict(model, x, noise, batch_size=settings.eval_batch_size, clip=settings.clip)

    fooling = metrics.fooling_rate(clean, predict(result.perturbation.to(x.dtype)))
    found = random_baselines(predict, clean, x.shape[1:], settings.threat, result.perturbation, seed=settings.seed + 1)
    result.fooling_rate_attack_set = fooling
    result.random_fooling_rate = found.same_norm
    result.random_same_l2_fooling_rate = found.same_l2
    result.beats_random = found.beaten_by(fooling)
    if result.beats_random:
        return
    threat = settings.threat
    used = float(torch.linalg.vector_norm(result.perturbation.flatten().double(), ord=threat.p)) / threat.radius
    fixes = []
    if not result.converged:
        fixes.append(f"more passes (max_passes={max(10, 2 * result.passes)})")
    fixes.append(f"more images (it saw {x.shape[0]})")
    if settings.method != "sgd_uap":
        fixes.append('method="sgd_uap" (the strongest from data here)')
    if used >= BUDGET_FULL:
        fixes.append(f"a larger eps if the threat model allows (eps={threat.eps * 1.5:g})")
    warnings.warn(
        f"the perturbation fools {fooling:.3f} of the images, which does not beat random noise by {MARGIN} (random "
        f"{threat.symbol} noise of norm eps={threat.eps:g}: {found.same_norm:.3f}; a random direction with v's ℓ2 "
        f"norm: {found.same_l2:.3f}); v used {used:.0%} of eps; try: " + "; ".join(fixes),
        UserWarning,
        stacklevel=3,
    )


def threat_of(eps: Any, p: Union[str, float], eps_scale: int) -> ThreatModel:
    """The threat model of an API call: ``eps`` in the units ``eps_scale`` says, checked; warns
    (UserWarning) when ε is under one 8-bit level in 0–255 units."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a number (0–255 pixel units, or [0,1] with eps_scale=1); got {eps!r}")
    threat = ThreatModel.in_units(float(eps), p, eps_scale, eps_key="eps", scale_key="eps_scale")
    if threat.below_one_level:
        warnings.warn(threat.unit_advice("eps", "eps_scale"), UserWarning, stacklevel=3)
    return threat


@contextlib.contextmanager
def pass_bar(settings: AttackSettings, verbose: bool) -> Iterator[Optional[PassCallback]]:
    """Inside, a pass callback drawing the project's pass display as a bar with the rate on X
    (:class:`~uap_lightning.progress.PassProgress`; None when not ``verbose``)."""
    if not verbose:
        yield None
        return
    label = f"{settings.method} passes"
    with PassProgress(label, settings.max_passes, bar=True, rate_name=settings.rate_on_x_name) as display:
        yield display.on_pass_end


def _data_free(
    model: nn.Module,
    settings: AttackSettings,
    image_shape: Optional[Sequence[int]],
    on_pass_end: Optional[PassCallback] = None,
) -> UAPResult:
    """compute_uap without images: a data-free engine on C×H×W = ``image_shape``."""
    if image_shape is None or len(image_shape) != 3 or not all(isinstance(n, int) and n > 0 for n in image_shape):
        raise ValueError(f"images=None needs image_shape=(C, H, W), positive integers; got {image_shape!r}")
    if settings.engine().reads_images:
        raise ValueError(f"method={settings.method} with these options reads images; give images (or prior=none|range)")
    with frozen_eval(model):
        check_logits(model, torch.full((1, *image_shape), 0.5, dtype=_float_dtype(model)))
        return run_passes(model, settings, None, None, image_shape=image_shape, on_pass_end=on_pass_end)


def fooling_rate(
    model: nn.Module, images: Images, perturbation: Tensor, *, clip: bool = True, batch_size: int = 512
) -> float:
    """Share of ``images`` whose predicted label changes when ``perturbation`` (C×H×W, [0,1]
    scale, finite) is added."""
    x = as_images(images, model)
    if not isinstance(perturbation, Tensor):
        raise TypeError(f"perturbation must be a C×H×W tensor; got {type(perturbation).__name__}")
    if tuple(perturbation.shape) != tuple(x.shape[1:]):
        raise ValueError(
            f"perturbation has shape {tuple(perturbation.shape)}; expected C×H×W = {tuple(x.shape[1:])} like the images"
        )
    if not perturbation.is_floating_point() or not bool(torch.isfinite(perturbation).all()):
        raise ValueError("perturbation must hold finite floats (it has NaN or infinite values, or is not float)")
    perturbation = perturbation.to(x.dtype)
    with frozen_eval(model):
        check_logits(model, x)
        clean = metrics.predict(model, x, batch_size=batch_size, clip=clip)
        perturbed = metrics.predict(model, x, perturbation, batch_size=batch_size, clip=clip)
    return metrics.fooling_rate(clean, perturbed)


def as_images(images: Images, model: Optional[nn.Module] = None) -> Tensor:
    """An N×C×H×W float tensor in [0,1] from a tensor or an iterable of batches, cast to the
    floating dtype of ``model``'s parameters (float32 when it has none); ValueError otherwise."""
    if not isinstance(images, Tensor):
        if not isinstance(images, Iterable):
            raise TypeError(f"images must be an N×C×H×W tensor or a DataLoader; got {type(images).__name__}")
        batches = [_images_of(batch) for batch in images]
        if not batches:
            raise ValueError("images: the DataLoader yielded no batches")
        images = torch.cat(batches)
    if images.dim() != 4:
        raise ValueError(f"images must be N×C×H×W (4 dims); got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("images is empty: give at least one image")
    if not images.is_floating_point():
        raise ValueError(f"images must be floats in [0,1]; got dtype {images.dtype} (divide uint8 images by 255)")
    low, high = float(images.min()), float(images.max())
    if not (math.isfinite(low) and math.isfinite(high)) or low < -RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
        raise ValueError(
            f"images must lie in [0,1] (normalisation belongs inside the model); got values in [{low:.4g}, {high:.4g}]"
        )
    return images.detach().to(_float_dtype(model))


def _float_dtype(model: Optional[nn.Module]) -> torch.dtype:
    for tensor in model.parameters() if model is not None else ():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def check_logits(model: nn.Module, images: Tensor) -> int:
    """The number of classes of ``model``, after checking that it maps a batch of ``images`` to an
    N×K logits tensor with K ≥ 2; ValueError saying what it returned otherwise. Each member of an
    :class:`Ensemble` is checked on the images at its own input size."""
    if isinstance(model, Ensemble):
        classes = {check_logits(member, resized(images[:2], size)) for member, size in zip(model.members, model.sizes)}
        if len(classes) != 1:
            raise ValueError(f"the victims of an ensemble must share their classes; they have {sorted(classes)}")
        return classes.pop()
    with torch.no_grad():
        out = model(images[:2].to(model_device(model)))
    if not isinstance(out, Tensor):
        raise ValueError(
            f"the model must return a logits tensor (N×K); it returned a {type(out).__name__}: "
            "wrap it in a module whose forward returns the logits alone"
        )
    if out.dim() != 2 or out.shape[0] != min(2, images.shape[0]) or out.shape[1] < 2:
        raise ValueError(f"the model must return N×K logits with K >= 2 classes; it returned shape {tuple(out.shape)}")
    if not bool(torch.isfinite(out).all()):
        raise NonFiniteError(
            "the model returns NaN or infinite logits on these images: its weights (or the images) hold non-finite "
            "values, so no perturbation can be measured against it"
        )
    return int(out.shape[1])


def _images_of(batch) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise TypeError(f"DataLoader batches must be image tensors or (images, labels); got {type(batch).__name__}")

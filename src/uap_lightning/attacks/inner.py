"""The inner attacks of Algorithm 1: what finds Δv for an image v does not fool yet.

Algorithm 1 (:mod:`uap_lightning.attacks.algorithm_one`) asks its inner attack, for a batch of
images x + v that v does not fool, for a small perturbation Δv per image that fools it, and adds
the successful ones to v before projecting. An inner attack is one :class:`InnerAttack` subclass
decorated with :func:`register_inner`; ``attack.inner=NAME`` selects it. Its settings are the
engine's options (:class:`InnerOptions` holds the keys the inner attacks share).

- ``deepfool`` (default): the paper's choice, DeepFool's minimal step to the nearest boundary.
- ``fgsm``: one step of ℓp length ``inner_step`` along the steepest ascent of the cross-entropy
  to the clean label (the gradient's sign for ℓ∞).
- ``pgd``: up to ``inner_steps`` such steps, each projected onto the threat's ℓp ball of
  radius ε, an image leaving as soon as it is fooled.

Images are N×C×H×W in [0,1] scale, perturbations too; step lengths are given in 0–255 units.
"""

from __future__ import annotations

import abc
import math
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Optional, Tuple, Type, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uap_lightning.attacks.deepfool import DeepFoolResult, deepfool_batched, deepfool_single
from uap_lightning.attacks.projections import lp_norm, project_lp
from uap_lightning.attacks.threat import ThreatModel, parse_p
from uap_lightning.metrics import perturb
from uap_lightning.units import to_image_scale

# Every registered inner attack class, by name, in the order they were registered.
INNER_ATTACKS: Dict[str, Type["InnerAttack"]] = {}

MAX_STEP = 255.0  # the largest inner step that can still change a pixel, 0–255 units
PGD_STEPS = 10  # inner_steps' default
DEFAULT_STEP_SHARE = 1 / 4  # fgsm and pgd steps of ε/4 when attack.inner_step is null

# A forward pass already run on x: (x as a leaf tensor requiring grad, model(x), N×classes, with its graph).
Start = Tuple[Tensor, Tensor]


@dataclass
class InnerResult:
    """What an inner attack found for a batch of N images: ``perturbation`` Δv (N×C×H×W, [0,1]
    scale, not clipped), ``succeeded`` (BoolTensor N: x + Δv is fooled, targeted: at the target)
    and ``iterations`` (LongTensor N: the attack's iterations on each image)."""

    perturbation: Tensor
    succeeded: Tensor
    iterations: Tensor


@dataclass(frozen=True)
class InnerOptions:
    """The inner attack of Algorithm 1 and the settings the gradient ones read (``attack`` keys):
    ``inner`` (a registered name: deepfool, fgsm, pgd), ``inner_step`` (the ℓp length of one
    fgsm or pgd step in 0–255 units; None: ε / 4) and ``inner_steps`` (pgd's most steps per
    image). The default by measurement on digits (cnn, ℓ∞ ε=64, 10 passes, three seeds): fgsm
    fooled 0.59–0.63 with ε/4 and at most 0.48 with ε/2 or ε (a large Δv overwrites what v
    learnt from earlier images); ε/8 fooled up to 0.70 but left v at zero for one seed, where no
    image of X was fooled by a single step from v = 0; pgd fooled 0.34–0.54 with ε/4."""

    inner: str = "deepfool"
    inner_step: Optional[float] = None
    inner_steps: int = PGD_STEPS

    def __post_init__(self) -> None:
        inner_class(self.inner)
        step = self.inner_step
        if step is not None and (
            isinstance(step, bool) or not isinstance(step, numbers.Real) or not (math.isfinite(step) and step > 0)
        ):
            raise ValueError(f"attack.inner_step must be a positive number in 0-255 units or null; got {step!r}")
        if step is not None and step > MAX_STEP:
            raise ValueError(
                f"attack.inner_step={step:g} is in 0-255 units: a step beyond {MAX_STEP} moves past any image; "
                "e.g. a quarter of attack.eps, or null for that"
            )
        if step is not None and self.inner == "deepfool":
            raise ValueError(
                "attack.inner_step sets the step of inner=fgsm or inner=pgd; DeepFool finds its own minimal step: "
                "leave attack.inner_step null with inner=deepfool"
            )
        if self.inner_steps != PGD_STEPS and self.inner != "pgd":
            raise ValueError(
                f"attack.inner_steps={self.inner_steps} is read by inner=pgd only (inner={self.inner} takes "
                f"{'one step' if self.inner == 'fgsm' else 'its own iterations, attack.max_deepfool_iters'})"
            )
        if (
            isinstance(self.inner_steps, bool)
            or not isinstance(self.inner_steps, numbers.Integral)
            or self.inner_steps < 1
        ):
            raise ValueError(f"attack.inner_steps must be an integer >= 1; got {self.inner_steps!r}")


class InnerAttack(abc.ABC):
    """Finds Δv for images that v does not fool yet.

    Built once per engine with the threat model, the engine's options (an object with the
    :class:`InnerOptions` fields and those of :class:`~uap_lightning.attacks.deepfool.DeepFoolOptions`)
    and the target class (None: untargeted). Subclasses set ``name`` and implement ``__call__``.
    """

    name: ClassVar[str]

    def __init__(self, threat: ThreatModel, options: Any, target_class: Optional[int] = None) -> None:
        self.threat = threat
        self.options = options
        self.target_class = target_class

    @abc.abstractmethod
    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        labels: Tensor,
        *,
        clip: bool,
        generator: Optional[torch.Generator],
        start: Optional[Start] = None,
    ) -> InnerResult:
        """Δv for each image of ``x`` (N×C×H×W, [0,1] scale: clean images plus v, which fools none
        of them) with clean labels ``labels`` (N,); ``clip``: judge x + Δv clipped to [0,1];
        ``generator``: the attack's randomness; ``start``: x's forward pass, if already run."""

    def attack_one(
        self, model: nn.Module, x: Tensor, label: Tensor, *, clip: bool, generator: Optional[torch.Generator]
    ) -> Tuple[Tensor, bool, int]:
        """The attack on one image ``x`` (C×H×W) with its clean label (a 0-d tensor): Δv (C×H×W),
        whether it succeeded and its iterations; the per-image reference of ``__call__``."""
        result = self(model, x.unsqueeze(0), label.view(1), clip=clip, generator=generator)
        return result.perturbation[0], bool(result.succeeded[0]), int(result.iterations[0])


InnerClass = TypeVar("InnerClass", bound=Type[InnerAttack])


def register_inner(cls: InnerClass) -> InnerClass:
    """Class decorator: make ``cls`` available as ``attack.inner=<cls.name>``."""
    INNER_ATTACKS[cls.name] = cls
    return cls


def inner_class(name: str) -> Type[InnerAttack]:
    """The inner attack registered under ``name``; ValueError listing the known names otherwise."""
    try:
        return INNER_ATTACKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"attack.inner must be one of {', '.join(INNER_ATTACKS)}; got {name!r}") from None


@register_inner
class DeepFoolInner(InnerAttack):
    """DeepFool (:func:`~uap_lightning.attacks.deepfool.deepfool_batched`) with the engine's
    DeepFool options: the minimal step to the nearest linearised boundary, iterated until the label
    changes. It attacks the label predicted at x (for the images given, the clean one) and judges
    success without clipping, as the authors' code does."""

    name = "deepfool"

    def __init__(self, threat: ThreatModel, options: Any, target_class: Optional[int] = None) -> None:
        super().__init__(threat, options, target_class)
        self.keywords = dict(
            num_candidates=options.num_candidates,
            overshoot=options.overshoot,
            max_iters=options.max_deepfool_iters,
            norm=parse_p(options.deepfool_norm),
            target=target_class,
        )

    def deepfool(self, model: nn.Module, x: Tensor, start: Optional[Start] = None) -> DeepFoolResult:
        """Batched DeepFool with these options on ``x`` (N×C×H×W); ``start`` as in :func:`deepfool_batched`."""
        return deepfool_batched(model, x, start=start, **self.keywords)

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        labels: Tensor,
        *,
        clip: bool,
        generator: Optional[torch.Generator],
        start: Optional[Start] = None,
    ) -> InnerResult:
        result = self.deepfool(model, x, start)
        # deepfool_batched's converged and iterations are tensors (N,)
        return InnerResult(result.perturbation, cast(Tensor, result.converged), cast(Tensor, result.iterations))

    def attack_one(
        self, model: nn.Module, x: Tensor, label: Tensor, *, clip: bool, generator: Optional[torch.Generator]
    ) -> Tuple[Tensor, bool, int]:
        """:func:`~uap_lightning.attacks.deepfool.deepfool_single`, the one-image DeepFool."""
        result = deepfool_single(model, x, **self.keywords)
        return result.perturbation, bool(result.converged), int(result.iterations)


class GradientInner(InnerAttack):
    """What fgsm and pgd share: steps of ℓp length ``inner_step`` (p of the threat model) along the
    steepest ascent of the cross-entropy to the clean label (targeted: descent of the
    cross-entropy to the target); ``inner_step`` null means ε/4."""

    @property
    def step(self) -> float:
        """The step's ℓp length in [0,1] scale."""
        pixels = self.options.inner_step
        return to_image_scale(DEFAULT_STEP_SHARE * self.threat.eps if pixels is None else pixels)

    def ascent(self, logits: Tensor, labels: Tensor, x: Tensor) -> Tensor:
        """The step (like ``x``, N×C×H×W) that raises the loss of every row of ``logits`` (N×classes,
        computed from ``x`` with its graph) most to first order, of ℓp length ``step``."""
        if self.target_class is None:
            loss = F.cross_entropy(logits, labels, reduction="sum")
        else:
            loss = -F.cross_entropy(logits, torch.full_like(labels, self.target_class), reduction="sum")
        grad = torch.autograd.grad(loss, x)[0]
        if self.threat.p == math.inf:
            return self.step * grad.sign()
        lengths = lp_norm(grad, self.threat.p).clamp_min(torch.finfo(grad.dtype).tiny)
        return self.step * grad / lengths.view((-1,) + (1,) * (grad.dim() - 1))

    def fooled(self, logits: Tensor, labels: Tensor) -> Tensor:
        """BoolTensor (N,): the prediction of each row left its clean label (targeted: is the target)."""
        predicted = logits.detach().argmax(1)
        return predicted != labels if self.target_class is None else predicted == self.target_class

    @staticmethod
    def forward(model: nn.Module, x: Tensor, start: Optional[Start]) -> Start:
        """``start``, or x as a new leaf requiring grad with ``model`` of it."""
        if start is not None:
            return start
        xa = x.detach().clone().requires_grad_(True)
        return xa, model(xa)


@register_inner
class FGSMInner(GradientInner):
    """One step of ℓp length ``inner_step`` (default ε/4) along the steepest ascent of the
    cross-entropy to the clean label: ``inner_step`` · sign(∇) for ℓ∞ (the fast gradient sign
    method), ∇ / ‖∇‖_p scaled to ``inner_step`` for ℓ2 and ℓ1. One iteration per image."""

    name = "fgsm"

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        labels: Tensor,
        *,
        clip: bool,
        generator: Optional[torch.Generator],
        start: Optional[Start] = None,
    ) -> InnerResult:
        with torch.enable_grad():
            xa, logits = self.forward(model, x, start)
            step = self.ascent(logits, labels, xa).detach()
        with torch.no_grad():
            succeeded = self.fooled(model(perturb(x.detach(), step, clip)), labels)
        return InnerResult(step, succeeded, torch.ones_like(labels))


@register_inner
class PGDInner(GradientInner):
    """Projected gradient ascent from Δv = 0: up to ``inner_steps`` steps of ℓp length
    ``inner_step`` (default ε/4) along the steepest ascent of the cross-entropy at x + Δv, Δv
    projected onto the threat's ℓp ball of radius ε after each; an image stops at the first step
    that fools it (its iterations: the steps it took)."""

    name = "pgd"

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        labels: Tensor,
        *,
        clip: bool,
        generator: Optional[torch.Generator],
        start: Optional[Start] = None,
    ) -> InnerResult:
        x = x.detach()
        n = x.shape[0]
        delta = torch.zeros_like(x)
        iterations = torch.zeros(n, dtype=torch.long, device=x.device)
        succeeded = torch.zeros(n, dtype=torch.bool, device=x.device)
        active = torch.arange(n, device=x.device)  # positions in x of the images still attacked
        with torch.enable_grad():
            xa, logits = self.forward(model, x, start)
            rows = active.clone()  # their positions in the last forward batch
            for _ in range(self.options.inner_steps):
                if active.numel() == 0:
                    break
                step = self.ascent(logits[rows], labels[active], xa)[rows].detach()
                delta[active] = self._project(delta[active] + step)
                iterations[active] += 1
                xa = perturb(x[active], delta[active], clip).requires_grad_(True)
                logits = model(xa)
                fooled = self.fooled(logits, labels[active])
                succeeded[active[fooled]] = True
                rows = (~fooled).nonzero().squeeze(1)
                active = active[rows]
        return InnerResult(delta, succeeded, iterations)

    def _project(self, delta: Tensor) -> Tensor:
        """Each row of ``delta`` (N×C×H×W) projected onto the ℓp ball of radius ε."""
        radius = self.threat.radius
        if self.threat.p == math.inf:
            return delta.clamp(-radius, radius)
        return torch.stack([project_lp(row, radius, self.threat.p) for row in delta])

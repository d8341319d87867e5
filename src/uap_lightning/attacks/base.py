"""The interface every universal attack engine implements: one pass over the attack set.

An engine declares itself: a subclass of :class:`UniversalAttack` decorated with
:func:`register_engine` is registered under its ``name`` when its module is imported, and its
``Options`` dataclass (field defaults are the defaults) is both what its constructor accepts and
the schema of its ``attack`` settings.
"""

from __future__ import annotations

import abc
import dataclasses
import difflib
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Iterable, Optional, Tuple, Type, TypeVar

import torch
from torch import Tensor, nn

from uap_lightning.attacks.distributed import Reducer
from uap_lightning.attacks.projections import block_average, project_lp
from uap_lightning.attacks.threat import ThreatModel

# Every registered engine class, by name, in the order their modules were imported.
ENGINES: Dict[str, Type["UniversalAttack"]] = {}


@dataclass
class PassStats:
    """What one pass did: ``updates`` (inner-attack steps added to v, or gradient steps), the mean
    inner-attack iterations of those steps (0 for gradient engines) and ``converged``, the engine's
    own judgement that more passes would not change v much (the stop of an attack without X)."""

    updates: int
    mean_iterations: float
    converged: bool = False

    @classmethod
    def of_steps(cls, updates: int, iterations: int) -> "PassStats":
        """The stats of ``updates`` steps that took ``iterations`` inner iterations in all."""
        return cls(updates=updates, mean_iterations=iterations / updates if updates else 0.0)


@dataclass(frozen=True)
class NoOptions:
    """The options of an engine that has none beyond the shared ones."""


def checked_target_class(
    value: Any, num_classes: Optional[int] = None, key: str = "attack.target_class"
) -> Optional[int]:
    """``value`` as the class index a targeted attack pushes images to (None: untargeted);
    ValueError naming ``key`` unless it is an integer >= 0 and, when ``num_classes`` is known,
    below it. The one check of a target class, wherever one is given."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{key} must be a class index >= 0 or null; got {value!r}")
    if num_classes is not None and int(value) >= num_classes:
        raise ValueError(f"{key}={value} is not one of the {num_classes} classes (0 to {num_classes - 1})")
    return int(value)


class UniversalAttack(abc.ABC):
    """An engine that improves a universal perturbation v (C×H×W, [0,1] scale) one pass at a time.

    A pass visits the attack set X once in the order ``torch.randperm(N, generator=generator)``.
    The model is expected in eval mode with frozen parameters (see ``frozen_eval``).

    Subclasses set ``name`` and ``Options``, a dataclass of their own settings, and register with
    :func:`register_engine`; ``engine.options`` holds the values given to the constructor over
    the defaults.

    On several processes (a ``reducer`` of world size > 1) every rank is given the same X, v and
    generator state and returns the same v: the engine shares the work of each global batch
    among the ranks (see :mod:`uap_lightning.attacks.distributed`).
    """

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    # True for an engine whose first pass computes v once and for all (SV-UAP): the driver runs no more
    one_pass: ClassVar[bool] = False
    # True for an engine whose objective averages over the members of an Ensemble (attack.ensemble)
    averages_loss: ClassVar[bool] = False

    def __init__(
        self, threat: ThreatModel, *, clip: bool = True, target_class: Optional[int] = None, **options: Any
    ) -> None:
        if not isinstance(threat, ThreatModel):
            raise TypeError(f"threat must be a ThreatModel; got {type(threat).__name__}")
        target_class = checked_target_class(target_class)
        unknown = sorted(set(options) - set(self.option_names()))
        if unknown:
            raise TypeError(
                f"attack.method={self.name} does not take option(s) {', '.join(unknown)}"
                f"{did_you_mean(unknown[0], self.option_names())}; "
                f"its options: {', '.join(self.option_names()) or 'none'}"
            )
        self.threat = threat
        self.resolution: Optional[int] = None  # see :meth:`at_resolution`
        self.clip = bool(clip)
        self.target_class = target_class
        self.options = self.Options(**options)

    @classmethod
    def option_names(cls) -> Tuple[str, ...]:
        """The names of the engine's own options (the fields of ``Options``)."""
        return tuple(f.name for f in dataclasses.fields(cls.Options))

    @classmethod
    def from_settings(cls, settings: Any) -> "UniversalAttack":
        """The engine for ``settings`` (an :class:`~uap_lightning.attacks.settings.AttackSettings`)."""
        return cls(settings.threat, clip=settings.clip, target_class=settings.target_class, **settings.options)

    @property
    def reads_images(self) -> bool:
        """Whether a pass reads the attack set X (data-free engines: False, and X may be None)."""
        return True

    def at_resolution(self, resolution: Optional[int]) -> "UniversalAttack":
        """This engine with v kept a ``resolution``×``resolution`` image upsampled by pixel repetition
        (None: full resolution): every projection first averages v over its blocks and every step
        follows the block-averaged gradient (``attack.resolution``). Only for engines that follow
        the gradient of a mean loss (``averages_loss``); ValueError otherwise."""
        if resolution is not None and not self.averages_loss:
            raise ValueError(
                f"attack.resolution is for the engines that follow a loss's gradient "
                f"({', '.join(ensemble_engines())}); attack.method={self.name} takes none"
            )
        self.resolution = resolution
        return self

    def project(self, v: Tensor) -> Tensor:
        """v projected onto the threat model's ℓp ball (radius eps/255), at the engine's resolution."""
        return project_lp(block_average(v, self.resolution), self.threat.radius, self.threat.p)

    def low_pass(self, grad: Tensor) -> Tensor:
        """A gradient of v (C×H×W) averaged over the blocks of the engine's resolution (unchanged at full)."""
        return block_average(grad, self.resolution)

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


EngineClass = TypeVar("EngineClass", bound=Type[UniversalAttack])


def register_engine(cls: EngineClass) -> EngineClass:
    """Class decorator: make ``cls`` available as ``attack=<cls.name>`` (and ``method=``)."""
    ENGINES[cls.name] = cls
    return cls


def engine_class(method: str) -> Type[UniversalAttack]:
    """The engine registered under ``method``; ValueError listing the known names otherwise."""
    try:
        return ENGINES[method]
    except KeyError:
        raise ValueError(
            f"attack.method must be one of {', '.join(ENGINES)}; got {method!r}{did_you_mean(str(method), ENGINES)}"
        ) from None


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """`` (did you mean 'step_size'?)`` for the known name closest to ``name``, or "" when none is close."""
    close = difflib.get_close_matches(name.replace("-", "_").lower(), list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def ensemble_engines() -> Tuple[str, ...]:
    """The registered engines that take an ensemble of victims (``averages_loss``)."""
    return tuple(name for name, cls in ENGINES.items() if cls.averages_loss)

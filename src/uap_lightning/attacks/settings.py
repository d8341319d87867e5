"""The settings of one universal attack, validated once and handed to every caller.

``AttackSettings`` holds everything that determines the perturbation an attack returns: the
threat model, the engine and its options, δ, the pass budget, which pass is kept, clipping, the
target class, the seed and the augmentation, plus how X is predicted. It is built once, from a
run's config (``validation.attack_settings``) or from ``compute_uap``'s arguments, and the API,
the tasks, the loop and the benchmark all take it; no caller re-checks or converts its values.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch

from uap_lightning.attacks.base import UniversalAttack, checked_target_class, engine_class, ensemble_engines
from uap_lightning.attacks.threat import ThreatModel
from uap_lightning.metrics import PRECISIONS

KEEP_CHOICES = ("best", "last")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class AttackSettings:
    """A universal attack: ``threat`` (ε in 0–255 pixel units) and the engine ``method`` with its
    ``options`` (the engine's own keys; the others take its defaults).

    ``delta``: stop once the fooling rate on X (targeted: the targeted success rate) reaches
    1 − δ; ``max_passes``: at most this many passes; ``keep``: "best" returns the pass with the
    highest rate on X, "last" the last one; ``clip``: x + v clipped to [0,1]; ``target_class``:
    targeted mode; ``seed``: the order of X and the attack's randomness; ``augment``: every pass
    on new random crops and flips of X; ``eval_batch_size``: images per prediction batch;
    ``compile``: predictions through ``torch.compile``; ``input_diversity``: the probability that a
    gradient step sees its batch randomly resized and padded (0: never; see
    :mod:`~uap_lightning.attacks.input_diversity`); ``resolution``: v kept a
    resolution×resolution image upsampled by pixel repetition (None: full resolution). The last two
    are for the engines that follow a loss's gradient (``ensemble_engines()``). ``precision``: the
    victim's forward and backward passes in float32 ("32") or autocast to bfloat16 ("bf16") or
    float16 ("16"); v, its steps and its projection stay float32.

    Raises ValueError naming the ``attack.`` key of a value out of range, TypeError for an
    option the engine does not take.
    """

    threat: ThreatModel
    method: str = "deepfool_uap"
    options: Mapping[str, Any] = field(default_factory=dict)
    delta: float = 0.2
    max_passes: int = 10
    keep: str = "best"
    clip: bool = True
    target_class: Optional[int] = None
    seed: int = 0
    augment: bool = False
    eval_batch_size: int = 512
    compile: bool = False
    input_diversity: float = 0.0
    resolution: Optional[int] = None
    precision: str = "32"

    def __post_init__(self) -> None:
        if not isinstance(self.threat, ThreatModel):
            raise TypeError(f"threat must be a ThreatModel; got {type(self.threat).__name__}")
        if not isinstance(self.delta, numbers.Real) or isinstance(self.delta, bool) or not 0.0 < self.delta < 1.0:
            raise ValueError(
                f"attack.delta must lie in (0, 1), e.g. 0.2 to stop at a fooling rate of 0.8; got {self.delta!r}"
            )
        if not _is_int(self.max_passes) or self.max_passes < 1:
            raise ValueError(f"attack.max_passes must be an integer >= 1; got {self.max_passes!r}")
        if self.keep not in KEEP_CHOICES:
            raise ValueError(f"attack.keep must be one of {', '.join(KEEP_CHOICES)}; got {self.keep!r}")
        object.__setattr__(self, "target_class", checked_target_class(self.target_class))
        if not _is_int(self.seed):
            raise ValueError(f"attack.seed must be an integer; got {self.seed!r}")
        if not _is_int(self.eval_batch_size) or self.eval_batch_size < 1:
            raise ValueError(f"attack.eval_batch_size must be an integer >= 1; got {self.eval_batch_size!r}")
        if (
            not isinstance(self.input_diversity, numbers.Real)
            or isinstance(self.input_diversity, bool)
            or not 0.0 <= self.input_diversity <= 1.0
        ):
            raise ValueError(
                f"attack.input_diversity must lie in [0, 1], e.g. 0.5 (the paper's; 0: off); "
                f"got {self.input_diversity!r}"
            )
        if self.resolution is not None and (not _is_int(self.resolution) or self.resolution < 1):
            raise ValueError(
                f"attack.resolution must be a positive integer (pixels on a side) or null; got {self.resolution!r}"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"attack.precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}")
        object.__setattr__(self, "options", dict(self.options))  # a copy the caller cannot change
        engine = self.engine()  # the method exists and takes these options
        if self.input_diversity > 0 and not engine.averages_loss:
            raise ValueError(
                f"attack.input_diversity is for the engines that follow a loss's gradient "
                f"({', '.join(ensemble_engines())}); attack.method={self.method} takes none"
            )

    @property
    def rate_on_x_key(self) -> str:
        """The name of the rate the attack steers by on X: the fooling rate, or in targeted mode
        the targeted success rate (the share of non-target images sent to the target)."""
        return "fooling_rate_attack_set" if self.target_class is None else "targeted_success_rate_attack_set"

    @property
    def rate_on_x_name(self) -> str:
        """The rate the attack steers by on X, as progress displays name it."""
        return "fooling on X" if self.target_class is None else "targeted success on X"

    def engine(self) -> UniversalAttack:
        """A new engine of ``method`` with these settings."""
        return engine_class(self.method).from_settings(self).at_resolution(self.resolution)

    @classmethod
    def from_values(
        cls, threat: ThreatModel, values: Mapping[str, Any], options: Mapping[str, Any]
    ) -> "AttackSettings":
        """The one way callers build settings: ``threat``, the engine's ``options``, and the other
        fields taken by name from ``values`` (a run's ``attack`` config, compute_uap's keywords;
        absent ones take their defaults; other keys are ignored); switches become bools and the
        precision its name ("32", "bf16", "16")."""
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in ("threat", "options")}
        chosen = {name: values[name] for name in fields if name in values}
        for name in ("augment", "compile"):
            if name in chosen:
                chosen[name] = bool(chosen[name])
        if "precision" in chosen:
            chosen["precision"] = str(chosen["precision"])
        return cls(threat, options=options, **chosen)

    def generator(self) -> torch.Generator:
        """A CPU generator seeded with ``seed``: the attack's order and randomness."""
        return torch.Generator().manual_seed(int(self.seed))

    def replace(self, **changes: Any) -> "AttackSettings":
        """These settings with ``changes``, validated again."""
        return dataclasses.replace(self, **changes)

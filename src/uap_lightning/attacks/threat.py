"""The threat model: an ℓp ball of radius ε, with ε in 0–255 pixel units for every p."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Sequence, Union, cast

from uap_lightning.units import EPS_SCALES, to_image_scale, to_pixel_units

NORMS = (1.0, 2.0, math.inf)
_P_NAMES = {1.0: "1", 2.0: "2", math.inf: "inf"}
P_SYMBOLS = {1.0: "ℓ1", 2.0: "ℓ2", math.inf: "ℓ∞"}
_EPS_HINT = "attack.eps must be a positive finite number in 0-255 pixel units (e.g. attack.eps=10)"


def parse_p(value: Union[str, float, int]) -> float:
    """The norm order as 1.0, 2.0 or ``math.inf`` from "inf"/"Infinity"/2/"2.0"/1/... ."""
    error = ValueError(f"attack.p must be one of 1, 2, inf; got {value!r}")
    if isinstance(value, bool):
        raise error
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("inf", "infinity", "+inf", "linf"):
            return math.inf
        try:
            number = float(text)
        except ValueError:
            raise error from None
    elif isinstance(value, numbers.Real):
        number = float(value)
    else:
        raise error
    if number not in NORMS:
        raise error
    return number


def p_name(value: Union[str, float, int]) -> str:
    """The norm as text ("inf", "2" or "1") of anything :func:`parse_p` accepts."""
    return _P_NAMES[parse_p(value)]


@dataclass(frozen=True)
class ThreatModel:
    """‖v‖_p ≤ eps, eps in 0–255 pixel units; ``p`` is 1.0, 2.0 or ``math.inf``."""

    eps: float
    p: float

    def __post_init__(self) -> None:
        if self.p not in NORMS:
            raise ValueError(f"attack.p must be one of 1, 2, inf; got {self.p!r}")
        eps = self.eps
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps <= 0:
            raise ValueError(f"{_EPS_HINT}; got {eps!r}")

    @classmethod
    def parse(cls, eps: Union[float, int, str], p: Union[str, float, int]) -> "ThreatModel":
        """Validate user input; ``eps`` may be a numeric string, ``p`` anything :func:`parse_p` accepts."""
        norm = parse_p(p)
        value = eps
        if isinstance(eps, str):
            try:
                value = float(eps)
            except ValueError:
                raise ValueError(f"{_EPS_HINT}; got {eps!r}") from None
        elif isinstance(eps, numbers.Real) and not isinstance(eps, bool):
            value = float(eps)
        return cls(eps=cast(float, value), p=norm)  # anything but a real number: refused by __post_init__

    @classmethod
    def in_units(
        cls,
        eps: Union[float, int, str],
        p: Union[str, float, int],
        eps_scale: int,
        eps_key: str = "attack.eps",
        scale_key: str = "attack.eps_scale",
    ) -> "ThreatModel":
        """:meth:`parse` with ``eps`` in the units ``eps_scale`` says: 255 (0–255 pixel units) or 1
        ([0,1] image scale, converted); ``eps_key`` and ``scale_key`` name the settings in errors."""
        if isinstance(eps_scale, bool) or eps_scale not in EPS_SCALES:
            raise ValueError(
                f"{scale_key} must be 255 ({eps_key} in 0–255 pixel units) or 1 ([0,1] scale); got {eps_scale!r}"
            )
        if eps_scale == 1:
            if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
                raise ValueError(f"{eps_key} must be a number in [0,1] units with {scale_key}=1; got {eps!r}")
            eps = to_pixel_units(float(eps))
        return cls.parse(eps, p)

    def largest_useful_eps(self, shape: Sequence[int]) -> float:
        """The ℓp norm (0–255 units) of the all-ones image of C×H×W ``shape``: every perturbation of
        [0,1] images lies within it, so a larger ε constrains nothing."""
        count = math.prod(int(n) for n in shape)
        return to_pixel_units(1.0 if math.isinf(self.p) else count ** (1.0 / self.p))

    def check_fits(self, shape: Sequence[int], eps_key: str = "attack.eps") -> None:
        """ValueError naming ``eps_key`` when ε exceeds the norm of the all-ones image of ``shape``."""
        largest = self.largest_useful_eps(shape)
        if self.eps > largest:
            raise ValueError(
                f"{eps_key}={self.eps:g} exceeds the {self.symbol} norm of an all-ones {'×'.join(map(str, shape))} "
                f"image ({largest:.6g} in 0–255 units), which bounds every perturbation of images in [0,1]; "
                f"choose {eps_key} at most {largest:.6g}"
            )

    @property
    def below_one_level(self) -> bool:
        """Whether ε is under one 8-bit level (1 in 0–255 units): such a ball holds no perturbation
        that changes any pixel by a full level, the sign of an ε given in [0,1] units."""
        return self.eps < 1.0

    def unit_advice(self, eps_key: str = "attack.eps", scale_key: str = "attack.eps_scale") -> str:
        """What to say of an ε under one level: the units, and the ε it would be in 0–255 units;
        ``eps_key`` and ``scale_key`` name the settings (the API's: eps, eps_scale)."""
        return (
            f"{eps_key}={self.eps:g} is below one 8-bit level: ε is in 0–255 pixel units for every p, so no pixel "
            f"can change by a full level; did you mean {eps_key}={to_pixel_units(self.eps):g} ({self.eps:g} × 255 ≈ "
            f"{round(to_pixel_units(self.eps))})? "
            f"To give ε in [0,1] units, set {scale_key}=1"
        )

    @property
    def radius(self) -> float:
        """The radius in [0,1] image scale: eps / 255."""
        return to_image_scale(self.eps)

    @property
    def symbol(self) -> str:
        """The norm for people: "ℓ∞", "ℓ2" or "ℓ1"."""
        return P_SYMBOLS[self.p]

    @property
    def p_name(self) -> str:
        """The norm as text: "inf", "2" or "1"."""
        return _P_NAMES[self.p]

"""The fixed colour scale a perturbation is shown on, in figures and TensorBoard images, so that
the images of successive passes compare (no matplotlib: the attack loop logs with it)."""

from __future__ import annotations

import math
from typing import Sequence, Union

from torch import Tensor

from uap_lightning.attacks.threat import parse_p
from uap_lightning.units import to_image_scale


def perturbation_image(v: Tensor, eps: float, p: Union[str, float]) -> Tensor:
    """``v`` (C×H×W, [0,1] scale) as a per-pass image on the fixed scale ±s of
    :func:`perturbation_scale`: 0.5 is no change, 0 and 1 are −s and +s (clipped beyond), so the
    images of successive passes compare."""
    scale = to_image_scale(perturbation_scale(eps, p, v.shape))
    return (v / (2 * scale) + 0.5).clamp(0, 1)


def perturbation_scale(eps: float, p: Union[str, float], shape: Sequence[int]) -> float:
    """Half-width s (0–255 units) of the fixed colour range ±s for a norm-ε perturbation of C×H×W ``shape``.

    ℓ∞: s = ε; ℓ2: s = min(255, 3ε/√(C·H·W)) (three times the per-pixel RMS); ℓ1: s = min(255, ε).
    """
    norm = parse_p(p)
    if not eps > 0:
        raise ValueError(f"eps must be positive (0–255 units); got {eps!r}")
    if norm == math.inf:
        return float(eps)
    if norm == 2.0:
        return min(255.0, 3.0 * float(eps) / math.sqrt(math.prod(shape)))
    return min(255.0, float(eps))

"""The fixed colour scale a perturbation is shown on, in figures and TensorBoard images, so that
the images of successive passes compare (no matplotlib: the attack loop logs with it)."""

from __future__ import annotations

import math
from typing import Sequence

from torch import Tensor

from uap_lightning.attacks.threat import ThreatModel
from uap_lightning.units import to_image_scale


def perturbation_image(v: Tensor, threat: ThreatModel) -> Tensor:
    """``v`` (C×H×W, [0,1] scale) as a per-pass image on the fixed scale ±s of
    :func:`perturbation_scale`: 0.5 is no change, 0 and 1 are −s and +s (clipped beyond), so the
    images of successive passes compare."""
    scale = to_image_scale(perturbation_scale(threat, v.shape))
    return (v / (2 * scale) + 0.5).clamp(0, 1)


def perturbation_scale(threat: ThreatModel, shape: Sequence[int]) -> float:
    """Half-width s (0–255 units) of the fixed colour range ±s for a perturbation in ``threat``'s
    ε-ball, of C×H×W ``shape``.

    ℓ∞: s = ε; ℓ2: s = min(255, 3ε/√(C·H·W)) (three times the per-pixel RMS); ℓ1: s = min(255, ε).
    """
    if threat.p == math.inf:
        return threat.eps
    if threat.p == 2.0:
        return min(255.0, 3.0 * threat.eps / math.sqrt(math.prod(shape)))
    return min(255.0, threat.eps)

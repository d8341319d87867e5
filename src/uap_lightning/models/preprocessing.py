"""The input a pretrained classifier was evaluated on: its normalisation and its image size."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class Preprocessing:
    """How a pretrained model's images were prepared: the shorter side resized (with
    ``interpolation``) to ``image_size / crop_pct``, a centre crop of ``image_size`` × ``image_size``
    pixels, then per-channel ``(x - mean) / std`` with ``mean`` and ``std`` in [0,1] scale."""

    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    image_size: int  # side of the square input, pixels
    crop_pct: float  # share of the resized side that the centre crop keeps, in (0, 1]
    interpolation: str  # the resize filter, e.g. bilinear | bicubic

    def resize_for(self, image_size: int) -> int:
        """The shorter side (pixels) to resize to before a centre crop of ``image_size``:
        ⌊image_size / crop_pct⌋, as timm's evaluation transform computes it."""
        return math.floor(image_size / self.crop_pct)

"""Pixel units: every ε, step size and norm a user sets or reads is in 0–255 pixel units, while
images and perturbations are tensors in [0,1] image scale. These two functions are the only
conversions between them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Union, overload

if TYPE_CHECKING:
    from torch import Tensor

PIXEL_SCALE = 255.0  # 0–255 pixel units per unit of [0,1] image scale
EPS_SCALES = (255, 1)  # the units ε may be given in: 0–255 pixel units, or [0,1] image scale


def to_image_scale(pixels: float) -> float:
    """A length in 0–255 pixel units (ε, a step size, a norm) in [0,1] image scale."""
    return pixels / PIXEL_SCALE


@overload
def to_pixel_units(value: float) -> float: ...


@overload
def to_pixel_units(value: Tensor) -> Tensor: ...


def to_pixel_units(value: Union[float, Tensor]) -> Union[float, Tensor]:
    """A length in [0,1] image scale in 0–255 pixel units (a tensor: each entry)."""
    return value * PIXEL_SCALE

"""ℓp norms, projections onto ℓp balls, and the dual-norm step DeepFool takes.

``p`` is 1.0, 2.0 or ``math.inf`` throughout; radii are in the tensor's own scale.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

_DUAL = {1.0: math.inf, 2.0: 2.0, math.inf: 1.0}


def dual_exponent(p: float) -> float:
    """q with 1/p + 1/q = 1."""
    try:
        return _DUAL[float(p)]
    except KeyError:
        raise ValueError(f"p must be one of 1, 2, inf; got {p!r}") from None


def lp_norm(x: Tensor, p: float) -> Tensor:
    """Per-sample ℓp norm of an N×... tensor over all dims but the first: shape (N,)."""
    norms: Tensor = torch.linalg.vector_norm(x.flatten(1), ord=p, dim=1)
    return norms


def dual_norm(w: Tensor, p: float) -> Tensor:
    """Per-sample ℓq norm (q dual to ``p``) of an N×... tensor: shape (N,)."""
    return lp_norm(w, dual_exponent(p))


def project_lp(v: Tensor, radius: float, p: float) -> Tensor:
    """Euclidean projection of ``v`` (any shape, one vector) onto {‖u‖_p ≤ radius}."""
    p = float(p)
    if p == math.inf:
        return v.clamp(-radius, radius)
    if p == 2.0:
        norm: Tensor = torch.linalg.vector_norm(v)
        scale = (radius / norm.clamp_min(torch.finfo(v.dtype).tiny)).clamp(max=1.0)
        return v * scale
    if p == 1.0:
        return _project_l1(v, radius)
    raise ValueError(f"p must be one of 1, 2, inf; got {p!r}")


def _project_l1(v: Tensor, radius: float) -> Tensor:
    """Sort-based projection onto the ℓ1 ball (Duchi et al., ICML 2008), computed in float64."""
    if radius <= 0:
        return torch.zeros_like(v)
    flat = v.detach().flatten().double()
    magnitude = flat.abs()
    if float(magnitude.sum()) <= radius:
        return v
    sorted_mag = magnitude.sort(descending=True).values
    cumulative = sorted_mag.cumsum(0)
    ranks = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=flat.dtype)
    support = int(((sorted_mag - (cumulative - radius) / ranks) > 0).sum())
    theta = (cumulative[support - 1] - radius) / support
    projected = flat.sign() * (magnitude - theta).clamp_min(0.0)
    return projected.to(v.dtype).view_as(v)


def dual_step(w: Tensor, f_abs: Tensor, p: float) -> Tensor:
    """Smallest ℓp step r (N×..., like ``w``) with ⟨w_n, r_n⟩ = f_abs_n, for each sample n.

    p=2: f/‖w‖₂² · w;  p=inf: f/‖w‖₁ · sign(w);  p=1: f/‖w‖∞ along the largest |w_j| only.
    """
    p = float(p)
    tiny = torch.finfo(w.dtype).tiny
    shape = (-1,) + (1,) * (w.dim() - 1)
    if p == 2.0:
        return (f_abs / lp_norm(w, 2.0).square().clamp_min(tiny)).view(shape) * w
    if p == math.inf:
        return (f_abs / lp_norm(w, 1.0).clamp_min(tiny)).view(shape) * w.sign()
    if p == 1.0:
        flat = w.flatten(1)
        peak, index = flat.abs().max(dim=1)
        step = torch.zeros_like(flat)
        rows = torch.arange(flat.shape[0], device=w.device)
        step[rows, index] = f_abs / peak.clamp_min(tiny) * flat[rows, index].sign()
        return step.view_as(w)
    raise ValueError(f"p must be one of 1, 2, inf; got {p!r}")


def unit_direction(grad: Tensor, p: float) -> Tensor:
    """The steepest-ascent direction of unit ℓp norm (one vector, any shape): sign(grad) for
    p=inf, grad/‖grad‖_p otherwise; a zero gradient gives a zero direction."""
    if p == math.inf:
        return grad.sign()
    return grad / lp_norm(grad.unsqueeze(0), p).clamp_min(torch.finfo(grad.dtype).tiny)


def check_resolution(resolution: Optional[int], image_shape: Sequence[int], key: str = "attack.resolution") -> None:
    """ValueError naming ``key`` unless ``resolution`` is None or a side that divides both sides of
    ``image_shape`` (C×H×W), so that v is made of whole blocks of pixels."""
    if resolution is None:
        return
    height, width = int(image_shape[-2]), int(image_shape[-1])
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"{key} must be a positive integer (pixels on a side) or null; got {resolution!r}")
    if height % resolution or width % resolution:
        sides = [s for s in range(1, min(height, width) + 1) if height % s == 0 and width % s == 0]
        raise ValueError(
            f"{key}={resolution} must divide the image side ({height}×{width}) so that v is made of "
            f"whole blocks; e.g. one of {', '.join(map(str, sides[-6:]))}"
        )


def block_average(v: Tensor, resolution: Optional[int]) -> Tensor:
    """``v`` (…×H×W) with each of the resolution×resolution blocks of H/resolution × W/resolution
    pixels replaced by its mean: the orthogonal projection onto perturbations that are a
    resolution×resolution image upsampled by pixel repetition. ``v`` itself when ``resolution`` is None."""
    if resolution is None or tuple(v.shape[-2:]) == (resolution, resolution):
        return v
    fy, fx = v.shape[-2] // resolution, v.shape[-1] // resolution
    blocks = v.reshape(*v.shape[:-2], resolution, fy, resolution, fx).mean(dim=(-3, -1), keepdim=True)
    return blocks.expand(*v.shape[:-2], resolution, fy, resolution, fx).reshape(v.shape)

"""Fooling rate and friends: the one shared definition every engine, loop and benchmark uses.

Images are float tensors in [0,1], N×C×H×W; a perturbation is C×H×W in the same scale.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor, nn

from uap_lightning.units import to_pixel_units


def perturb(images: Tensor, perturbation: Optional[Tensor], clip: bool = True) -> Tensor:
    """x + v, clipped to [0,1] when ``clip``; ``perturbation`` broadcasts over the batch."""
    if perturbation is None:
        return images
    out = images + perturbation
    return out.clamp_(0.0, 1.0) if clip else out


PRECISIONS = ("32", "bf16", "16")  # attack.precision: float32, or autocast to bfloat16 / float16


def precision_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Where the victim runs at ``precision`` (one of PRECISIONS) on ``device``: nothing for "32",
    else ``torch.autocast`` to bfloat16 or float16 (convolutions and matrix products in the lower
    precision; additions, projections and the perturbation stay float32)."""
    if precision == "32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@torch.no_grad()
def predict(
    model: nn.Module,
    images: Tensor,
    perturbation: Optional[Tensor] = None,
    *,
    batch_size: int = 512,
    clip: bool = True,
    precision: str = "32",
    channels_last: bool = False,
) -> Tensor:
    """Predicted labels (N,) of ``model`` on ``images`` (+ ``perturbation``), in large no-grad batches.

    Batches are moved to the device of the model's parameters; labels come back on the
    device of ``images``. ``precision``: see :func:`precision_context`.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else images.device
    if perturbation is not None:
        perturbation = perturbation.to(device)
    labels = []
    for start in range(0, images.shape[0], batch_size):
        batch = perturb(images[start : start + batch_size].to(device), perturbation, clip)
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with precision_context(precision, device):
            logits = model(batch)
        labels.append(logits.argmax(dim=1).to(images.device))
    if not labels:
        return torch.empty(0, dtype=torch.long, device=images.device)
    return torch.cat(labels)


def fooling_rate(clean_labels: Tensor, perturbed_labels: Tensor) -> float:
    """The paper's fooling rate: share of images whose *predicted* label changes."""
    if clean_labels.numel() == 0:
        return 0.0
    return (clean_labels != perturbed_labels).float().mean().item()


def accuracy(predicted: Tensor, labels: Tensor) -> float:
    """Share of predictions equal to the true labels."""
    if labels.numel() == 0:
        return 0.0
    return (predicted == labels.to(predicted.device)).float().mean().item()


def targeted_success_rate(clean_labels: Tensor, perturbed_labels: Tensor, target_class: int) -> float:
    """Share of images not already predicted as ``target_class`` that the perturbation sends there."""
    candidates = clean_labels != target_class
    if not bool(candidates.any()):
        return 0.0
    return (perturbed_labels[candidates] == target_class).float().mean().item()


def norm_255(perturbation: Tensor, p: float) -> float:
    """ℓp norm of a perturbation in 0–255 pixel units (``p`` may be ``math.inf``)."""
    return to_pixel_units(float(torch.linalg.vector_norm(perturbation.detach().flatten().double(), ord=p).item()))

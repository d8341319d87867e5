"""Input diversity (Xie et al., "Improving transferability of adversarial examples with input
diversity", CVPR 2019), for universal perturbations (``attack.input_diversity``).

At each gradient step, with probability p, the perturbed batch clip(x + v) is shrunk to a random
side r drawn uniformly from [⌊0.9·H⌋, H) and zero-padded back to H×W at a random offset (the
fixed-input-size form of the paper's resize-and-pad, resize rate 0.9); else it passes unchanged.
The paper's p is 0.5. v is thereby fitted to a family of small rescalings and shifts of the images
rather than to one network's exact pixel grid, which is what helps it transfer. Predictions (the
fooling rate on X, evaluation) never go through it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RESIZE_RATE = 0.9  # the smallest side drawn, as a share of the image side


def diverse(images: Tensor, probability: float, generator: torch.Generator) -> Tensor:
    """``images`` (B×C×H×W) resized to a random side in [⌊0.9·H⌋, H) and zero-padded back to H×W at a
    random offset with probability ``probability`` (one draw for the batch), else unchanged;
    randomness from ``generator`` (CPU)."""
    height, width = images.shape[-2:]
    if float(torch.rand((), generator=generator)) >= probability:
        return images
    smallest = int(RESIZE_RATE * min(height, width))
    side = int(torch.randint(smallest, min(height, width), (), generator=generator))
    top = int(torch.randint(0, height - side + 1, (), generator=generator))
    left = int(torch.randint(0, width - side + 1, (), generator=generator))
    small = F.interpolate(images, size=(side, side), mode="nearest")
    return F.pad(small, (left, width - side - left, top, height - side - top), value=0.0)


class DiverseInputs(nn.Module):
    """``model`` whose passes that build a graph for gradients see :func:`diverse` inputs; passes
    without gradients (predictions) see the images as they are."""

    def __init__(self, model: nn.Module, probability: float, generator: torch.Generator) -> None:
        super().__init__()
        self.model = model
        self.probability = float(probability)
        self.generator = generator

    def forward(self, images: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            images = diverse(images, self.probability, self.generator)
        logits: Tensor = self.model(images)
        return logits

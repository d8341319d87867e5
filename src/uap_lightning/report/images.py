"""Images of a perturbation and of clean/perturbed examples.

Perturbations are C×H×W tensors in [0,1] scale (values around 0); images N×C×H×W in [0,1].
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import Tensor  # noqa: E402
from torchvision.utils import save_image  # noqa: E402


def perturbation_image(v: Tensor) -> Tensor:
    """``v`` scaled for visibility into [0,1]: 0.5 is no change, 0/1 the largest |v|."""
    peak = v.abs().max()
    if peak == 0:
        return torch.full_like(v, 0.5)
    return (v / (2 * peak) + 0.5).clamp(0, 1)


def save_perturbation_png(v: Tensor, target: str | Path | BinaryIO, upscale: int = 8, format: str = "png") -> None:
    """Write ``perturbation_image(v)`` as a PNG (to a path or a binary file), enlarged ``upscale`` times."""
    image = perturbation_image(v.detach().cpu().float())
    if upscale > 1:
        image = torch.nn.functional.interpolate(image[None], scale_factor=upscale, mode="nearest")[0]
    save_image(image, target if hasattr(target, "write") else str(target), format=format)


def examples_figure(
    clean: Tensor,
    perturbed: Tensor,
    clean_labels: Sequence[int],
    perturbed_labels: Sequence[int],
    class_names: Sequence[str],
) -> Figure:
    """A two-row grid: clean images with their predictions above, perturbed ones below.

    A perturbed prediction that differs from the clean one is titled in red.
    """
    count = clean.shape[0]
    fig, axes = plt.subplots(2, count, figsize=(1.6 * count, 3.6), squeeze=False)
    for i in range(count):
        for row, (images, labels) in enumerate(((clean, clean_labels), (perturbed, perturbed_labels))):
            ax = axes[row][i]
            picture = images[i].detach().cpu().float().permute(1, 2, 0).clamp(0, 1).numpy()
            ax.imshow(picture.squeeze(-1) if picture.shape[-1] == 1 else picture, cmap="gray", vmin=0, vmax=1)
            fooled = row == 1 and labels[i] != clean_labels[i]
            ax.set_title(_name(class_names, labels[i]), fontsize=8, color="red" if fooled else "black")
            ax.axis("off")
    axes[0][0].text(-0.1, 0.5, "clean", transform=axes[0][0].transAxes, rotation=90, va="center", ha="right")
    axes[1][0].text(-0.1, 0.5, "x + v", transform=axes[1][0].transAxes, rotation=90, va="center", ha="right")
    fig.tight_layout()
    return fig


def _name(class_names: Sequence[str], label: int) -> str:
    return str(class_names[label]) if 0 <= label < len(class_names) else str(label)

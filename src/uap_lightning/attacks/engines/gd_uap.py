"""GD-UAP: universal perturbations from the network alone (Mopuri, Ganeshan and Babu,
"Generalizable data-free objective for crafting universal adversarial perturbations", TPAMI 2018).

δ maximises the activations it causes in the network's convolutional layers: it minimises
−Σ_l log ‖f_l(input)‖₂ (the mean over a batch of the per-image ℓ2 norms of layer l's output) under
‖δ‖_p ≤ ε, with Adam and a projection after every step. The input depends on the prior:

- ``none``: δ on a uniform mid-grey image (0.5 everywhere), the pixel-space counterpart of the
  paper's δ alone on mean-subtracted inputs; no image is read.
- ``range``: δ on random images drawn uniformly in [0,1] (the paper's "range prior"); no image
  of X is read.
- ``data``: δ on images of X (the paper's "data prior").

Activations are collected with forward hooks on the layers (``layers``: "conv" for every Conv2d,
or a list of module names), removed after every pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Tuple, cast

import torch
from torch import Tensor, nn

from uap_lightning.attacks.activations import GREY, activations
from uap_lightning.attacks.base import PassStats, UniversalAttack, register_engine
from uap_lightning.attacks.data_free import saturation_of, uniform_start
from uap_lightning.attacks.distributed import Reducer
from uap_lightning.attacks.ensemble import Ensemble
from uap_lightning.metrics import perturb
from uap_lightning.units import to_image_scale

PRIORS = ("none", "range", "data")
NORM_FLOOR = 1e-12  # keeps log ‖f‖ finite for a layer whose output is all zeros


@dataclass(frozen=True)
class GDUAPOptions:
    """GD-UAP's settings (the ``attack`` keys of ``attack=gd_uap``), see :class:`GDUAP`."""

    layers: Any = "conv"  # "conv" (every Conv2d output) or a list of module names
    prior: str = "none"  # none | range | data
    steps: int = 100  # Adam steps per pass
    step_size: float = 0.5  # Adam's learning rate, 0–255 units
    batch_size: int = 16  # images per step with the range and data priors
    saturation: float = 0.001  # without X: stop once the share of δ at its bound moves less than this in a pass

    def __post_init__(self) -> None:
        layers = self.layers
        if not (
            layers == "conv"
            or (not isinstance(layers, str) and len(layers) > 0 and all(isinstance(name, str) for name in layers))
        ):
            raise ValueError(f"attack.layers must be conv or a list of module names; got {layers!r}")
        if self.prior not in PRIORS:
            raise ValueError(f"attack.prior must be one of {', '.join(PRIORS)}; got {self.prior!r}")
        if self.steps < 1:
            raise ValueError(f"attack.steps must be at least 1; got {self.steps}")
        if not (math.isfinite(self.step_size) and self.step_size > 0):
            raise ValueError(f"attack.step_size must be a positive number in 0-255 units; got {self.step_size!r}")
        if self.batch_size < 1:
            raise ValueError(f"attack.batch_size must be at least 1; got {self.batch_size}")
        if not 0 <= self.saturation < 1:
            raise ValueError(f"attack.saturation must lie in [0, 1); got {self.saturation}")


@register_engine
class GDUAP(UniversalAttack):
    """GD-UAP: Adam steps on δ that raise the log-norms of the network's convolutional
    activations, projected onto the ℓp ball of radius ε; data-free with ``prior`` none or range.

    Arguments:
        threat: the ℓp ball, ``ThreatModel.parse(eps, p)`` with ε in 0–255 pixel units.
        clip (bool, True): clip the input (grey, random or x, plus δ) to [0,1].
        layers (str or list, "conv"): "conv" for every ``nn.Conv2d`` output, or module names
        (as in ``model.named_modules()``).
        prior (str, "none"): "none" (δ on mid-grey), "range" (δ on uniform random images) or
        "data" (δ on images of X).
        steps (int, 100): Adam steps per pass (its moments restart every pass).
        step_size (float, 0.5): Adam's learning rate in 0–255 units.
        batch_size (int, 16): images per step with the range and data priors.
        saturation (float, 0.001): without X the attack stops once the share of δ's entries at
        the ℓ∞ bound (ℓ2/ℓ1: ‖δ‖ relative to ε) changes by less than this over a pass.

    Shape:
        ``run_pass(model, v, images, clean_labels, generator, pass_index)``: v C×H×W in [0,1]
        scale; images N×C×H×W (read only with prior "data"; may be None otherwise) and
        clean_labels (N,) are not used by the objective. Returns the new v and :class:`PassStats`.

    Example::

        engine = GDUAP(ThreatModel.parse(10, "inf"), prior="none", steps=100)
        v, stats = engine.run_pass(model, torch.zeros(3, 224, 224), None, None, torch.Generator(), pass_index=0)

    The first pass (``pass_index`` 0, v all zeros) starts from δ drawn uniformly in the ℓ∞ box
    of radius ε (then projected onto the ℓp ball), as the authors do.
    """

    name = "gd_uap"
    Options = GDUAPOptions
    options: GDUAPOptions
    averages_loss = True

    @property
    def reads_images(self) -> bool:
        return self.options.prior == "data"

    def run_pass(
        self,
        model: nn.Module,
        v: Tensor,
        images: Optional[Tensor],
        clean_labels: Optional[Tensor],
        generator: Optional[torch.Generator],
        pass_index: Optional[int] = None,
        reducer: Optional[Reducer] = None,
    ) -> Tuple[Tensor, PassStats]:
        if self.reads_images and images is None:
            raise ValueError("attack.prior=data needs the attack set X; use prior none or range without images")
        v = v.detach().clone()
        if pass_index == 0 and not bool(v.any()):
            v = self.project(uniform_start(v, self.threat, generator))
        before = saturation_of(v, self.threat)
        v.requires_grad_(True)
        adam = torch.optim.Adam([v], lr=to_image_scale(self.options.step_size))
        members = len(model.members) if isinstance(model, Ensemble) else 1  # the loss is averaged over them
        with activations(model, self.options.layers) as outputs, torch.enable_grad():
            for _ in range(self.options.steps):
                outputs.clear()
                model(perturb(self._inputs(v, images, generator), v, self.clip))
                loss = (
                    -cast(
                        Tensor, sum(torch.log(output.flatten(1).norm(dim=1) + NORM_FLOOR).mean() for output in outputs)
                    )
                    / members
                )
                adam.zero_grad()
                torch.autograd.backward(loss)
                adam.step()
                with torch.no_grad():
                    v.copy_(self.project(v))
        v = v.detach()
        moved = abs(saturation_of(v, self.threat) - before)
        return v, PassStats(updates=self.options.steps, mean_iterations=0.0, converged=moved < self.options.saturation)

    def _inputs(self, v: Tensor, images: Optional[Tensor], generator: Optional[torch.Generator]) -> Tensor:
        """The images δ is added to in one step (B×C×H×W in [0,1])."""
        prior, batch = self.options.prior, self.options.batch_size
        if prior == "none":
            return torch.full((1, *v.shape), GREY, dtype=v.dtype, device=v.device)
        if prior == "range":
            return torch.rand((batch, *v.shape), generator=generator, dtype=v.dtype).to(v.device)
        data = cast(Tensor, images)  # prior "data": run_pass has refused a pass without images
        chosen = torch.randint(data.shape[0], (batch,), generator=generator)
        return data[chosen].to(device=v.device, dtype=v.dtype)

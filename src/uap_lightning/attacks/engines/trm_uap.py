"""TRM-UAP: data-free universal perturbations by truncated ratio maximization (Liu, Feng, Wang,
Yang and Ming, "TRM-UAP: Enhancing the Transferability of Data-Free Universal Adversarial
Perturbation via Truncated Ratio Maximization", ICCV 2023).

δ raises the ratio of the positive to the negative activations it causes in the victim's first,
shallow convolutional layers (the truncation: low-level features are the ones networks share, the
paper's lever for transfer), on artificial images drawn from a curriculum that grows harder; no
image of X is read. With A_l (B×C_l×H_l×W_l) the output of the l-th ``nn.Conv2d`` call of the
forward pass of a batch of pseudo-images x + δ and L the number of such calls, δ maximises

    R(δ) = Σ_{l ≤ L_p} log(½‖A_l⁺‖₂²) − λ Σ_{l ≤ L_n} log(½‖A_l⁻‖₂),

the log of the positive-negative activation ratio Π‖A_l⁺‖² / Π‖A_l⁻‖^λ, with A⁺ = max(A, 0),
A⁻ = min(A, 0), each norm over the whole batch, L_p = ⌊p_rate·L⌋ and L_n = ⌊n_rate·L⌋ (at least
one layer when the rate is above 0). Activations are those of (x + δ) itself, not differences to
x; exponents, ½ factors and the 1e-9 inside the logs are those of the authors' code (trmuap.py,
l2_layer_loss). The pass driver hands the engine the victim with batch norm folded into its
convolutions, so A_l is read after the batch norm and before the activation function.

The curriculum (the authors' strategy.py; step t counts Adam steps from 1 across passes, pass i
covering steps i·steps + 1 … (i + 1)·steps):

- ``gauss``: 0.5 + Gaussian noise, clipped to [0,1], with standard deviation σ in the last channel
  and 10 more in each channel before it (RGB: σ+20, σ+10, σ; 0–255 units), where
  σ = min(10 + std_growth·⌊t/400⌋, 127).
- ``jigsaw``: each image cut at k random rows and k random columns into (k+1)² rectangles, each a
  uniform random colour; k = 1 + min(⌊t/600⌋, 6).
- the batch starts at ``batch_size`` and doubles at steps 1600, 2400 and 3200 (jigsaw: 1600, 3200).

Adam on δ (v, C×H×W in [0,1] scale) with a projection onto the ℓp ball of radius ε after every
step. Where this differs from the authors' code: pseudo-images are pixel-space images in [0,1]
that pass, with δ, through the victim's normalisation layer (the authors feed mean-subtracted
noise plus δ to the network without its normalisation), without the random flips, rotations and
blur of the noise or the median filter of the jigsaw images, and without the model-specific jigsaw
schedules of ResNet-152 and GoogLeNet; Adam's moments restart every pass; δ is not halved when it
saturates, and the attack without X stops once the curriculum has reached its last stage and δ's
saturation settles (the authors stop on the fooling rate of validation images).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple, cast

import torch
from torch import Tensor, nn

from uap_lightning.attacks.activations import GREY, activations
from uap_lightning.attacks.base import PassStats, UniversalAttack, register_engine
from uap_lightning.attacks.data_free import saturation_of, uniform_start
from uap_lightning.attacks.distributed import Reducer
from uap_lightning.errors import ConfigError
from uap_lightning.metrics import perturb
from uap_lightning.units import to_image_scale

PRIORS = ("gauss", "jigsaw")
LOG_FLOOR = 1e-9  # inside every log of R, as in the authors' code
# the curriculum of the authors' code (strategy.py); steps are Adam steps counted from 1
GAUSS_STD = 10.0  # σ at the start, 0–255 units
GAUSS_CHANNEL_STD = 10.0  # each channel has this much more σ than the next, 0–255 units
GAUSS_STD_MAX = 127.0  # σ grows no further, 0–255 units
GAUSS_EVERY = 400  # σ grows by std_growth every this many steps
GAUSS_DOUBLINGS = (1600, 2400, 3200)  # the batch doubles at these steps
JIGSAW_CUTS = 1  # cuts per axis at the start
JIGSAW_EVERY = 600  # one more cut per axis every this many steps ...
JIGSAW_UNTIL = 4200  # ... before this step
JIGSAW_DOUBLINGS = (1600, 3200)


@dataclass(frozen=True)
class TRMUAPOptions:
    """TRM-UAP's settings (the ``attack`` keys of ``attack=trm_uap``), see :class:`TRMUAP`."""

    p_rate: float = 0.8  # share of the conv layers, the first ones, whose positive activations count
    n_rate: float = 0.8  # the same for the negative activations; 0: no negative term
    lam: float = 1.0  # λ, the weight of the negative term
    prior: str = "gauss"  # gauss | jigsaw: the kind of pseudo-images
    std_growth: float = 10.0  # gauss: σ grows by this every 400 steps, 0–255 units
    steps: int = 400  # Adam steps per pass
    step_size: float = 25.5  # Adam's learning rate, 0–255 units
    batch_size: int = 1  # pseudo-images per step at the start of the curriculum
    saturation: float = 0.001  # without X: stop once the share of δ at its bound moves less than this in a pass

    def __post_init__(self) -> None:
        if not 0 < self.p_rate <= 1:
            raise ValueError(f"attack.p_rate must lie in (0, 1] (a share of the conv layers); got {self.p_rate!r}")
        if not 0 <= self.n_rate <= 1:
            raise ValueError(f"attack.n_rate must lie in [0, 1] (a share of the conv layers); got {self.n_rate!r}")
        if not (math.isfinite(self.lam) and self.lam >= 0):
            raise ValueError(f"attack.lam must be a number >= 0; got {self.lam!r}")
        if self.prior not in PRIORS:
            raise ValueError(f"attack.prior must be one of {', '.join(PRIORS)}; got {self.prior!r}")
        if not (math.isfinite(self.std_growth) and self.std_growth >= 0):
            raise ValueError(f"attack.std_growth must be a number >= 0 in 0-255 units; got {self.std_growth!r}")
        if self.steps < 1:
            raise ValueError(f"attack.steps must be at least 1; got {self.steps}")
        if not (math.isfinite(self.step_size) and self.step_size > 0):
            raise ValueError(f"attack.step_size must be a positive number in 0-255 units; got {self.step_size!r}")
        if self.batch_size < 1:
            raise ValueError(f"attack.batch_size must be at least 1; got {self.batch_size}")
        if not 0 <= self.saturation < 1:
            raise ValueError(f"attack.saturation must lie in [0, 1); got {self.saturation}")


@dataclass(frozen=True)
class Stage:
    """The pseudo-images of one step: how many, σ of the Gaussian ones (0–255 units) and the cuts
    per axis of the jigsaw ones."""

    batch_size: int
    std: float
    cuts: int


def curriculum_stage(prior: str, step: int, batch_size: int = 1, std_growth: float = 10.0) -> Stage:
    """The stage of Adam step ``step`` (from 1, counted across passes) for ``prior``."""
    if prior == "gauss":
        doublings = sum(step >= milestone for milestone in GAUSS_DOUBLINGS)
        std = min(GAUSS_STD + std_growth * (step // GAUSS_EVERY), GAUSS_STD_MAX)
        return Stage(batch_size * 2**doublings, std, 0)
    doublings = sum(step >= milestone for milestone in JIGSAW_DOUBLINGS)
    cuts = JIGSAW_CUTS + min(step // JIGSAW_EVERY, (JIGSAW_UNTIL - 1) // JIGSAW_EVERY)
    return Stage(batch_size * 2**doublings, 0.0, cuts)


def curriculum_end(prior: str, std_growth: float = 10.0) -> int:
    """The first step from which the stage of ``prior`` no longer changes."""
    if prior == "gauss":
        growth = GAUSS_EVERY * math.ceil((GAUSS_STD_MAX - GAUSS_STD) / std_growth) if std_growth > 0 else 0
        return max(GAUSS_DOUBLINGS[-1], growth)
    return max(JIGSAW_DOUBLINGS[-1], JIGSAW_EVERY * ((JIGSAW_UNTIL - 1) // JIGSAW_EVERY))


def pseudo_images(
    prior: str,
    stage: Stage,
    shape: Sequence[int],
    generator: Optional[torch.Generator],
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``stage.batch_size`` artificial images of ``shape`` (C×H×W), B×C×H×W in [0,1] on the CPU,
    drawn from ``generator``: Gaussian noise around mid-grey, or jigsaw images (see the module)."""
    channels, height, width = shape
    batch = stage.batch_size
    if prior == "gauss":
        extra = [GAUSS_CHANNEL_STD * (channels - 1 - c) for c in range(channels)]
        std = torch.tensor([to_image_scale(stage.std + more) for more in extra], dtype=dtype)
        noise = torch.randn((batch, channels, height, width), generator=generator, dtype=dtype)
        return (GREY + std.view(1, channels, 1, 1) * noise).clamp_(0.0, 1.0)
    pieces = stage.cuts + 1
    rows = _piece_index(batch, height, stage.cuts, generator)
    columns = _piece_index(batch, width, stage.cuts, generator)
    colours = torch.rand((batch, channels, pieces * pieces), generator=generator, dtype=dtype)
    piece = (rows[:, :, None] * pieces + columns[:, None, :]).flatten(1)  # B×(H·W)
    return colours.gather(2, piece[:, None, :].expand(batch, channels, -1)).view(batch, channels, height, width)


def _piece_index(batch: int, length: int, cuts: int, generator: Optional[torch.Generator]) -> Tensor:
    """B×length int64: the piece (0 … cuts) of each row (or column) of each image once ``cuts``
    random positions in [0, length] cut it; coinciding cuts leave fewer pieces."""
    positions = torch.randint(0, length + 1, (batch, cuts), generator=generator).sort(dim=1).values
    return torch.searchsorted(positions, torch.arange(length).repeat(batch, 1), right=True)


def truncated_ratio(outputs: Sequence[Tensor], p_rate: float, n_rate: float, lam: float) -> Tensor:
    """R, the log positive-negative activation ratio of the first conv outputs (see the module),
    from ``outputs``, the outputs of every conv call of one forward pass in call order; a 0-dim
    tensor. ConfigError naming the truncation keys when the pass ran no conv layer."""
    if not outputs:
        raise ConfigError(
            "attack.method=trm_uap: the model ran no Conv2d layer, so attack.p_rate and attack.n_rate select no "
            "activations; TRM-UAP needs a convolutional victim (attack=gd_uap takes attack.layers=[NAME, ...])"
        )
    # p_rate > 0 keeps a layer or more, so the positive sum is a tensor (n_rate = 0 leaves the negative one 0)
    positive = cast(
        Tensor,
        sum(
            torch.log(out.clamp(min=0).square().sum() / 2 + LOG_FLOOR)
            for out in outputs[: _truncation(len(outputs), p_rate)]
        ),
    )
    negative = sum(
        torch.log(torch.linalg.vector_norm(out.clamp(max=0)) / 2 + LOG_FLOOR)
        for out in outputs[: _truncation(len(outputs), n_rate)]
    )
    return positive - lam * negative


def _truncation(layers: int, rate: float) -> int:
    """How many of ``layers`` layers a rate keeps: ⌊rate·layers⌋, at least one when rate > 0."""
    kept = int(layers * rate)
    return max(kept, 1) if rate > 0 else 0


@contextlib.contextmanager
def conv_outputs(model: nn.Module) -> Iterator[List[Tensor]]:
    """Inside, the output of every ``nn.Conv2d`` call of ``model`` is appended to the yielded list
    (in call order); the hooks are removed on exit."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    with activations(model, names) as outputs:
        yield outputs


@register_engine
class TRMUAP(UniversalAttack):
    """TRM-UAP: Adam steps on δ that raise the positive-negative activation ratio of the victim's
    first conv layers on a curriculum of pseudo-images, projected onto the ℓp ball of radius ε;
    data-free.

    Arguments:
        threat: the ℓp ball, ``ThreatModel.parse(eps, p)`` with ε in 0–255 pixel units.
        clip (bool, True): clip the pseudo-images plus δ to [0,1].
        p_rate (float, 0.8): the first ⌊p_rate·L⌋ of the L conv outputs (at least one) enter the
            positive term.
        n_rate (float, 0.8): the same for the negative term (0: none).
        lam (float, 1.0): λ, the weight of the negative term.
        prior (str, "gauss"): the pseudo-images, "gauss" (noise around mid-grey, σ growing) or
            "jigsaw" (random-colour rectangles, more of them over time).
        std_growth (float, 10): gauss: σ grows by this every 400 steps, 0–255 units.
        steps (int, 400): Adam steps per pass (its moments restart every pass).
        step_size (float, 25.5): Adam's learning rate in 0–255 units.
        batch_size (int, 1): pseudo-images per step at the start; the curriculum doubles it.
        saturation (float, 0.001): without X the attack stops after a pass that ran entirely on the
            curriculum's last stage and changed the share of δ's entries at the ℓ∞ bound (ℓ2/ℓ1:
            ‖δ‖ relative to ε) by less than this.

    Shape:
        ``run_pass(model, v, images, clean_labels, generator, pass_index)``: v C×H×W in [0,1]
        scale; images (N×C×H×W or None) and clean_labels are never read; ``pass_index`` (0-based)
        places the pass in the curriculum. Returns the new v and :class:`PassStats`.

    Example::

        engine = TRMUAP(ThreatModel.parse(10, "inf"), prior="gauss", p_rate=0.8, n_rate=0.8)
        v, stats = engine.run_pass(model, torch.zeros(3, 224, 224), None, None, torch.Generator(), pass_index=0)

    The first pass (``pass_index`` 0, v all zeros) starts from δ drawn uniformly in the ℓ∞ box of
    radius ε (then projected onto the ℓp ball), as the authors do.
    """

    name = "trm_uap"
    Options = TRMUAPOptions

    @property
    def reads_images(self) -> bool:
        return False

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
        options = self.options
        first_step = (pass_index or 0) * options.steps + 1
        v = v.detach().clone()
        if pass_index == 0 and not bool(v.any()):
            v = self.project(uniform_start(v, self.threat, generator))
        before = saturation_of(v, self.threat)
        v.requires_grad_(True)
        adam = torch.optim.Adam([v], lr=to_image_scale(options.step_size))
        with conv_outputs(model) as outputs, torch.enable_grad():
            for step in range(first_step, first_step + options.steps):
                stage = curriculum_stage(options.prior, step, options.batch_size, options.std_growth)
                inputs = pseudo_images(options.prior, stage, v.shape, generator, v.dtype).to(v.device)
                outputs.clear()
                model(perturb(inputs, v, self.clip))
                loss = -truncated_ratio(outputs, options.p_rate, options.n_rate, options.lam)
                adam.zero_grad()
                torch.autograd.backward(loss)
                adam.step()
                with torch.no_grad():
                    v.copy_(self.project(v))
        v = v.detach()
        settled = first_step >= curriculum_end(options.prior, options.std_growth)
        moved = abs(saturation_of(v, self.threat) - before)
        converged = settled and moved < options.saturation
        return v, PassStats(updates=options.steps, mean_iterations=0.0, converged=converged)

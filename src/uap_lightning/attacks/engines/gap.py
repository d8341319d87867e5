"""GAP: universal perturbations from a generator network (Poursaeed, Katsman, Gao and Belongie,
"Generative Adversarial Perturbations", CVPR 2018), the universal (image-agnostic) variant.

A ResNet generator G (Johnson et al., ECCV 2016: a 7×7 convolution, two stride-2 convolutions,
residual blocks, two stride-2 transposed convolutions, a 7×7 convolution and tanh) maps one fixed
noise pattern z (C×H×W, uniform in [0,1], drawn once from the seed) to a raw perturbation G(z)
(C×H×W in (−1, 1)), which is scaled onto the ℓp sphere of radius ε (ε in 0–255 units, ε/255 in
the [0,1] scale of the images), so that δ always uses the whole budget:

    δ = G(z) · (ε/255) / ‖G(z)‖_p

δ is added to the images, x + δ clipped to [0,1], and G is trained with Adam (lr 2e-4, betas
(0.5, 0.999)) on the fooling loss of the classifier f, as in the authors' code (GAP_clf.py):

    untargeted:  l = log H(f(x + δ), 1_{y_ll})    y_ll = argmin f(x), the clean image's least likely class
    targeted:    l = log H(f(x + δ), 1_t)         t = ``target_class``

where H is the cross-entropy averaged over the batch: minimising l pulls every image towards its
least likely class (untargeted), or towards the target.

Deliberate differences from the authors' code: the generator normalises with instance norm where
the code uses batch norm on a batch of copies of the same z (the same function while training, but
also in eval mode, so that δ does not depend on running statistics); δ is the tanh output scaled as
a whole, where the code shifts it by the normalisation's mean and scales each colour channel to ε
(ℓ∞ only); the reflection padding is built from slices and flips, whose gradients are
deterministic on CUDA.

The generator's width and depth follow the image side (:func:`default_ngf`, :func:`default_blocks`):
the paper's ngf=64 and 6 blocks at 224 px and above, ngf=8 and 1 block on 8×8 digits, whose
perturbation has 64 entries.

The noise z is a buffer of the generator, so its state dict (``generator.pt``) holds everything
the perturbation depends on: weights saved and loaded back give the same δ whatever the seed.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uap_lightning.attacks.base import PassStats, UniversalAttack, register_engine
from uap_lightning.attacks.distributed import Reducer
from uap_lightning.attacks.model_state import model_device
from uap_lightning.attacks.settings import AttackSettings
from uap_lightning.attacks.threat import ThreatModel
from uap_lightning.errors import ConfigError, DamagedFileError
from uap_lightning.metrics import perturb

ADAM_BETAS = (0.5, 0.999)  # the authors' code (--beta1 0.5)
INIT_STD = 0.02  # the authors' weights_init: conv weights N(0, 0.02), norm scales N(1, 0.02)
CE_FLOOR = 1e-12  # keeps log H finite once every image sits at its aim
MIN_SIDE = 5  # the smallest image side whose 4× downsampled map (⌈⌈H/2⌉/2⌉ ≥ 2) can be reflection-padded
PAPER_SIDE, PAPER_NGF, PAPER_BLOCKS = 224, 64, 6  # the paper's generator for 224×224 images
WEIGHTS_KEY = "attack.generator_weights"


@dataclass(frozen=True)
class GAPOptions:
    """GAP's settings (the ``attack`` keys of ``attack=gap``), see :class:`GAP`."""

    ngf: Optional[int] = None  # filters of the generator's first convolution; None: default_ngf of the image side
    blocks: Optional[int] = None  # residual blocks; None: default_blocks of the image side
    lr: float = 2e-4  # Adam's learning rate on the generator's weights (the code: 0.0002)
    batch_size: int = 30  # images per Adam step (the code: --batchSize 30)
    generator_weights: Optional[str] = None  # a generator.pt to start from (tensors only)

    def __post_init__(self) -> None:
        for key, least, nullable in (("ngf", 1, True), ("blocks", 0, True), ("batch_size", 1, False)):
            value = getattr(self, key)
            if value is None and nullable:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                null = " or null" if nullable else ""
                raise ValueError(f"attack.{key} must be an integer >= {least}{null}; got {value!r}")
        lr = self.lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"attack.lr must be a positive number; got {lr!r}")
        if self.generator_weights is not None and not Path(self.generator_weights).is_file():
            raise ValueError(
                f"{WEIGHTS_KEY}={self.generator_weights} is not a file; give the generator.pt an attack=gap run wrote"
            )


def default_ngf(side: int) -> int:
    """The generator's first width for images of ``side`` pixels: the paper's 64 at 224 px, scaled
    with the side (so the weights grow with the image's area) in multiples of 8, from 8 to 64."""
    return min(PAPER_NGF, 8 * max(1, round(PAPER_NGF / 8 * side / PAPER_SIDE)))


def default_blocks(side: int) -> int:
    """The generator's residual blocks for images of ``side`` pixels: the paper's 6 at 224 px, scaled
    with the side, from 1 to 6."""
    return min(PAPER_BLOCKS, max(1, round(PAPER_BLOCKS * side / PAPER_SIDE)))


def reflect_pad(x: Tensor, pad: int) -> Tensor:
    """``x`` (N×C×H×W) padded by ``pad`` pixels on every side with its mirror image, as
    ``F.pad(x, (pad,) * 4, mode="reflect")``, from slices, flips and concatenation."""
    top, bottom = x[..., 1 : pad + 1, :].flip(-2), x[..., -pad - 1 : -1, :].flip(-2)
    x = torch.cat([top, x, bottom], dim=-2)
    left, right = x[..., 1 : pad + 1].flip(-1), x[..., -pad - 1 : -1].flip(-1)
    return torch.cat([left, x, right], dim=-1)


class ReflectPad(nn.Module):
    """:func:`reflect_pad` by ``pad`` pixels as a layer."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        return reflect_pad(x, self.pad)


def _conv_norm_relu(conv: nn.Module, width: int) -> List[nn.Module]:
    return [conv, nn.InstanceNorm2d(width, affine=True), nn.ReLU()]


class ResidualBlock(nn.Module):
    """x + (pad, 3×3 conv, norm, ReLU, pad, 3×3 conv, norm)(x) at ``width`` channels."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            ReflectPad(1),
            *_conv_norm_relu(nn.Conv2d(width, width, 3, bias=False), width),
            ReflectPad(1),
            nn.Conv2d(width, width, 3, bias=False),
            nn.InstanceNorm2d(width, affine=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        residual: Tensor = self.body(x)
        return x + residual


class ResnetGenerator(nn.Module):
    """G: the fixed noise ``noise`` (buffer, 1×C×H×W) → a raw perturbation C×H×W in (−1, 1).

    Layers (Johnson et al.): 7×7 conv to ``ngf`` channels, two stride-2 3×3 convs (×2 channels
    each), ``blocks`` residual blocks at 4·ngf channels and ⌈⌈H/2⌉/2⌉ × ⌈⌈W/2⌉/2⌉ pixels, two
    stride-2 transposed convs back, a 7×7 conv to C channels and tanh; each hidden conv is
    followed by instance norm and ReLU. The output is cropped to H×W.
    """

    noise: Tensor

    def __init__(self, noise: Tensor, ngf: int, blocks: int) -> None:
        super().__init__()
        channels, height, width = noise.shape[1:]
        if min(height, width) < MIN_SIDE:
            raise ValueError(f"attack=gap needs images of at least {MIN_SIDE}×{MIN_SIDE} pixels; got {height}×{width}")
        self.ngf, self.blocks = ngf, blocks
        self.register_buffer("noise", noise)
        layers = [ReflectPad(3), *_conv_norm_relu(nn.Conv2d(channels, ngf, 7, bias=False), ngf)]
        for mult in (1, 2):
            down = nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1, bias=False)
            layers += _conv_norm_relu(down, ngf * mult * 2)
        layers += [ResidualBlock(ngf * 4) for _ in range(blocks)]
        for mult in (4, 2):
            up = nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 3, stride=2, padding=1, output_padding=1, bias=False)
            layers += _conv_norm_relu(up, ngf * mult // 2)
        layers += [ReflectPad(3), nn.Conv2d(ngf, channels, 7), nn.Tanh()]
        self.layers = nn.Sequential(*layers)

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        """(C, H, W) of the perturbation."""
        return cast(Tuple[int, int, int], tuple(self.noise.shape[1:]))

    def forward(self) -> Tensor:
        _, height, width = self.image_shape
        raw: Tensor = self.layers(self.noise)
        return raw[0, :, :height, :width]

    def initialise(self, generator: torch.Generator) -> None:
        """The authors' initialisation, drawn from ``generator`` (CPU): conv weights N(0, 0.02), norm
        scales N(1, 0.02), biases 0."""
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                    module.weight.normal_(0.0, INIT_STD, generator=generator)
                elif isinstance(module, nn.InstanceNorm2d):
                    module.weight.normal_(1.0, INIT_STD, generator=generator)
                bias = getattr(module, "bias", None)
                if bias is not None:
                    bias.zero_()


@register_engine
class GAP(UniversalAttack):
    """GAP: a ResNet generator, trained with Adam on the fooling loss, maps a fixed noise pattern to
    δ = G(z)·ε/‖G(z)‖_p (see the module's notes for the equations).

    Arguments:
        threat: the ℓp ball, ``ThreatModel.parse(eps, p)`` with ε in 0–255 pixel units.
        clip (bool, True): clip x + δ to [0,1].
        target_class (int or None, None): push images to this class instead of each clean image's
        least likely class.
        seed (int, 0): draws the noise z and the generator's initial weights.
        ngf (int or None, None): filters of the first convolution; None: :func:`default_ngf` of the
        image side (the paper's 64 at 224 px and above, 8 on 8×8 digits).
        blocks (int or None, None): residual blocks; None: :func:`default_blocks` of the image side
        (the paper's 6 at 224 px and above, 1 on 8×8 digits).
        lr (float, 2e-4): Adam's learning rate on the weights (betas (0.5, 0.999)).
        batch_size (int, 30): images per Adam step.
        generator_weights (str or None, None): a state dict (``generator.pt``) to start from, read
        tensors-only; ConfigError naming ``attack.generator_weights`` when it does not fit.

    The generator and Adam's moments live in the engine: each ``run_pass`` continues training them,
    one epoch over X in the order ``torch.randperm(N, generator=generator)``; the v it is given is
    not read. Every process of a multi-process run trains the same generator on all of X.

    Shape:
        ``run_pass(model, v, images, clean_labels, generator, pass_index)``: v C×H×W (its shape,
        device and dtype are the generator's), images N×C×H×W in [0,1] scale; returns δ (C×H×W,
        [0,1] scale, on the ℓp sphere of radius ε/255) and :class:`PassStats`.

    Example::

        engine = GAP(ThreatModel.parse(10, "inf"), seed=0)
        for k in range(10):
            v, _ = engine.run_pass(model, v, X, clean, generator, pass_index=k)
        torch.save(engine.generator.state_dict(), "generator.pt")
    """

    name = "gap"
    Options = GAPOptions

    def __init__(self, threat: ThreatModel, *, seed: int = AttackSettings.seed, **options: Any) -> None:
        super().__init__(threat, **options)
        self.seed = int(seed)
        self.generator: Optional[ResnetGenerator] = None
        self.optimizer: Optional[torch.optim.Adam] = None

    @classmethod
    def from_settings(cls, settings: AttackSettings) -> "GAP":
        """The engine for ``settings``, its noise and initial weights drawn from ``settings.seed``."""
        return cls(
            settings.threat,
            clip=settings.clip,
            target_class=settings.target_class,
            seed=settings.seed,
            **settings.options,
        )

    def build(
        self, image_shape: Sequence[int], device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32
    ) -> ResnetGenerator:
        """The generator for C×H×W ``image_shape`` on ``device``: built on the first call (noise and
        weights drawn from the seed, then ``generator_weights`` loaded when set), the same after."""
        shape = tuple(int(n) for n in image_shape)
        if self.generator is None:
            side = min(shape[1:])
            ngf = default_ngf(side) if self.options.ngf is None else self.options.ngf
            blocks = default_blocks(side) if self.options.blocks is None else self.options.blocks
            draws = torch.Generator().manual_seed(self.seed)
            noise = torch.rand((1, *shape), generator=draws)
            generator = ResnetGenerator(noise, ngf, blocks)
            generator.initialise(draws)
            if self.options.generator_weights is not None:
                load_generator_weights(generator, self.options.generator_weights)
            self.generator = generator.to(device=device, dtype=dtype)
        elif self.generator.image_shape != shape:
            raise ValueError(f"the generator makes {self.generator.image_shape} perturbations; got images of {shape}")
        return self.generator

    def make_optimizer(self) -> torch.optim.Adam:
        """A new Adam on the generator's weights with the engine's learning rate and the authors' betas."""
        return torch.optim.Adam(self._built().parameters(), lr=self.options.lr, betas=ADAM_BETAS)

    def scale(self, raw: Tensor) -> Tensor:
        """``raw`` (C×H×W) times ε/‖raw‖_p ([0,1] scale): on the ℓp sphere of radius ε/255."""
        norm: Tensor = torch.linalg.vector_norm(raw.flatten(), ord=self.threat.p)
        return raw * (self.threat.radius / norm.clamp_min(torch.finfo(raw.dtype).tiny))

    def perturbation(self) -> Tensor:
        """δ = scale(G(z)) (C×H×W, [0,1] scale, on the generator's device), without gradients."""
        with torch.no_grad():
            return self.scale(self._built()())

    def aims(self, model: nn.Module, images: Tensor) -> Tensor:
        """The class each of ``images`` (N×C×H×W in [0,1]) is pushed to, (N,) int64 on the CPU: the
        target class, or the least likely class of ``model`` on the clean image."""
        if self.target_class is not None:
            return torch.full((images.shape[0],), self.target_class, dtype=torch.long)
        device = model_device(model)
        with torch.no_grad():
            return torch.cat(
                [model(chunk.to(device)).argmin(dim=1).cpu() for chunk in torch.split(images, self.options.batch_size)]
            )

    def fooling_loss(self, model: nn.Module, images: Tensor, aims: Tensor) -> Tensor:
        """log H(f(clip(x + δ)), 1_aim): the log of the batch's mean cross-entropy of ``model`` on
        ``images`` (B×C×H×W, on the generator's device) plus δ towards ``aims`` (B,); a scalar with
        gradients for the generator's weights."""
        delta = self.scale(self._built()())
        logits = model(perturb(images, delta, self.clip))
        cross_entropy = -F.log_softmax(logits, dim=1).gather(1, aims.to(logits.device).unsqueeze(1)).mean()
        return torch.log(cross_entropy.clamp_min(CE_FLOOR))

    def run_pass(
        self,
        model: nn.Module,
        v: Tensor,
        images: Tensor,
        clean_labels: Tensor,
        generator: Optional[torch.Generator],
        pass_index: Optional[int] = None,
        reducer: Optional[Reducer] = None,
    ) -> Tuple[Tensor, PassStats]:
        self.build(v.shape, device=v.device, dtype=v.dtype)
        if self.optimizer is None:
            self.optimizer = self.make_optimizer()
        aims = self.aims(model, images)
        batches = torch.split(torch.randperm(images.shape[0], generator=generator), self.options.batch_size)
        with torch.enable_grad():
            for batch in batches:
                loss = self.fooling_loss(model, images[batch].to(v.device), aims[batch])
                self.optimizer.zero_grad()
                torch.autograd.backward(loss)
                self.optimizer.step()
        return self.perturbation().to(v.dtype), PassStats(updates=len(batches), mean_iterations=0.0)

    def _built(self) -> ResnetGenerator:
        if self.generator is None:
            raise RuntimeError("the generator is built by the first run_pass or by build(image_shape)")
        return self.generator


def generator_state(generator: nn.Module) -> Dict[str, Tensor]:
    """A CPU copy of ``generator``'s state dict (weights and the noise z): what ``generator.pt`` holds."""
    return {key: value.detach().cpu().clone() for key, value in generator.state_dict().items()}


def load_generator_weights(generator: ResnetGenerator, path: str, key: str = WEIGHTS_KEY) -> None:
    """Load the state dict at ``path`` into ``generator``, reading tensors only.

    DamagedFileError when the file is not a plain state dict of tensors; ConfigError naming ``key``
    when its entries or shapes differ from the generator's (another image size, ngf or blocks)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        raise DamagedFileError(f"{key}={path} cannot be read as a plain tensors file: {err}".splitlines()[0]) from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise DamagedFileError(f"{key}={path} is not a state dict of tensors (a generator.pt of an attack=gap run)")
    expected = generator.state_dict()
    differences = _differences(expected, state)
    if differences:
        channels, height, width = generator.image_shape
        raise ConfigError(
            f"{key}={path} does not fit the generator of attack.ngf={generator.ngf}, attack.blocks={generator.blocks} "
            f"for {channels}×{height}×{width} images: {'; '.join(differences)}; give weights saved with the same image "
            "size, ngf and blocks"
        )
    generator.load_state_dict(state)


def _differences(expected: Dict[str, Tensor], found: Dict[str, Tensor], shown: int = 3) -> Iterable[str]:
    """Up to ``shown`` lines on how ``found``'s entries differ from ``expected``'s (names, shapes)."""
    lines = [f"{name} is missing" for name in expected if name not in found]
    lines += [f"{name} is not a generator entry" for name in found if name not in expected]
    lines += [
        f"{name} has shape {tuple(found[name].shape)} in the file, {tuple(tensor.shape)} here"
        for name, tensor in expected.items()
        if name in found and found[name].shape != tensor.shape
    ]
    return lines[:shown] + ([f"{len(lines) - shown} more"] if len(lines) > shown else [])

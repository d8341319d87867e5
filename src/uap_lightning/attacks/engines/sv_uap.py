"""SV-UAP: universal perturbations from the (p, q)-singular vectors of a hidden layer's Jacobian
(Khrulkov and Oseledets, "Art of singular vectors and universal adversarial perturbations",
CVPR 2018, arXiv 1709.03582).

A perturbation ε that moves the features f_i(x) of a hidden layer far, for many images at once,
maximises Σ_j ‖J_i(x_j) ε‖_q^q subject to ‖ε‖_p ≤ ξ, J_i(x) the Jacobian of layer i at image x
(f_i(x + ε) − f_i(x) ≈ J_i(x) ε). Stacking the Jacobians of a batch of images X_b into
J = [J_i(x_1); …; J_i(x_b)] makes this the (p, q)-singular vector of J: v maximising ‖J v‖_q
subject to ‖v‖_p = 1. It is found by Boyd's generalised power method (the paper's Algorithm 1,
Boyd 1974): with ψ_r(z) = sign(z)·|z|^(r−1) entrywise and p' = p/(p − 1) the dual exponent,

    v ← ψ_p'(Jᵀ ψ_q(J v)),  v ← v / ‖v‖_p,

which for p = ∞ (p' = 1, ψ_1 = sign) is v ← sign(Jᵀ ψ_q(J v)): v stays a ±1 vertex of the ℓ∞
ball. J is never formed: J v is a Jacobian-vector product (forward-mode AD, or the
double-backward trick where an operation lacks a forward-mode formula) and Jᵀ w a
vector-Jacobian product (backward), summed over the images of the batch (the paper's Algorithms
2 and 3). ‖J v‖_q never decreases from one step to the next, but for p = ∞ the problem is NP-hard
and the method ends in a local maximum that depends on its random start. The perturbation is
ξ·v, and of ±ξ·v (a singular vector has no sign) the one that fools more images of X is kept.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad

from uap_lightning import metrics
from uap_lightning.attacks import distributed
from uap_lightning.attacks.base import PassStats, UniversalAttack, register_engine
from uap_lightning.attacks.distributed import SINGLE_PROCESS, Reducer, shard
from uap_lightning.attacks.model_state import CompiledPredictions
from uap_lightning.attacks.settings import AttackSettings
from uap_lightning.attacks.threat import ThreatModel
from uap_lightning.errors import ConfigError

Features = Callable[[Tensor], Tensor]  # B×C×H×W images in [0,1] -> the layer's output for them
NAMES_SHOWN = 5  # module names an error about attack.layer suggests


@dataclass(frozen=True)
class SVUAPOptions:
    """SV-UAP's settings (the ``attack`` keys of ``attack=sv_uap``), see :class:`SVUAP`."""

    layer: Optional[str] = None  # a module name as in model.named_modules(); None: see default_layer
    jacobian_images: int = 64  # images of X whose Jacobians are stacked (the paper: 64)
    q: float = 5.0  # the norm of the layer's output change that is maximised (the paper: 5)
    power_iterations: int = 30  # steps of the power method (the authors' code: 30)
    batch_size: int = 32  # images per Jacobian product (memory only: the products are summed)

    def __post_init__(self) -> None:
        if self.layer is not None and not (isinstance(self.layer, str) and self.layer):
            raise ValueError(f"attack.layer must be a module name or null; got {self.layer!r}")
        for key in ("jacobian_images", "power_iterations", "batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"attack.{key} must be an integer >= 1; got {value!r}")
        if (
            isinstance(self.q, bool)
            or not isinstance(self.q, numbers.Real)
            or not (math.isfinite(self.q) and self.q > 1)
        ):
            raise ValueError(f"attack.q must be > 1 and finite; got {self.q!r}")


@register_engine
class SVUAP(UniversalAttack):
    """SV-UAP: ξ times the (p, q)-singular vector of the stacked Jacobians of one hidden layer at
    ``jacobian_images`` images of X, with the sign that fools more of X.

    Arguments:
        threat: the ℓp ball, ``ThreatModel.parse(eps, p)`` with ε in 0–255 pixel units; p = inf
            (the paper's case) or 2 (p = 1 is refused: its power step ψ_∞ is undefined).
        clip (bool, True): clip x ± v to [0,1] when choosing the sign.
        target_class (int or None, None): choose the sign by the targeted success rate instead
            (the singular vector itself is not aimed at a class).
        eval_batch_size (int, 512): images per prediction batch when choosing the sign.
        layer (str or None, None): the hidden layer, a name of ``model.named_modules()`` of the
            model the attack runs (see :func:`default_layer` for None). Its output at the first
            call in a forward pass is used.
        jacobian_images (int, 64): the images of X whose Jacobians are stacked, the first of
            ``torch.randperm(N, generator=generator)`` (``images`` would clash with ``compute_uap``'s
            first argument).
        q (float, 5.0): the ℓq norm of J v that is maximised, q > 1.
        power_iterations (int, 30): steps of the power method.
        batch_size (int, 32): images per Jacobian product.

    Shape:
        ``run_pass(model, v, images, clean_labels, generator, pass_index)``: v C×H×W and images
        N×C×H×W in [0,1] scale, clean_labels (N,) int64; returns the new v (C×H×W, ‖v‖_p = ε/255)
        and :class:`PassStats` (``updates``: power iterations run; ``converged`` True).

    The method is one computation, not an iteration over passes: the first pass, from v = 0,
    computes v; a later pass (v nonzero) returns v unchanged at no cost. The power method starts
    from ψ_p'(u)/‖ψ_p'(u)‖_p, u uniform in [−1, 1] from ``generator`` (p = inf: random signs), so
    the same seed gives the same v. After a pass, ``singular_value`` holds ‖J v‖_q of the unit
    singular vector (J of the layer's output with respect to [0,1]-scale images).

    Example::

        engine = SVUAP(ThreatModel.parse(10, "inf"), layer="features.9", q=5.0)
        v, _ = engine.run_pass(model, torch.zeros(3, 224, 224), X, clean, torch.Generator().manual_seed(0))
    """

    name = "sv_uap"
    one_pass = True
    Options = SVUAPOptions

    def __init__(
        self, threat: ThreatModel, *, eval_batch_size: int = AttackSettings.eval_batch_size, **options: Any
    ) -> None:
        super().__init__(threat, **options)
        if threat.p == 1.0:
            raise ValueError(
                "attack.method=sv_uap needs attack.p=inf (the paper's) or 2: for p=1 the power method's step "
                "ψ_∞ is undefined"
            )
        self.eval_batch_size = int(eval_batch_size)
        self.dual = threat.p / (threat.p - 1.0) if math.isfinite(threat.p) else 1.0  # p', 1/p + 1/p' = 1
        self.singular_value = math.nan

    @classmethod
    def from_settings(cls, settings: AttackSettings) -> "SVUAP":
        """The engine for ``settings``, choosing the sign with ``settings.eval_batch_size`` images a batch."""
        return cls(
            settings.threat,
            clip=settings.clip,
            target_class=settings.target_class,
            eval_batch_size=settings.eval_batch_size,
            **settings.options,
        )

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
        if bool(v.any()):
            return v, PassStats(updates=0, mean_iterations=0.0, converged=True)
        reducer = reducer or SINGLE_PROCESS
        # the module names of a compiled model are those of the model it wraps, which runs its gradients
        network = model.model if isinstance(model, CompiledPredictions) else model
        name = self.options.layer if self.options.layer is not None else default_layer(network)
        chosen = images[torch.randperm(images.shape[0], generator=generator)[: self.options.jacobian_images]]
        start = torch.rand(v.shape, generator=generator, dtype=v.dtype).mul_(2).sub_(1).to(v.device)
        with layer_output(network, name) as features, torch.enable_grad():
            jacobian = StackedJacobian(features, shard(reducer, chosen), self.options.batch_size, reducer, v)
            unit, steps = self._power_method(jacobian, self._normalised(_psi(start, self.dual)))
            self.singular_value = float(jacobian.q_norm(jacobian.matvec(unit), self.options.q))
        v = self.project(unit * self.threat.radius)
        if self._rate(model, images, clean_labels, -v, reducer) > self._rate(model, images, clean_labels, v, reducer):
            v = -v
        return v, PassStats(updates=steps, mean_iterations=0.0, converged=True)

    def _power_method(self, jacobian: "StackedJacobian", v: Tensor) -> Tuple[Tensor, int]:
        """Algorithm 1 from the unit vector ``v``: the (p, q)-singular vector (C×H×W, ‖v‖_p = 1) and
        the steps run (fewer than ``power_iterations`` only when J v or Jᵀ ψ_q(J v) vanishes).

        J v is divided by a common positive factor before ψ_q, which the next normalisation
        undoes: |J v|^(q−1) neither overflows nor underflows whatever the layer's scale."""
        for step in range(self.options.power_iterations):
            jv = jacobian.matvec(v)
            scale = jacobian.largest_entry(jv)
            if scale == 0:
                return v, step
            direction = jacobian.rmatvec([_psi(chunk / scale, self.options.q) for chunk in jv])
            if not bool(direction.any()):
                return v, step
            v = self._normalised(_psi(direction, self.dual))
        return v, self.options.power_iterations

    def _normalised(self, v: Tensor) -> Tensor:
        """``v`` / ‖v‖_p (C×H×W)."""
        norm: Tensor = torch.linalg.vector_norm(v.flatten(), ord=self.threat.p)
        return v / norm

    def _rate(self, model: nn.Module, images: Tensor, clean_labels: Tensor, v: Tensor, reducer: Reducer) -> float:
        """The fooling rate of ``v`` on ``images`` (targeted: the targeted success rate)."""
        perturbed = distributed.predict(
            model, images, v, reducer=reducer, batch_size=self.eval_batch_size, clip=self.clip
        )
        clean = clean_labels.to(perturbed.device)
        if self.target_class is None:
            return metrics.fooling_rate(clean, perturbed)
        return metrics.targeted_success_rate(clean, perturbed, self.target_class)


def _psi(z: Tensor, r: float) -> Tensor:
    """ψ_r(z) = sign(z)·|z|^(r−1), entrywise (ψ_1 = sign, ψ_2 = identity)."""
    return z.sign() * z.abs().pow(r - 1.0)


class StackedJacobian:
    """J = [J(x_1); …; J(x_n)], the Jacobians of ``features`` at ``images`` (this rank's n×C×H×W
    in [0,1]) stacked, applied ``batch_size`` images at a time without forming it, on the device
    and in the dtype of ``like`` (a C×H×W tensor).

    A vector of J's output space is a list of chunks, one B×(layer output shape) tensor per batch
    of images; on several processes each rank holds the chunks of its shard of the images, and
    :meth:`rmatvec` and the norms sum over the ranks."""

    def __init__(self, features: Features, images: Tensor, batch_size: int, reducer: Reducer, like: Tensor) -> None:
        self.features = features
        self.chunks = [
            batch.to(device=like.device, dtype=like.dtype) for batch in torch.split(images, batch_size) if len(batch)
        ]
        self.reducer = reducer
        self.zero = torch.zeros_like(like)
        self.forward_mode = True  # J v by forward-mode AD until an operation lacks its formula

    def matvec(self, v: Tensor) -> List[Tensor]:
        """J v for a C×H×W ``v``: per batch, the change of the layer's output along v."""
        return [self._jvp(chunk, v).detach() for chunk in self.chunks]

    def rmatvec(self, w: List[Tensor]) -> Tensor:
        """Jᵀ w = Σ_j J(x_j)ᵀ w_j (C×H×W) for ``w`` chunked as :meth:`matvec` returns, over all ranks."""
        total = self.zero
        for chunk, cotangent in zip(self.chunks, w):
            x = chunk.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.features(x), x, grad_outputs=cotangent)
            total = total + grad.sum(0)
        return self.reducer.all_reduce_sum(total)

    def largest_entry(self, w: List[Tensor]) -> float:
        """A common scale of ``w``: the sum over ranks of each rank's largest |entry| (0 when w = 0)."""
        local = max((float(chunk.abs().max()) for chunk in w if chunk.numel()), default=0.0)
        return float(self.reducer.all_reduce_sum(torch.tensor([local], dtype=torch.float64)))

    def q_norm(self, w: List[Tensor], q: float) -> float:
        """‖w‖_q over all chunks of all ranks."""
        scale = self.largest_entry(w)
        if scale == 0:
            return 0.0
        local = sum(float((chunk / scale).abs().pow(q).sum()) for chunk in w)
        total = float(self.reducer.all_reduce_sum(torch.tensor([local], dtype=torch.float64)))
        norm: float = scale * total ** (1.0 / q)
        return norm

    def _jvp(self, x: Tensor, v: Tensor) -> Tensor:
        """J(x) v for each image of ``x`` (B×C×H×W): forward-mode AD, else the double-backward trick
        (J v = ∂/∂u ⟨J(x)ᵀ u, v⟩ at u = 0)."""
        tangent = v.expand_as(x).contiguous()
        if self.forward_mode:
            try:
                with forward_ad.dual_level():
                    # torch.autograd.forward_ad's make_dual and unpack_dual carry no annotations
                    dual = forward_ad.make_dual(x, tangent)  # type: ignore[no-untyped-call]
                    jv: Tensor = forward_ad.unpack_dual(self.features(dual)).tangent  # type: ignore[no-untyped-call]
                    return jv
            except NotImplementedError:  # an operation without a forward-mode formula
                self.forward_mode = False
        x = x.detach().requires_grad_(True)
        output = self.features(x)
        probe = torch.zeros_like(output, requires_grad=True)
        (transposed,) = torch.autograd.grad(output, x, grad_outputs=probe, create_graph=True)
        (product,) = torch.autograd.grad(transposed, probe, grad_outputs=tangent)
        return product


class _LayerReached(Exception):
    """Raised by the hook on the chosen layer: the rest of the forward pass is not needed."""


@contextlib.contextmanager
def layer_output(model: nn.Module, name: str) -> Iterator[Features]:
    """Inside, a function of a B×C×H×W batch returning the output of module ``name`` of ``model``
    at its first call (the forward pass stops there); the hook is removed on exit.
    ConfigError naming ``attack.layer`` when no module has that name, when the module is not
    called as a module in a forward pass, or when its output is not a tensor."""
    modules = dict(model.named_modules())
    if name not in modules:
        raise ConfigError(
            f"attack.layer={name!r} names no module of the model (names as in model.named_modules() of the model "
            f"attacked, whose batch norm layers are folded into the convolution before them); "
            f"close names: {', '.join(_close_names(model, name))}"
        )
    reached: List[object] = []

    def hook(_module: nn.Module, _inputs: object, output: object) -> None:
        reached.append(output)
        raise _LayerReached

    def features(x: Tensor) -> Tensor:
        reached.clear()
        try:
            model(x)
        except _LayerReached:
            output = reached[0]
            if not isinstance(output, Tensor):
                raise ConfigError(
                    f"attack.layer={name!r} outputs a {type(output).__name__}, not a tensor; name a layer whose "
                    "output is one tensor"
                ) from None
            return output
        raise ConfigError(
            f"attack.layer={name!r} was not called as a module in a forward pass (a model with batch norm is "
            "attacked as a copy with the batch norm folded by torch.fx, which calls only its innermost layers, "
            f"not the containers around them); name a layer that runs, e.g. {', '.join(_close_names(model, name))}"
        )

    handle = modules[name].register_forward_hook(hook)
    try:
        yield features
    finally:
        handle.remove()


def _leaf_names(model: nn.Module) -> List[str]:
    """The names of ``model``'s innermost modules (those without children), in order."""
    return [name for name, module in model.named_modules() if name and next(module.children(), None) is None]


def _close_names(model: nn.Module, name: str) -> List[str]:
    """The names of ``model``'s innermost modules inside module ``name``, else those closest to it."""
    leaves = _leaf_names(model)
    inside = [leaf for leaf in leaves if leaf.startswith(name + ".")]
    return inside[:NAMES_SHOWN] or difflib.get_close_matches(name, leaves, n=NAMES_SHOWN, cutoff=0.0)


def default_layer(model: nn.Module) -> str:
    """The layer SV-UAP uses when ``attack.layer`` is null: with n the number of ``nn.Conv2d``
    modules in ``model.named_modules()`` order and k = min(n, max(2, ⌊n/4⌋)), the first
    ``nn.MaxPool2d`` after the k-th convolution, or that convolution when no max-pool follows it.

    The paper found early layers best and used block2_pool of VGG-16 and VGG-19; on the digits
    CNNs here the first convolution fooled no more than random noise, hence k ≥ 2. The rule picks
    block2_pool on VGG-11/16/19 (torchvision's and the project's; ``features.9`` in torchvision's
    VGG-16), the second block's max-pool on the project's cnn (``features.1.3``) and LeNet
    (``features.5``), the 4th convolution on ResNet-20 (``layers.0.1.conv1``), the 13th on
    ResNet-56 (``layers.0.5.conv2``) and torchvision's ResNet-50 (``layer2.0.conv2``, in the
    paper's res3 stage), and on EfficientNet-Lite and MobileNetV2 the convolution a quarter of the
    way in. In a run these names are prefixed by the victim's ``1.`` (its normalisation is ``0``).
    ConfigError naming ``attack.layer`` when the model has no ``nn.Conv2d``."""
    modules: List[Tuple[str, nn.Module]] = list(model.named_modules())
    convolutions = [index for index, (_, module) in enumerate(modules) if isinstance(module, nn.Conv2d)]
    if not convolutions:
        raise ConfigError(
            "attack.layer=null picks a layer after the model's convolutions, but it has no Conv2d; name the hidden "
            f"layer, attack.layer=NAME, e.g. one of {', '.join(_leaf_names(model)[:NAMES_SHOWN])}"
        )
    chosen = convolutions[min(len(convolutions), max(2, len(convolutions) // 4)) - 1]
    pools = [name for name, module in modules[chosen + 1 :] if isinstance(module, nn.MaxPool2d)]
    return pools[0] if pools else modules[chosen][0]

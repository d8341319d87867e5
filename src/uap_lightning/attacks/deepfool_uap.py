"""Universal perturbations by accumulated DeepFool steps (Moosavi-Dezfooli et al., CVPR 2017).

``DeepFoolUAP`` is the paper's Algorithm 1, one image at a time; ``BatchedDeepFoolUAP``
runs DeepFool on a mini-batch of still-unfooled images and adds their combined step.
DeepFool starts from clip(x + v) (x + v when ``clip=False``); a step counts only when
DeepFool converged. Steps are in [0,1] image scale; v is projected onto the ℓp ball of
radius eps/255 after each update.
"""

from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from uap_lightning.attacks.base import PassStats, UniversalAttack
from uap_lightning.attacks.deepfool import DeepFoolResult, deepfool_batched, deepfool_single
from uap_lightning.attacks.threat import ThreatModel, parse_p
from uap_lightning.metrics import perturb

AGGREGATES = ("mean", "sum")


class _DeepFoolEngine(UniversalAttack):
    """Options shared by the DeepFool engines; ``deepfool_norm`` None means the threat's p."""

    def __init__(
        self,
        threat: ThreatModel,
        *,
        clip: bool = True,
        target_class: Optional[int] = None,
        overshoot: float = 0.02,
        num_candidates: int = 10,
        max_deepfool_iters: int = 10,
        deepfool_norm: Optional[Union[str, float]] = None,
    ) -> None:
        super().__init__(threat, clip=clip, target_class=target_class)
        if overshoot < 0:
            raise ValueError(f"attack.overshoot must be >= 0; got {overshoot}")
        if num_candidates < 2:
            raise ValueError(f"attack.num_candidates must be at least 2; got {num_candidates}")
        if max_deepfool_iters < 1:
            raise ValueError(f"attack.max_deepfool_iters must be at least 1; got {max_deepfool_iters}")
        self.overshoot = float(overshoot)
        self.num_candidates = int(num_candidates)
        self.max_deepfool_iters = int(max_deepfool_iters)
        self.deepfool_norm = threat.p if deepfool_norm is None else parse_p(deepfool_norm)

    def deepfool(self, model: nn.Module, x: Tensor) -> DeepFoolResult:
        """Batched DeepFool with this engine's options on ``x`` (N×C×H×W)."""
        return deepfool_batched(model, x, **self._deepfool_options())

    def _deepfool_options(self) -> dict:
        return dict(
            num_candidates=self.num_candidates,
            overshoot=self.overshoot,
            max_iters=self.max_deepfool_iters,
            norm=self.deepfool_norm,
            target=self.target_class,
        )


class DeepFoolUAP(_DeepFoolEngine):
    """Algorithm 1 of the paper: for each x in shuffled order, if v does not yet fool x,
    v ← Proj(v + DeepFool(clip(x + v))).

    ``per_image_reference=True`` runs :func:`deepfool_single` instead of a batch of one
    through :func:`deepfool_batched`; both give the same v.
    """

    name = "deepfool_uap"

    def __init__(self, threat: ThreatModel, *, per_image_reference: bool = False, **options) -> None:
        super().__init__(threat, **options)
        self.per_image_reference = bool(per_image_reference)

    def run_pass(
        self,
        model: nn.Module,
        v: Tensor,
        images: Tensor,
        clean_labels: Tensor,
        generator: Optional[torch.Generator],
        pass_index: Optional[int] = None,
    ) -> Tuple[Tensor, PassStats]:
        v = v.detach().clone()
        clean = clean_labels.to(v.device)
        iterations: List[int] = []
        for i in torch.randperm(images.shape[0], generator=generator).tolist():
            x = perturb(images[i : i + 1].to(v.device), v, self.clip)
            with torch.no_grad():
                predicted = model(x).argmax(1)
            if not bool(self.still_to_fool(predicted, clean[i : i + 1])):
                continue
            step, used, converged = self._step(model, x)
            if converged:
                v = self.project(v + step)
                iterations.append(used)
        return v, _stats(iterations)

    def _step(self, model: nn.Module, x: Tensor) -> Tuple[Tensor, int, bool]:
        if self.per_image_reference:
            result = deepfool_single(model, x[0], **self._deepfool_options())
            return result.perturbation, result.iterations, result.converged
        result = self.deepfool(model, x)
        return result.perturbation[0], int(result.iterations[0]), bool(result.converged[0])


class BatchedDeepFoolUAP(_DeepFoolEngine):
    """Mini-batch variant: per batch of ``batch_size`` shuffled images, DeepFool on those v
    does not yet fool, then v ← Proj(v + aggregate of the converged steps), where
    ``aggregate`` is "sum" (default) or "mean" (over the converged steps).

    The sum is the default by measurement: DeepFool steps of different images are nearly
    uncorrelated (on a CIFAR ResNet-20 the mean pairwise correlation of their ℓ∞ sign
    patterns is 0.002), so their mean shrinks towards zero and v barely grows, while the sum
    keeps what they share and the projection bounds the rest."""

    name = "deepfool_uap_batched"

    def __init__(self, threat: ThreatModel, *, batch_size: int = 32, aggregate: str = "sum", **options) -> None:
        super().__init__(threat, **options)
        if batch_size < 1:
            raise ValueError(f"attack.batch_size must be at least 1; got {batch_size}")
        if aggregate not in AGGREGATES:
            raise ValueError(f"attack.aggregate must be one of {', '.join(AGGREGATES)}; got {aggregate!r}")
        self.batch_size = int(batch_size)
        self.aggregate = aggregate

    def run_pass(
        self,
        model: nn.Module,
        v: Tensor,
        images: Tensor,
        clean_labels: Tensor,
        generator: Optional[torch.Generator],
        pass_index: Optional[int] = None,
    ) -> Tuple[Tensor, PassStats]:
        v = v.detach().clone()
        order = torch.randperm(images.shape[0], generator=generator)
        iterations: List[int] = []
        for start in range(0, order.numel(), self.batch_size):
            index = order[start : start + self.batch_size]
            x = perturb(images[index].to(v.device), v, self.clip)
            with torch.no_grad():
                predicted = model(x).argmax(1)
            todo = self.still_to_fool(predicted, clean_labels[index].to(v.device))
            if not bool(todo.any()):
                continue
            result = self.deepfool(model, x[todo])
            steps = result.perturbation[result.converged]
            if steps.shape[0] == 0:
                continue
            v = self.project(v + (steps.mean(0) if self.aggregate == "mean" else steps.sum(0)))
            iterations.extend(result.iterations[result.converged].tolist())
        return v, _stats(iterations)


def _stats(iterations: List[int]) -> PassStats:
    return PassStats(updates=len(iterations), mean_iterations=sum(iterations) / len(iterations) if iterations else 0.0)

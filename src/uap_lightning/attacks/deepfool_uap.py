"""Universal perturbations by accumulated DeepFool steps (Moosavi-Dezfooli et al., CVPR 2017).

``DeepFoolUAP`` is the paper's Algorithm 1, one image at a time (its "does v fool x?" checks
predicted for windows of images, with the same result); ``BatchedDeepFoolUAP``
runs DeepFool on a mini-batch of still-unfooled images and adds their combined step.
DeepFool (its minimal ℓ2 step by default, as in the paper, whatever the threat's p) starts
from clip(x + v) (x + v when ``clip=False``); a step counts only when
DeepFool converged. Steps are in [0,1] image scale; v is projected onto the ℓp ball of
radius eps/255 after each update.

On several processes ``BatchedDeepFoolUAP`` shares each global batch among the ranks and sums
their steps; ``DeepFoolUAP``, sequential by definition, runs the same pass on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from uap_lightning.attacks.base import PassStats, UniversalAttack, register_engine
from uap_lightning.attacks.deepfool import DeepFoolOptions, DeepFoolResult, deepfool_batched, deepfool_single
from uap_lightning.attacks.distributed import SINGLE_PROCESS, Reducer, shard
from uap_lightning.attacks.threat import ThreatModel, parse_p
from uap_lightning.metrics import perturb

AGGREGATES = ("mean", "sum")
MAX_WINDOW = 64  # most images DeepFoolUAP predicts in one check forward pass


class _DeepFoolEngine(UniversalAttack):
    """What the DeepFool engines share: DeepFool with the engine's :class:`DeepFoolOptions`.

    ``deepfool_norm`` "2" (default) is the paper's Algorithm 1, Δv = arg min ‖r‖₂ s.t. the label
    of x + v + r changes, for every p of the threat model (only the projection depends on p), as
    in the authors' code; "inf" or "1" take the dual-norm step of that norm instead, a variant
    (on a CIFAR-10 ResNet-20, ℓ∞ ξ=8, X = 500, 3 passes it fooled 0.62 against 0.69 for ℓ2).
    """

    Options = DeepFoolOptions

    def __init__(self, threat: ThreatModel, **options) -> None:
        super().__init__(threat, **options)
        self.deepfool_norm = parse_p(self.options.deepfool_norm)

    def deepfool(
        self, model: nn.Module, x: Tensor, start: Optional[Tuple[Tensor, Tensor]] = None
    ) -> DeepFoolResult:
        """Batched DeepFool with this engine's options on ``x`` (N×C×H×W); ``start`` as in
        :func:`deepfool_batched`."""
        return deepfool_batched(model, x, start=start, **self._deepfool_options())

    def _deepfool_options(self) -> dict:
        return dict(
            num_candidates=self.options.num_candidates,
            overshoot=self.options.overshoot,
            max_iters=self.options.max_deepfool_iters,
            norm=self.deepfool_norm,
            target=self.target_class,
        )


@register_engine
class DeepFoolUAP(_DeepFoolEngine):
    """The paper's Algorithm 1: for each x of X in shuffled order, if v does not yet fool x,
    v ← Proj_{p,ε}(v + DeepFool(clip(x + v))), counting a step only when DeepFool converged.

    Arguments:
        threat: the ℓp ball, ``ThreatModel.parse(eps, p)`` with ε in 0–255 pixel units.
        clip (bool, True): clip x + v to [0,1].
        target_class (int or None, None): push images to this class instead of any other.
        overshoot (float, 0.02), num_candidates (int, 10), max_deepfool_iters (int, 10),
        deepfool_norm (str, "2"): DeepFool's settings, see :class:`DeepFoolOptions`.
        per_image_reference (bool, False): check and attack one image at a time with
        :func:`deepfool_single` (the reference the default pass is tested against).

    Shape:
        ``run_pass(model, v, images, clean_labels, generator)``: v C×H×W and images N×C×H×W in
        [0,1] scale, clean_labels (N,) int64; returns the new v (C×H×W) and :class:`PassStats`.

    Example::

        engine = DeepFoolUAP(ThreatModel.parse(10, "inf"), max_deepfool_iters=10)
        v, stats = engine.run_pass(model, torch.zeros(3, 224, 224), X, model(X).argmax(1), None)

    "Does v fool x?" is answered for a window of the next images in one forward pass; the
    answers stay exact until v changes, so after an update the window's remaining images are
    predicted again under the new v (see :func:`next_window` for the window size). A window of
    one image is forwarded with grad enabled and handed to DeepFool as its first forward pass.
    The v, the updates and the iterations are those of checking one image at a time, bit for
    bit, unless the batch an image is predicted in flips its argmax (float32 logits differ by
    about 1e-6 between batch sizes).

    Each update depends on the v left by the one before, so a pass cannot be shared: on several
    processes every rank runs the whole pass (the same v), and only the evaluation on X between
    passes is shared (see :func:`uap_lightning.attacks.driver.run_passes`).
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
        reducer: Optional[Reducer] = None,
    ) -> Tuple[Tensor, PassStats]:
        v = v.detach().clone()
        clean = clean_labels.to(v.device)
        order = torch.randperm(images.shape[0], generator=generator)
        if self.per_image_reference:
            v, iterations = self._reference_pass(model, v, images, clean, order.tolist())
        else:
            v, iterations = self._windowed_pass(model, v, images, clean, order)
        return v, _stats(iterations)

    def _windowed_pass(
        self, model: nn.Module, v: Tensor, images: Tensor, clean: Tensor, order: Tensor
    ) -> Tuple[Tensor, List[int]]:
        """The pass over ``order`` (N,) with windowed checks; returns v and the iterations of each update."""
        iterations: List[int] = []
        position, size = 0, 1
        while position < order.numel():
            index = order[position : position + size]
            x = perturb(images[index].to(v.device), v, self.clip)  # W×C×H×W
            single = index.numel() == 1
            with torch.set_grad_enabled(single):  # a one-image check is DeepFool's first forward pass
                logits = model(x.requires_grad_(single))
            todo = self.still_to_fool(logits.detach().argmax(1), clean[index.to(clean.device)])
            update_at = None
            for offset in todo.nonzero().flatten().tolist():
                result = self.deepfool(model, x[offset : offset + 1], start=(x, logits) if single else None)
                if bool(result.converged[0]):
                    v = self.project(v + result.perturbation[0])
                    iterations.append(int(result.iterations[0]))
                    update_at = offset
                    break
            position += index.numel() if update_at is None else update_at + 1
            size = next_window(size, update_at, position, len(iterations))
        return v, iterations

    def _reference_pass(
        self, model: nn.Module, v: Tensor, images: Tensor, clean: Tensor, order: List[int]
    ) -> Tuple[Tensor, List[int]]:
        """The pass one image at a time with :func:`deepfool_single`; returns v and the iterations of each update."""
        iterations: List[int] = []
        for i in order:
            x = perturb(images[i : i + 1].to(v.device), v, self.clip)
            with torch.no_grad():
                predicted = model(x).argmax(1)
            if not bool(self.still_to_fool(predicted, clean[i : i + 1])):
                continue
            result = deepfool_single(model, x[0], **self._deepfool_options())
            if result.converged:
                v = self.project(v + result.perturbation)
                iterations.append(result.iterations)
        return v, iterations


def next_window(size: int, update_at: Optional[int], checked: int, updates: int) -> int:
    """Number of images to predict in the next check window of a pass.

    ``size`` is the window just used; ``update_at`` the offset (0-based) in it of the image whose
    DeepFool step changed v, None if v did not change; ``checked`` and ``updates`` count the
    images checked and the updates so far in the pass. The window doubles after a window without
    an update, halves after an update that left at least half of its predictions unused
    (``update_at + 1 <= size / 2``) and keeps its size otherwise. It reaches at most half the mean
    run of images per update so far, (checked + 1) // (2 (updates + 1)), and ``MAX_WINDOW``; it is
    at least one. A pass starts with a window of one. A one-image check doubles as DeepFool's
    first forward pass, so wider windows pay only once updates are rare: with a cap of the whole
    mean run, windows of two cost more than they saved on small CPU models, where updates come
    every second image and a batch of two costs three batch-1 forward passes.
    """
    if update_at is None:
        resized = 2 * size
    elif 2 * (update_at + 1) <= size:
        resized = size // 2
    else:
        resized = size
    return max(1, min(resized, (checked + 1) // (2 * (updates + 1)), MAX_WINDOW))


@dataclass(frozen=True)
class BatchedDeepFoolOptions(DeepFoolOptions):
    """:class:`DeepFoolOptions` and the mini-batch: ``batch_size`` images per update, whose
    converged steps are combined by ``aggregate`` ("sum" or "mean")."""

    batch_size: int = 32
    aggregate: str = "sum"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size < 1:
            raise ValueError(f"attack.batch_size must be at least 1; got {self.batch_size}")
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"attack.aggregate must be one of {', '.join(AGGREGATES)}; got {self.aggregate!r}")


@register_engine
class BatchedDeepFoolUAP(_DeepFoolEngine):
    """Algorithm 1 on mini-batches: per batch of ``batch_size`` shuffled images, DeepFool on those
    v does not yet fool, then v ← Proj_{p,ε}(v + the sum (or mean) of the converged steps).

    Arguments:
        threat, clip, target_class, overshoot, num_candidates, max_deepfool_iters, deepfool_norm:
        as for :class:`DeepFoolUAP`.
        batch_size (int, 32): images per update.
        aggregate (str, "sum"): how the converged steps of a batch combine, "sum" or "mean".

    Shape:
        as for :class:`DeepFoolUAP`.

    Example::

        engine = BatchedDeepFoolUAP(ThreatModel.parse(8, "inf"), batch_size=32)
        v, stats = engine.run_pass(model, torch.zeros(3, 32, 32), X, model(X).argmax(1), None)

    The sum is the default by measurement: DeepFool steps of different images are nearly
    uncorrelated (on a CIFAR ResNet-20 the mean pairwise correlation of their ℓ∞ sign
    patterns is 0.002), so their mean shrinks towards zero and v barely grows, while the sum
    keeps what they share and the projection bounds the rest.

    On several processes each rank runs DeepFool on its shard of every global batch of
    ``batch_size`` images; the sums of the converged steps and their counts are summed over the
    ranks, so every rank makes the one-process update (up to float rounding of the sum)."""

    name = "deepfool_uap_batched"
    Options = BatchedDeepFoolOptions

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
        reducer = reducer or SINGLE_PROCESS
        v = v.detach().clone()
        order = torch.randperm(images.shape[0], generator=generator)
        updates = iterations = 0
        for start in range(0, order.numel(), self.options.batch_size):
            index = shard(reducer, order[start : start + self.options.batch_size])
            step_sum, tally = self._local_steps(model, v, images, clean_labels, index)
            tally = reducer.all_reduce_sum(tally)
            count = int(tally[0])
            if count == 0:
                continue
            step_sum = reducer.all_reduce_sum(step_sum)
            v = self.project(v + (step_sum / count if self.options.aggregate == "mean" else step_sum))
            updates += count
            iterations += int(tally[1])
        return v, PassStats(updates=updates, mean_iterations=iterations / updates if updates else 0.0)

    def _local_steps(
        self, model: nn.Module, v: Tensor, images: Tensor, clean_labels: Tensor, index: Tensor
    ) -> Tuple[Tensor, Tensor]:
        """DeepFool on the images ``index`` (this rank's share of a batch) that v does not fool yet:
        the sum of the converged steps (C×H×W) and an int64 tally (converged steps, their DeepFool
        iterations)."""
        step_sum = torch.zeros_like(v)
        tally = torch.zeros(2, dtype=torch.int64, device=v.device)
        if index.numel() == 0:
            return step_sum, tally
        x = perturb(images[index].to(v.device), v, self.clip)
        with torch.no_grad():
            predicted = model(x).argmax(1)
        todo = self.still_to_fool(predicted, clean_labels[index].to(v.device))
        if not bool(todo.any()):
            return step_sum, tally
        result = self.deepfool(model, x[todo])
        converged = result.converged.to(v.device)
        tally[0] = int(converged.sum())
        tally[1] = int(result.iterations.to(v.device)[converged].sum())
        return result.perturbation[converged].sum(0), tally


def _stats(iterations: List[int]) -> PassStats:
    return PassStats(updates=len(iterations), mean_iterations=sum(iterations) / len(iterations) if iterations else 0.0)

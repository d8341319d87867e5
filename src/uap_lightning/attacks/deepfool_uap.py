"""Universal perturbations by Algorithm 1 of Moosavi-Dezfooli et al. (CVPR 2017).

Both engines run one outer loop (:class:`AlgorithmOne`): in shuffled order, the images of X that
v does not fool yet are attacked by the inner attack (``attack.inner``, DeepFool by default, see
:mod:`uap_lightning.attacks.inner`) from clip(x + v) (x + v when ``clip=False``); the successful
steps Δv are added to v, which is then projected onto the ℓp ball of radius eps/255. Steps are in
[0,1] image scale; a step counts only when the inner attack succeeded.

``DeepFoolUAP`` is the paper's Algorithm 1, one image per update (its "does v fool x?" checks
predicted for windows of images, with the same result); ``BatchedDeepFoolUAP`` attacks a
mini-batch of still-unfooled images and adds their combined step.

On several processes ``BatchedDeepFoolUAP`` shares each global batch among the ranks and sums
their steps; ``DeepFoolUAP``, sequential by definition, runs the same pass on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Tuple

import torch
from torch import Tensor, nn

from uap_lightning.attacks.base import PassStats, UniversalAttack, register_engine
from uap_lightning.attacks.deepfool import DeepFoolOptions, DeepFoolResult
from uap_lightning.attacks.distributed import SINGLE_PROCESS, Reducer, shard
from uap_lightning.attacks.inner import DeepFoolInner, InnerOptions, Start, inner_class
from uap_lightning.attacks.threat import ThreatModel, parse_p
from uap_lightning.metrics import perturb

AGGREGATES = ("mean", "sum")
MAX_WINDOW = 64  # most images DeepFoolUAP predicts in one check forward pass


@dataclass(frozen=True)
class AlgorithmOneOptions(InnerOptions, DeepFoolOptions):
    """The options of ``deepfool_uap``: DeepFool's (:class:`DeepFoolOptions`, read by the deepfool
    inner attack) and the inner attack's (:class:`~uap_lightning.attacks.inner.InnerOptions`)."""

    def __post_init__(self) -> None:
        DeepFoolOptions.__post_init__(self)
        InnerOptions.__post_init__(self)


class AlgorithmOne(UniversalAttack):
    """Algorithm 1's outer loop with a pluggable inner attack, shared by the DeepFool engines.

    A pass visits X in ``torch.randperm`` order, a window of images at a time: the window is
    predicted under v in one forward pass, and the images v does not fool yet are handed to the
    inner attack, in groups of one image (``sequential``: v is updated after the first success,
    and the images after it are checked again under the new v) or all at once (v is updated by
    the combined successful steps, see :meth:`combine`). After an update v ← Proj_{p,ε}(v + step).
    A window of one image is forwarded with grad enabled and handed to the inner attack as its
    first forward pass. ``PassStats`` counts the successful steps and their mean iterations.

    ``deepfool_norm`` "2" (default) is the paper's Algorithm 1, Δv = arg min ‖r‖₂ s.t. the label
    of x + v + r changes, for every p of the threat model (only the projection depends on p), as
    in the authors' code; "inf" or "1" take the dual-norm step of that norm instead, a variant
    (on a CIFAR-10 ResNet-20, ℓ∞ ξ=8, X = 500, 3 passes it fooled 0.62 against 0.69 for ℓ2).
    """

    Options = AlgorithmOneOptions
    sequential: ClassVar[bool]

    def __init__(self, threat: ThreatModel, **options) -> None:
        super().__init__(threat, **options)
        self.deepfool_norm = parse_p(self.options.deepfool_norm)
        self._deepfool = DeepFoolInner(threat, self.options, self.target_class)
        if self.options.inner == DeepFoolInner.name:
            self.inner = self._deepfool
        else:
            self.inner = inner_class(self.options.inner)(threat, self.options, self.target_class)

    def deepfool(self, model: nn.Module, x: Tensor, start: Optional[Start] = None) -> DeepFoolResult:
        """Batched DeepFool with this engine's options on ``x`` (N×C×H×W); ``start`` as in
        :func:`~uap_lightning.attacks.deepfool.deepfool_batched`."""
        return self._deepfool.deepfool(model, x, start)

    def first_window(self) -> int:
        """The images predicted in a pass's first window."""
        raise NotImplementedError

    def window_after(self, size: int, update_at: Optional[int], checked: int, updates: int) -> int:
        """The next window's size, from the last one's (arguments as for :func:`next_window`)."""
        raise NotImplementedError

    def combine(self, step_sum: Tensor, count: int) -> Tensor:
        """The step added to v from the sum of ``count`` successful steps: their sum."""
        return step_sum

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
        return self.outer_loop(model, v, images, clean, order, generator, reducer)

    def outer_loop(
        self,
        model: nn.Module,
        v: Tensor,
        images: Tensor,
        clean: Tensor,
        order: Tensor,
        generator: Optional[torch.Generator],
        reducer: Optional[Reducer],
    ) -> Tuple[Tensor, PassStats]:
        """One pass over ``order`` (N,), with v (C×H×W) and the clean labels (N,) on v's device."""
        reducer = SINGLE_PROCESS if self.sequential or reducer is None else reducer
        updates = iterations = 0
        position, size = 0, self.first_window()
        while position < order.numel():
            index = order[position : position + size]
            step_sum, tally, update_at = self._attack_window(model, v, images, clean, shard(reducer, index), generator)
            tally = reducer.all_reduce_sum(tally)
            count = int(tally[0])
            if count > 0:
                step_sum = reducer.all_reduce_sum(step_sum)
                v = self.project(v + self.combine(step_sum, count))
                updates += count
                iterations += int(tally[1])
            position += index.numel() if update_at is None else update_at + 1
            size = self.window_after(size, update_at, position, updates)
        return v, PassStats.of_steps(updates, iterations)

    def _attack_window(
        self,
        model: nn.Module,
        v: Tensor,
        images: Tensor,
        clean: Tensor,
        index: Tensor,
        generator: Optional[torch.Generator],
    ) -> Tuple[Tensor, Tensor, Optional[int]]:
        """The window ``index`` (this rank's images of it): the sum of its successful steps
        (C×H×W), an int64 tally (successful steps, their iterations) and, sequential, the offset
        of the image whose step succeeded (None: none did, or not sequential)."""
        step_sum = torch.zeros_like(v)
        tally = torch.zeros(2, dtype=torch.int64, device=v.device)
        if index.numel() == 0:
            return step_sum, tally, None
        x = perturb(images[index].to(v.device), v, self.clip)  # W×C×H×W
        labels = clean[index.to(clean.device)]
        single = index.numel() == 1
        with torch.set_grad_enabled(single):  # a one-image check is the inner attack's first forward pass
            logits = model(x.requires_grad_(single))
        todo = self.still_to_fool(logits.detach().argmax(1), labels).nonzero().flatten()
        groups = todo.split(1) if self.sequential else [todo]
        for group in groups:
            if group.numel() == 0:
                continue
            start = (x, logits) if single else None
            result = self.inner(model, x[group], labels[group], clip=self.clip, generator=generator, start=start)
            succeeded = result.succeeded.to(v.device)
            tally[0] = int(succeeded.sum())
            if tally[0] > 0:
                tally[1] = int(result.iterations.to(v.device)[succeeded].sum())
                step_sum = result.perturbation[succeeded].sum(0)
                return step_sum, tally, int(group[-1]) if self.sequential else None
        return step_sum, tally, None


@register_engine
class DeepFoolUAP(AlgorithmOne):
    """The paper's Algorithm 1: for each x of X in shuffled order, if v does not yet fool x,
    v ← Proj_{p,ε}(v + Δv) with Δv the inner attack's step from clip(x + v) (DeepFool by
    default), counting a step only when the inner attack succeeded.

    Arguments:
        threat: the ℓp ball, ``ThreatModel.parse(eps, p)`` with ε in 0–255 pixel units.
        clip (bool, True): clip x + v to [0,1].
        target_class (int or None, None): push images to this class instead of any other.
        overshoot (float, 0.02), num_candidates (int, 10), max_deepfool_iters (int, 10),
        deepfool_norm (str, "2"): DeepFool's settings, see :class:`DeepFoolOptions`.
        inner (str, "deepfool"), inner_step (float or None, None), inner_steps (int, 10): the
        inner attack and its settings, see :mod:`uap_lightning.attacks.inner`.
        per_image_reference (bool, False): check and attack one image at a time with the inner
        attack's per-image form (:func:`deepfool_single` for DeepFool; the reference the
        default pass is tested against).

    Shape:
        ``run_pass(model, v, images, clean_labels, generator)``: v C×H×W and images N×C×H×W in
        [0,1] scale, clean_labels (N,) int64; returns the new v (C×H×W) and :class:`PassStats`.

    Example::

        engine = DeepFoolUAP(ThreatModel.parse(10, "inf"), max_deepfool_iters=10)
        v, stats = engine.run_pass(model, torch.zeros(3, 224, 224), X, model(X).argmax(1), None)

    "Does v fool x?" is answered for a window of the next images in one forward pass; the
    answers stay exact until v changes, so after an update the window's remaining images are
    predicted again under the new v (see :func:`next_window` for the window size).
    The v, the updates and the iterations are those of checking one image at a time, bit for
    bit, unless the batch an image is predicted in flips its argmax (float32 logits differ by
    about 1e-6 between batch sizes).

    Each update depends on the v left by the one before, so a pass cannot be shared: on several
    processes every rank runs the whole pass (the same v), and only the evaluation on X between
    passes is shared (see :func:`uap_lightning.attacks.driver.run_passes`).
    """

    name = "deepfool_uap"
    sequential = True

    def __init__(self, threat: ThreatModel, *, per_image_reference: bool = False, **options) -> None:
        super().__init__(threat, **options)
        self.per_image_reference = bool(per_image_reference)

    def first_window(self) -> int:
        return 1

    def window_after(self, size: int, update_at: Optional[int], checked: int, updates: int) -> int:
        return next_window(size, update_at, checked, updates)

    def outer_loop(self, model, v, images, clean, order, generator, reducer) -> Tuple[Tensor, PassStats]:
        if self.per_image_reference:
            return self._reference_pass(model, v, images, clean, order, generator)
        return super().outer_loop(model, v, images, clean, order, generator, reducer)

    def _reference_pass(
        self,
        model: nn.Module,
        v: Tensor,
        images: Tensor,
        clean: Tensor,
        order: Tensor,
        generator: Optional[torch.Generator],
    ) -> Tuple[Tensor, PassStats]:
        """The pass one image at a time, each attacked by the inner attack's ``attack_one``."""
        updates = iterations = 0
        for i in order.tolist():
            x = perturb(images[i : i + 1].to(v.device), v, self.clip)
            with torch.no_grad():
                predicted = model(x).argmax(1)
            if not bool(self.still_to_fool(predicted, clean[i : i + 1])):
                continue
            step, succeeded, steps = self.inner.attack_one(model, x[0], clean[i], clip=self.clip, generator=generator)
            if succeeded:
                v = self.project(v + step)
                updates += 1
                iterations += steps
        return v, PassStats.of_steps(updates, iterations)


def next_window(size: int, update_at: Optional[int], checked: int, updates: int) -> int:
    """Number of images to predict in the next check window of a pass.

    ``size`` is the window just used; ``update_at`` the offset (0-based) in it of the image whose
    step changed v, None if v did not change; ``checked`` and ``updates`` count the
    images checked and the updates so far in the pass. The window doubles after a window without
    an update, halves after an update that left at least half of its predictions unused
    (``update_at + 1 <= size / 2``) and keeps its size otherwise. It reaches at most half the mean
    run of images per update so far, (checked + 1) // (2 (updates + 1)), and ``MAX_WINDOW``; it is
    at least one. A pass starts with a window of one. A one-image check doubles as the inner
    attack's first forward pass, so wider windows pay only once updates are rare: with a cap of the
    whole mean run, windows of two cost more than they saved on small CPU models, where updates
    come every second image and a batch of two costs three batch-1 forward passes.
    """
    if update_at is None:
        resized = 2 * size
    elif 2 * (update_at + 1) <= size:
        resized = size // 2
    else:
        resized = size
    return max(1, min(resized, (checked + 1) // (2 * (updates + 1)), MAX_WINDOW))


@dataclass(frozen=True)
class BatchedDeepFoolOptions(AlgorithmOneOptions):
    """:class:`AlgorithmOneOptions` and the mini-batch: ``batch_size`` images per update, whose
    successful steps are combined by ``aggregate`` ("sum" or "mean")."""

    batch_size: int = 32
    aggregate: str = "sum"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size < 1:
            raise ValueError(f"attack.batch_size must be at least 1; got {self.batch_size}")
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"attack.aggregate must be one of {', '.join(AGGREGATES)}; got {self.aggregate!r}")


@register_engine
class BatchedDeepFoolUAP(AlgorithmOne):
    """Algorithm 1 on mini-batches: per batch of ``batch_size`` shuffled images, the inner attack
    (DeepFool by default) on those v does not yet fool, then v ← Proj_{p,ε}(v + the sum (or mean)
    of the successful steps).

    Arguments:
        threat, clip, target_class, overshoot, num_candidates, max_deepfool_iters, deepfool_norm,
        inner, inner_step, inner_steps: as for :class:`DeepFoolUAP`.
        batch_size (int, 32): images per update.
        aggregate (str, "sum"): how the successful steps of a batch combine, "sum" or "mean".

    Shape:
        as for :class:`DeepFoolUAP`.

    Example::

        engine = BatchedDeepFoolUAP(ThreatModel.parse(8, "inf"), batch_size=32)
        v, stats = engine.run_pass(model, torch.zeros(3, 32, 32), X, model(X).argmax(1), None)

    The sum is the default by measurement: DeepFool steps of different images are nearly
    uncorrelated (on a CIFAR ResNet-20 the mean pairwise correlation of their ℓ∞ sign
    patterns is 0.002), so their mean shrinks towards zero and v barely grows, while the sum
    keeps what they share and the projection bounds the rest.

    On several processes each rank runs the inner attack on its shard of every global batch of
    ``batch_size`` images; the sums of the successful steps and their counts are summed over the
    ranks, so every rank makes the one-process update (up to float rounding of the sum)."""

    name = "deepfool_uap_batched"
    Options = BatchedDeepFoolOptions
    sequential = False

    def first_window(self) -> int:
        return self.options.batch_size

    def window_after(self, size: int, update_at: Optional[int], checked: int, updates: int) -> int:
        return self.options.batch_size

    def combine(self, step_sum: Tensor, count: int) -> Tensor:
        """The sum of the ``count`` successful steps, or their mean (``aggregate="mean"``)."""
        return step_sum / count if self.options.aggregate == "mean" else step_sum

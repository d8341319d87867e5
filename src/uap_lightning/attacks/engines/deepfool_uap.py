"""``deepfool_uap``: the paper's Algorithm 1 (Moosavi-Dezfooli et al., CVPR 2017), one image per
update; its "does v fool x?" checks are predicted for windows of images, with the same result.
Sequential by definition, it runs the same pass on every rank of several processes.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import Tensor, nn

from uap_lightning.attacks.algorithm_one import AlgorithmOne
from uap_lightning.attacks.base import PassStats, register_engine
from uap_lightning.attacks.distributed import Reducer
from uap_lightning.attacks.threat import ThreatModel
from uap_lightning.metrics import perturb

MAX_WINDOW = 64  # most images DeepFoolUAP predicts in one check forward pass


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

    def __init__(self, threat: ThreatModel, *, per_image_reference: bool = False, **options: Any) -> None:
        super().__init__(threat, **options)
        self.per_image_reference = bool(per_image_reference)

    def first_window(self) -> int:
        return 1

    def window_after(self, size: int, update_at: Optional[int], checked: int, updates: int) -> int:
        return next_window(size, update_at, checked, updates)

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

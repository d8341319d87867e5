"""``deepfool_uap_batched``: Algorithm 1 (Moosavi-Dezfooli et al., CVPR 2017) on mini-batches: the
inner attack on a batch's still-unfooled images, their combined step added to v. On several
processes each global batch is shared among the ranks and their steps summed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from uap_lightning.attacks.algorithm_one import AlgorithmOne, AlgorithmOneOptions
from uap_lightning.attacks.base import register_engine

AGGREGATES = ("mean", "sum")


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
    options: BatchedDeepFoolOptions
    sequential = False

    def first_window(self) -> int:
        return self.options.batch_size

    def window_after(self, size: int, update_at: Optional[int], checked: int, updates: int) -> int:
        return self.options.batch_size

    def combine(self, step_sum: Tensor, count: int) -> Tensor:
        """The sum of the ``count`` successful steps, or their mean (``aggregate="mean"``)."""
        return step_sum / count if self.options.aggregate == "mean" else step_sum

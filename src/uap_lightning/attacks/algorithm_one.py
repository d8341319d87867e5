"""Algorithm 1 of Moosavi-Dezfooli et al. (CVPR 2017): the outer loop the DeepFool engines share.

In shuffled order, the images of X that v does not fool yet are attacked by the inner attack
(``attack.inner``, DeepFool by default, see :mod:`uap_lightning.attacks.inner`) from clip(x + v)
(x + v when ``clip=False``); the successful steps Δv are added to v, which is then projected onto
the ℓp ball of radius eps/255. Steps are in [0,1] image scale; a step counts only when the inner
attack succeeded. The engines are ``deepfool_uap`` (one image per update) and
``deepfool_uap_batched`` (a mini-batch per update), in :mod:`uap_lightning.attacks.engines`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Tuple

import torch
from torch import Tensor, nn

from uap_lightning.attacks.base import PassStats, UniversalAttack
from uap_lightning.attacks.deepfool import DeepFoolOptions, DeepFoolResult
from uap_lightning.attacks.distributed import SINGLE_PROCESS, Reducer, shard
from uap_lightning.attacks.inner import DeepFoolInner, InnerAttack, InnerOptions, Start, inner_class
from uap_lightning.attacks.threat import ThreatModel, parse_p
from uap_lightning.metrics import perturb


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

    def __init__(self, threat: ThreatModel, **options: Any) -> None:
        super().__init__(threat, **options)
        self.deepfool_norm = parse_p(self.options.deepfool_norm)
        self._deepfool = DeepFoolInner(threat, self.options, self.target_class)
        if self.options.inner == DeepFoolInner.name:
            self.inner: InnerAttack = self._deepfool
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
        groups = torch.split(todo, 1) if self.sequential else [todo]
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

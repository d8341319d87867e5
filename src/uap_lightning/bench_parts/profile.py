"""Where one pass of an engine spends its time: forward passes, gradient passes, the rest.

The victim is wrapped so that its forward passes are timed, and the backward passes
(``torch.autograd.grad``, which the DeepFool and SGD engines call, and ``torch.autograd.backward``,
behind GD-UAP's ``loss.backward()``) are timed while the pass runs; "other" is the remainder
(projections, optimiser steps, indexing, Python). The sequential engine is also held against the victim's
own forward+backward throughput at batch 1, the shape its DeepFool steps run at.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterator, List

import torch
from torch import Tensor, nn

from uap_lightning.attacks import UniversalAttack, folded_copy, frozen_eval


@dataclass
class PassProfile:
    """Wall seconds of one pass over ``images`` images, split by kind of work."""

    images: int
    total_seconds: float
    forward_seconds: float  # the victim's forward passes, with or without gradients
    gradient_seconds: float  # backward passes (torch.autograd.grad and torch.autograd.backward)
    other_seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.total_seconds if self.total_seconds > 0 else 0.0

    def as_dict(self) -> Dict[str, Any]:
        return {**asdict(self), "images_per_second": self.images_per_second}


class _TimedForward(nn.Module):
    """``model`` with the wall time of its forward passes summed in ``seconds``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.seconds = 0.0

    def forward(self, x: Tensor) -> Tensor:
        started = time.perf_counter()
        try:
            return self.model(x)
        finally:
            self.seconds += time.perf_counter() - started


@contextlib.contextmanager
def _timed_gradients() -> Iterator[List[float]]:
    """Inside, ``torch.autograd.grad`` and ``torch.autograd.backward`` (which ``Tensor.backward``
    calls) add their wall time to the yielded one-item list."""
    originals = {name: getattr(torch.autograd, name) for name in ("grad", "backward")}
    spent = [0.0]

    def timed(original: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - started

        return call

    for name, original in originals.items():
        setattr(torch.autograd, name, timed(original))
    try:
        yield spent
    finally:
        for name, original in originals.items():
            setattr(torch.autograd, name, original)


def profile_pass(
    engine: UniversalAttack, model: nn.Module, images: Tensor, clean_labels: Tensor, seed: int
) -> PassProfile:
    """Time one pass of ``engine`` from v = 0 on ``images`` (N×C×H×W in [0,1]), as the pass driver
    runs it (eval mode, batch norm folded)."""
    with frozen_eval(model):
        timed = _TimedForward(folded_copy(model))
        v = torch.zeros(images.shape[1:], dtype=images.dtype)
        with _timed_gradients() as gradient:
            started = time.perf_counter()
            engine.run_pass(timed, v, images, clean_labels, torch.Generator().manual_seed(seed), pass_index=0)
            total = time.perf_counter() - started
    return PassProfile(
        images=int(images.shape[0]),
        total_seconds=total,
        forward_seconds=timed.seconds,
        gradient_seconds=gradient[0],
        other_seconds=max(0.0, total - timed.seconds - gradient[0]),
    )


def forward_backward_rate(model: nn.Module, images: Tensor, count: int = 50) -> float:
    """Images per second of one forward and one backward pass at batch 1 on the folded victim."""
    with frozen_eval(model):
        folded = folded_copy(model)
        batches = [images[i : i + 1] for i in range(min(count, len(images)))]

        def step(x: Tensor) -> None:
            xa = x.detach().clone().requires_grad_(True)
            torch.autograd.grad(folded(xa)[:, 0].sum(), xa)

        step(batches[0])  # warm-up
        started = time.perf_counter()
        for x in batches:
            step(x)
        return len(batches) / (time.perf_counter() - started)

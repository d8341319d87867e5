"""How close batched DeepFool runs to the victim's own forward+backward throughput.

efficiency = (image·DeepFool-iterations per second × candidates)
             / (forward+backward images per second at the same batch size)

Each DeepFool iteration of one image needs the gradients of ``candidates`` logits, so a
method that cost exactly one forward+backward per candidate gradient would score 1.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, cast

import torch
from torch import Tensor, nn

from uap_lightning.attacks import BatchedDeepFoolUAP, frozen_eval


@dataclass
class Efficiency:
    """The measured figures (per second of wall time) and their ratio."""

    batch_size: int
    candidates: int
    images: int
    deepfool_iterations: int  # summed over the images
    deepfool_seconds: float
    image_iterations_per_second: float
    forward_backward_seconds: float
    forward_backward_images_per_second: float
    efficiency: float

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _forward_backward(model: nn.Module, batch: Tensor) -> None:
    x = batch.detach().clone().requires_grad_(True)
    torch.autograd.grad(model(x).sum(), x)


def batched_efficiency(model: nn.Module, images: Tensor, engine: BatchedDeepFoolUAP, batches: int) -> Efficiency:
    """Time ``engine``'s DeepFool and plain forward+backward on the first ``batches`` batches of ``images``."""
    size = engine.options.batch_size
    chunks = [images[i : i + size] for i in range(0, min(len(images), size * batches), size)]
    with torch.enable_grad(), frozen_eval(model):
        engine.deepfool(model, chunks[0])  # warm-up
        _forward_backward(model, chunks[0])
        started = time.perf_counter()
        # the batched DeepFool counts the iterations of each image: a tensor
        iterations = sum(int(cast(Tensor, engine.deepfool(model, chunk).iterations).sum()) for chunk in chunks)
        deepfool_seconds = time.perf_counter() - started
        started = time.perf_counter()
        for chunk in chunks:
            _forward_backward(model, chunk)
        forward_backward_seconds = time.perf_counter() - started
        classes = model(chunks[0][:1]).shape[1]
    count = sum(len(chunk) for chunk in chunks)
    candidates = min(engine.options.num_candidates, classes)
    iteration_rate = iterations / deepfool_seconds
    forward_backward_rate = count / forward_backward_seconds
    return Efficiency(
        batch_size=size,
        candidates=candidates,
        images=count,
        deepfool_iterations=iterations,
        deepfool_seconds=deepfool_seconds,
        image_iterations_per_second=iteration_rate,
        forward_backward_seconds=forward_backward_seconds,
        forward_backward_images_per_second=forward_backward_rate,
        efficiency=iteration_rate * candidates / forward_backward_rate,
    )

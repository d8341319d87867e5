"""Preparing a victim for an attack: eval mode and frozen parameters (restored after), an
attack copy with batch norm folded into the layers before it, and a copy whose predictions
(forward passes without gradients) run compiled."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

from uap_lightning.attacks.ensemble import Ensemble


@contextlib.contextmanager
def frozen_eval(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and ``requires_grad=False`` inside; each module's mode and each parameter's flag restored on exit."""
    modes = [(module, module.training) for module in model.modules()]
    flags = [(param, param.requires_grad) for param in model.parameters()]
    try:
        model.eval()
        for param, _ in flags:
            param.requires_grad_(False)
        yield model
    finally:
        for module, training in modes:
            module.training = training
        for param, flag in flags:
            param.requires_grad_(flag)


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a model with neither)."""
    for tensor in model.parameters():
        return tensor.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def folded_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with each BatchNorm folded into the convolution or linear
    layer before it (torch.fx), parameters frozen: the same function up to float rounding,
    with fewer layers to run forward and backward. ``model`` itself when fx cannot trace it
    or it has no batch norm to fold; an :class:`Ensemble` of each member's folded copy.
    """
    if isinstance(model, Ensemble):
        return model.map_members(folded_copy)
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    training = model.training
    try:
        folded = fuse(model.eval(), inplace=False)
    except (torch.fx.proxy.TraceError, TypeError, NotImplementedError, RuntimeError):
        return model
    finally:
        model.train(training)
    folded.eval()
    for param in folded.parameters():
        param.requires_grad_(False)
    return folded


class CompiledPredictions(nn.Module):
    """``model`` whose forward passes without gradients run through ``torch.compile`` (dynamic
    shapes, so batch sizes share one compiled graph); passes that build a graph for gradients
    stay eager, because batched vector-Jacobian products (``is_grads_batched``) cannot run
    through compiled backward graphs. Compilation happens on the first prediction."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.compiled = torch.compile(model, dynamic=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.compiled(x) if not torch.is_grad_enabled() else self.model(x)
        return out


def compiled_predictions(model: nn.Module) -> nn.Module:
    """``model`` with its predictions compiled (:class:`CompiledPredictions`); for an
    :class:`Ensemble`, each member's, so that the ensemble's losses still see its members."""
    if isinstance(model, Ensemble):
        return model.map_members(CompiledPredictions)
    return CompiledPredictions(model)

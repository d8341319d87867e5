"""Layer outputs collected by forward hooks, and the blank canvas data-free engines add δ to."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, List

from torch import Tensor, nn

from uap_lightning.errors import ConfigError

GREY = 0.5  # the mid-grey image δ is added to when no image is read, [0,1] scale


@contextlib.contextmanager
def activations(model: nn.Module, layers: Any) -> Iterator[List[Tensor]]:
    """Inside, the outputs of ``layers`` ("conv": every ``nn.Conv2d``; else module names) are
    appended to the yielded list at every forward pass; the hooks are removed on exit.
    ConfigError naming ``attack.layers`` when no such layer exists."""
    modules = dict(model.named_modules())
    if layers == "conv":
        chosen = [module for module in modules.values() if isinstance(module, nn.Conv2d)]
        if not chosen:
            raise ConfigError(
                "attack.layers=conv: the model has no Conv2d layer; name the layers whose activations to "
                "maximise, attack.layers=[NAME, ...] (names as in model.named_modules())"
            )
    else:
        missing = [name for name in layers if name not in modules]
        if missing:
            raise ConfigError(f"attack.layers names no module of the model: {', '.join(missing)}")
        chosen = [modules[name] for name in layers]
    outputs: List[Tensor] = []
    handles = [module.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for module in chosen]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()

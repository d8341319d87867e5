"""Where a pretrained victim's weights come from, one rule for the model families that look for
them (``model=torchvision``, ``model=timm``): the file ``model.weights`` when given, else the
family's local cache; nothing is downloaded. Checked before any heavy work."""

from __future__ import annotations

import os
from typing import Callable, Optional

from uap_lightning.errors import ConfigError, NotFoundError


class PretrainedWeightsNotFoundError(NotFoundError):
    """The weight file of a pretrained model is neither given nor in its local cache."""


def pretrained_weights_file(
    *,
    pretrained: bool,
    weights: Optional[str],
    cached: Callable[[], Optional[str]],
    not_cached: Callable[[], str],
) -> Optional[str]:
    """The weight file a model loads: None when not ``pretrained``; ``weights`` (model.weights)
    when given; else ``cached()``, the file in the family's local cache (None: absent).

    ConfigError for ``weights`` without ``pretrained``; PretrainedWeightsNotFoundError when the
    given file does not exist, or (with the message ``not_cached()``: where it was looked for and
    how to give it) when the cache holds none."""
    if weights is not None and not pretrained:
        raise ConfigError("model.weights needs model.pretrained=true (or use model.checkpoint for your own weights)")
    if not pretrained:
        return None
    if weights is not None:
        if not os.path.isfile(weights):
            raise PretrainedWeightsNotFoundError(f"model.weights={weights}: no such file; give the path of the weights")
        return weights
    found = cached()
    if found is None or not os.path.isfile(found):
        raise PretrainedWeightsNotFoundError(not_cached())
    return found

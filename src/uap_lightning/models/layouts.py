"""Key renames that map published checkpoints' parameter names onto this project's models.

A rename is a pair ``(pattern, replacement)`` applied with :func:`re.sub` to every key of
a weights file, after the wrapper prefixes all keys share (DataParallel's ``module.``
and the like) are stripped; renames apply in order, each to the result of the previous.
"""

from __future__ import annotations

import re
from collections.abc import Sequence as SequenceABC
from typing import Dict, List, Optional, Pattern, Sequence, Tuple

from uap_lightning.errors import ConfigError

Rename = Tuple[Pattern[str], str]

LAYOUTS: Dict[str, Tuple[Tuple[str, str], ...]] = {
    # Option-A CIFAR ResNets (ResNet-20/32/44/56/110) as in the common PyTorch
    # reproductions, saved from DataParallel: ``{'state_dict': ...}`` with keys
    # ``module.conv1.*``, ``module.bn1.*``, ``module.layer{1,2,3}.<block>.{conv1,bn1,conv2,bn2}.*``
    # and ``module.linear.*``, many by PyTorch before 0.4.1 and so without BatchNorm's
    # ``num_batches_tracked`` (not required); their padding shortcuts have no parameters. Fits
    # ``resnet_cifar(depth, ...)``, whose stages are ``layers.{0,1,2}`` and classifier ``fc``.
    "cifar_resnet_a": (
        (r"^layer1\.", "layers.0."),
        (r"^layer2\.", "layers.1."),
        (r"^layer3\.", "layers.2."),
        (r"^linear\.", "fc."),
    ),
}


def renames(layout: Optional[str], key_map: Sequence[Tuple[str, str]] = ()) -> List[Rename]:
    """The renames of preset ``layout`` (none when None) followed by those of ``key_map``,
    compiled.

    Raises ConfigError naming ``model.layout`` (with the known presets) for an unknown
    preset, and naming ``model.key_map`` for an entry that is not a pair of strings or
    whose pattern or replacement is not a valid regular expression / template.
    """
    if layout is not None and layout not in LAYOUTS:
        raise ConfigError(
            f"model.layout={layout} is not a known layout; known: {', '.join(sorted(LAYOUTS))} "
            "(or leave it unset and rename keys with model.key_map)"
        )
    preset = LAYOUTS[layout] if layout is not None else ()
    return [_compiled(pair, "model.layout") for pair in preset] + [_compiled(pair, "model.key_map") for pair in key_map]


def _compiled(pair: Tuple[str, str], key: str) -> Rename:
    """``(pattern, replacement)`` with the pattern compiled and the replacement checked."""
    if not _is_pair_of_strings(pair):
        raise ConfigError(f"{key}: each entry must be a pair [PATTERN, REPLACEMENT] of strings, got {pair!r}")
    pattern, replacement = pair
    try:
        compiled = re.compile(pattern)
        compiled.sub(replacement, "")  # parses the replacement's group references
    except re.error as err:
        raise ConfigError(f"{key}: invalid rename [{pattern!r}, {replacement!r}]: {err}") from None
    return compiled, replacement


def _is_pair_of_strings(value: object) -> bool:
    """Whether ``value`` is a two-element sequence (list, tuple, ListConfig) of strings."""
    return (
        isinstance(value, SequenceABC)
        and not isinstance(value, str)
        and len(value) == 2
        and all(isinstance(v, str) for v in value)
    )

"""Load a user's weights into a backbone, a ``net`` or a victim, whatever the file's layout."""

from __future__ import annotations

import os
import pickle
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from torch import nn

# Dictionary keys under which training scripts commonly nest the weights.
_NESTING_KEYS = ("state_dict", "model_state_dict", "model")
# Key prefixes added by wrappers: DataParallel/DDP, torch.compile, the victim's ``net``
# and its ``Sequential(Normalize, backbone)`` index.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.", "net.", "1.")
_SHOWN = 5


class CheckpointMismatchError(ValueError):
    """A checkpoint's parameter names or shapes do not fit the model built from the config."""


def _read(path: str) -> Any:
    """Load on CPU; tensors-only unpickling first, full unpickling for files that need it
    (e.g. Lightning checkpoints whose hyperparameters hold config objects)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return torch.load(path, map_location="cpu", weights_only=False)


def _state_dict_of(obj: Any, path: str) -> Dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint: a module, a state dict, or a dict nesting one."""
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if not isinstance(obj, Mapping):
        raise CheckpointMismatchError(
            f"model.checkpoint={path} holds a {type(obj).__name__}, not a state dict"
        )
    for key in _NESTING_KEYS:
        if isinstance(obj.get(key), Mapping):
            return _state_dict_of(obj[key], path)
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _strip_wrappers(keys: Iterable[str]) -> Dict[str, str]:
    """Map each key with the wrapper prefixes that *all* keys share removed → the key."""
    keys = list(keys)
    stripped = list(keys)
    changed = True
    while changed and stripped:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in stripped):
                stripped = [k[len(prefix):] for k in stripped]
                changed = True
    return dict(zip(stripped, keys))


def _shape(t: torch.Tensor) -> Tuple[int, ...]:
    return tuple(t.shape)


def _mismatch_report(
    expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]
) -> List[str]:
    """Lines describing shape mismatches, missing keys and unexpected keys (a few each)."""
    lines = []
    wrong = [k for k in expected if k in found and _shape(expected[k]) != _shape(found[k])]
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    if wrong:
        lines.append(f"{len(wrong)} shape mismatch(es):")
        lines += [
            f"  {k}: expected {_shape(expected[k])}, found {_shape(found[k])}" for k in wrong[:_SHOWN]
        ]
    if missing:
        lines.append(f"{len(missing)} missing key(s): {', '.join(missing[:_SHOWN])}")
    if unexpected:
        lines.append(f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:_SHOWN])}")
    return lines


def load_weights(module: nn.Module, path: str, *, model_name: Optional[str] = None) -> None:
    """Load the weights at ``path`` into ``module`` (a backbone, a victim's ``net`` or a
    ``VictimClassifier``), on CPU.

    The file may be a Lightning ``.ckpt`` (weights under ``state_dict``, keys prefixed
    ``net.`` / ``net.1.``), a state dict of the backbone or of the whole ``net``, with or
    without DataParallel's ``module.`` prefix. Every parameter and buffer must match.

    Raises FileNotFoundError when ``path`` does not exist, and CheckpointMismatchError
    (a ValueError) listing the first mismatching keys when the weights do not fit;
    ``model_name`` (default: the module's class name) names the model in that message.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model.checkpoint={path}: no such file")
    found_raw = _state_dict_of(_read(path), path)
    target = module.state_dict()
    found_keys = _strip_wrappers(found_raw)
    target_keys = _strip_wrappers(target)
    found = {k: found_raw[full] for k, full in found_keys.items()}
    expected = {k: target[full] for k, full in target_keys.items()}
    problems = _mismatch_report(expected, found)
    if problems:
        name = model_name or type(module).__name__
        raise CheckpointMismatchError(
            f"model.checkpoint={path} does not fit model={name}:\n" + "\n".join(problems)
        )
    module.load_state_dict({target_keys[k]: v for k, v in found.items()}, strict=True)

"""Load a user's weights into a backbone, a ``net`` or a victim, whatever the file's layout.

Files are read tensors-only (:mod:`uap_lightning.tensors_only`): unpickling a file can run
code, so a file that needs more than tensors, containers and a few allow-listed
configuration types is refused unless the user declares it trusted.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from uap_lightning import tensors_only
from uap_lightning.errors import (
    DamagedFileError,
    NotFoundError,
    UntrustedFileError,
    UserError,
)
from uap_lightning.models.layouts import LAYOUTS, Rename, renames

log = logging.getLogger(__name__)

# Dictionary keys under which training scripts commonly nest the weights (beside scalars such as
# ``best_prec1`` or ``epoch`` and optimizer state, which are ignored).
_NESTING_KEYS = ("state_dict", "model_state_dict", "model", "net")
# Key prefixes added by wrappers: DataParallel/DDP, torch.compile, the victim's ``net``
# and its ``Sequential(Normalize, backbone)`` index.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.", "net.", "1.")
_SHOWN = 5


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint's parameter names or shapes do not fit the model built from the config."""


def read_checkpoint(path: str, *, trust: bool = False, key: str = "model.checkpoint") -> Any:
    """The object stored at ``path``, loaded on CPU, tensors-only.

    A file that needs full unpickling raises UntrustedFileError naming the types it
    wants, unless ``trust`` (the user's explicit ``model.trust_checkpoint=true``), which
    loads it fully with a warning. A truncated or foreign file raises DamagedFileError.
    ``key`` names the setting in messages.
    """
    try:
        return tensors_only.load(path)
    except tensors_only.Refused as refused:
        if not refused.unsafe:
            raise _damaged(path, key, refused) from None
        if not trust:
            raise UntrustedFileError(
                f"{key}={path} holds Python objects beyond tensors ({', '.join(refused.unsafe[:_SHOWN])}); "
                "loading them would run code from the file, so it is refused. Save the weights "
                "alone (torch.save(model.state_dict(), PATH)), or, for a file you trust, set "
                "model.trust_checkpoint=true"
            ) from None
    log.warning("%s=%s is loaded with full unpickling (model.trust_checkpoint=true): it can run code", key, path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except tensors_only.READ_ERRORS as err:  # e.g. a raw pickle, which torch.load cannot read at all
        raise _damaged(path, key, tensors_only.Refused(err)) from None


def _damaged(path: str, key: str, refused: tensors_only.Refused) -> DamagedFileError:
    return DamagedFileError(
        f"cannot read {key}={path}: the file is truncated, damaged or not a PyTorch weights file ({refused})"
    )


def _state_dict_of(obj: Any, path: str) -> Dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint: a module, a state dict, or a dict nesting either
    under one of :data:`_NESTING_KEYS` or, beside scalars, under one key of another name (logged)."""
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if not isinstance(obj, Mapping):
        raise CheckpointMismatchError(f"model.checkpoint={path} holds a {type(obj).__name__}, not a state dict")
    for key in _NESTING_KEYS:
        if isinstance(obj.get(key), (Mapping, nn.Module)):
            return _state_dict_of(obj[key], path)
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if tensors:
        return tensors
    nests = [
        k
        for k, v in obj.items()
        if isinstance(v, nn.Module) or (isinstance(v, Mapping) and any(isinstance(t, torch.Tensor) for t in v.values()))
    ]
    if len(nests) == 1:
        log.info("model.checkpoint=%s nests its tensors under %r; reading them from there", path, nests[0])
        return _state_dict_of(obj[nests[0]], path)
    if nests:
        raise CheckpointMismatchError(
            f"model.checkpoint={path} nests tensors under several keys ({', '.join(map(repr, nests))}); save the "
            "network's own as a file of its own: torch.save(checkpoint[KEY], 'weights.pt'), then "
            "model.checkpoint=weights.pt"
        )
    return tensors


def _filled_on_load(module: nn.Module, key: str) -> bool:
    """Whether ``module.load_state_dict`` fills ``key`` (a full key of ``module``) when the file
    lacks it: the ``num_batches_tracked`` counter of a normalisation layer tracking running
    statistics, which files saved before PyTorch 0.4.1 do not hold; the layer keeps its own."""
    owner, _, name = key.rpartition(".")
    if name != "num_batches_tracked":
        return False
    layer = module.get_submodule(owner)
    # _NormBase is the BatchNorm/InstanceNorm base whose _load_from_state_dict does the filling
    return isinstance(layer, nn.modules.batchnorm._NormBase) and layer.track_running_stats


def _strip_wrappers(keys: Iterable[str]) -> Dict[str, str]:
    """Map each key with the wrapper prefixes that *all* keys share removed → the key."""
    keys = list(keys)
    stripped = list(keys)
    changed = True
    while changed and stripped:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in stripped):
                stripped = [k[len(prefix) :] for k in stripped]
                changed = True
    return dict(zip(stripped, keys))


def _renamed(keys: Mapping[str, str], rules: Sequence[Rename], path: str) -> Dict[str, str]:
    """``keys`` (name → the file's key) with each name passed through ``rules`` in order.

    Raises CheckpointMismatchError naming both of the file's keys when two names become one.
    """
    renamed: Dict[str, str] = {}
    for name, source in keys.items():
        for pattern, replacement in rules:
            name = pattern.sub(replacement, name)
        if name in renamed:
            raise CheckpointMismatchError(
                f"model.checkpoint={path}: model.layout/model.key_map rename both {renamed[name]} "
                f"and {source} to {name}; change the renames so that each key stays distinct"
            )
        renamed[name] = source
    return renamed


def _shape(t: torch.Tensor) -> Tuple[int, ...]:
    return tuple(t.shape)


Shapes = Tuple[str, Tuple[int, ...], Tuple[int, ...]]  # a key, the shape the model expects, the file's


def key_report(wrong: Sequence[Shapes], missing: Sequence[str], unexpected: Sequence[str]) -> List[str]:
    """Lines giving how many keys have another shape, are missing or are unexpected, naming the
    first few of each kind (a model's whole key list runs to kilobytes)."""
    lines = []
    if wrong:
        lines.append(f"{len(wrong)} shape mismatch(es):")
        lines += [f"  {k}: expected {expected}, found {found}" for k, expected, found in wrong[:_SHOWN]]
    if missing:
        lines.append(f"{len(missing)} missing key(s): {', '.join(missing[:_SHOWN])}")
    if unexpected:
        lines.append(f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:_SHOWN])}")
    return lines


def _mismatch_report(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> List[str]:
    """Lines describing shape mismatches, missing keys and unexpected keys (a few each)."""
    wrong = [(k, _shape(expected[k]), _shape(found[k])) for k in expected if k in found]
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    lines = key_report([w for w in wrong if w[1] != w[2]], missing, unexpected)
    if missing or unexpected:
        lines.append(
            "keys are compared after stripping wrapper prefixes (module., ...) and renaming; if the "
            f"file names the same tensors differently, set model.layout ({', '.join(sorted(LAYOUTS))}) "
            "or model.key_map=[[PATTERN, REPLACEMENT], ...] (regular expressions, applied in order)"
        )
    return lines


def load_weights(
    module: nn.Module,
    path: str,
    *,
    model_name: Optional[str] = None,
    trust: bool = False,
    key_map: Sequence[Tuple[str, str]] = (),
    layout: Optional[str] = None,
) -> None:
    """Load the weights at ``path`` into ``module`` (a backbone, a victim's ``net`` or a
    ``VictimClassifier``), on CPU.

    The file may be a Lightning ``.ckpt`` (weights under ``state_dict``, keys prefixed
    ``net.`` / ``net.1.``), a state dict of the backbone or of the whole ``net``, with or
    without DataParallel's ``module.`` prefix. Every parameter and buffer must match, except
    BatchNorm's ``num_batches_tracked`` counters, which files saved by PyTorch before 0.4.1
    lack and which then keep the module's values (as ``load_state_dict`` does).

    After the wrapper prefixes are stripped, the file's keys are renamed by the preset
    ``layout`` (see :data:`~uap_lightning.models.layouts.LAYOUTS`), then by ``key_map``:
    ``(pattern, replacement)`` pairs applied in order with :func:`re.sub`. A bad preset or
    rename raises ConfigError before the file is read.

    The file is read by :func:`read_checkpoint` (``trust`` as there). Raises
    FileNotFoundError when ``path`` does not exist, and CheckpointMismatchError
    (a ValueError) listing the first mismatching keys when the weights do not fit or
    naming the two keys a rename merges; ``model_name`` (default: the module's class
    name) names the model in that message.
    """
    rules = renames(layout, key_map)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise NotFoundError(f"model.checkpoint={path}: no such file; give the path of your weights")
    found_raw = _state_dict_of(read_checkpoint(path, trust=trust), path)
    target = module.state_dict()
    found_keys = _renamed(_strip_wrappers(found_raw), rules, path)
    target_keys = _strip_wrappers(target)
    found = {k: found_raw[full] for k, full in found_keys.items()}
    expected = {k: target[full] for k, full in target_keys.items() if k in found or not _filled_on_load(module, full)}
    problems = _mismatch_report(expected, found)
    if problems:
        name = model_name or type(module).__name__
        raise CheckpointMismatchError(f"model.checkpoint={path} does not fit model={name}:\n" + "\n".join(problems))
    module.load_state_dict({target_keys[k]: v for k, v in found.items()}, strict=True)

"""Torch files read tensors-only, and why a file is refused: the one home of that rule.

Unpickling a file can run code, so checkpoints, weights and perturbation files are read with
``torch.load(weights_only=True)`` and a short allow-list of configuration types. When torch
refuses a file, :class:`Refused` says why in terms a message can use: the Python objects the
file wants beyond the allow-list (the file is untrusted), or none (it is truncated, damaged or
foreign), with a one-line reason that never repeats torch's advice to load with
``weights_only=False``. Only torch's public API is used: zip files are scanned by
``torch.serialization.get_unsafe_globals_in_checkpoint``; other files (the legacy format, a raw
pickle) are read as a pickle opcode stream with :mod:`pickletools`, never executed.
"""

from __future__ import annotations

import collections
import os
import pickle
import pickletools
import re
import typing
import warnings
from typing import Any, Callable, List, Sequence, Tuple, Union

import torch
from lightning.fabric.utilities.data import AttributeDict
from omegaconf import DictConfig, ListConfig, base, nodes

# Types Lightning checkpoints of Hydra projects carry in their hyperparameters; unpickling
# them only fills containers (interpolations are never resolved here).
SAFE_GLOBALS: List[Union[Callable[..., Any], Tuple[Callable[..., Any], str]]] = [
    # Lightning's AttributeDict is a dict subclass, which tensors-only loading cannot fill: read it as a dict
    (dict, f"{AttributeDict.__module__}.{AttributeDict.__qualname__}"),
    (dict, "lightning.pytorch.utilities.parsing.AttributeDict"),
    DictConfig,
    ListConfig,
    base.Metadata,
    base.ContainerMetadata,
    nodes.AnyNode,
    nodes.StringNode,
    nodes.IntegerNode,
    nodes.FloatNode,
    nodes.BooleanNode,
    nodes.BytesNode,
    nodes.PathNode,
    collections.defaultdict,
    collections.OrderedDict,
    typing.Any,
    dict,
    list,
]

# What torch.load raises on a file it cannot read (truncated, foreign, a raw pickle).
READ_ERRORS = (OSError, RuntimeError, EOFError, ValueError, IndexError, KeyError, TypeError, AttributeError)


class Refused(Exception):
    """Tensors-only loading refused a file. ``unsafe``: the globals beyond the allow-list it refers
    to ([] when it names none: the file is truncated, damaged or foreign); ``error``: torch's error;
    ``reason``: what went wrong, in one line fit for a message."""

    def __init__(self, error: BaseException, unsafe: Sequence[str] = ()) -> None:
        self.error = error
        self.unsafe = list(unsafe)
        self.reason = reason(error)
        super().__init__(f"{type(error).__name__}: {self.reason}")


def load(path: str | os.PathLike[str]) -> Any:
    """The object stored at ``path``, loaded on CPU tensors-only with :data:`SAFE_GLOBALS`.

    torch's warnings about its tensors-only unpickler (e.g. a raw pickle's protocol) are not shown:
    what the user must know is said by the caller's message. Raises :class:`Refused` for a file that
    wants other Python objects or that cannot be read."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            unsafe = unsafe_globals(os.fspath(path), err)
        raise Refused(err, unsafe) from None
    except READ_ERRORS as err:
        raise Refused(err) from None


def unsafe_globals(path: str, err: pickle.UnpicklingError) -> List[str]:
    """The non-allow-listed globals the file at ``path`` refers to ([] when it names none: a damaged file).

    Zip-format files are scanned whole by torch; other files (the legacy format, a raw pickle)
    are read as a pickle opcode stream, never executed, and their globals collected; the global the
    tensors-only unpickler stopped at (named in ``err``) counts too."""
    allowed = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint
        found = re.findall(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(err))
        found += [name for name in _pickle_globals(path) if name not in found]
    return [name for name in found if name not in allowed]


def _pickle_globals(path: str) -> List[str]:
    """The ``module.name`` globals a pickle stream at the start of ``path`` refers to, read with
    pickletools (nothing is built or run); [] when the file is no pickle."""
    names: List[str] = []
    strings: List[str] = []
    try:
        with open(path, "rb") as handle:
            for opcode, argument, _ in pickletools.genops(handle):
                if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                    strings.append(str(argument))
                elif opcode.name == "GLOBAL":
                    names.append(str(argument).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # pickletools stops at the first byte that is no opcode: what was read counts
        pass
    return list(dict.fromkeys(names))


def reason(err: BaseException) -> str:
    """What went wrong reading a file, in one sentence: the unpickler's own complaint when there is one
    (else the error's first), and never torch's advice to load with weights_only=False (which would
    run the file's code)."""
    text = str(err).strip()
    found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    line = found.group(1).strip() if found else (text.splitlines()[0] if text else "no detail")
    sentence = line.split(". ")[0]
    return "not a plain tensors file" if "weights_only" in sentence else sentence

"""Victim cache: a trained victim is stored once, keyed by everything that determines it.

Layout under ``<cache_dir>/victims/``::

    <model>-<key>/weights.pt    state dict of the victim's ``net`` (normalisation + backbone)
    <model>-<key>/victim.json   what was trained, test accuracy, training seconds
    <model>-<key>.lock          file lock held while one process trains it

Concurrent runs that want the same victim take the lock: the first trains and saves,
the others wait and then load. Files are written to a temporary name and renamed, so
a killed run never leaves weights that look complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

import torch
from filelock import FileLock
from torch import nn

from uap_lightning.atomic import atomic_write, atomic_write_text

CACHE_FORMAT = 1


def victim_key(spec: Dict[str, Any]) -> str:
    """Short stable hash of a JSON-serialisable description of a victim."""
    canonical = json.dumps({"format": CACHE_FORMAT, **spec}, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass
class CachedVictim:
    """Where one victim lives in the cache."""

    directory: Path

    @property
    def weights_path(self) -> Path:
        return self.directory / "weights.pt"

    @property
    def info_path(self) -> Path:
        return self.directory / "victim.json"

    @property
    def lock_path(self) -> Path:
        return self.directory.with_suffix(".lock")

    def exists(self) -> bool:
        return self.weights_path.is_file() and self.info_path.is_file()

    def load(self, net: nn.Module) -> Dict[str, Any]:
        """Load the cached weights into ``net``; return the stored info."""
        state = torch.load(self.weights_path, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
        return json.loads(self.info_path.read_text())

    def save(self, net: nn.Module, info: Dict[str, Any]) -> None:
        """Write weights then info, each atomically; info last marks the entry complete."""
        self.directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        atomic_write(self.weights_path, lambda f: torch.save(state, f))
        atomic_write_text(self.info_path, json.dumps(info, indent=2, default=str))


def cache_entry(cache_dir: str | os.PathLike, model_name: str, spec: Dict[str, Any]) -> CachedVictim:
    """The cache entry of the victim described by ``spec``."""
    return CachedVictim(Path(cache_dir) / "victims" / f"{model_name}-{victim_key(spec)}")


def load_or_train(
    entry: CachedVictim,
    net: nn.Module,
    train: Callable[[], Dict[str, Any]],
    *,
    timeout_s: float = -1,
) -> Tuple[Dict[str, Any], bool]:
    """Load ``net`` from ``entry``, or run ``train()`` (which trains ``net`` in place and
    returns its info) under the entry's lock and store the result.

    Returns (info, hit) where ``hit`` is True when the weights came from the cache.
    """
    entry.directory.parent.mkdir(parents=True, exist_ok=True)
    if entry.exists():
        return entry.load(net), True
    with FileLock(str(entry.lock_path), timeout=timeout_s):
        if entry.exists():  # another process trained it while we waited
            return entry.load(net), True
        info = train()
        entry.save(net, info)
        return info, False


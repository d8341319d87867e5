"""Victim cache: a trained victim is stored once, keyed by everything that determines it.

Layout under ``<cache_dir>/victims/``::

    <model>-<key>/weights.pt    state dict of the victim's ``net`` (normalisation + backbone)
    <model>-<key>/victim.json   what was trained, test accuracy, training seconds, weights checksum
    <model>-<key>.lock          file lock held while one process trains it

Concurrent runs that want the same victim take the lock: the first trains and saves,
the others wait and then load. Files are written to a temporary name and renamed, so
a killed run never leaves weights that look complete. An entry that is truncated,
unreadable, of the wrong shapes or whose weights do not match their recorded checksum is
reported, moved aside (``<model>-<key>.damaged-<time>``) and trained again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from uap_lightning.atomic import atomic_write, atomic_write_text
from uap_lightning.errors import DamagedFileError
from uap_lightning.keys import keyed_hash
from uap_lightning.locking import held_lock

log = logging.getLogger(__name__)

CACHE_FORMAT = 2


def victim_key(spec: Dict[str, Any]) -> str:
    """Short stable hash of a JSON-serialisable description of a victim."""
    return keyed_hash({"format": CACHE_FORMAT, **spec})[:16]


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class CachedVictim:
    """Where one victim lives in the cache, and the description (``spec``) its key was made from."""

    directory: Path
    spec: Optional[Dict[str, Any]] = None

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
        """Load the cached weights into ``net`` (tensors only); return the stored info.

        DamagedFileError (naming the file) when the info is unreadable, the weights do not
        match their checksum, cannot be read, or do not fit ``net``.
        """
        try:
            info = json.loads(self.info_path.read_text())
            expected = info["weights_sha256"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DamagedFileError(f"victim cache entry {self.info_path} is unreadable ({err})") from None
        if self.spec is not None and info.get("spec") != json.loads(json.dumps(self.spec, default=str)):
            raise DamagedFileError(
                f"victim cache entry {self.directory} holds another victim: the settings recorded in {self.info_path} "
                "are not those its name was made from"
            )
        if file_sha256(self.weights_path) != expected:
            raise DamagedFileError(f"victim weights {self.weights_path} do not match the checksum in {self.info_path}")
        try:
            state = torch.load(self.weights_path, map_location="cpu", weights_only=True)
        except Exception as err:  # any failure to read the file means the entry is damaged
            raise DamagedFileError(f"victim weights {self.weights_path} cannot be read: {err}") from None
        expected_shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        if (
            not isinstance(state, dict)
            or {k: tuple(getattr(v, "shape", ())) for k, v in state.items()} != expected_shapes
        ):
            raise DamagedFileError(
                f"victim weights {self.weights_path} do not fit the {type(net).__name__} built for them"
            )
        if not all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point()):
            raise DamagedFileError(f"victim weights {self.weights_path} hold NaN or infinite values")
        net.load_state_dict(state)
        return info

    def save(self, net: nn.Module, info: Dict[str, Any]) -> Dict[str, Any]:
        """Write weights then info (with the weights' checksum), each atomically; info last
        marks the entry complete. Returns the info written."""
        self.directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        atomic_write(self.weights_path, lambda f: torch.save(state, f))
        info = {**info, "weights_sha256": file_sha256(self.weights_path), "format": CACHE_FORMAT}
        if self.spec is not None:  # what the key was made from, checked when the entry is loaded
            info["spec"] = json.loads(json.dumps(self.spec, default=str))
        atomic_write_text(self.info_path, json.dumps(info, indent=2, default=str))
        return info

    def move_aside(self) -> Path:
        """Rename the entry's folder to ``<name>.damaged-<time>``; return the new path."""
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{secrets.token_hex(2)}"
        target = self.directory.with_name(f"{self.directory.name}.damaged-{stamp}")
        os.replace(self.directory, target)
        return target


def cache_entry(cache_dir: str | os.PathLike, model_name: str, spec: Dict[str, Any]) -> CachedVictim:
    """The cache entry of the victim described by ``spec``."""
    return CachedVictim(Path(cache_dir) / "victims" / f"{model_name}-{victim_key(spec)}", spec)


def load_or_train(
    entry: CachedVictim,
    net: nn.Module,
    train: Callable[[], Dict[str, Any]],
    *,
    timeout: float = 3600.0,
) -> Tuple[Dict[str, Any], bool]:
    """Load ``net`` from ``entry``, or run ``train()`` (which trains ``net`` in place and
    returns its info) under the entry's lock and store the result.

    A damaged entry is reported, moved aside and trained again. Waits at most ``timeout``
    seconds for another process holding the lock (LockTimeoutError after). Returns
    (info, hit) where ``hit`` is True when the weights came from the cache.
    """
    entry.directory.parent.mkdir(parents=True, exist_ok=True)
    with held_lock(entry.lock_path, what=f"the victim {entry.directory.name} to be trained", timeout=timeout):
        if entry.directory.exists():
            try:
                if entry.exists():
                    return entry.load(net), True
                raise DamagedFileError(f"victim cache entry {entry.directory} is incomplete")
            except DamagedFileError as err:
                moved = entry.move_aside()
                log.warning("%s; moved it to %s and training the victim again", err, moved)
        info = train()
        return entry.save(net, info), False

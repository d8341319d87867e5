"""A disk cache of decoded tensors, keyed by a hash of what determines them."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from uap_lightning.atomic import atomic_write
from uap_lightning.keys import keyed_hash

log = logging.getLogger(__name__)


def cache_file(cache_dir: str, key: Dict[str, Any]) -> Path:
    """``cache_dir/datasets/<keyed hash of key>.pt``."""
    return Path(cache_dir) / "datasets" / f"{keyed_hash(key)}.pt"


def load(path: Path) -> Optional[Dict[str, Any]]:
    """The cached object, or None when the file is absent or unreadable."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception as err:  # any damage to a cache file means: decode again
        log.warning("ignoring unreadable dataset cache %s: %s", path, err)
        return None


def save(obj: Dict[str, Any], path: Path) -> None:
    """Write ``obj`` to ``path`` atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))

"""A disk cache of decoded tensors, keyed by a hash of what determines them."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

import torch

log = logging.getLogger(__name__)


def cache_file(cache_dir: str, key: Dict[str, Any]) -> Path:
    """``cache_dir/datasets/<sha256 of key as sorted JSON>.pt``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return Path(cache_dir) / "datasets" / f"{digest}.pt"


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
    """Write ``obj`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(handle)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise

"""One keyed hash for everything cached or resumed: the SHA-256 of a canonical JSON text."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def keyed_hash(description: Any) -> str:
    """Hex SHA-256 of ``description`` as JSON with sorted keys (values JSON cannot hold as text)."""
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()

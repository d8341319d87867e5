"""torch's intra-op thread count, a setting (``threads``): the result of an attack and its speed
depend on it (float reductions split differently across threads), so a run sets it at start and
records it."""

from __future__ import annotations

import os
from typing import Optional

import torch

from uap_lightning.errors import ConfigError


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask; os.cpu_count where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def set_threads(threads: Optional[int], parallel_jobs: int = 1) -> int:
    """Set torch's intra-op threads to ``threads``, or (None) to this process's share of the cores
    when ``parallel_jobs`` jobs run at once; return the count set. ConfigError for a count below 1."""
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be at least 1 (or null: the cores this process may use); got {threads}")
    count = threads if threads is not None else max(1, available_cores() // max(1, parallel_jobs))
    torch.set_num_threads(count)
    return count

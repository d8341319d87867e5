"""The benchmark's parts: a naive reference, the ART peer, rows and the efficiency measure.

The benchmark itself is the task ``task=bench`` (``uap_lightning.tasks.bench``); ``main`` is
``python -m uap_lightning.bench`` and the ``uap-bench`` console script.
"""

from typing import Any


def main() -> Any:
    """Run the benchmark: the run's entry point with the ``bench`` primary config."""
    from uap_lightning.run import entry

    return entry("bench")

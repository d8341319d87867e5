"""The default sweeper: Hydra's basic sweeper without its check that every job of a batch composes
before any runs; the launcher (:class:`SafeBasicLauncher`) records a job that cannot be composed
as failed, and the others run."""

from __future__ import annotations

from typing import Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper


class SafeBasicSweeper(BasicSweeper):
    """Hydra's grid sweeper (``-m key=a,b,c``), leaving uncomposable jobs to fail alone."""

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        """Accept every batch: each job is composed, and may fail, on its own in the launcher."""

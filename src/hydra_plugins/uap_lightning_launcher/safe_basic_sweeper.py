"""The default sweeper: Hydra's basic sweeper without its check that every job of a batch composes
before any runs; the launcher (:class:`SafeBasicLauncher`) records a job that cannot be composed
as failed, and the others run. With ``task=compare`` its jobs are the compare's cells not yet
complete in the sweep folder (``uap_lightning.tasks.compare.pending_jobs``)."""

from __future__ import annotations

from typing import List, Optional, Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.types import Override
from omegaconf import DictConfig, OmegaConf


class SafeBasicSweeper(BasicSweeper):
    """Hydra's grid sweeper (``-m key=a,b,c``), leaving uncomposable jobs to fail alone; the cells of
    ``task=compare``."""

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        """Accept every batch: each job is composed, and may fail, on its own in the launcher."""

    def split_arguments(self, overrides: List[Override], max_batch_size: Optional[int]) -> List[List[List[str]]]:
        """The jobs' overrides in batches of at most ``max_batch_size``: the grid of the swept
        overrides, or with ``task=compare`` one job per cell still to run (none: no batch)."""
        if OmegaConf.select(self.config, "task.name") != "compare":
            return BasicSweeper.split_arguments(overrides, max_batch_size)
        from uap_lightning.tasks.compare import pending_jobs  # heavy: only for task=compare

        fixed = [o for o in overrides if not o.is_sweep_override()]
        base = BasicSweeper.split_arguments(fixed, None)[0][0]
        swept = [o.input_line or o.get_key_element() for o in overrides if o.is_sweep_override()]
        jobs = pending_jobs(self.config, base, swept, self._compose)
        return list(self.split_overrides_to_chunks(jobs, max_batch_size)) if jobs else []

    def _compose(self, overrides: List[str]) -> DictConfig:
        """The config a job with ``overrides`` runs with, as the launcher composes it."""
        return self.hydra_context.config_loader.load_sweep_config(self.config, overrides)

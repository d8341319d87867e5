"""The default sweep launcher: Hydra's basic launcher, except that a job whose overrides cannot be
composed (``-m attack.eps=64,abc``: "abc" is no number) fails alone. Its folder gets the overrides
and a ``failure.json`` naming the error, so the sweep's summary lists it as a failed row, and the
other jobs run."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Sequence

import yaml
from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.utils import JobReturn, JobStatus, filter_overrides, run_job, setup_globals
from hydra.errors import HydraException
from omegaconf import open_dict
from omegaconf.errors import OmegaConfBaseException

from uap_lightning.atomic import atomic_write_text
from uap_lightning.config import safe_folder_name
from uap_lightning.config_errors import composition_error_message
from uap_lightning.rundir import write_failure

log = logging.getLogger(__name__)


class SafeBasicLauncher(BasicLauncher):
    """Runs the jobs one after another in this process, like Hydra's basic launcher; a job that
    cannot be composed is recorded as failed instead of ending the sweep."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info("Launching %d jobs locally", len(job_overrides))
        runs: List[JobReturn] = []
        for index, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info("\t#%d : %s", index, " ".join(filter_overrides(overrides)))
            try:
                config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            except (HydraException, OmegaConfBaseException, ValueError) as err:
                runs.append(self._failed(sweep_dir, index, list(overrides), err))
                continue
            with open_dict(config):
                config.hydra.job.id = index
                config.hydra.job.num = index
            runs.append(
                run_job(
                    hydra_context=self.hydra_context,
                    task_function=self.task_function,
                    config=config,
                    job_dir_key="hydra.sweep.dir",
                    job_subdir_key="hydra.sweep.subdir",
                )
            )
        return runs

    @staticmethod
    def _failed(sweep_dir: Path, index: int, overrides: List[str], err: BaseException) -> JobReturn:
        """The folder of a job that could not be composed: its overrides and failure.json; a return
        whose value (NaN) tells sweepers nothing was measured."""
        folder = sweep_dir / f"{index}-{safe_folder_name(','.join(filter_overrides(overrides)))}"
        atomic_write_text(folder / ".hydra" / "overrides.yaml", yaml.safe_dump(overrides))
        write_failure(folder, err)
        log.error(
            "job %d (%s) cannot be composed: %s",
            index,
            " ".join(overrides),
            composition_error_message(err, overrides).splitlines()[0],
        )
        ret = JobReturn(overrides=overrides, working_dir=str(folder), status=JobStatus.COMPLETED)
        ret.return_value = float("nan")
        return ret

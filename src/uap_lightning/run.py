"""Entry point: compose -> check -> prepare (data, X, eval set, victims) -> task -> outputs.

    python -m uap_lightning.run attack.eps=10 attack.p=inf
    python -m uap_lightning.run -m attack.eps=32,64 attack.p=2,inf model=cnn,lenet
    python -m uap_lightning.run task=transfer

Exit status: 0 done; 2 bad settings, data or files (one message naming the key or file, no
traceback unless HYDRA_FULL_ERROR=1); 130 interrupted (the last finished pass is saved; the
same command continues it). In a multirun a failing job leaves ``failure.json`` and the
sweep goes on.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from uap_lightning.config import CONF_DIR, register_configs
from uap_lightning.console import quiet_libraries
from uap_lightning.errors import UserError
from uap_lightning.rundir import remove_if_only_hydra, write_failure
from uap_lightning.tasks import TASKS, run_task

log = logging.getLogger("uap_lightning")

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class _Started:
    """Whether Hydra reached the task function (composition succeeded)."""

    value = False


def execute(cfg: DictConfig) -> Optional[float]:
    """Run the task of ``cfg`` inside Hydra; the task's objective for sweepers.

    A single run ends with SystemExit(2) on a user error; in a multirun any failure is
    recorded in the job's ``failure.json`` and NaN returned so the sweep goes on.
    """
    _Started.value = True
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        metrics = run_task(cfg)
    except UserError as err:
        log.error("%s", err)
        if multirun:
            write_failure(run_dir, err)
            return math.nan
        if not _full_error():
            job_log = Path(hydra_cfg.runtime.output_dir) / f"{hydra_cfg.job.name}.log"
            remove_if_only_hydra(run_dir, job_log)
            raise SystemExit(EXIT_USER_ERROR) from None
        raise
    except Exception as err:
        if not multirun:
            raise
        log.exception("job %s failed", hydra_cfg.job.num)
        write_failure(run_dir, err)
        return math.nan
    objective = TASKS[cfg.task.name].objective
    value = metrics.get(objective) if objective else None
    return float(value) if isinstance(value, (int, float)) else None


def _full_error() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def entry(config_name: str) -> Any:
    """Run Hydra with ``config_name`` from the packaged configs, mapping outcomes to exit codes."""
    register_configs()
    quiet_libraries()
    task_function = hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)(execute)
    try:
        return task_function()
    except KeyboardInterrupt as interrupt:
        log.warning("interrupted (%s); run the same command again in the same run folder to continue", interrupt)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except SystemExit as done:
        if done.code == 1 and not _Started.value:  # Hydra refused the settings before any work
            raise SystemExit(EXIT_USER_ERROR) from None
        raise


def main() -> Any:
    """``python -m uap_lightning.run`` and the ``uap-lightning`` console script."""
    return entry("config")


def bench_main() -> Any:
    """``python -m uap_lightning.bench`` and the ``uap-bench`` console script: the run's entry point
    with the ``bench`` primary config (task=bench)."""
    return entry("bench")


if __name__ == "__main__":
    sys.exit(main())

"""Tasks: each takes the shared setup and leaves metrics and files in the run folder.

``task=NAME`` picks one; :func:`run_task` checks the settings, prepares the shared setup
(data, X, the evaluation set; victims on demand) and runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

from omegaconf import DictConfig

from uap_lightning.attacks import ThreatModel
from uap_lightning.tasks import attack, bench, evaluate, finetune, generalisation, transfer
from uap_lightning.tasks.setup import Setup, prepare
from uap_lightning.validation import validate


@dataclass(frozen=True)
class Task:
    """A task: an optional check of its own settings (before any heavy work) and its run."""

    run: Callable[[Setup], Dict[str, Any]]
    check: Optional[Callable[[DictConfig, ThreatModel], None]] = None
    objective: str = "fooling_rate"  # the metric returned to Hydra sweepers


TASKS: Dict[str, Task] = {
    "attack": Task(attack.run, attack.check, objective="objective"),
    "bench": Task(bench.run, bench.check, objective=""),
    "transfer": Task(transfer.run, transfer.check, objective=""),
    "generalisation": Task(generalisation.run, generalisation.check, objective=""),
    "finetune": Task(finetune.run, finetune.check, objective="fooling_rate_after"),
    "evaluate": Task(evaluate.run, evaluate.check),
}


def run_task(cfg: DictConfig) -> Dict[str, Any]:
    """Check ``cfg``, prepare the shared setup and run the task ``task.name``; its metrics."""
    threat = validate(cfg)
    task = TASKS[cfg.task.name]
    if task.check is not None:
        task.check(cfg, threat)
    return task.run(prepare(cfg, threat))


__all__ = ["TASKS", "Setup", "Task", "prepare", "run_task"]

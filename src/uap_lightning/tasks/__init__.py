"""Tasks: each takes the shared setup and leaves metrics and files in the run folder.

Every module of this package but ``setup`` is a task and declares itself as ``TASK`` (a
:class:`Task`: name, settings schema, run, check, objective), so adding a task is adding its
module, its schema in :mod:`uap_lightning.task_configs` (which the command line composes with
before importing this package) and its ``conf/task/<name>.yaml``. ``task=NAME`` picks one; :func:`run_task` checks
the settings, prepares the shared setup (data, X, the evaluation set; victims on demand) and
runs it.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Dict

from omegaconf import DictConfig

from uap_lightning.tasks.setup import Setup, Task, prepare
from uap_lightning.validation import validate
from uap_lightning.victim_input import command_line_keys, fit_data_to_victim

_NOT_TASKS = ("setup",)


def _declared_tasks() -> Dict[str, Task]:
    """The ``TASK`` of every task module of this package, by name."""
    tasks: Dict[str, Task] = {}
    for module in pkgutil.iter_modules(__path__):
        if module.name not in _NOT_TASKS:
            task = importlib.import_module(f"{__name__}.{module.name}").TASK
            tasks[task.name] = task
    return tasks


TASKS: Dict[str, Task] = _declared_tasks()


def task_schemas() -> Dict[str, type]:
    """Each task's settings schema by name, for :func:`uap_lightning.config.register_configs`."""
    return {name: task.schema for name, task in TASKS.items()}


def run_task(cfg: DictConfig) -> Dict[str, Any]:
    """Check ``cfg``, prepare the shared setup and run the task ``task.name``; its metrics.

    Preparing starts by fitting image-file data to a pretrained victim's input
    (:func:`fit_data_to_victim`, which sets ``data.image_size`` and ``data.resize``), before the
    task's own check, which sees the data's settings as the task will."""
    attack = validate(cfg)
    fit_data_to_victim(cfg, command_line_keys())
    task = TASKS[cfg.task.name]
    if task.check is not None:
        task.check(cfg, attack)
    return task.run(prepare(cfg, attack))


__all__ = ["TASKS", "Setup", "Task", "prepare", "run_task", "task_schemas"]

"""A run folder holds one run: an earlier run's outputs are moved aside before a new one starts.

Only the files and folders runs write are moved (never anything else a user keeps there),
into ``<run dir>/stale/<time>/``, which reports skip. Hydra's ``.hydra/`` and the job log
belong to the starting run and stay. The folder is made (or refused, naming its setting)
before any work, and a job that fails for want of space removes what it wrote.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional

from uap_lightning.atomic import atomic_write_text
from uap_lightning.errors import ConfigError

log = logging.getLogger(__name__)

STALE_DIR = "stale"
STATE_FILE = "attack_state.ckpt"
SETTINGS_FILE = "attack_settings.json"  # the settings the attack state (or last.ckpt) was saved under
GENERATOR_CHECKPOINT = "last.ckpt"  # attack=gap: the Trainer's checkpoint, the generator's training to resume
GENERATOR_WEIGHTS = "generator.pt"  # attack=gap: the kept pass's generator weights (a state dict of tensors)
FAILURE_FILE = "failure.json"
METRICS_FILE = "metrics.json"
# Everything a task may write in its run folder.
RUN_OUTPUTS = (
    METRICS_FILE,
    FAILURE_FILE,
    STATE_FILE,
    SETTINGS_FILE,
    GENERATOR_CHECKPOINT,
    GENERATOR_WEIGHTS,
    "perturbation.pt",
    "perturbation.npy",
    "perturbation.png",
    "perturbation.pdf",
    "examples.png",
    "examples.pdf",
    "curve.png",
    "curve.pdf",
    "labels.png",
    "labels.pdf",
    "bench.json",
    "transfer.csv",
    "transfer.png",
    "transfer.pdf",
    "generalisation.csv",
    "generalisation.png",
    "generalisation.pdf",
    "finetune.csv",
    "perturbations",
    "tensorboard",
    "csv",
    "wandb",
    "mlflow.db",
    "mlartifacts",
)


def make_folder(path: str | os.PathLike, key: str) -> None:
    """Make the folder ``path`` that the setting ``key`` (``hydra.run.dir``, ``hydra.sweep.dir``) names,
    with its parents, and check that a file can be written there; ConfigError naming ``key``, the
    reason and what to change when it cannot."""
    path = Path(path).absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        reason = f"{blocker} is a file, not a folder" if blocker else f"{err.strerror} ({err.filename or path})"
        raise ConfigError(
            f"{key}={path} cannot be made or written to: {reason}; set {key} to a folder you can write to"
        ) from None


def discard_outputs_since(run_dir: Path, since: float) -> None:
    """Remove the outputs (files of :data:`RUN_OUTPUTS`, recursively) that a failed job wrote into
    ``run_dir`` at or after ``since`` (``time.time()``, whole seconds count), so that none is taken
    for a finished run's, and the folders this leaves empty. The attack state (complete by
    construction, checksummed) and the settings it was saved under stay so that the same command
    continues; outputs of earlier runs stay too. Best effort: a file that cannot be removed is left."""
    since = float(int(since))  # file systems that keep whole seconds
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if name in (STATE_FILE, SETTINGS_FILE) or not path.exists():
            continue
        if path.is_dir() and not path.is_symlink():
            for folder, _, files in os.walk(path, topdown=False):
                for file_name in files:
                    _remove_if_newer(Path(folder) / file_name, since)
                with contextlib.suppress(OSError):
                    os.rmdir(folder)  # only when empty
        else:
            _remove_if_newer(path, since)


def _remove_if_newer(path: Path, since: float) -> None:
    with contextlib.suppress(OSError):
        if path.lstat().st_mtime >= since:
            path.unlink()


def earlier_outputs(run_dir: Path) -> list:
    """The outputs of an earlier run present in ``run_dir``."""
    return [run_dir / name for name in RUN_OUTPUTS if (run_dir / name).exists()]


def move_aside(run_dir: Path) -> Optional[Path]:
    """Move an earlier run's outputs into ``run_dir/stale/<time>/``; return that folder (None if
    there was nothing to move)."""
    found = earlier_outputs(run_dir)
    if not found:
        return None
    target = run_dir / STALE_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    target.mkdir(parents=True)
    for path in found:
        os.replace(path, target / path.name)
    log.warning("the run folder %s held an earlier run's outputs; moved them to %s", run_dir, target)
    return target


def write_failure(run_dir: Path, error: BaseException) -> None:
    """Record a failed job as ``failure.json`` (status, "<type>: <message>", traceback)."""
    text = f"{type(error).__name__}: {error}"
    details = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    record = {"status": "failed", "error": text, "traceback": details}
    atomic_write_text(run_dir / FAILURE_FILE, json.dumps(record, indent=2) + "\n")


def remove_if_only_hydra(run_dir: Path, job_log: Optional[Path]) -> bool:
    """Delete ``run_dir`` when it holds nothing but Hydra's ``.hydra/`` and this job's log (a run
    that failed before any work); True when it was removed."""
    if not run_dir.is_dir():
        return False
    allowed = {".hydra"} | ({job_log.name} if job_log is not None else set())
    if any(entry.name not in allowed for entry in run_dir.iterdir()):
        return False
    for entry in run_dir.iterdir():
        if entry.is_dir():
            for item in entry.iterdir():
                item.unlink()
            entry.rmdir()
        else:
            entry.unlink()
    run_dir.rmdir()
    return True

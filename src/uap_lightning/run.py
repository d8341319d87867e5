"""Entry point: compose -> check -> prepare (data, X, eval set, victims) -> task -> outputs.

    python -m uap_lightning.run attack.eps=10 attack.p=inf
    python -m uap_lightning.run -m attack.eps=32,64 attack.p=2,inf model=cnn,lenet
    python -m uap_lightning.run task=transfer

Exit status: 0 done; 2 bad settings, data or files (one message naming the key or file, no
traceback unless HYDRA_FULL_ERROR=1); 130 interrupted (the last finished pass is saved; the
same command continues it). In a multirun a failing job (one whose overrides cannot even be
composed included) leaves ``failure.json`` and the sweep goes on; a sweep in which any job
failed exits with 3 after writing its summary.
"""

from __future__ import annotations

import errno
import io
import logging
import math
import os
import re
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any, List, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from uap_lightning.config import CONF_DIR, register_configs
from uap_lightning.config_errors import composition_error_message
from uap_lightning.console import print_config_tree, quiet_libraries
from uap_lightning.errors import DISK_FULL, DISK_FULL_CAUSES, ConfigError, UserError
from uap_lightning.rundir import discard_outputs_since, make_folder, remove_if_only_hydra, write_failure
from uap_lightning.task_configs import TASK_SCHEMAS
from uap_lightning.threads import available_cores, set_threads

log = logging.getLogger("uap_lightning")

EXIT_USER_ERROR = 2
EXIT_FAILED_JOBS = 3  # a sweep in which some job failed (the summary is written)


class DiskFullError(UserError, OSError):
    """A write failed for want of space."""


EXIT_INTERRUPTED = 130


class _Started:
    """Whether Hydra reached the task function (composition succeeded)."""

    value = False


class _Composing:
    """While active (from :func:`entry` until the task starts), Hydra raises the errors of composing
    the config, as under HYDRA_FULL_ERROR=1, instead of printing its own message for them (which
    advises ``+key`` for a mistyped key): :func:`entry` says them in the project's words."""

    active = False

    @classmethod
    def start(cls) -> None:
        if not _full_error():
            os.environ[_FULL_ERROR] = "1"
            cls.active = True

    @classmethod
    def stop(cls) -> None:
        if cls.active:
            os.environ.pop(_FULL_ERROR, None)
            cls.active = False


def execute(cfg: DictConfig) -> Optional[float]:
    """Run the task of ``cfg`` inside Hydra; the task's objective for sweepers.

    A single run ends with SystemExit(2) on a user error; in a multirun any failure is
    recorded in the job's ``failure.json`` and NaN returned so the sweep goes on.
    """
    from uap_lightning.tasks import TASKS, run_task  # Lightning loads here, once the settings are composed

    _Started.value = True
    _Composing.stop()
    _quiet_disk_full_in_threads()
    started = time.time()
    hydra_cfg = HydraConfig.get()
    _reapply_logger_levels(hydra_cfg.job_logging)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        set_threads(cfg.threads, parallel_jobs(hydra_cfg) if multirun else 1)
        print_config_tree(cfg, cfg.extras.print_config)
        try:
            metrics = run_task(cfg)
        except Exception as failure:
            err = _disk_full(failure)
            if err is None:
                raise
            discard_outputs_since(run_dir, started)
            raise DiskFullError(
                f"{disk_full_message(err, _folder_setting(err, cfg, run_dir, multirun))}, then run the "
                "command again (the outputs this run had written were removed)"
            ) from None
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


def _reapply_logger_levels(job_logging: Any) -> None:
    """Set the levels the job's logging config gives named loggers again: importing Lightning (after
    Hydra configured logging) sets its own loggers back to INFO, which would bring its banners and
    tips to the console."""
    for name, spec in (job_logging.get("loggers") or {}).items():
        if spec is not None and spec.get("level") is not None:
            logging.getLogger(str(name)).setLevel(spec.level)


def _disk_full(error: Optional[BaseException]) -> Optional[OSError]:
    """The OSError of a full disk that ``error`` is or was caused by (loggers re-raise it as another
    type, e.g. Lightning's TensorBoard logger as ValueError), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno in DISK_FULL:
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


# A temporary file written beside its target: ``.NAME.<pid>.<hex>.tmp`` (uap_lightning.atomic) or
# ``.NAME.<pid>.tmp`` (the attack state).
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.\d+(\.[0-9a-f]+)?\.tmp$")


def disk_full_message(err: OSError, setting: Optional[str] = None) -> str:
    """What failed and what to do, for the OSError of a full disk (or quota, or file size limit):
    "the disk is full writing FILE (strerror); free some space or set SETTING to a folder on another
    disk", where SETTING is the setting (``hydra.run.dir``, ``paths.cache_dir``) whose folder holds FILE."""
    file = _written_file(err)
    cause = DISK_FULL_CAUSES.get(err.errno or 0, "the disk is full")
    if err.errno == errno.EFBIG:
        remedy = "raise the limit (ulimit -f)"  # per process: another folder would not help
    else:
        remedy = "free some space" + (f" or set {setting} to a folder on another disk" if setting else "")
    return f"{cause} writing {file or 'a file'} ({err.strerror}); {remedy}"


def _written_file(err: OSError) -> Optional[Path]:
    """The file a failed write was for: the destination of a copy or move, else the file the error
    names, else the file open for writing nearest to where the error was raised (a write into an
    open file names none); a temporary file beside its target by the target's name."""
    name = err.filename2 if err.filename2 is not None else err.filename
    if not isinstance(name, (str, bytes, os.PathLike)):
        name = _open_for_writing(err.__traceback__)
    if name is None:
        return None
    path = Path(os.fsdecode(name))
    temporary = _TEMPORARY.match(path.name)
    return path.with_name(temporary["name"]) if temporary else path


def _open_for_writing(traceback: Optional[TracebackType]) -> Optional[str]:
    frames = []
    while traceback is not None:
        frames.append(traceback.tb_frame)
        traceback = traceback.tb_next
    for frame in reversed(frames):  # the innermost first
        for value in frame.f_locals.values():
            name, mode = getattr(value, "name", None), getattr(value, "mode", "")
            if isinstance(value, io.IOBase) and isinstance(name, str) and set(str(mode)) & set("wax+"):
                return name
    return None


def _folder_setting(err: OSError, cfg: DictConfig, run_dir: Path, multirun: bool) -> Optional[str]:
    """The setting whose folder holds the file ``err`` failed to write, or None."""
    file = _written_file(err)
    if file is None:
        return None
    folders = {"hydra.sweep.dir" if multirun else "hydra.run.dir": run_dir}
    cache = cfg.get("paths", {}).get("cache_dir")
    if cache:
        folders["paths.cache_dir"] = Path(cache)
    file = file.absolute()
    for setting, folder in folders.items():
        if file.is_relative_to(folder.absolute()):
            return setting
    return None


def _discard_hydra_record(err: OSError, since: float) -> str:
    """After a write that failed for want of space before the task started: remove Hydra's record
    (``.hydra/``) written since ``since`` when the failing file is part of it (so that no cut-off
    record is taken for a run's), and the run folder when nothing else is left in it; what was done,
    for the message ("" when nothing)."""
    file = _written_file(err)
    if file is None or file.parent.name != ".hydra":
        return ""
    record, run_dir = file.parent, file.parent.parent
    since = float(int(since))  # file systems that keep whole seconds
    try:
        for path in record.iterdir():
            if path.is_file() and path.lstat().st_mtime >= since:
                path.unlink()
        if not any(record.iterdir()):
            record.rmdir()
        left = list(run_dir.iterdir())
        if all(p.suffix == ".log" and p.is_file() and p.lstat().st_mtime >= since for p in left):
            for path in left:
                path.unlink()
            run_dir.rmdir()
            return f" (the run folder {run_dir}, which held nothing else, was removed)"
    except OSError:
        return ""
    return f" (Hydra's record in {record} was removed)"


def _quiet_disk_full_in_threads() -> None:
    """From now on a background thread (TensorBoard's event writer) that dies of a full disk prints no
    traceback: the writer hands the same error to the run, which says it once. Other errors of
    threads go to the hook that was in place."""
    previous = threading.excepthook
    if getattr(previous, "quiet_disk_full", False):
        return

    def hook(args: Any) -> None:
        if isinstance(args.exc_value, OSError) and args.exc_value.errno in DISK_FULL:
            log.debug("thread %s stopped: %s", getattr(args.thread, "name", "?"), args.exc_value)
            return
        previous(args)

    hook.quiet_disk_full = True  # type: ignore[attr-defined]
    threading.excepthook = hook


class RunFolderCheck(Callback):
    """Hydra callback (``hydra.callbacks.run_folder``): the run's folder (``hydra.run.dir``) or the
    sweep's (``hydra.sweep.dir``) is made before any work; one that cannot be (under a file, on a
    read-only or virtual file system) ends the command with one message and exit status 2."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _make_or_exit(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _make_or_exit(config.hydra.sweep.dir, "hydra.sweep.dir")


def _make_or_exit(path: str, key: str) -> None:
    """:func:`make_folder`, or the console's one error line (no run log exists yet) and exit status 2."""
    try:
        make_folder(path, key)
    except ConfigError as err:
        print(f"ERROR: {err}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None


def parallel_jobs(hydra_cfg: Any) -> int:
    """How many jobs of this multirun run at once on this machine (a joblib launcher's n_jobs; 1 else)."""
    n_jobs = getattr(hydra_cfg.launcher, "n_jobs", None) if "launcher" in hydra_cfg else None
    if n_jobs is None:
        return 1
    return available_cores() if int(n_jobs) < 0 else max(1, int(n_jobs))


def check_group_options(arguments: List[str]) -> None:
    """ConfigError when a command-line override picks a config group option by a path (``..`` or
    an absolute path): options are names in the config tree or on Hydra's search path
    (``hydra.searchpath``), so that no YAML from elsewhere is loaded (its ``_target_``s could run)."""
    groups = {p.name for p in CONF_DIR.rglob("*") if p.is_dir()} | {"launcher", "sweeper"}
    for argument in arguments:
        key, sep, value = argument.lstrip("+~").partition("=")
        if not sep or argument.startswith("-") or key.split("/")[-1].split("@")[0] not in groups:
            continue
        options = [v.strip() for v in re.split(r"[\[\],]", value) if v.strip()]
        bad = [o for o in options if ".." in o or o.startswith(("/", "~")) or re.match(r"^[A-Za-z]:\\", o)]
        if bad:
            raise ConfigError(
                f"{key}={bad[0]}: a config group option is a name in the config tree (conf/{key}/), not a path; "
                "to use your own configs, add their folder to hydra.searchpath"
            )


_FULL_ERROR = "HYDRA_FULL_ERROR"


def _full_error() -> bool:
    return os.environ.get(_FULL_ERROR) == "1"


def _refuse(message: str) -> None:
    """The console's one error line for settings refused before any run folder or log exists, and exit status 2."""
    print(f"ERROR: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USER_ERROR)


def entry(config_name: str) -> Any:
    """Run Hydra with ``config_name`` from the packaged configs, mapping outcomes to exit codes."""
    register_configs(TASK_SCHEMAS)
    quiet_libraries()
    try:
        check_group_options(sys.argv[1:])
    except ConfigError as err:
        _refuse(str(err))
    task_function = hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)(execute)
    started = time.time()
    _Composing.start()
    try:
        result = task_function()
    except KeyboardInterrupt as interrupt:
        log.warning("%s", str(interrupt) or "interrupted")
        raise SystemExit(EXIT_INTERRUPTED) from None
    except SystemExit as done:
        if done.code == 1 and not _Started.value:  # Hydra refused the settings before any work
            raise SystemExit(EXIT_USER_ERROR) from None
        raise
    except (HydraException, OmegaConfBaseException) as err:
        if not _Composing.active:
            raise
        _refuse(composition_error_message(err, sys.argv[1:]))  # the settings could not be composed
    except UserError as err:  # refused by the sweeper before any job (task=compare's lists), or by the task
        if _full_error() and not _Composing.active:  # HYDRA_FULL_ERROR=1 of the user's: the traceback
            raise
        _refuse(str(err))
    except Exception as failure:  # a write of Hydra's own (.hydra/*.yaml, the log) on a full disk
        full = _disk_full(failure)
        if full is None or (_full_error() and not _Composing.active):
            raise
        setting = "hydra.sweep.dir" if {"-m", "--multirun"} & set(sys.argv[1:]) else "hydra.run.dir"
        _refuse(disk_full_message(full, setting) + _discard_hydra_record(full, started))
    finally:
        _Composing.stop()
    from uap_lightning.report.sweep import SweepSummaryCallback  # pandas and matplotlib: only after a run

    if SweepSummaryCallback.failed:
        log.error("%d job(s) of the sweep failed: see summary.md in the sweep folder", SweepSummaryCallback.failed)
        raise SystemExit(EXIT_FAILED_JOBS)
    return result


def main() -> Any:
    """``python -m uap_lightning.run`` and the ``uap-lightning`` console script."""
    return entry("config")


def bench_main() -> Any:
    """``python -m uap_lightning.bench`` and the ``uap-bench`` console script: the run's entry point
    with the ``bench`` primary config (task=bench)."""
    return entry("bench")


if __name__ == "__main__":
    sys.exit(main())

"""What the console shows: plain lines for information, the level name before warnings and
errors, and none of the libraries' tips and warnings that ask nothing of the user."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Optional, Tuple

from omegaconf import DictConfig, ListConfig, OmegaConf
from rich.console import Console
from rich.syntax import Syntax
from rich.tree import Tree

from uap_lightning.errors import DISK_FULL, DISK_FULL_CAUSES

# Library warnings about their own internals or about settings this project chooses on purpose.
_QUIET_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\).*",  # a deprecation inside Lightning
    r".*does not have many workers.*",  # in-memory tensors need no loader workers
    r".*Total length of `DataLoader` across ranks is zero.*",  # data.val_fraction=0 means no validation
    r".*You defined a `validation_step` but have no `val_dataloader`.*",
)


class ConsoleFormatter(logging.Formatter):
    """``message`` for information, ``LEVEL: message`` for warnings and errors."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno < logging.WARNING else f"{record.levelname}: {message}"


def quiet_libraries() -> None:
    """Ignore the library warnings listed in ``_QUIET_WARNINGS`` for this process."""
    for pattern in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


class RunLogHandler(logging.FileHandler):
    """The run's log file (``conf/hydra/job_logging/uap.yaml``). When a line cannot be written for want
    of space, one warning naming the file goes to the console (instead of logging's traceback for every
    line) and the file gets no more lines; the console keeps showing them. Other errors are logging's."""

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        err = sys.exc_info()[1]
        if not (isinstance(err, OSError) and err.errno in DISK_FULL):
            super().handleError(record)
            return
        self.failed = True
        stream, self.stream = self.stream, None
        if stream is not None:
            try:
                stream.close()  # flushing what is left fails the same way
            except OSError:
                pass
        print(
            f"WARNING: {DISK_FULL_CAUSES[err.errno]} writing the run's log {self.baseFilename} ({err.strerror}): "
            "it gets no more lines; the console shows them",
            file=sys.stderr,
            flush=True,
        )


# Sweep plugins' lines that restate settings the sweep folder already records, by logger.
_QUIET_PLUGIN_LINES = {
    "hydra_plugins.hydra_optuna_sweeper._impl": ("Study name:", "Storage:", "Sampler:", "Directions:"),
    "hydra_plugins.hydra_joblib_launcher._core": ("Joblib.Parallel(",),
}


class _DropLines(logging.Filter):
    """Drop the records whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: Tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def quiet_sweep_plugins() -> None:
    """Leave the sweep plugins' settings lines (Optuna's study, storage, sampler; joblib's
    Parallel(...) line) out of the console, and their colour codes when it is not a terminal."""
    for name, prefixes in _QUIET_PLUGIN_LINES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLines) for f in logger.filters):
            logger.addFilter(_DropLines(prefixes))
    if not sys.stderr.isatty():
        os.environ.setdefault("NO_COLOR", "1")  # colorlog (Optuna's console) honours it


# The config groups in the order a reader follows a run.
_TREE_ORDER = ("data", "model", "trainer", "attack", "task", "perturbation", "logger", "callbacks", "extras", "paths")


def print_config_tree(cfg: DictConfig, setting: Optional[bool]) -> None:
    """Print ``cfg`` (resolved) as a tree of its groups on the console: always when ``setting`` is
    true, never when false, on a terminal only when None (``extras.print_config``)."""
    if setting is False or (setting is None and not sys.stdout.isatty()):
        return
    tree = Tree("config", guide_style="dim")
    for name in [*_TREE_ORDER, *(key for key in cfg if key not in _TREE_ORDER)]:
        if name not in cfg or name == "hydra":
            continue
        node = cfg[name]
        text = OmegaConf.to_yaml(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else f"{node}\n"
        tree.add(str(name)).add(Syntax(text.rstrip() or "{}", "yaml", theme="ansi_dark", background_color="default"))
    Console().print(tree)

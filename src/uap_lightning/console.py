"""What the console shows: plain lines for information, the level name before warnings and
errors, and none of the libraries' tips and warnings that ask nothing of the user."""

from __future__ import annotations

import logging
import warnings

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

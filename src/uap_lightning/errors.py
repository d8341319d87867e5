"""Errors that mean "the user must change something": a setting, a file or a folder.

The entry point prints their message alone (no traceback) and exits with status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno

# The errors of a write that failed for want of space, and how the console words each.
DISK_FULL_CAUSES = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file size limit (ulimit -f) is reached",
}
DISK_FULL = tuple(DISK_FULL_CAUSES)


class UserError(Exception):
    """Bad input found by a check; the message names the key or file and how to fix it."""


class ConfigError(UserError, ValueError):
    """A setting that cannot work, found before any heavy work."""


class UntrustedFileError(UserError, ValueError):
    """A file that would need full unpickling (which can run code) to be read."""


class DamagedFileError(UserError, ValueError):
    """A file that is truncated, unreadable or not what its name says."""


class NonFiniteError(UserError, ValueError):
    """Weights or outputs hold NaN or infinite values: the victim cannot be attacked meaningfully."""


class NotFoundError(UserError, FileNotFoundError):
    """A file or folder the settings point at does not exist."""


class DataNotFoundError(NotFoundError):
    """Files or folders a dataset needs are absent; the message names them and the fix."""

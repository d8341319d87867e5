"""The error raised when a dataset's files are not where the configuration points."""

from __future__ import annotations


class DataNotFoundError(FileNotFoundError):
    """Files or folders a dataset needs are absent; the message names them and the fix."""

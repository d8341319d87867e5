"""A file lock that says what it waits for, gives up after a timeout, and names its holder.

The lock is an OS file lock (``filelock``, ``flock`` on Unix): the kernel frees it when the
process holding it dies, so a lock left by a dead process is simply taken. Beside the lock
file, ``<lock>.owner`` records the holder (pid, host, since) so that waiters can name it. A lock
whose file was deleted while held (a cleaned cache folder) still counts: a process that takes the
new file's lock while the owner record names another live process waits for that process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

from filelock import FileLock, Timeout

from uap_lightning.atomic import atomic_write_text
from uap_lightning.errors import UserError

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0  # how often a waiter retries
REPORT_SECONDS = 30.0  # how often a waiter logs that it still waits


class LockTimeoutError(UserError, TimeoutError):
    """Waited longer than the allowed time for a lock another process holds."""


def _owner_path(lock_path: Path) -> Path:
    return lock_path.with_name(lock_path.name + ".owner")


def read_owner(lock_path: Path) -> Optional[Dict[str, Any]]:
    """The recorded holder of ``lock_path`` (pid, host, since: epoch seconds), or None."""
    try:
        return json.loads(_owner_path(lock_path).read_text())
    except (OSError, ValueError):
        return None


def _describe(owner: Optional[Dict[str, Any]]) -> str:
    if not owner:
        return "an unknown process"
    held = time.time() - float(owner.get("since", time.time()))
    return f"pid {owner.get('pid')} on {owner.get('host')} (for {held:.0f} s)"


def _held_elsewhere(owner: Optional[Dict[str, Any]]) -> bool:
    """Whether the owner record names another process that still runs (on this host)."""
    if not owner or owner.get("host") != socket.gethostname() or owner.get("pid") == os.getpid():
        return False
    return _alive_here(owner)


def _alive_here(owner: Dict[str, Any]) -> bool:
    """False when the owner ran on this host and its pid no longer exists."""
    if owner.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, TypeError, ValueError):
        return True
    return True


@contextlib.contextmanager
def held_lock(lock_path: Path, *, what: str, timeout: float) -> Iterator[None]:
    """Hold the lock at ``lock_path`` inside; ``what`` names the guarded work in messages.

    Waiting is logged every REPORT_SECONDS with the holder's pid, host and holding time;
    after ``timeout`` seconds a LockTimeoutError names the holder and the way out.
    """
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path))
    started = time.monotonic()
    reported = started
    while True:
        try:
            lock.acquire(timeout=min(POLL_SECONDS, max(0.01, timeout - (time.monotonic() - started))))
            if not _held_elsewhere(read_owner(lock_path)):
                break
            lock.release()  # the lock file was replaced while another process held it: wait for that one
            time.sleep(POLL_SECONDS)
            raise Timeout(str(lock_path))
        except Timeout:
            waited = time.monotonic() - started
            owner = read_owner(lock_path)
            if waited >= timeout:
                raise LockTimeoutError(
                    f"gave up after {waited:.0f} s waiting for {what}: the lock {lock_path} is held by "
                    f"{_describe(owner)}. Wait for it to finish, stop it, or raise paths.lock_timeout"
                ) from None
            if time.monotonic() - reported >= REPORT_SECONDS:
                log.info("waiting for %s: lock %s held by %s", what, lock_path, _describe(owner))
                reported = time.monotonic()
    try:
        previous = read_owner(lock_path)
        if previous and not _alive_here(previous):
            log.warning("taking over %s: its previous holder, %s, is no longer running", lock_path, _describe(previous))
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        atomic_write_text(_owner_path(lock_path), json.dumps(owner))
        yield
    finally:
        _owner_path(lock_path).unlink(missing_ok=True)
        lock.release()

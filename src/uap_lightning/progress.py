"""Log lines for the long steps after an attack (random baselines, figures), so that a run never
goes quiet for long without saying what it does.

A :class:`Phase` names a step and, as it goes, the part it works on. While a phase runs and the
project has logged nothing for :data:`PHASE_HEARTBEAT_SECONDS` (any ``uap_lightning`` line counts,
the attack's pass lines included), it logs a line: the step, its part and the seconds it has run.
A quick step logs nothing; one that logged while it ran ends with a line giving its seconds.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from typing import Any, Callable, Optional, TypeVar

PHASE_HEARTBEAT_SECONDS = 5.0  # the longest quiet while a phase runs
PROJECT_LOGGER = "uap_lightning"

F = TypeVar("F", bound=Callable[..., Any])


class _LastLine(logging.Handler):
    """Notes when the project last logged a line that shows (INFO and above)."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.at = time.monotonic()

    def emit(self, record: logging.LogRecord) -> None:
        self.at = time.monotonic()


_last_line: Optional[_LastLine] = None
_lock = threading.Lock()


def _clock() -> _LastLine:
    """The handler on the project's logger that times its last line (added once)."""
    global _last_line
    with _lock:
        if _last_line is None:
            _last_line = _LastLine()
            logging.getLogger(PROJECT_LOGGER).addHandler(_last_line)
        return _last_line


def quiet_seconds() -> float:
    """Seconds since the project last logged a line or showed progress (:func:`shown`)."""
    return time.monotonic() - _clock().at


def shown() -> None:
    """Progress was just shown another way (a progress bar that closed): the quiet starts now."""
    _clock().at = time.monotonic()


_clock()  # from import on, so that the quiet before the first phase (after the attack's last line) counts


class Phase:
    """A long step's lines to ``logger`` (see the module's docstring): ``with Phase(log, "random
    baselines") as phase: phase.part("draw 1 of 10"); ...``. ``every`` (seconds; default
    :data:`PHASE_HEARTBEAT_SECONDS`) bounds the quiet."""

    def __init__(self, logger: logging.Logger, name: str, every: Optional[float] = None) -> None:
        self.logger = logger
        self.name = name
        self.every = PHASE_HEARTBEAT_SECONDS if every is None else float(every)
        self.current = ""
        self.spoke = False
        self._started = 0.0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def part(self, text: str) -> None:
        """The part of the step now running (named in the next line)."""
        self.current = text

    def __enter__(self) -> "Phase":
        self._started = time.monotonic()
        if not self.logger.isEnabledFor(logging.INFO):
            return self
        self._thread = threading.Thread(target=self._watch, daemon=True, name=f"phase: {self.name}")
        self._thread.start()
        return self

    def _watch(self) -> None:
        tick = min(0.5, self.every / 4)
        while not self._stop.wait(tick):
            if quiet_seconds() >= self.every:
                running = time.monotonic() - self._started
                part = f": {self.current}" if self.current else ""
                self.logger.info("%s%s (%.0f s so far)", self.name, part, running)
                self.spoke = True

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.spoke and exc[0] is None:
            self.logger.info("%s done in %.1f s", self.name, time.monotonic() - self._started)


def phase(name: str, logger: Optional[logging.Logger] = None) -> Callable[[F], F]:
    """Decorator: the function runs as a :class:`Phase` named ``name``."""

    def wrap(function: F) -> F:
        target = logger or logging.getLogger(function.__module__)

        @functools.wraps(function)
        def run(*args: Any, **kwargs: Any) -> Any:
            with Phase(target, name):
                return function(*args, **kwargs)

        return run  # type: ignore[return-value]

    return wrap

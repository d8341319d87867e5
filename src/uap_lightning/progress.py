"""Progress shown while the project works, so that a run never goes quiet for long without
saying what it does: over an attack's passes (:class:`PassProgress`, the one display of the
Python API, the attack loop and the tasks) and through the long steps around it (:class:`Phase`:
predictions, random baselines, figures).

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
from typing import Any, Callable, Mapping, Optional, Protocol, TypeVar

from tqdm.auto import tqdm

PHASE_HEARTBEAT_SECONDS = 5.0  # the longest quiet while a phase runs
PASS_HEARTBEAT_SECONDS = 60.0  # a line this often while a pass runs, when lines are shown
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


class RateOnX(Protocol):
    """What a pass reports to :meth:`PassProgress.on_pass_end` (an attack's ``PassReport``)."""

    pass_index: int  # 1-based
    fooling_rate: float  # the rate on X the attack steers by


class PassProgress:
    """Progress over an attack's ``total`` passes (``done`` already run), named ``label``: with
    ``bar`` a tqdm bar over passes showing each pass's rates; otherwise, with ``lines``, a line
    to ``logger`` per pass (its rates, its seconds, the seconds so far and at most how many are
    left) and, while a pass runs longer than ``heartbeat`` seconds, a line every ``heartbeat``
    seconds; neither: nothing. ``rate_name`` names the rate on X of :meth:`on_pass_end`. A
    context manager::

        with PassProgress("sgd_uap passes", 10, bar=False, logger=log) as progress:
            progress.pass_done(1, {"fooling on X": "0.4120"}, seconds=3.1, elapsed=3.1)
    """

    def __init__(
        self,
        label: str,
        total: int,
        *,
        done: int = 0,
        bar: bool = False,
        lines: bool = True,
        heartbeat: float = PASS_HEARTBEAT_SECONDS,
        logger: Optional[logging.Logger] = None,
        rate_name: str = "fooling on X",
    ) -> None:
        self.label = label
        self.rate_name = rate_name
        self.total = total
        self.passes = done
        self.bar = bar
        self.lines = lines and not bar
        self.heartbeat = heartbeat
        self.logger = logger or logging.getLogger(__name__)
        self._tqdm: Optional[tqdm] = None
        self._started = 0.0
        self._pass_started = 0.0
        self._stop: Optional[threading.Event] = None

    def __enter__(self) -> "PassProgress":
        self._started = self._pass_started = time.perf_counter()
        if self.bar:
            self._tqdm = tqdm(total=self.total, initial=self.passes, desc=self.label, unit="pass", dynamic_ncols=True)
        elif self.lines:
            self._stop = threading.Event()
            threading.Thread(target=self._beat, args=(self._stop,), daemon=True, name="pass-heartbeat").start()
        return self

    def _beat(self, stop: threading.Event) -> None:
        """While the passes run: a line each ``heartbeat`` seconds that a pass has been running."""
        while not stop.wait(self.heartbeat):
            running = time.perf_counter() - self._pass_started
            if running >= self.heartbeat:
                self.logger.info("pass %d/%d running for %.0f s", self.passes + 1, self.total, running)

    def pass_done(self, pass_index: int, rates: Mapping[str, str], seconds: float, elapsed: float) -> None:
        """Pass ``pass_index`` (1-based) ended after ``seconds``, ``elapsed`` seconds of passes in
        all, with ``rates`` (name → formatted value)."""
        self.passes, self._pass_started = pass_index, time.perf_counter()
        if self._tqdm is not None:
            self._tqdm.update(1)
            self._tqdm.set_postfix(dict(rates))
        elif self.lines:
            left = elapsed / pass_index * (self.total - pass_index) if pass_index else 0.0
            self.logger.info(
                "pass %d/%d: %s; %.1f s, %.0f s in all, at most ~%.0f s to go",
                pass_index,
                self.total,
                ", ".join(f"{name} {value}" for name, value in rates.items()),
                seconds,
                elapsed,
                left,
            )

    def on_pass_end(self, report: RateOnX) -> None:
        """A pass callback: the pass and its rate on X (named ``rate_name``), timed here (the
        seconds since the last pass ended, or since the start)."""
        now = time.perf_counter()
        rates = {self.rate_name: f"{report.fooling_rate:.4f}"}
        self.pass_done(report.pass_index, rates, seconds=now - self._pass_started, elapsed=now - self._started)

    def __exit__(self, *exc: Any) -> None:
        if self._stop is not None:
            self._stop.set()
            self._stop = None
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None
            shown()  # the bar showed the passes to their end: the quiet after it starts now

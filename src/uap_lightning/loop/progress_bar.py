"""The attack's progress as a Fabric callback: the project's one pass display
(:class:`~uap_lightning.progress.PassProgress`) fed by the loop's hooks, on rank 0."""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional

from torch import Tensor

from uap_lightning.attacks import AttackSettings
from uap_lightning.progress import PASS_HEARTBEAT_SECONDS, PassProgress

log = logging.getLogger(__name__)


class AttackProgressBar:
    """Fabric callback showing the attack's progress on rank 0: on a terminal a bar over passes
    with the live rates; elsewhere (a pipe, a batch job) a log line per pass and, while a pass
    runs longer than ``heartbeat`` seconds, a line every ``heartbeat`` seconds
    (:class:`~uap_lightning.progress.PassProgress`). ``enabled=False`` draws no bar (the lines
    instead); ``lines=False`` writes no lines either (``attack.progress=false``)."""

    def __init__(self, enabled: bool = True, lines: bool = True, heartbeat: float = PASS_HEARTBEAT_SECONDS) -> None:
        self.enabled = enabled
        self.lines = lines
        self.heartbeat = heartbeat
        self._progress: Optional[PassProgress] = None

    def on_attack_start(self, loop: Any, max_passes: int, done: int) -> None:
        if not loop.fabric.is_global_zero:
            return
        display = PassProgress(
            f"{loop.settings.method} passes",
            max_passes,
            done=done,
            bar=self.enabled,
            lines=self.lines,
            heartbeat=self.heartbeat,
            logger=log,
        )
        self._progress = display.__enter__()

    def on_attack_pass_end(self, loop: Any, record: Dict[str, Any], perturbation: Tensor) -> None:
        if self._progress is not None:
            rates = {**progress_rates(loop.settings, record), "‖v‖∞": f"{record['norm_linf']:.1f}"}
            self._progress.pass_done(record["pass"], rates, record["seconds"], record["attack_seconds"])

    def on_passes_done(self, loop: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(None, None, None)
            self._progress = None


def progress_rates(settings: AttackSettings, record: Dict[str, Any]) -> Dict[str, str]:
    """The rates a progress line shows for a pass's ``record``: on X the rate the attack steers by,
    on the eval set the fooling rate (and, targeted, the targeted success rate)."""
    rates = {settings.rate_on_x_name: f"{record[settings.rate_on_x_key]:.4f}"}
    if settings.target_class is None:
        return {**rates, "on the eval set": f"{record['fooling_rate']:.4f}"}
    return {
        **rates,
        "on the eval set": f"{record['targeted_success_rate']:.4f}",
        "fooling on the eval set": f"{record['fooling_rate']:.4f}",
    }

"""The attack loop on Lightning Fabric: passes of a universal attack engine, each scored on the
eval set, logged and saved, so that an interrupted attack resumes to the same result.

The loop composes the parts, each in its own module: the engine's passes
(:func:`~uap_lightning.attacks.run_passes`, pure torch), the records of each pass
(:mod:`~uap_lightning.loop.records`), the state file (:mod:`~uap_lightning.loop.state`), the
loggers (:mod:`~uap_lightning.loop.pass_log`), the processes of several devices
(:mod:`~uap_lightning.loop.spawn`) and the Fabric callbacks (the progress display,
:mod:`~uap_lightning.loop.progress_bar`). After every pass it scores v on the eval set, logs the
record and v, saves its state and calls the ``on_attack_pass_end`` hook of every callback. Ctrl-C
(or a SIGTERM turned into KeyboardInterrupt by the caller) ends the loop after the last finished
pass: the outcome is marked ``interrupted`` and built from that pass.

With a Fabric of several devices (strategy ``ddp_spawn``) :meth:`AttackLoop.run` runs the attack
in as many processes, each running the same loop on the same X and eval set: the engine shares
its passes through a :class:`~uap_lightning.attacks.TorchDistributed` reducer, every prediction is
shared out by rank and gathered, so every rank holds the same v and records; the state is saved
and the callbacks draw on rank 0, and the main process logs the passes once the workers are done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from lightning.fabric import Fabric
from torch import Tensor, nn

from uap_lightning import metrics, progress
from uap_lightning.attacks import (
    SINGLE_PROCESS,
    AttackSettings,
    PassReport,
    Reducer,
    TorchDistributed,
    UAPResult,
    distributed,
    frozen_eval,
    run_passes,
)
from uap_lightning.loop import spawn
from uap_lightning.loop.pass_log import PassLogger, log_pass
from uap_lightning.loop.records import AttackOutcome, PassRecords
from uap_lightning.loop.state import AttackState, no_pass_result, save_state

log = logging.getLogger(__name__)


@dataclass
class EvaluationSettings:
    """The memory format of convolutional victims (``attack.channels_last``); the batch size,
    precision and compilation are the attack's settings."""

    channels_last: bool = False


@dataclass
class AttackLoop:
    """Runs the attack of ``settings`` pass by pass until the fooling rate on X reaches 1 − δ or
    ``settings.max_passes``; saves its state at ``state_path`` (None: nowhere) under ``fingerprint``."""

    fabric: Fabric
    settings: AttackSettings
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)
    state_path: Optional[Path] = None
    fingerprint: str = ""

    def load_state(self) -> Optional[AttackState]:
        """The saved state at ``state_path`` (see :meth:`AttackState.load`), or None."""
        return None if self.state_path is None else AttackState.load(self.state_path)

    def run(
        self,
        model: nn.Module,
        attack_images: Tensor,
        eval_images: Tensor,
        eval_labels: Tensor,
        resume: Optional[AttackState] = None,
    ) -> AttackOutcome:
        """Compute a universal perturbation on ``attack_images`` (X) and evaluate it on the eval set,
        continuing from ``resume`` when given (same settings, same X: the same final v).

        Images are N×C×H×W in [0,1]; the model maps them to logits and is left on
        ``fabric.device``. With ``fabric.world_size`` > 1 the attack runs in processes Fabric
        spawns (its strategy must spawn them: ``ddp_spawn``), see the module's notes.
        """
        arguments = (model, attack_images, eval_images, eval_labels, resume)
        if self.fabric.world_size == 1:
            return self.attack(*arguments, reducer=SINGLE_PROCESS, log_pass=self.log_pass)
        # the loop travels with the function: Fabric's launcher walks the arguments, which a frozen
        # dataclass (the threat model) stops
        outcome, passes = spawn.launch(self.fabric, functools.partial(_attack_on_rank, loop=self), *arguments)
        for record, perturbation in passes:
            self.log_pass(record, perturbation)
        model.to(self.fabric.device)
        return outcome

    def attack(
        self,
        model: nn.Module,
        attack_images: Tensor,
        eval_images: Tensor,
        eval_labels: Tensor,
        resume: Optional[AttackState],
        *,
        reducer: Reducer,
        log_pass: PassLogger,
    ) -> AttackOutcome:
        """The attack in this process, one of ``reducer.world_size`` (an interrupt on several
        processes propagates); ``log_pass`` gets each pass's record and v."""
        model = self.placed(model)
        attack_images = attack_images.to(self.fabric.device)
        generator = self.settings.generator()
        if resume is not None:
            generator.set_state(resume.generator_state)
        with frozen_eval(model):
            clean_attack_labels, records = self.clean_records(model, attack_images, eval_images, eval_labels, reducer)
            book = _PassBook(self, records, generator, log_pass, resume)
            self.fabric.call("on_attack_start", loop=self, max_passes=self.settings.max_passes, done=len(book.history))
            start = book.started = time.perf_counter()
            interrupted = False
            try:
                result = run_passes(
                    model,
                    self.settings,
                    attack_images,
                    clean_attack_labels,
                    generator=generator,
                    initial=None if resume is None else resume.perturbation,
                    start_pass=0 if resume is None else resume.passes,
                    kept=None if resume is None else resume.kept,
                    on_pass_end=book.pass_ended,
                    reducer=reducer,
                )
            except KeyboardInterrupt:
                if reducer.world_size > 1:
                    raise  # ranks stop at different points: no more collectives; the saved state continues
                interrupted = True
                result = book.result_so_far(attack_images)
            else:
                book.finished()
            finally:
                self.fabric.call("on_passes_done", loop=self)
            wall = time.perf_counter() - start
            return self.outcome(result, book.history, records, wall, book.elapsed, interrupted)

    def placed(self, model: nn.Module) -> nn.Module:
        """``model`` on the loop's device, channels-last when the evaluation settings ask for it."""
        model = model.to(self.fabric.device)
        if self.evaluation.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def clean_records(
        self,
        model: nn.Module,
        attack_images: Tensor,
        eval_images: Tensor,
        eval_labels: Tensor,
        reducer: Reducer = SINGLE_PROCESS,
    ) -> Tuple[Tensor, PassRecords]:
        """The victim's (N,) predictions on X, and the records of the eval set (its clean
        predictions and accuracy measured here)."""
        with self.phase(f"the victim's predictions on X and the {len(eval_images)} eval images"):
            clean_attack_labels = self.predict(model, attack_images, reducer=reducer)
            clean_eval_labels = self.predict(model, eval_images, reducer=reducer)
        records = PassRecords(
            self.settings,
            functools.partial(self.predict, model, eval_images, reducer=reducer),
            eval_labels,
            clean_eval_labels,
            metrics.accuracy(clean_eval_labels, eval_labels),
        )
        return clean_attack_labels, records

    def outcome(
        self,
        result: UAPResult,
        history: List[Dict[str, Any]],
        records: PassRecords,
        wall: float,
        elapsed: float,
        interrupted: bool,
    ) -> AttackOutcome:
        """The outcome of the passes that gave ``result``: its kept v scored on the eval set, the
        final record (with the loop's ``wall`` and the attack's ``elapsed`` seconds); callbacks told."""
        with self.phase(f"scoring the kept perturbation on the {len(records.clean_labels)} eval images"):
            perturbed_eval_labels = records.predict(result.perturbation)
        final = records.final(result, history)
        final.update(loop_seconds=wall, clean_accuracy=records.clean_accuracy, attack_seconds=elapsed)
        self.fabric.call("on_attack_end", loop=self, result=result, final=final)
        return AttackOutcome(
            result,
            history,
            final,
            records.clean_labels.cpu(),
            perturbed_eval_labels.cpu(),
            interrupted=interrupted,
        )

    def predict(
        self,
        model: nn.Module,
        images: Tensor,
        perturbation: Optional[Tensor] = None,
        reducer: Optional[Reducer] = None,
    ) -> Tensor:
        """Labels (N,) of ``model``, in eval mode, on ``images`` (+ ``perturbation``); the loop's
        settings; with a ``reducer`` each rank predicts its shard and every rank gets all labels."""
        with frozen_eval(model):
            return distributed.predict(
                model,
                images,
                perturbation,
                reducer=reducer,
                batch_size=self.settings.eval_batch_size,
                clip=self.settings.clip,
                precision=self.settings.precision,
                channels_last=self.evaluation.channels_last,
            )

    def pass_ended(self, record: Dict[str, Any], perturbation: Tensor, log_pass: PassLogger) -> None:
        """After a pass's ``record``: ``log_pass`` gets it with v, the callbacks are told."""
        log_pass(record, perturbation)
        self.fabric.call("on_attack_pass_end", loop=self, record=record, perturbation=perturbation)

    def phase(self, name: str) -> Any:
        """A :class:`~uap_lightning.progress.Phase` named ``name`` on rank 0 (lines while it runs
        long), nothing on the other ranks."""
        return progress.Phase(log, name) if self.fabric.is_global_zero else contextlib.nullcontext()

    def log_pass(self, record: Dict[str, Any], v: Tensor) -> None:
        """Log a pass's record (scalars) and v (an image) to the loop's loggers."""
        log_pass(self.fabric, self.settings.threat, record, v)

    def _save(self, state: AttackState) -> None:
        """Save ``state`` at ``state_path`` (when there is one)."""
        if self.state_path is not None:
            save_state(self.fabric, self.state_path, state)


class _PassBook:
    """The bookkeeping of one attack's passes: each pass's record and attack seconds (a pass's
    engine updates and its check on X, not its evaluation), the state saved after it (continuing
    ``resume``'s), the pass logged and the callbacks told."""

    def __init__(
        self,
        loop: AttackLoop,
        records: PassRecords,
        generator: torch.Generator,
        log_pass: PassLogger,
        resume: Optional[AttackState],
    ) -> None:
        self.loop, self.records, self.generator, self.log_pass = loop, records, generator, log_pass
        self.history = [] if resume is None else [dict(record) for record in resume.history]
        self.elapsed = 0.0 if resume is None else resume.attack_seconds
        self.latest = resume
        self.started = time.perf_counter()

    def pass_ended(self, report: PassReport) -> None:
        """The ``on_pass_end`` of :func:`~uap_lightning.attacks.run_passes`."""
        seconds = time.perf_counter() - self.started
        self.elapsed += seconds
        record = self.records.of_pass(report, seconds, self.elapsed)
        self.history.append(record)
        self.latest = AttackState(
            self.loop.fingerprint,
            report.pass_index,
            report.perturbation.detach().cpu().clone(),
            report.kept,
            self.generator.get_state(),
            [dict(r) for r in self.history],
            self.elapsed,
        )
        self.loop._save(self.latest)
        self.loop.pass_ended(record, report.perturbation, self.log_pass)
        self.started = time.perf_counter()

    def finished(self) -> None:
        """The passes ended (converged or all run): the last state is saved as finished."""
        if self.latest is not None:
            self.latest.finished = True
            self.loop._save(self.latest)

    def result_so_far(self, attack_images: Tensor) -> UAPResult:
        """The result as of the last finished pass (v = 0 of X's image shape when none finished)."""
        if self.latest is None:
            return no_pass_result(attack_images.shape[1:], attack_images.dtype)
        return self.latest.result(self.loop.settings.rate_on_x_key, self.loop.settings.delta)


def _attack_on_rank(
    fabric: Fabric,
    model: nn.Module,
    attack_images: Tensor,
    eval_images: Tensor,
    eval_labels: Tensor,
    resume: Optional[AttackState],
    *,
    loop: AttackLoop,
    log_pass: PassLogger,
) -> AttackOutcome:
    """The attack in one spawned process, on ``loop``'s settings with this process's ``fabric``."""
    loop = dataclasses.replace(loop, fabric=fabric)
    reducer = TorchDistributed(fabric.device)
    return loop.attack(model, attack_images, eval_images, eval_labels, resume, reducer=reducer, log_pass=log_pass)

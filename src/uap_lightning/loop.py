"""The attack loop on Lightning Fabric: passes of a universal attack engine, evaluated, logged
and saved, so that an interrupted attack resumes to the same result.

The loop owns devices, loggers, callbacks and the attack state; the engine (pure torch) owns
the update rule. After every pass the loop evaluates v on the eval set, logs scalars and the
perturbation, saves its state (v, the kept v, the pass, the generator, the history) with
Fabric's ``save`` and calls the ``on_attack_pass_end`` hook of every Fabric callback. Ctrl-C
(or a SIGTERM turned into KeyboardInterrupt by the caller) ends the loop after the last
finished pass: the outcome is marked ``interrupted`` and built from that pass.

With a Fabric of several devices (strategy ``ddp_spawn``) :meth:`AttackLoop.run` launches the
attack in as many processes, each running the same loop on the same X and the same eval set:
the engine shares its passes through a :class:`~uap_lightning.attacks.TorchDistributed`
reducer, every prediction (X, eval set) is shared out by rank and gathered, so every rank holds
the same v and the same records; Fabric saves the state from rank 0 and the callbacks (the
progress bar) draw on rank 0. The workers leave the loggers alone: rank 0 writes the outcome
and each pass's record and v to a file (tensors-only; Fabric's launcher would send a return
value through a pipe it reads only after the workers exit, which a large value blocks), and the
main process reads and logs them once the workers are done, so every log file has one writer. An
interrupt stops all processes; the state saved after the last finished pass lets the same command
continue.

A generative engine (``attack=gap``) trains a network rather than v: :meth:`AttackLoop.train_generator`
trains it with a Lightning Trainer (one epoch per pass, :class:`~uap_lightning.models.gap_module.GAPModule`),
whose checkpoint in the run folder takes the place of the attack state, and evaluates, logs and
reports each pass as :meth:`AttackLoop.run` does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import logging
import math
import os
import signal
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, cast

import lightning as L
import torch
from lightning.fabric import Fabric
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch import Tensor, nn
from tqdm.auto import tqdm

from uap_lightning import metrics, progress
from uap_lightning.atomic import atomic_write
from uap_lightning.attacks import (
    SINGLE_PROCESS,
    AttackSettings,
    KeptPerturbation,
    PassReport,
    Reducer,
    TorchDistributed,
    UAPResult,
    distributed,
    frozen_eval,
    run_passes,
)
from uap_lightning.attacks.engines.gap import GAP
from uap_lightning.errors import DamagedFileError
from uap_lightning.models.gap_module import GAPModule
from uap_lightning.report.figures import perturbation_image
from uap_lightning.rundir import GENERATOR_CHECKPOINT, GENERATOR_WEIGHTS

log = logging.getLogger(__name__)

STATE_VERSION = 2  # 2: the state travels as a torch.save payload beside its sha256
HEARTBEAT_SECONDS = 60.0  # a line this often while a pass runs, off a terminal

PassLogger = Callable[[Dict[str, Any], Tensor], None]  # (a pass's record, v after it)


@dataclass
class EvaluationSettings:
    """The memory format of convolutional victims (``attack.channels_last``); the batch size,
    precision and compilation are the attack's settings."""

    channels_last: bool = False


@dataclass
class AttackState:
    """Everything needed to continue an attack after its pass ``passes``: v after that pass,
    the kept perturbation, the generator state, the per-pass history and attack seconds."""

    fingerprint: str  # of the settings that determine the result
    passes: int
    perturbation: Tensor  # C×H×W, [0,1] scale
    kept: KeptPerturbation
    generator_state: Tensor
    history: List[Dict[str, Any]]
    attack_seconds: float
    finished: bool = False

    def to_dict(self) -> Dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint,
            "passes": self.passes,
            "perturbation": self.perturbation,
            "kept_perturbation": self.kept.perturbation,
            "kept_fooling_rate": self.kept.fooling_rate,
            "kept_pass": self.kept.pass_index,
            "generator_state": self.generator_state,
            "history": self.history,
            "attack_seconds": self.attack_seconds,
            "finished": self.finished,
        }

    def to_file_content(self) -> Dict[str, Any]:
        """What the state file holds: ``to_dict()`` serialised by ``torch.save`` (a uint8 tensor)
        beside the sha256 of those bytes, which :meth:`load` checks."""
        buffer = io.BytesIO()
        torch.save(self.to_dict(), buffer)
        payload = buffer.getvalue()
        return {
            "version": STATE_VERSION,
            "sha256": hashlib.sha256(payload).hexdigest(),
            "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8),
        }

    @classmethod
    def load(cls, path: Path) -> Optional["AttackState"]:
        """The state saved at ``path`` (tensors-only load), or None when there is none.

        DamagedFileError when the file exists but cannot be read as an attack state, or when its
        contents do not match their sha256 checksum."""
        if not path.is_file():
            return None
        try:
            # torch.load, not Fabric's: a Fabric of several devices loads only once launched
            content = torch.load(path, map_location="cpu", weights_only=True)
            if content.get("version") != STATE_VERSION:
                raise ValueError(f"attack state version {content.get('version')!r}, expected {STATE_VERSION}")
            payload, checksum = content["payload"].numpy().tobytes(), content["sha256"]
        except Exception as err:  # any failure to read the state means it cannot be resumed
            raise DamagedFileError(f"attack state {path} cannot be read: {err}") from None
        if hashlib.sha256(payload).hexdigest() != checksum:
            raise DamagedFileError(
                f"attack state {path} is damaged: its contents do not match their sha256 checksum, so the attack "
                "cannot continue from it"
            )
        try:
            return cls.from_dict(torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True))
        except Exception as err:
            raise DamagedFileError(f"attack state {path} cannot be read: {err}") from None

    @classmethod
    def from_dict(cls, state: Dict[str, Any]) -> "AttackState":
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"attack state version {state.get('version')!r}, expected {STATE_VERSION}")
        return cls(
            fingerprint=str(state["fingerprint"]),
            passes=int(state["passes"]),
            perturbation=state["perturbation"],
            kept=KeptPerturbation(
                state["kept_perturbation"], float(state["kept_fooling_rate"]), int(state["kept_pass"])
            ),
            generator_state=state["generator_state"],
            history=list(state["history"]),
            attack_seconds=float(state["attack_seconds"]),
            finished=bool(state["finished"]),
        )


@dataclass
class AttackOutcome:
    """What one attack run produced, with everything its outputs need."""

    result: UAPResult
    history: List[Dict[str, Any]]  # one record per pass, resumed passes included
    final: Dict[str, Any]  # the evaluation record of the kept perturbation
    clean_eval_labels: Tensor  # (N,) predictions on the eval set without perturbation
    perturbed_eval_labels: Tensor  # (N,) predictions with the kept perturbation
    interrupted: bool = False


@dataclass
class AttackLoop:
    """Runs the attack of ``settings`` pass by pass until the fooling rate on X reaches 1 − δ or
    ``settings.max_passes``."""

    fabric: Fabric
    settings: AttackSettings
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)
    state_path: Optional[Path] = None  # where the state is saved after each pass
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
        if self.fabric.world_size == 1:
            return self._attack(model, attack_images, eval_images, eval_labels, resume, SINGLE_PROCESS, self._log_pass)
        # the loop travels with the function: Fabric's launcher walks the arguments, which a frozen
        # dataclass (the threat model) stops
        with tempfile.TemporaryDirectory(prefix="uap-attack-") as folder:
            sent = Path(folder) / "outcome.pt"
            attack = functools.partial(_attack_on_rank, loop=self, sent=sent)
            self.fabric.launch(attack, model, attack_images, eval_images, eval_labels, resume)
            outcome, passes = _received(sent)
        for record, perturbation in passes:
            self._log_pass(record, perturbation)
        model.to(self.fabric.device)
        return outcome

    def _attack(
        self,
        model: nn.Module,
        attack_images: Tensor,
        eval_images: Tensor,
        eval_labels: Tensor,
        resume: Optional[AttackState],
        reducer: Reducer,
        log_pass: PassLogger,
    ) -> AttackOutcome:
        """The attack in this process, one of ``reducer.world_size`` (an interrupt on several
        processes propagates); ``log_pass`` gets each pass's record and v."""
        model = model.to(self.fabric.device)
        if self.evaluation.channels_last:
            model = model.to(memory_format=torch.channels_last)
        attack_images = attack_images.to(self.fabric.device)
        generator = self.settings.generator()
        history: List[Dict[str, Any]] = []
        latest: Optional[AttackState] = None
        if resume is not None:
            generator.set_state(resume.generator_state)
            history = [dict(record) for record in resume.history]
            latest = resume

        with frozen_eval(model):
            with self._phase(f"the victim's predictions on X and the {len(eval_images)} eval images"):
                clean_attack_labels = self.predict(model, attack_images, reducer=reducer)
                clean_eval_labels = self.predict(model, eval_images, reducer=reducer)
            clean_accuracy = metrics.accuracy(clean_eval_labels, eval_labels)
            self.fabric.call("on_attack_start", loop=self, max_passes=self.settings.max_passes, done=len(history))
            elapsed = resume.attack_seconds if resume is not None else 0.0

            pass_started: float  # set when the passes start, below

            def on_pass_end(report: PassReport) -> None:
                # attack time of this pass: engine updates plus the check on X, not the evaluation
                nonlocal elapsed, pass_started, latest
                pass_seconds = time.perf_counter() - pass_started
                elapsed += pass_seconds
                record = self._pass_record(
                    model,
                    report,
                    eval_images,
                    eval_labels,
                    clean_eval_labels,
                    clean_accuracy,
                    pass_seconds,
                    elapsed,
                    reducer,
                )
                history.append(record)
                latest = AttackState(
                    self.fingerprint,
                    report.pass_index,
                    report.perturbation.detach().cpu().clone(),
                    report.kept,
                    generator.get_state(),
                    [dict(r) for r in history],
                    elapsed,
                )
                self._save(latest)
                log_pass(record, report.perturbation)
                self.fabric.call("on_attack_pass_end", loop=self, record=record, perturbation=report.perturbation)
                pass_started = time.perf_counter()

            start = pass_started = time.perf_counter()
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
                    on_pass_end=on_pass_end,
                    reducer=reducer,
                )
            except KeyboardInterrupt:
                if reducer.world_size > 1:
                    raise  # ranks stop at different points: no more collectives; the saved state continues
                interrupted = True
                result = self._result_of(latest, attack_images.shape[1:], attack_images.dtype)
            else:
                if latest is not None:
                    latest.finished = True
                    self._save(latest)
            finally:
                self.fabric.call("on_passes_done", loop=self)
            wall = time.perf_counter() - start
            kept_v = result.perturbation
            with self._phase(f"scoring the kept perturbation on the {len(eval_images)} eval images"):
                perturbed_eval_labels = self.predict(model, eval_images, kept_v, reducer=reducer)

        final = self._final_record(model, kept_v, result, history, eval_images, eval_labels, clean_eval_labels, reducer)
        final.update(loop_seconds=wall, clean_accuracy=clean_accuracy, attack_seconds=elapsed)
        self.fabric.call("on_attack_end", loop=self, result=result, final=final)
        return AttackOutcome(
            result,
            history,
            final,
            clean_eval_labels.cpu(),
            perturbed_eval_labels.cpu(),
            interrupted=interrupted,
        )

    def train_generator(
        self,
        engine: GAP,
        model: nn.Module,
        attack_images: Tensor,
        eval_images: Tensor,
        eval_labels: Tensor,
        *,
        trainer_settings: Mapping[str, Any],
        run_dir: Path,
        resume_passes: Optional[int] = None,
    ) -> AttackOutcome:
        """Train the generator of ``engine`` (``attack=gap``) with a Lightning Trainer, one epoch per
        pass, and evaluate its perturbation as :meth:`run` does (the same records, logs, progress
        and outcome); ``trainer_settings`` (accelerator, precision, deterministic) go to the Trainer,
        on one device, with the loop's loggers.

        The Trainer saves ``last.ckpt`` in ``run_dir`` after every epoch; ``resume_passes`` (the
        passes that checkpoint holds, None: start afresh) continues from it. The weights of the
        kept pass are written to ``generator.pt`` in ``run_dir`` (a state dict of tensors). Ctrl-C
        ends the training after the last finished epoch, as in :meth:`run`.
        """
        model = model.to(self.fabric.device)
        with frozen_eval(model):
            with self._phase(f"the victim's predictions on X and the {len(eval_images)} eval images"):
                clean_attack_labels = self.predict(model, attack_images)
                clean_eval_labels = self.predict(model, eval_images)
            clean_accuracy = metrics.accuracy(clean_eval_labels, eval_labels)

            def record_pass(report: PassReport, seconds: float, elapsed: float) -> Dict[str, Any]:
                record = self._pass_record(
                    model,
                    report,
                    eval_images,
                    eval_labels,
                    clean_eval_labels,
                    clean_accuracy,
                    seconds,
                    elapsed,
                    SINGLE_PROCESS,
                )
                self._log_pass(record, report.perturbation)
                self.fabric.call("on_attack_pass_end", loop=self, record=record, perturbation=report.perturbation)
                return record

            module = GAPModule(
                engine,
                model,
                attack_images,
                clean_attack_labels,
                self.settings,
                fingerprint=self.fingerprint,
                record_pass=record_pass,
            )
            trainer = L.Trainer(
                **trainer_settings,
                devices=1,
                max_epochs=self.settings.max_passes,
                # the run's loggers are Lightning's Trainer loggers (instantiate_loggers), which Fabric takes too
                logger=cast(List[Logger], list(self.fabric.loggers)) or False,
                callbacks=[
                    ModelCheckpoint(
                        dirpath=run_dir,
                        filename=Path(GENERATOR_CHECKPOINT).stem,
                        save_top_k=1,
                        save_on_train_epoch_end=True,
                        enable_version_counter=False,
                    )
                ],
                log_every_n_steps=1,
                enable_progress_bar=False,
                enable_model_summary=False,
                default_root_dir=run_dir,
            )
            self.fabric.call("on_attack_start", loop=self, max_passes=self.settings.max_passes, done=resume_passes or 0)
            start = time.perf_counter()
            interrupted = False
            sigint = signal.getsignal(signal.SIGINT)
            try:
                checkpoint = None if resume_passes is None else run_dir / GENERATOR_CHECKPOINT
                with warnings.catch_warnings():  # the run folder is meant to hold more than the checkpoint
                    warnings.filterwarnings("ignore", message=".*exists and is not empty")
                    trainer.fit(module, ckpt_path=checkpoint, weights_only=True)
            except (KeyboardInterrupt, SystemExit):  # Lightning ends an interrupted fit with SystemExit
                if not trainer.interrupted:
                    raise
                interrupted = True
                signal.signal(signal.SIGINT, sigint)  # Lightning ignores Ctrl-C from then on
            finally:
                self.fabric.call("on_passes_done", loop=self)
            wall = time.perf_counter() - start
            result = module.result() or self._result_of(None, attack_images.shape[1:], attack_images.dtype)
            with self._phase(f"scoring the kept perturbation on the {len(eval_images)} eval images"):
                perturbed_eval_labels = self.predict(model, eval_images, result.perturbation)
        if module.kept_weights is not None:
            atomic_write(run_dir / GENERATOR_WEIGHTS, lambda f: torch.save(module.kept_weights, f))
        history = module.history
        final = self._final_record(
            model, result.perturbation, result, history, eval_images, eval_labels, clean_eval_labels, SINGLE_PROCESS
        )
        elapsed = history[-1]["attack_seconds"] if history else 0.0
        final.update(loop_seconds=wall, clean_accuracy=clean_accuracy, attack_seconds=elapsed)
        self.fabric.call("on_attack_end", loop=self, result=result, final=final)
        return AttackOutcome(
            result, history, final, clean_eval_labels.cpu(), perturbed_eval_labels.cpu(), interrupted=interrupted
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

    def _phase(self, name: str) -> Any:
        """A :class:`~uap_lightning.progress.Phase` named ``name`` on rank 0 (lines while it runs
        long), nothing on the other ranks."""
        return progress.Phase(log, name) if self.fabric.is_global_zero else contextlib.nullcontext()

    def _final_record(
        self,
        model: nn.Module,
        kept_v: Tensor,
        result: UAPResult,
        history: List[Dict[str, Any]],
        eval_images: Tensor,
        eval_labels: Tensor,
        clean_labels: Tensor,
        reducer: Reducer,
    ) -> Dict[str, Any]:
        """The evaluation record of the kept perturbation: its pass's record, or (no pass) a fresh one."""
        for record in history:
            if record["pass"] == result.best_pass:
                return dict(record)
        record = self._evaluate(model, kept_v, eval_images, eval_labels, clean_labels, reducer)
        record.update({"pass": result.best_pass, self.settings.rate_on_x_key: result.fooling_rate})
        return record

    def _result_of(self, state: Optional[AttackState], shape, dtype) -> UAPResult:
        """The result as of the last finished pass (v = 0 when none finished)."""
        if state is None:
            zero = torch.zeros(tuple(shape), dtype=dtype)
            return UAPResult(zero, 0.0, passes=0, best_pass=0, last_perturbation=zero)
        rate = state.history[-1][self.settings.rate_on_x_key] if state.history else state.kept.fooling_rate
        return UAPResult(
            state.kept.perturbation,
            state.kept.fooling_rate,
            passes=state.passes,
            converged=rate >= 1.0 - self.settings.delta,
            best_pass=state.kept.pass_index,
            last_perturbation=state.perturbation,
        )

    def _save(self, state: AttackState) -> None:
        """Save ``state`` (with its checksum) with Fabric (rank 0), to a temporary name then renamed
        into place; a failed save leaves no temporary file."""
        if self.state_path is None:
            return
        temporary = self.state_path.with_name(f".{self.state_path.name}.{os.getpid()}.tmp")
        try:
            self.fabric.save(temporary, state.to_file_content())
            if self.fabric.is_global_zero:
                os.replace(temporary, self.state_path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise

    def _evaluate(
        self,
        model: nn.Module,
        v: Tensor,
        eval_images: Tensor,
        eval_labels: Tensor,
        clean_labels: Tensor,
        reducer: Reducer,
    ) -> Dict[str, Any]:
        """Fooling rate, perturbed accuracy and norms (0–255 units) of ``v`` on the eval set."""
        perturbed = self.predict(model, eval_images, v, reducer=reducer)
        record = {
            "fooling_rate": metrics.fooling_rate(clean_labels, perturbed),
            "perturbed_accuracy": metrics.accuracy(perturbed, eval_labels),
            "norm_l2": metrics.norm_255(v, 2),
            "norm_linf": metrics.norm_255(v, math.inf),
        }
        target = self.settings.target_class
        if target is not None:
            record["targeted_success_rate"] = metrics.targeted_success_rate(clean_labels, perturbed, target)
        return record

    def _pass_record(
        self,
        model: nn.Module,
        report: PassReport,
        eval_images: Tensor,
        eval_labels: Tensor,
        clean_eval_labels: Tensor,
        clean_accuracy: float,
        seconds: float,
        elapsed: float,
        reducer: Reducer,
    ) -> Dict[str, Any]:
        """The record of a pass: the evaluation of its v on the eval set, its rate on X, its
        statistics, its ``seconds`` and the attack's ``elapsed`` seconds so far, and the kept pass."""
        record = self._evaluate(model, report.perturbation, eval_images, eval_labels, clean_eval_labels, reducer)
        record.update(
            {
                "pass": report.pass_index,
                self.settings.rate_on_x_key: report.fooling_rate,
                "clean_accuracy": clean_accuracy,
                "updates": report.stats.updates,
                "mean_inner_iterations": report.stats.mean_iterations,
                "seconds": seconds,
                "attack_seconds": elapsed,
                "kept_pass": report.kept.pass_index,
            }
        )
        return record

    def _log_pass(self, record: Dict[str, Any], v: Tensor) -> None:
        """Log a pass's record (scalars) and v (an image) at step ``record["pass"]``."""
        step = record["pass"]
        self.fabric.log_dict({f"attack/{k}": v_ for k, v_ in record.items() if k != "pass"}, step=step)
        for logger in self.fabric.loggers:
            experiment: Any = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                threat = self.settings.threat
                experiment.add_image(
                    "attack/perturbation", perturbation_image(v.detach().cpu(), threat.eps, threat.p), step
                )


def _attack_on_rank(
    fabric: Fabric,
    model: nn.Module,
    attack_images: Tensor,
    eval_images: Tensor,
    eval_labels: Tensor,
    resume: Optional[AttackState],
    *,
    loop: AttackLoop,
    sent: Path,
) -> None:
    """The attack in one spawned process, on ``loop``'s settings with this process's ``fabric``.
    Rank 0 saves the outcome and each pass's (record, v) to ``sent`` for :func:`_received`."""
    loop = dataclasses.replace(loop, fabric=fabric)
    passes: List[Tuple[Dict[str, Any], Tensor]] = []
    outcome = loop._attack(
        model,
        attack_images,
        eval_images,
        eval_labels,
        resume,
        TorchDistributed(fabric.device),
        lambda record, v: passes.append((dict(record), v.detach().cpu().clone())),
    )
    if fabric.is_global_zero:
        torch.save({"outcome": dataclasses.asdict(outcome), "passes": passes}, sent)


def _received(sent: Path) -> Tuple[AttackOutcome, List[Tuple[Dict[str, Any], Tensor]]]:
    """What rank 0 saved at ``sent`` (read tensors-only): the outcome and each pass's (record, v)."""
    saved = torch.load(sent, map_location="cpu", weights_only=True)
    fields = saved["outcome"]
    outcome = AttackOutcome(**{**fields, "result": UAPResult(**fields["result"])})
    return outcome, [(record, perturbation) for record, perturbation in saved["passes"]]


class AttackProgressBar:
    """Fabric callback showing the attack's progress on rank 0: on a terminal a progress bar over
    passes with the live rates; elsewhere (a pipe, a batch job) one log line per pass with the
    rates, the pass's seconds and an estimate of the time left, and, while a pass runs longer than
    ``heartbeat`` seconds, a line every ``heartbeat`` seconds. ``enabled=False`` draws no bar
    (the lines instead); ``lines=False`` writes no lines either (``attack.progress=false``)."""

    def __init__(self, enabled: bool = True, lines: bool = True, heartbeat: float = HEARTBEAT_SECONDS) -> None:
        self.enabled = enabled
        self.lines = lines
        self.heartbeat = heartbeat
        self._bar: Optional[tqdm] = None
        self._max_passes = 0
        self._pass = 0
        self._pass_started = 0.0
        self._stop: Optional[threading.Event] = None

    def on_attack_start(self, loop: AttackLoop, max_passes: int, done: int) -> None:
        self._max_passes, self._pass, self._pass_started = max_passes, done, time.perf_counter()
        if not loop.fabric.is_global_zero:
            return
        if self.enabled:
            self._bar = tqdm(
                total=max_passes, initial=done, desc=f"{loop.settings.method} passes", unit="pass", dynamic_ncols=True
            )
        elif self.lines:
            self._stop = threading.Event()
            threading.Thread(target=self._beat, args=(self._stop,), daemon=True, name="attack-heartbeat").start()

    def _beat(self, stop: threading.Event) -> None:
        """While the attack runs: a line each ``heartbeat`` seconds that a pass has been running."""
        while not stop.wait(self.heartbeat):
            running = time.perf_counter() - self._pass_started
            if running >= self.heartbeat:
                log.info("pass %d/%d running for %.0f s", self._pass + 1, self._max_passes, running)

    def on_attack_pass_end(self, loop: AttackLoop, record: Dict[str, Any], perturbation: Tensor) -> None:
        self._pass, self._pass_started = record["pass"], time.perf_counter()
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix({**progress_rates(loop.settings, record), "linf": f"{record['norm_linf']:.1f}"})
        elif self.lines and loop.fabric.is_global_zero:
            done = record["pass"]
            left = record["attack_seconds"] / done * (self._max_passes - done)
            rates = ", ".join(f"{name} {value}" for name, value in progress_rates(loop.settings, record).items())
            log.info(
                "pass %d/%d: %s; %.1f s, %.0f s in all, at most ~%.0f s to go",
                done,
                self._max_passes,
                rates,
                record["seconds"],
                record["attack_seconds"],
                left,
            )

    def on_passes_done(self, loop: AttackLoop) -> None:
        if self._stop is not None:
            self._stop.set()
            self._stop = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            progress.shown()  # the bar showed the attack to its end: the quiet after it starts now


def progress_rates(settings: AttackSettings, record: Dict[str, Any]) -> Dict[str, str]:
    """The rates a progress line shows for a pass's ``record``: on X the rate the attack steers by,
    on the eval set the fooling rate (and, targeted, the targeted success rate)."""
    if settings.target_class is None:
        return {
            "fooling on X": f"{record['fooling_rate_attack_set']:.4f}",
            "on the eval set": f"{record['fooling_rate']:.4f}",
        }
    return {
        "targeted success on X": f"{record['targeted_success_rate_attack_set']:.4f}",
        "on the eval set": f"{record['targeted_success_rate']:.4f}",
        "fooling on the eval set": f"{record['fooling_rate']:.4f}",
    }

"""A generative engine's attack (``attack=gap``): the generator trained by a Lightning Trainer,
one epoch per pass, whose checkpoint in the run folder takes the place of the attack state, each
pass scored, logged and reported as the attack loop does."""

from __future__ import annotations

import signal
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, cast

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch import Tensor, nn

from uap_lightning.atomic import atomic_write
from uap_lightning.attacks import PassReport, frozen_eval
from uap_lightning.attacks.engines.gap import GAP
from uap_lightning.loop.attack_loop import AttackLoop
from uap_lightning.loop.records import AttackOutcome
from uap_lightning.loop.state import no_pass_result
from uap_lightning.models.gap_module import GAPModule
from uap_lightning.rundir import GENERATOR_CHECKPOINT, GENERATOR_WEIGHTS


def train_generator(
    loop: AttackLoop,
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
    """Train the generator of ``engine`` with a Lightning Trainer, one epoch per pass, and evaluate
    its perturbation as :meth:`AttackLoop.run` does (the same records, logs, progress and outcome);
    ``trainer_settings`` (accelerator, precision, deterministic) go to the Trainer, on one device,
    with the loop's loggers.

    The Trainer saves ``last.ckpt`` in ``run_dir`` after every epoch; ``resume_passes`` (the passes
    that checkpoint holds, None: start afresh) continues from it. The weights of the kept pass are
    written to ``generator.pt`` in ``run_dir`` (a state dict of tensors). Ctrl-C ends the training
    after the last finished epoch, as in :meth:`AttackLoop.run`.
    """
    model = loop.placed(model)
    with frozen_eval(model):
        clean_attack_labels, records = loop.clean_records(model, attack_images, eval_images, eval_labels)

        def record_pass(report: PassReport, seconds: float, elapsed: float) -> Dict[str, Any]:
            record = records.of_pass(report, seconds, elapsed)
            loop.pass_ended(record, report.perturbation, loop.log_pass)
            return record

        module = GAPModule(
            engine,
            model,
            attack_images,
            clean_attack_labels,
            loop.settings,
            fingerprint=loop.fingerprint,
            record_pass=record_pass,
        )
        trainer = _trainer(loop, trainer_settings, run_dir)
        loop.fabric.call("on_attack_start", loop=loop, max_passes=loop.settings.max_passes, done=resume_passes or 0)
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
            loop.fabric.call("on_passes_done", loop=loop)
        wall = time.perf_counter() - start
        result = module.result() or no_pass_result(attack_images.shape[1:], attack_images.dtype)
        if module.kept_weights is not None:
            atomic_write(run_dir / GENERATOR_WEIGHTS, lambda f: torch.save(module.kept_weights, f))
        history = module.history
        elapsed = history[-1]["attack_seconds"] if history else 0.0
        return loop.outcome(result, history, records, wall, elapsed, interrupted)


def _trainer(loop: AttackLoop, trainer_settings: Mapping[str, Any], run_dir: Path) -> L.Trainer:
    """The Trainer of the generator: one device, ``loop.settings.max_passes`` epochs, the loop's
    loggers, the checkpoint of the last epoch in ``run_dir``."""
    return L.Trainer(
        **trainer_settings,
        devices=1,
        max_epochs=loop.settings.max_passes,
        # the run's loggers are Lightning's Trainer loggers (instantiate_loggers), which Fabric takes too
        logger=cast(List[Logger], list(loop.fabric.loggers)) or False,
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

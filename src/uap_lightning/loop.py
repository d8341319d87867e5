"""The attack loop on Lightning Fabric: passes of a universal attack engine, evaluated and logged.

The loop owns devices, loggers and callbacks; the engine (pure torch) owns the update
rule. After every pass the loop evaluates the perturbation on the eval set, logs scalars
and the perturbation to TensorBoard and calls the ``on_attack_pass_end`` hook of every
Fabric callback.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from lightning.fabric import Fabric
from torch import Tensor, nn
from tqdm.auto import tqdm

from uap_lightning import metrics
from uap_lightning.attacks import PassStats, ThreatModel, UAPResult, UniversalAttack, frozen_eval, run_passes
from uap_lightning.report.images import perturbation_image


@dataclass
class EvaluationSettings:
    """How the eval set is predicted: batch size and the optional GPU speed-ups."""

    batch_size: int = 512
    amp: bool = False
    channels_last: bool = False


@dataclass
class AttackOutcome:
    """What one attack run produced, with everything its outputs need."""

    result: UAPResult
    history: List[Dict[str, Any]]
    final: Dict[str, Any]
    clean_eval_labels: Tensor  # (N,) predictions on the eval set without perturbation
    perturbed_eval_labels: Tensor  # (N,) predictions with the perturbation


@dataclass
class AttackLoop:
    """Runs ``engine`` pass by pass until the fooling rate on X reaches 1 − δ or ``max_passes``."""

    fabric: Fabric
    engine: UniversalAttack
    threat: ThreatModel
    delta: float
    max_passes: int
    clip: bool = True
    target_class: Optional[int] = None
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)

    def run(
        self,
        model: nn.Module,
        attack_images: Tensor,
        eval_images: Tensor,
        eval_labels: Tensor,
        seed: int,
    ) -> AttackOutcome:
        """Compute a universal perturbation on ``attack_images`` (X) and evaluate it on the eval set.

        Images are N×C×H×W in [0,1]; the model maps them to logits.
        """
        model = model.to(self.fabric.device)
        if self.evaluation.channels_last:
            model = model.to(memory_format=torch.channels_last)
        attack_images = attack_images.to(self.fabric.device)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        history: List[Dict[str, Any]] = []

        with frozen_eval(model):
            clean_attack_labels = self.predict(model, attack_images)
            clean_eval_labels = self.predict(model, eval_images)
            clean_accuracy = metrics.accuracy(clean_eval_labels, eval_labels)
            self.fabric.call("on_attack_start", loop=self, max_passes=self.max_passes)
            elapsed = 0.0

            def on_pass_end(pass_index: int, v: Tensor, stats: PassStats, rate_attack_set: float) -> None:
                # attack time of this pass: engine updates plus the check on X, not the evaluation
                nonlocal elapsed, pass_started
                pass_seconds = time.perf_counter() - pass_started
                elapsed += pass_seconds
                record = self._evaluate(model, v, eval_images, eval_labels, clean_eval_labels)
                record.update(
                    {
                        "pass": pass_index,
                        "fooling_rate_attack_set": rate_attack_set,
                        "clean_accuracy": clean_accuracy,
                        "updates": stats.updates,
                        "mean_deepfool_iterations": stats.mean_iterations,
                        "seconds": pass_seconds,
                        "attack_seconds": elapsed,
                    }
                )
                history.append(record)
                self.fabric.log_dict({f"attack/{k}": v_ for k, v_ in record.items() if k != "pass"}, step=pass_index)
                self._log_perturbation(v, pass_index)
                self.fabric.call("on_attack_pass_end", loop=self, record=record, perturbation=v)
                pass_started = time.perf_counter()

            start = pass_started = time.perf_counter()
            result = run_passes(
                model,
                self.engine,
                attack_images,
                clean_attack_labels,
                delta=self.delta,
                max_passes=self.max_passes,
                generator=generator,
                eval_batch_size=self.evaluation.batch_size,
                clip=self.clip,
                target_class=self.target_class,
                on_pass_end=on_pass_end,
            )
            wall = time.perf_counter() - start
            perturbed_eval_labels = self.predict(model, eval_images, result.perturbation)

        final = dict(history[-1], loop_seconds=wall)  # run_passes makes at least one pass
        self.fabric.call("on_attack_end", loop=self, result=result, final=final)
        return AttackOutcome(result, history, final, clean_eval_labels.cpu(), perturbed_eval_labels.cpu())

    def predict(self, model: nn.Module, images: Tensor, perturbation: Optional[Tensor] = None) -> Tensor:
        """Labels (N,) of ``model``, in eval mode, on ``images`` (+ ``perturbation``); the loop's settings."""
        with frozen_eval(model):
            return metrics.predict(
                model,
                images,
                perturbation,
                batch_size=self.evaluation.batch_size,
                clip=self.clip,
                amp=self.evaluation.amp,
                channels_last=self.evaluation.channels_last,
            )

    def _evaluate(
        self, model: nn.Module, v: Tensor, eval_images: Tensor, eval_labels: Tensor, clean_labels: Tensor
    ) -> Dict[str, Any]:
        """Fooling rate, perturbed accuracy and norms (0–255 units) of ``v`` on the eval set."""
        perturbed = self.predict(model, eval_images, v)
        record = {
            "fooling_rate": metrics.fooling_rate(clean_labels, perturbed),
            "perturbed_accuracy": metrics.accuracy(perturbed, eval_labels),
            "norm_l2": metrics.norm_255(v, 2),
            "norm_linf": metrics.norm_255(v, math.inf),
        }
        if self.target_class is not None:
            record["targeted_success_rate"] = metrics.targeted_success_rate(clean_labels, perturbed, self.target_class)
        return record

    def _log_perturbation(self, v: Tensor, step: int) -> None:
        for logger in self.fabric.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                experiment.add_image("attack/perturbation", perturbation_image(v.detach().cpu()), step)


class AttackProgressBar:
    """Fabric callback: a progress bar over passes showing the live fooling rate on X."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._bar: Optional[tqdm] = None

    def on_attack_start(self, loop: AttackLoop, max_passes: int) -> None:
        if self.enabled and loop.fabric.is_global_zero:
            self._bar = tqdm(total=max_passes, desc=f"{loop.engine.name} passes", unit="pass", dynamic_ncols=True)

    def on_attack_pass_end(self, loop: AttackLoop, record: Dict[str, Any], perturbation: Tensor) -> None:
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(
                fool_X=f"{record['fooling_rate_attack_set']:.3f}",
                fool_eval=f"{record['fooling_rate']:.3f}",
                linf=f"{record['norm_linf']:.1f}",
            )

    def on_attack_end(self, loop: AttackLoop, result: UAPResult, final: Dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

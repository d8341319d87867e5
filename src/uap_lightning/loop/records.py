"""What an attack run records: each pass's v scored on the eval set, the record of the kept
perturbation, and the outcome a run's outputs are written from."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from torch import Tensor

from uap_lightning import metrics
from uap_lightning.attacks import AttackSettings, PassReport, UAPResult

# labels (N,) of the eval images plus a perturbation (C×H×W, [0,1] scale; None: the clean images)
EvalPredictor = Callable[[Optional[Tensor]], Tensor]


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
class PassRecords:
    """The records of an attack on one eval set: ``predict`` gives the victim's eval labels for a
    perturbation, ``clean_labels`` (N,) its predictions without one, ``eval_labels`` (N,) the true
    labels, ``clean_accuracy`` its accuracy."""

    settings: AttackSettings
    predict: EvalPredictor
    eval_labels: Tensor
    clean_labels: Tensor
    clean_accuracy: float

    def evaluate(self, v: Tensor) -> Dict[str, Any]:
        """Fooling rate, perturbed accuracy and norms (0–255 units) of ``v`` on the eval set; the
        targeted success rate for a targeted attack."""
        perturbed = self.predict(v)
        record = {
            "fooling_rate": metrics.fooling_rate(self.clean_labels, perturbed),
            "perturbed_accuracy": metrics.accuracy(perturbed, self.eval_labels),
            "norm_l2": metrics.norm_255(v, 2),
            "norm_linf": metrics.norm_255(v, math.inf),
        }
        target = self.settings.target_class
        if target is not None:
            record["targeted_success_rate"] = metrics.targeted_success_rate(self.clean_labels, perturbed, target)
        return record

    def of_pass(self, report: PassReport, seconds: float, elapsed: float) -> Dict[str, Any]:
        """The record of a pass: the evaluation of its v on the eval set, its rate on X, its
        statistics, its ``seconds`` and the attack's ``elapsed`` seconds so far, and the kept pass."""
        record = self.evaluate(report.perturbation)
        record.update(
            {
                "pass": report.pass_index,
                self.settings.rate_on_x_key: report.fooling_rate,
                "clean_accuracy": self.clean_accuracy,
                "updates": report.stats.updates,
                "mean_inner_iterations": report.stats.mean_iterations,
                "seconds": seconds,
                "attack_seconds": elapsed,
                "kept_pass": report.kept.pass_index,
            }
        )
        return record

    def final(self, result: UAPResult, history: List[Dict[str, Any]]) -> Dict[str, Any]:
        """The evaluation record of the kept perturbation of ``result``: its pass's record in
        ``history``, or (no pass) a fresh one."""
        for record in history:
            if record["pass"] == result.best_pass:
                return dict(record)
        record = self.evaluate(result.perturbation)
        record.update({"pass": result.best_pass, self.settings.rate_on_x_key: result.fooling_rate})
        return record

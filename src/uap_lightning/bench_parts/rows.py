"""Benchmark rows: the naive reference, ART and this project's engines on one victim and one X.

Every row is timed from the clean images of X to its perturbation (clean predictions
included) and scored on the evaluation set by the same function, :func:`eval_fooling_rate`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import pandas as pd
from torch import Tensor, nn

from uap_lightning import metrics
from uap_lightning.attacks import AttackSettings, PassReport, frozen_eval, run_passes
from uap_lightning.bench_parts.art_peer import art_uap
from uap_lightning.bench_parts.naive import naive_uap


@dataclass
class BenchProblem:
    """What every row attacks: the victim, X (N×C×H×W, [0,1]) and the eval set with its clean
    labels, and the DeepFool reference settings (``reference``: threat, δ, passes, clipping, seed
    and DeepFool's options) that the naive and ART rows follow."""

    model: nn.Module
    attack_images: Tensor
    eval_images: Tensor
    clean_eval_labels: Tensor
    num_classes: int
    reference: AttackSettings


@dataclass
class BenchRow:
    """One row of the table; fooling rates are shares in [0,1], seconds are wall seconds."""

    method: str
    seconds: float
    fooling_rate: float  # on the eval set, the paper's definition
    fooling_rate_attack_set: float  # as the method measured it on X
    passes: int
    norm_linf: float  # 0–255 units
    norm_l2: float
    speedup_vs_art: Optional[float] = None
    speedup_vs_naive: Optional[float] = None
    # engines only: after each pass, [seconds so far, eval fooling rate] (scoring time excluded)
    curve: List[List[float]] = field(default_factory=list)
    # engines only: seconds until the eval fooling rate first came within REACH_TOLERANCE of
    # deepfool_uap's final one; None when it never did
    seconds_to_reference: Optional[float] = None
    # mean fooling rate of random directions with this row's ℓ2 norm (the paper's comparison)
    random_same_l2_fooling_rate: Optional[float] = None

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def eval_fooling_rate(problem: BenchProblem, perturbation: Tensor) -> float:
    """The fooling rate of ``perturbation`` on the eval set: the one score every row gets."""
    reference = problem.reference
    perturbed = metrics.predict(
        problem.model, problem.eval_images, perturbation, batch_size=reference.eval_batch_size, clip=reference.clip
    )
    return metrics.fooling_rate(problem.clean_eval_labels, perturbed)


PEERS = ("naive", "art")  # the rows that are not this project's engines
REFERENCE_METHOD = "deepfool_uap"
REACH_TOLERANCE = 0.02  # fooling-rate points


def run_row(method: str, problem: BenchProblem, settings: AttackSettings, art_batch_size: int) -> BenchRow:
    """Time ``method`` (naive | art | an engine with its ``settings``) from X to v, then score v on
    the eval set. Engines are also scored after every pass (``curve``); that scoring is not timed."""
    curve: List[List[float]] = []
    scoring = 0.0

    def score_pass(report: PassReport) -> None:
        nonlocal scoring
        paused = time.perf_counter()
        curve.append([paused - started - scoring, eval_fooling_rate(problem, report.perturbation)])
        scoring += time.perf_counter() - paused

    started = time.perf_counter()
    if method in PEERS:
        v, rate, passes = _peer(method, problem, art_batch_size)
    else:
        clean = metrics.predict(problem.model, problem.attack_images, batch_size=settings.eval_batch_size)
        result = run_passes(problem.model, settings, problem.attack_images, clean, on_pass_end=score_pass)
        v, rate, passes = result.perturbation, result.fooling_rate, result.passes
    seconds = time.perf_counter() - started - scoring
    return BenchRow(
        method=method,
        seconds=seconds,
        fooling_rate=eval_fooling_rate(problem, v),
        fooling_rate_attack_set=float(rate),
        passes=int(passes),
        norm_linf=metrics.norm_255(v, math.inf),
        norm_l2=metrics.norm_255(v, 2.0),
        curve=curve,
    )


def _peer(method: str, problem: BenchProblem, art_batch_size: int) -> Tuple[Tensor, float, int]:
    """(v, fooling rate on X, passes) of the naive reference or ART with the reference settings."""
    reference = problem.reference
    options = reference.options
    common: Dict[str, Any] = dict(delta=reference.delta, max_passes=reference.max_passes, clip=reference.clip)
    with frozen_eval(problem.model):
        if method == "naive":
            return naive_uap(
                problem.model,
                problem.attack_images,
                reference.threat,
                generator=reference.generator(),
                **common,
                **options,
            )
        return art_uap(
            problem.model,
            problem.attack_images,
            reference.threat,
            num_classes=problem.num_classes,
            overshoot=options["overshoot"],
            num_candidates=options["num_candidates"],
            max_deepfool_iters=options["max_deepfool_iters"],
            seed=reference.seed,
            batch_size=art_batch_size,
            **common,
        )


def add_speedups(rows: List[BenchRow]) -> None:
    """Fill each row's speed-up over the ART and naive rows (their seconds / its seconds)."""
    by_method = {row.method: row for row in rows}
    for row in rows:
        for peer, attribute in (("art", "speedup_vs_art"), ("naive", "speedup_vs_naive")):
            if peer in by_method and row.seconds > 0:
                setattr(row, attribute, by_method[peer].seconds / row.seconds)


def add_time_to_reference(rows: List[BenchRow]) -> None:
    """Fill each engine row's seconds to come within REACH_TOLERANCE of deepfool_uap's final fooling rate."""
    reference = next((row for row in rows if row.method == REFERENCE_METHOD), None)
    if reference is None:
        return
    goal = reference.fooling_rate - REACH_TOLERANCE
    for row in rows:
        row.seconds_to_reference = next((seconds for seconds, rate in row.curve if rate >= goal), None)


def rows_table(rows: List[BenchRow]) -> pd.DataFrame:
    """The rows as a table: seconds, fooling rates, passes, speed-ups, seconds to the reference's
    rate and the same-ℓ2 random baseline (missing values as "-")."""
    table = pd.DataFrame(
        {
            "seconds": [row.seconds for row in rows],
            "fooling": [row.fooling_rate for row in rows],
            "on X": [row.fooling_rate_attack_set for row in rows],
            "passes": [row.passes for row in rows],
            "vs ART": [row.speedup_vs_art for row in rows],
            "vs naive": [row.speedup_vs_naive for row in rows],
            "to ref": [row.seconds_to_reference for row in rows],
            "rand ℓ2": [row.random_same_l2_fooling_rate for row in rows],
        },
        index=pd.Index([row.method for row in rows], name="method"),
    )
    for column in table.columns[table.isna().any()]:  # mixed columns print as text: format them here
        table[column] = [("-" if pd.isna(value) else f"{value:.3f}") for value in table[column]]
    return table

"""Benchmark rows: the naive reference, ART and this project's engines on one victim and one X.

Every row is timed from the clean images of X to its perturbation (clean predictions
included) and scored on the evaluation set by the same function, :func:`eval_fooling_rate`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn

from uap_lightning import metrics
from uap_lightning.attacks import PassReport, ThreatModel, build_engine, frozen_eval, run_passes
from uap_lightning.bench.art_peer import art_uap
from uap_lightning.bench.naive import naive_uap


@dataclass
class BenchProblem:
    """What every row attacks: the victim, X (N×C×H×W, [0,1]) and the eval set with its clean labels."""

    model: nn.Module
    attack_images: Tensor
    eval_images: Tensor
    clean_eval_labels: Tensor
    num_classes: int
    threat: ThreatModel
    delta: float
    max_passes: int
    clip: bool
    seed: int
    deepfool: Dict[str, Any]  # overshoot, num_candidates, max_deepfool_iters, deepfool_norm (naive, ART, engines)
    keep: str = "best"  # which pass the engines return (naive and ART return their last)
    compile: bool = False  # engines' predictions through torch.compile (compilation timed)


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
    perturbed = metrics.predict(problem.model, problem.eval_images, perturbation, clip=problem.clip)
    return metrics.fooling_rate(problem.clean_eval_labels, perturbed)


REFERENCE_METHOD = "deepfool_uap"
REACH_TOLERANCE = 0.02  # fooling-rate points


def run_row(method: str, problem: BenchProblem, engine_options: Dict[str, Any]) -> BenchRow:
    """Time ``method`` (naive | art | an engine name) from X to v, then score v on the eval set.

    Engines are also scored after every pass (``curve``); that scoring is not timed.
    """
    generator = torch.Generator().manual_seed(problem.seed)
    curve: List[List[float]] = []
    scoring = 0.0

    def score_pass(report: PassReport) -> None:
        nonlocal scoring
        paused = time.perf_counter()
        curve.append([paused - started - scoring, eval_fooling_rate(problem, report.perturbation)])
        scoring += time.perf_counter() - paused

    started = time.perf_counter()
    if method == "naive":
        with frozen_eval(problem.model):
            v, rate, passes = naive_uap(
                problem.model,
                problem.attack_images,
                problem.threat,
                delta=problem.delta,
                max_passes=problem.max_passes,
                generator=generator,
                clip=problem.clip,
                **problem.deepfool,
            )
    elif method == "art":
        with frozen_eval(problem.model):
            v, rate, passes = art_uap(
                problem.model,
                problem.attack_images,
                problem.threat,
                num_classes=problem.num_classes,
                delta=problem.delta,
                max_passes=problem.max_passes,
                overshoot=problem.deepfool["overshoot"],
                num_candidates=problem.deepfool["num_candidates"],
                max_deepfool_iters=problem.deepfool["max_deepfool_iters"],
                clip=problem.clip,
                seed=problem.seed,
                batch_size=engine_options["batch_size"],
            )
    else:
        engine = build_engine(method, problem.threat, clip=problem.clip, **engine_options)
        clean = metrics.predict(problem.model, problem.attack_images)
        result = run_passes(
            problem.model,
            engine,
            problem.attack_images,
            clean,
            delta=problem.delta,
            max_passes=problem.max_passes,
            generator=generator,
            clip=problem.clip,
            keep=problem.keep,
            compile=problem.compile,
            on_pass_end=score_pass,
        )
        v, rate, passes = result.perturbation, result.fooling_rate, result.passes
    seconds = time.perf_counter() - started - scoring
    return BenchRow(
        method=method,
        seconds=seconds,
        fooling_rate=eval_fooling_rate(problem, v),
        fooling_rate_attack_set=float(rate),
        passes=int(passes),
        norm_linf=float(v.abs().max()) * 255.0,
        norm_l2=float(v.norm()) * 255.0,
        curve=curve,
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


def format_table(rows: List[BenchRow]) -> str:
    """The rows as a fixed-width text table."""
    header = (
        f"{'method':<22}{'seconds':>9}{'fooling':>9}{'on X':>8}{'passes':>8}{'vs ART':>9}{'vs naive':>10}"
        f"{'to ref':>9}{'rand ℓ2':>9}"
    )
    lines = [header, "-" * len(header)]

    def times(value: Optional[float]) -> str:
        return f"{value:.2f}x" if value is not None else "-"

    def seconds(value: Optional[float]) -> str:
        return f"{value:.1f}" if value is not None else "-"

    def rate(value: Optional[float]) -> str:
        return f"{value:.3f}" if value is not None else "-"

    for row in rows:
        lines.append(
            f"{row.method:<22}{row.seconds:>9.1f}{row.fooling_rate:>9.3f}{row.fooling_rate_attack_set:>8.3f}"
            f"{row.passes:>8d}{times(row.speedup_vs_art):>9}{times(row.speedup_vs_naive):>10}"
            f"{seconds(row.seconds_to_reference):>9}{rate(row.random_same_l2_fooling_rate):>9}"
        )
    return "\n".join(lines)

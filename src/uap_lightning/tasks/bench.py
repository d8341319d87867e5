"""The benchmark's task, ``task=bench``: ART, a naive reference and the engines side by side on one
victim, one X and one eval set, in one process. Its entry is ``python -m uap_lightning.bench``
(``uap_lightning.bench``); the rows, the profile and the efficiency measure it composes are the
benchmark's parts (``uap_lightning.bench_parts``).

The naive and ART rows follow the run's DeepFool settings (the ``attack`` keys of a DeepFool
engine, or DeepFool's defaults); each engine row takes the run's ``attack`` settings it knows,
overridden by ``task.engines.<engine>``. Writes ``bench.json`` in the run folder and logs the
table, the random baselines and where one pass of each engine spends its time.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Dict, List, cast

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from uap_lightning.attacks import ENGINES, AttackSettings, BatchedDeepFoolUAP, engine_class, folded_copy
from uap_lightning.attacks.deepfool import DeepFoolOptions
from uap_lightning.baselines import DRAWS, mean_fooling_rate, same_l2_fooling_rate
from uap_lightning.bench_parts.art_peer import require_art
from uap_lightning.bench_parts.efficiency import batched_efficiency
from uap_lightning.bench_parts.profile import PassProfile, forward_backward_rate, profile_pass
from uap_lightning.bench_parts.rows import (
    PEERS,
    REACH_TOLERANCE,
    REFERENCE_METHOD,
    BenchProblem,
    BenchRow,
    add_speedups,
    add_time_to_reference,
    rows_table,
    run_row,
)
from uap_lightning.errors import ConfigError
from uap_lightning.report.outputs import write_json
from uap_lightning.rundir import move_aside
from uap_lightning.task_configs import BenchTaskConfig, bench_rows
from uap_lightning.tasks.setup import Setup, Task

log = logging.getLogger(__name__)

BENCH_FILE = "bench.json"


def reference_settings(cfg: DictConfig, attack: AttackSettings) -> AttackSettings:
    """The run's settings with DeepFool as engine: the DeepFool keys of ``attack`` (defaults for
    those it lacks), for the naive and ART rows and as the base of every engine row."""
    names = [f.name for f in dataclasses.fields(DeepFoolOptions)]
    options = {name: cfg.attack[name] for name in names if name in cfg.attack}
    return attack.replace(method=REFERENCE_METHOD, options=options, target_class=None, augment=False)


def row_settings(cfg: DictConfig, attack: AttackSettings, method: str) -> AttackSettings:
    """The settings of the engine row ``method``: the run's ``attack`` keys the engine takes,
    overridden by ``task.engines.<method>`` (shared keys such as max_passes, or the engine's own).
    A key the run leaves null (its engine's default, e.g. sgd_uap's step_size) keeps the row
    engine's own default. Rows do not augment X (the peers cannot), unless
    ``task.engines.<method>.augment=true``."""
    node = cfg.task.engines.get(method)
    # a mapping node's container is a dict
    overrides = cast(Dict[str, Any], OmegaConf.to_container(node, resolve=True)) if node is not None else {}
    shared = {k: v for k, v in overrides.items() if k in {f.name for f in dataclasses.fields(AttackSettings)}}
    own = set(engine_class(method).option_names())
    options = {k: cfg.attack[k] for k in own if cfg.attack.get(k) is not None}
    options.update({k: v for k, v in overrides.items() if k not in shared})
    return attack.replace(method=method, options=options, target_class=None, **{"augment": False, **shared})


def check(cfg: DictConfig, attack: AttackSettings) -> None:
    """Check the rows and their settings before any data is read or victim trained."""
    rows, known = list(cfg.task.rows), bench_rows()
    if not rows or len(set(rows)) != len(rows) or not set(rows) <= set(known):
        raise ConfigError(f"task.rows must list distinct names among {', '.join(known)}; got {rows}")
    extra = sorted(set(cfg.task.engines) - set(ENGINES))
    if extra:
        raise ConfigError(f"task.engines has settings for unknown engine(s) {extra}; known: {', '.join(ENGINES)}")
    if attack.target_class is not None:
        raise ConfigError("the benchmark compares untargeted attacks; drop attack.target_class")
    if cfg.task.art_batch_size < 2:
        raise ConfigError(f"task.art_batch_size must be at least 2; got {cfg.task.art_batch_size}")
    if cfg.task.efficiency_batches < 1:
        raise ConfigError(f"task.efficiency_batches must be at least 1; got {cfg.task.efficiency_batches}")
    for method in [REFERENCE_METHOD, *(row for row in rows if row in ENGINES)]:
        try:
            row_settings(cfg, attack, method) if method in rows else reference_settings(cfg, attack)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"bench row {method}: {err}") from None
    if "art" in rows:
        try:
            require_art()
        except ImportError as err:
            raise ConfigError(str(err)) from None


def run(setup: Setup) -> Dict[str, Any]:
    """Run every row of ``task.rows`` on one victim and one X; write and return bench.json's content."""
    move_aside(setup.output_dir)
    victim = setup.victim()
    model = folded_copy(victim.net)
    problem = BenchProblem(
        model=model,
        attack_images=setup.attack_images,
        eval_images=setup.eval_images,
        clean_eval_labels=setup.predict(model, setup.eval_images),
        num_classes=setup.num_classes,
        reference=reference_settings(setup.cfg, setup.attack),
    )
    rows = compare_rows(setup, problem)
    random_rate = add_random_baselines(setup, problem, rows)
    profiles, batch1_rate = profile_engines(setup, problem)
    efficiency = batched_efficiency(
        model,
        setup.attack_images,
        # from_settings builds an engine of the class it is called on
        cast(
            BatchedDeepFoolUAP,
            BatchedDeepFoolUAP.from_settings(row_settings(setup.cfg, setup.attack, "deepfool_uap_batched")),
        ),
        setup.cfg.task.efficiency_batches,
    )
    report = {
        "rows": [row.as_dict() for row in rows],
        "profiles": {method: profile.as_dict() for method, profile in profiles.items()},
        "forward_backward_images_per_second_batch1": batch1_rate,
        "efficiency": efficiency.as_dict(),
        "random_fooling_rate": random_rate,
        "random_draws": DRAWS,
        "victim": {"model": setup.cfg.model.name, "source": victim.source, "test_accuracy": victim.test_accuracy},
        "settings": {
            "data": setup.cfg.data.name,
            "attack_images": len(setup.attack_images),
            "eval_images": len(setup.eval_images),
            "eps": setup.threat.eps,
            "p": setup.threat.symbol,
            **problem.reference.options,
            "delta": problem.reference.delta,
            "max_passes": problem.reference.max_passes,
            "torch_threads": torch.get_num_threads(),
            "device": str(next(model.parameters()).device),
            "engines": {
                m: dict(row_settings(setup.cfg, setup.attack, m).options) for m in setup.cfg.task.rows if m in ENGINES
            },
        },
    }
    write_json(setup.output_dir / BENCH_FILE, report)
    log.info(
        "random ℓp noise of norm ε fools %.3f (mean of %d draws; 'rand ℓ2' is a random direction of each row's ℓ2 "
        "norm); batched DeepFool efficiency %.2f of its limit (%.0f image·iterations/s × %d candidates against %.0f "
        "forward+backward images/s at batch %d); to ref: seconds until a row came within %.2f of %s's final fooling "
        "rate (per-pass scoring not timed)",
        random_rate,
        DRAWS,
        efficiency.efficiency,
        efficiency.image_iterations_per_second,
        efficiency.candidates,
        efficiency.forward_backward_images_per_second,
        efficiency.batch_size,
        REACH_TOLERANCE,
        REFERENCE_METHOD,
    )
    log.info("one pass from v = 0:\n%s", profiles_table(profiles, batch1_rate).to_markdown(floatfmt=".1f"))
    return setup.finish(report, "benchmark (fooling rates on the eval set)", rows_table(rows))


def compare_rows(setup: Setup, problem: BenchProblem) -> List[BenchRow]:
    """Every row of ``task.rows``, timed and scored, with their speed-ups and times to the reference."""
    rows = []
    for method in setup.cfg.task.rows:
        settings = problem.reference if method in PEERS else row_settings(setup.cfg, setup.attack, method)
        log.info("bench row %s ...", method)
        rows.append(run_row(method, problem, settings, setup.cfg.task.art_batch_size))
        log.info("%s: %.1f s, fooling rate %.3f", method, rows[-1].seconds, rows[-1].fooling_rate)
    add_speedups(rows)
    add_time_to_reference(rows)
    return rows


def add_random_baselines(setup: Setup, problem: BenchProblem, rows: List[BenchRow]) -> float:
    """Fill each row's same-ℓ2 random baseline (the paper's comparison); return the random ℓp
    baseline of norm ε (means of ``DRAWS`` draws)."""

    def noisy_labels(noise):
        return setup.predict(problem.model, problem.eval_images, noise)

    shape, threat, clean = problem.eval_images.shape[1:], setup.threat, problem.clean_eval_labels
    for row in rows:
        generator = torch.Generator().manual_seed(setup.seed + 2)
        row.random_same_l2_fooling_rate = same_l2_fooling_rate(noisy_labels, clean, shape, row.norm_l2, generator)
    generator = torch.Generator().manual_seed(setup.seed + 1)
    return mean_fooling_rate(noisy_labels, clean, shape, threat, generator)


def profile_engines(setup: Setup, problem: BenchProblem) -> tuple[Dict[str, PassProfile], float]:
    """One pass from v = 0 of each engine row, split into forward, gradient and the rest, and the
    victim's forward+backward images per second at batch 1 (the sequential engine's limit)."""
    clean = setup.predict(problem.model, problem.attack_images)
    profiles = {
        method: profile_pass(
            row_settings(setup.cfg, setup.attack, method).engine(),
            problem.model,
            problem.attack_images,
            clean,
            setup.seed,
        )
        for method in setup.cfg.task.rows
        if method in ENGINES
    }
    return profiles, forward_backward_rate(problem.model, problem.attack_images)


def profiles_table(profiles: Dict[str, PassProfile], batch1_rate: float) -> pd.DataFrame:
    """Per engine: seconds of one pass, its shares of forward, gradient and other work, images per
    second, and (the sequential engine's measure) that rate against the batch-1 forward+backward one."""
    table = pd.DataFrame(
        {
            "seconds": [p.total_seconds for p in profiles.values()],
            "forward %": [
                100 * p.forward_seconds / p.total_seconds if p.total_seconds else 0.0 for p in profiles.values()
            ],
            "gradient %": [
                100 * p.gradient_seconds / p.total_seconds if p.total_seconds else 0.0 for p in profiles.values()
            ],
            "other %": [100 * p.other_seconds / p.total_seconds if p.total_seconds else 0.0 for p in profiles.values()],
            "images/s": [p.images_per_second for p in profiles.values()],
            "of batch-1 fwd+bwd": [p.images_per_second / batch1_rate for p in profiles.values()],
        },
        index=pd.Index(list(profiles), name="engine"),
    )
    return table


TASK = Task("bench", BenchTaskConfig, run, check)

"""The benchmark task (``task=bench``; ``python -m uap_lightning.bench``): ART, a naive
reference and the engines side by side on one victim, one X and one eval set, in one process.

Writes ``bench.json`` in the run folder and prints a table.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Dict

import torch
from omegaconf import DictConfig, OmegaConf

from uap_lightning import metrics
from uap_lightning.atomic import atomic_write_text
from uap_lightning.attacks import (
    ENGINES,
    BatchedDeepFoolUAP,
    ThreatModel,
    build_engine,
    engine_options,
)
from uap_lightning.baselines import DRAWS, mean_fooling_rate
from uap_lightning.bench.art_peer import require_art
from uap_lightning.bench.efficiency import batched_efficiency
from uap_lightning.bench.profile import PassProfile, forward_backward_rate, profile_pass
from uap_lightning.bench.rows import (
    REACH_TOLERANCE,
    REFERENCE_METHOD,
    BenchProblem,
    add_speedups,
    add_time_to_reference,
    format_table,
    run_row,
)
from uap_lightning.config import BENCH_ROWS
from uap_lightning.errors import ConfigError
from uap_lightning.rundir import move_aside
from uap_lightning.tasks.setup import Setup

log = logging.getLogger("uap_lightning.bench")

BENCH_FILE = "bench.json"
_DEEPFOOL_KEYS = ("overshoot", "num_candidates", "max_deepfool_iters", "deepfool_norm")


def row_options(cfg: DictConfig, method: str) -> Dict[str, Any]:
    """The shared ``attack`` settings an engine takes, overridden by ``task.engines.<method>``."""
    if method == "art":
        return {"batch_size": cfg.task.art_batch_size}
    if method == "naive":
        return {}
    known = set(engine_options(method))
    shared = {k: cfg.attack[k] for k in known if k in cfg.attack and k not in ("clip", "target_class")}
    overrides = cfg.task.engines.get(method)
    return {**shared, **(OmegaConf.to_container(overrides, resolve=True) if overrides else {})}


def check(cfg: DictConfig, threat: ThreatModel) -> None:
    """Check the rows and their options before any data is read or victim trained."""
    rows = list(cfg.task.rows)
    unknown = [row for row in rows if row not in BENCH_ROWS]
    if unknown or not rows or len(set(rows)) != len(rows):
        raise ConfigError(f"task.rows must list distinct names among {', '.join(BENCH_ROWS)}; got {rows}")
    extra = sorted(set(cfg.task.engines) - set(ENGINES))
    if extra:
        raise ConfigError(f"task.engines has options for unknown engine(s) {extra}; known: {', '.join(ENGINES)}")
    if cfg.attack.target_class is not None:
        raise ConfigError("the benchmark compares untargeted attacks; drop attack.target_class")
    missing = [key for key in _DEEPFOOL_KEYS if key not in cfg.attack]
    if missing:
        raise ConfigError(
            f"the benchmark takes its DeepFool settings ({', '.join(missing)}) from a DeepFool engine's "
            f"attack config, which attack={cfg.attack.method} lacks: drop the attack= override "
            "(per-row settings go in task.engines.<engine>)"
        )
    if cfg.task.art_batch_size < 2:
        raise ConfigError(f"task.art_batch_size must be at least 2; got {cfg.task.art_batch_size}")
    if cfg.task.efficiency_batches < 1:
        raise ConfigError(f"task.efficiency_batches must be at least 1; got {cfg.task.efficiency_batches}")
    for method in rows:
        if method in ENGINES:
            try:
                build_engine(method, threat, clip=cfg.attack.clip, **row_options(cfg, method))
            except (TypeError, ValueError) as err:
                raise ConfigError(f"bench row {method}: {err}") from None
    if "art" in rows:
        try:
            require_art()
        except ImportError as err:
            raise ConfigError(str(err)) from None


def format_profiles(profiles: Dict[str, PassProfile], batch1_rate: float) -> str:
    """One line per engine: where one pass from v = 0 spends its time, and the sequential engine
    against the victim's forward+backward throughput at batch 1."""
    lines = ["one pass from v = 0:       seconds  forward  gradient   other  images/s"]
    for method, p in profiles.items():
        share = [100 * x / p.total_seconds if p.total_seconds else 0.0
                 for x in (p.forward_seconds, p.gradient_seconds, p.other_seconds)]
        lines.append(f"  {method:<22}{p.total_seconds:>9.1f}{share[0]:>8.0f}%{share[1]:>9.0f}%{share[2]:>7.0f}%"
                     f"{p.images_per_second:>10.1f}")
    if "deepfool_uap" in profiles:
        rate = profiles["deepfool_uap"].images_per_second
        lines.append(f"  deepfool_uap: {rate:.1f} images/s against {batch1_rate:.1f} forward+backward images/s of the "
                     f"victim at batch 1 ({rate / batch1_rate:.2f} of it)")
    return "\n".join(lines)


def run(setup: Setup) -> Dict[str, Any]:
    """Run every row of ``task.rows`` on one victim and one X; write and return bench.json's content."""
    cfg, threat = setup.cfg, setup.threat
    move_aside(setup.output_dir)
    victim = setup.victim()
    model = victim.net.eval()
    attack_images, eval_images = setup.attack_images, setup.eval_images
    problem = BenchProblem(
        model=model,
        attack_images=attack_images,
        eval_images=eval_images,
        clean_eval_labels=metrics.predict(model, eval_images, clip=cfg.attack.clip),
        num_classes=setup.num_classes,
        threat=threat,
        delta=cfg.attack.delta,
        max_passes=cfg.attack.max_passes,
        clip=cfg.attack.clip,
        seed=setup.seed,
        deepfool={k: cfg.attack[k] for k in _DEEPFOOL_KEYS},
        keep=cfg.attack.keep,
        compile=cfg.attack.compile,
    )
    rows = []
    for method in cfg.task.rows:
        log.info("bench row %s ...", method)
        rows.append(run_row(method, problem, row_options(cfg, method)))
        log.info("%s: %.1f s, fooling rate %.3f", method, rows[-1].seconds, rows[-1].fooling_rate)
    add_speedups(rows)
    add_time_to_reference(rows)

    batched = BatchedDeepFoolUAP(threat, clip=cfg.attack.clip, **row_options(cfg, "deepfool_uap_batched"))
    efficiency = batched_efficiency(model, attack_images, batched, cfg.task.efficiency_batches)
    def noisy_labels(noise):
        return metrics.predict(model, eval_images, noise, clip=problem.clip)

    shape = eval_images.shape[1:]
    random_rate = mean_fooling_rate(
        noisy_labels, problem.clean_eval_labels, shape, threat.eps, threat.p, torch.Generator().manual_seed(setup.seed + 1)
    )
    for row in rows:  # the paper's comparison: a random direction with the row's ℓ2 norm
        row.random_same_l2_fooling_rate = mean_fooling_rate(
            noisy_labels, problem.clean_eval_labels, shape, row.norm_l2, 2.0, torch.Generator().manual_seed(setup.seed + 2)
        )

    clean_attack = metrics.predict(model, attack_images, clip=problem.clip)
    profiles = {
        method: profile_pass(
            build_engine(method, threat, clip=problem.clip, **row_options(cfg, method)),
            model,
            attack_images,
            clean_attack,
            setup.seed,
        )
        for method in cfg.task.rows
        if method in ENGINES
    }
    batch1_rate = forward_backward_rate(model, attack_images)

    report = {
        "rows": [row.as_dict() for row in rows],
        "profiles": {method: profile.as_dict() for method, profile in profiles.items()},
        "forward_backward_images_per_second_batch1": batch1_rate,
        "efficiency": efficiency.as_dict(),
        "random_fooling_rate": random_rate,
        "random_draws": DRAWS,
        "victim": {
            "model": cfg.model.name,
            "data": cfg.data.name,
            "source": victim.source,
            "test_accuracy": victim.test_accuracy,
        },
        "settings": {
            "eps": threat.eps,
            "p": threat.p_name,
            "delta": cfg.attack.delta,
            "max_passes": cfg.attack.max_passes,
            "attack_images": len(attack_images),
            "eval_images": len(eval_images),
            "torch_threads": torch.get_num_threads(),
            "device": str(next(model.parameters()).device),
            **problem.deepfool,
            "engines": {m: row_options(cfg, m) for m in cfg.task.rows if m in ENGINES},
        },
    }
    atomic_write_text(setup.output_dir / BENCH_FILE, json.dumps(report, indent=2) + "\n")
    print(format_table(rows))
    print(
        f"random ℓp noise of norm ε fools {random_rate:.3f} (mean of {DRAWS} draws; per row, 'rand ℓ2' is a random "
        f"direction of the row's ℓ2 norm); "
        f"batched DeepFool efficiency "
        f"{efficiency.efficiency:.2f} of its limit ({efficiency.image_iterations_per_second:.0f} image·iterations/s "
        f"× {efficiency.candidates} candidates vs {efficiency.forward_backward_images_per_second:.0f} "
        f"forward+backward images/s at batch {efficiency.batch_size})"
    )
    print(
        f"to ref: seconds until a row's eval fooling rate came within {REACH_TOLERANCE:.2f} of "
        f"{REFERENCE_METHOD}'s final one (per-pass scoring not timed)"
    )
    print(format_profiles(profiles, batch1_rate))
    print(f"files    {(setup.output_dir / BENCH_FILE).resolve()}")
    return report

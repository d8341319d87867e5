"""Entry point of the benchmark: compose -> validate -> data -> cached victim -> rows -> bench.json.

    python -m uap_lightning.bench                    # CIFAR-10 copy, ResNet-20 (UAP_DATA_DIR)
    python -m uap_lightning.bench bench=smoke        # digits, under a minute
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from uap_lightning import metrics
from uap_lightning.atomic import atomic_write_text
from uap_lightning.attacks import ENGINES, BatchedDeepFoolUAP, ThreatModel, build_engine, engine_options
from uap_lightning.attacks.random_noise import random_perturbation
from uap_lightning.bench.art_peer import require_art
from uap_lightning.bench.efficiency import batched_efficiency
from uap_lightning.bench.rows import (
    REACH_TOLERANCE,
    REFERENCE_METHOD,
    BenchProblem,
    add_speedups,
    add_time_to_reference,
    eval_fooling_rate,
    format_table,
    run_row,
)
from uap_lightning.config import BENCH_ROWS, register_configs
from uap_lightning.data import build_datamodule
from uap_lightning.training import obtain_victim
from uap_lightning.validation import ConfigError, resolve_threat

log = logging.getLogger("uap_lightning.bench")

BENCH_FILE = "bench.json"
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"  # shipped with the package
_DEEPFOOL_KEYS = ("overshoot", "num_candidates", "max_deepfool_iters")


def row_options(cfg: DictConfig, method: str) -> Dict[str, Any]:
    """The shared ``attack`` settings an engine takes, overridden by ``bench.engines.<method>``."""
    if method == "art":
        return {"batch_size": cfg.bench.art_batch_size}
    if method == "naive":
        return {}
    known = set(engine_options(method))
    shared = {k: cfg.attack[k] for k in known if k in cfg.attack and k not in ("clip", "target_class")}
    overrides = cfg.bench.engines.get(method)
    return {**shared, **(OmegaConf.to_container(overrides, resolve=True) if overrides else {})}


def validate_bench(cfg: DictConfig) -> ThreatModel:
    """Check the rows and their options before any data is read or victim trained."""
    threat = resolve_threat(cfg)
    rows = list(cfg.bench.rows)
    unknown = [row for row in rows if row not in BENCH_ROWS]
    if unknown or not rows or len(set(rows)) != len(rows):
        raise ConfigError(f"bench.rows must list distinct names among {', '.join(BENCH_ROWS)}; got {rows}")
    extra = sorted(set(cfg.bench.engines) - set(ENGINES))
    if extra:
        raise ConfigError(f"bench.engines has options for unknown engine(s) {extra}; known: {', '.join(ENGINES)}")
    if cfg.attack.target_class is not None:
        raise ConfigError("the benchmark compares untargeted attacks; drop attack.target_class")
    if not 0.0 < cfg.attack.delta < 1.0 or cfg.attack.max_passes < 1:
        raise ConfigError("attack.delta must lie in (0, 1) and attack.max_passes be at least 1")
    if cfg.bench.art_batch_size < 2:
        raise ConfigError(f"bench.art_batch_size must be at least 2; got {cfg.bench.art_batch_size}")
    if cfg.bench.efficiency_batches < 1:
        raise ConfigError(f"bench.efficiency_batches must be at least 1; got {cfg.bench.efficiency_batches}")
    for method in rows:
        if method in ENGINES:
            try:
                build_engine(method, threat, clip=cfg.attack.clip, **row_options(cfg, method))
            except (TypeError, ValueError) as err:
                raise ConfigError(f"bench row {method}: {err}") from err
    if "art" in rows:
        try:
            require_art()
        except ImportError as err:
            raise ConfigError(str(err)) from err
    return threat


def run_bench(cfg: DictConfig) -> Dict[str, Any]:
    """Run every row of ``cfg.bench.rows`` on one victim and one X; write and return bench.json's content."""
    threat = validate_bench(cfg)
    output_dir = Path(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg.data, cache_dir=cfg.paths.cache_dir)
    datamodule.prepare_data()
    datamodule.setup("fit")
    attack_images, _ = datamodule.attack_set()
    eval_images, _ = datamodule.eval_set()
    victim = obtain_victim(cfg, datamodule, log_dir=str(output_dir))
    model = victim.module.net.eval()

    problem = BenchProblem(
        model=model,
        attack_images=attack_images,
        eval_images=eval_images,
        clean_eval_labels=metrics.predict(model, eval_images),
        num_classes=datamodule.num_classes,
        threat=threat,
        delta=cfg.attack.delta,
        max_passes=cfg.attack.max_passes,
        clip=cfg.attack.clip,
        seed=cfg.seed,
        deepfool={k: cfg.attack[k] for k in _DEEPFOOL_KEYS},
    )
    rows = []
    for method in cfg.bench.rows:
        log.info("bench row %s ...", method)
        rows.append(run_row(method, problem, row_options(cfg, method)))
        log.info("%s: %.1f s, fooling rate %.3f", method, rows[-1].seconds, rows[-1].fooling_rate)
    add_speedups(rows)
    add_time_to_reference(rows)

    batched = BatchedDeepFoolUAP(threat, clip=cfg.attack.clip, **row_options(cfg, "deepfool_uap_batched"))
    efficiency = batched_efficiency(model, attack_images, batched, cfg.bench.efficiency_batches)
    noise = random_perturbation(attack_images.shape[1:], threat.eps, threat.p, torch.Generator().manual_seed(cfg.seed))

    report = {
        "rows": [row.as_dict() for row in rows],
        "efficiency": efficiency.as_dict(),
        "random_fooling_rate": eval_fooling_rate(problem, noise),
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
            "engines": {m: row_options(cfg, m) for m in cfg.bench.rows if m in ENGINES},
        },
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / BENCH_FILE, json.dumps(report, indent=2) + "\n")
    print(format_table(rows))
    print(
        f"random ±ξ noise fools {report['random_fooling_rate']:.3f}; batched DeepFool efficiency "
        f"{efficiency.efficiency:.2f} of its limit ({efficiency.image_iterations_per_second:.0f} image·iterations/s "
        f"× {efficiency.candidates} candidates vs {efficiency.forward_backward_images_per_second:.0f} "
        f"forward+backward images/s at batch {efficiency.batch_size})"
    )
    print(
        f"to ref: seconds until a row's eval fooling rate came within {REACH_TOLERANCE:.2f} of "
        f"{REFERENCE_METHOD}'s final one (per-pass scoring not timed)"
    )
    print(f"files    {(output_dir / BENCH_FILE).resolve()}")
    return report


register_configs()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="bench")
def main(cfg: DictConfig) -> None:
    """Hydra entry point of ``python -m uap_lightning.bench``."""
    try:
        run_bench(cfg)
    except ConfigError as err:
        log.error("%s", err)
        raise

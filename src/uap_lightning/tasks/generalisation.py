"""The generalisation task (``task=generalisation``, the paper's Fig. 6): how the fooling rate on
unseen images grows with the number of images in X.

One perturbation per size of ``task.sizes``, each on X drawn with the attack seed (a smaller X
is a subset of a larger one) with the run's attack settings, scored on the eval set beside the
two random baselines. Writes ``generalisation.csv``, ``generalisation.png`` and ``metrics.json``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, List

import pandas as pd
from omegaconf import DictConfig

from uap_lightning import metrics
from uap_lightning.atomic import atomic_write_text
from uap_lightning.attacks import AttackSettings
from uap_lightning.baselines import random_baselines
from uap_lightning.errors import ConfigError
from uap_lightning.report.figures import size_curve_figure
from uap_lightning.rundir import move_aside
from uap_lightning.task_configs import GeneralisationTaskConfig
from uap_lightning.tasks.setup import Setup, Task, eval_fooling_rate, universal_perturbation

log = logging.getLogger(__name__)

GENERALISATION_CSV = "generalisation.csv"
GENERALISATION_FIGURE = "generalisation"  # generalisation.png and generalisation.pdf


def check(cfg: DictConfig, attack: AttackSettings) -> None:
    """The sizes are distinct positive numbers of images."""
    sizes = list(cfg.task.sizes)
    if not sizes or any(int(n) < 1 for n in sizes) or len(set(sizes)) != len(sizes):
        raise ConfigError(f"task.sizes must list distinct positive numbers of images, e.g. [50,100,200]; got {sizes}")


def run(setup: Setup) -> Dict[str, Any]:
    """A perturbation per size of X, scored on the eval set; the table, the curve and metrics.json."""
    cfg, threat = setup.cfg, setup.threat
    sizes = sorted(int(n) for n in cfg.task.sizes)
    available = setup.datamodule.attack_set_capacity()
    if sizes[-1] > available:
        raise ConfigError(
            f"task.sizes asks for X of {sizes[-1]} images but the training split offers {available}; "
            f"keep task.sizes at most {available}"
        )
    move_aside(setup.output_dir)
    net = setup.victim().net
    clean = setup.predict(net, setup.eval_images)
    rows = []
    for size in sizes:
        images, _ = setup.attack_set(size)
        started = time.perf_counter()
        result = universal_perturbation(setup, net, images)
        seconds = time.perf_counter() - started
        baselines = random_baselines(
            lambda noise: setup.predict(net, setup.eval_images, noise),
            clean,
            setup.eval_images.shape[1:],
            threat,
            result.perturbation,
            seed=setup.seed + 1,
        )
        rows.append(
            {
                "attack_images": size,
                "fooling_rate": eval_fooling_rate(setup, net, result.perturbation, clean),
                "fooling_rate_attack_set": result.fooling_rate,
                "random_fooling_rate": baselines.same_norm,
                "random_same_l2_fooling_rate": baselines.same_l2,
                "best_pass": result.best_pass,
                "passes": result.passes,
                "norm_l2": metrics.norm_255(result.perturbation, 2.0),
                "attack_seconds": seconds,
            }
        )
        log.info("|X| = %d: fooling rate %.4f (%.1f s)", size, rows[-1]["fooling_rate"], seconds)
    table = pd.DataFrame(rows)
    atomic_write_text(setup.output_dir / GENERALISATION_CSV, table.to_csv(index=False))
    figure = size_curve_figure(
        sizes,
        table["fooling_rate"].tolist(),
        table["fooling_rate_attack_set"].tolist(),
        {
            f"random {threat.symbol} noise of norm ε": table["random_fooling_rate"].tolist(),
            "random direction, same ℓ2 norm": table["random_same_l2_fooling_rate"].tolist(),
        },
        f"{setup.attack.method} {threat.symbol} ε={threat.eps:g} on {cfg.model.name}: fooling rate against |X|",
    )
    return setup.finish(
        {"rows": rows},
        "fooling rate against |X|",
        printable(table),
        figures={GENERALISATION_FIGURE: figure},
        steps=_steps(rows),
        index=False,
    )


def _steps(rows: List[Dict[str, Any]]) -> Dict[int, Dict[str, float]]:
    """Each row's numbers as the loggers' ``generalisation/<column>`` scalars at step |X|."""
    return {
        row["attack_images"]: {
            f"generalisation/{key}": float(value) for key, value in row.items() if key != "attack_images"
        }
        for row in rows
    }


def printable(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` as the run prints it: object columns keep each cell's own type, so that the counts
    (|X|, best_pass, passes) print as integers (a numeric frame's rows reach tabulate as floats: 50.000)."""
    return table.astype(object)


TASK = Task("generalisation", GeneralisationTaskConfig, run, check)

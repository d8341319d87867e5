"""The evaluate task (``task=evaluate perturbation.path=FILE``): score one perturbation, computed
here or published by others, on the run's victim and evaluation set.

The file is read as ``perturbation.*`` says (.npy, .npz, .mat, .pt/.pth; H×W×C or C×H×W; 0–255
or [0,1] scale) and must match the data's image shape. Writes ``perturbation.png``,
``examples.png``, ``labels.png`` and ``metrics.json`` (fooling rate, accuracies, norms, the
random baselines of the perturbation's own ℓp norm under ``attack.p``, dominant label).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, cast

import pandas as pd
from matplotlib.figure import Figure
from omegaconf import DictConfig
from torch import Tensor

from uap_lightning import metrics
from uap_lightning.attacks import AttackSettings, ThreatModel, folded_copy
from uap_lightning.baselines import random_baselines
from uap_lightning.errors import ConfigError
from uap_lightning.perturbation_io import check_reading, read_perturbation_source
from uap_lightning.report import figures
from uap_lightning.rundir import move_aside
from uap_lightning.task_configs import EvaluateTaskConfig
from uap_lightning.tasks.setup import Setup, Task, victim_label_names
from uap_lightning.training import Victim

log = logging.getLogger(__name__)


def check(cfg: DictConfig, attack: AttackSettings) -> None:
    """``perturbation.path`` names a file or a run folder, and the reading settings are valid."""
    path = cfg.perturbation.path
    if path is None:
        raise ConfigError("task=evaluate needs the perturbation to score: perturbation.path=FILE (or a run folder)")
    check_reading(path, layout=cfg.perturbation.layout, scale=cfg.perturbation.scale)


def run(setup: Setup) -> Dict[str, Any]:
    """Score the perturbation of ``perturbation.path`` on the eval set; write figures and metrics.json."""
    cfg, reading = setup.cfg, setup.cfg.perturbation
    v = read_perturbation_source(
        reading.path,
        shape=cast(Tuple[int, int, int], tuple(setup.eval_images.shape[1:])),  # eval images are N×C×H×W
        layout=reading.layout,
        scale=reading.scale,
        key=reading.key,
    )
    move_aside(setup.output_dir)
    victim = setup.victim()
    net = folded_copy(victim.net)

    def predict(noise: Optional[Tensor] = None) -> Tensor:
        return setup.predict(net, setup.eval_images, noise)

    clean, perturbed = predict(), predict(v)
    names = victim_label_names(setup.class_names, victim)
    dominant = figures.dominant_labels(clean, perturbed, len(names))
    results = _results(setup, victim, v, clean, perturbed, predict)
    results.update(
        dominant_label=dominant.label,
        dominant_label_name=None if dominant.label is None else names[dominant.label],
        dominant_label_share=dominant.share,
    )
    table = pd.DataFrame([{key: results[key] for key in _TABLE}])
    return setup.finish(
        results,
        f"perturbation {reading.path} on {cfg.model.name}",
        table,
        figures=_figures(setup, victim, v, clean, perturbed, dominant, names),
        index=False,
    )


_TABLE = (
    "fooling_rate",
    "random_fooling_rate",
    "random_same_l2_fooling_rate",
    "clean_accuracy",
    "perturbed_accuracy",
    "norm_l2",
    "norm_linf",
)


def _results(
    setup: Setup, victim: Victim, v: Tensor, clean: Tensor, perturbed: Tensor, predict: Callable[[Tensor], Tensor]
) -> Dict[str, Any]:
    """Fooling rate, accuracies, norms and the random baselines of ``v``'s own ℓp norm (p = attack.p)."""
    p = setup.threat.p
    norm = metrics.norm_255(v, p)
    own = ThreatModel(norm, p) if norm > 0 else setup.threat
    baselines = random_baselines(predict, clean, v.shape, own, v, seed=setup.seed + 1)
    fooling = metrics.fooling_rate(clean, perturbed)
    eval_labels = setup.eval_labels_for(victim)
    return {
        "perturbation_path": str(Path(setup.cfg.perturbation.path).resolve()),
        "fooling_rate": fooling,
        "clean_accuracy": metrics.accuracy(clean, eval_labels),
        "perturbed_accuracy": metrics.accuracy(perturbed, eval_labels),
        "random_fooling_rate": baselines.same_norm,
        "random_same_l2_fooling_rate": baselines.same_l2,
        "random_draws": baselines.draws,
        "beats_random": baselines.beaten_by(fooling),
        "eps": norm,  # the perturbation's own ℓp norm (0–255 units), the radius of the random baseline
        "method": "file",
        "norm_l2": metrics.norm_255(v, 2.0),
        "norm_linf": metrics.norm_255(v, math.inf),
        "victim_accuracy": victim.test_accuracy,
        "victim_source": victim.source,
    }


def _figures(
    setup: Setup,
    victim: Victim,
    v: Tensor,
    clean: Tensor,
    perturbed: Tensor,
    dominant: figures.DominantLabels,
    names: List[str],
) -> Dict[str, Figure]:
    """perturbation, examples and labels figures of the scored perturbation."""
    count = max(1, min(setup.cfg.extras.example_images, len(setup.eval_images)))
    fooled = clean.cpu() != perturbed.cpu()
    chosen = figures.pick_examples(setup.eval_labels, count, seed=setup.seed, first_class=dominant.label, fooled=fooled)
    shown = setup.eval_images[chosen]
    fooling = metrics.fooling_rate(clean, perturbed)
    title = (
        f"{Path(setup.cfg.perturbation.path).name} on {setup.cfg.model.name}: fooling rate {fooling:.2f}"
        f"\n{figures.examples_caption(fooled[chosen])}"
    )
    eval_labels = setup.eval_labels_for(victim)
    norm = metrics.norm_255(v, setup.threat.p)
    return {
        # on the scale of its own norm (the threat model's ε for v = 0)
        "perturbation": figures.perturbation_figure(v, ThreatModel(norm, setup.threat.p) if norm else setup.threat),
        "examples": figures.examples_figure(
            shown, metrics.perturb(shown, v), eval_labels[chosen], clean[chosen], perturbed[chosen], names, title
        ),
        "labels": figures.labels_figure(dominant, names),
    }


TASK = Task("evaluate", EvaluateTaskConfig, run, check, objective="fooling_rate")

"""The transfer task (``task=transfer``, the paper's Table 2): how a perturbation computed on one
victim fools the others.

Each perturbation (computed on each victim of ``task.victims`` with the run's attack settings,
or read from the files or run folders of ``task.perturbations``) is scored on every victim's eval-set
predictions. On image-file data each pretrained victim that declares its input size sees the
photographs at that size (``task.native_sizes``); a perturbation of another size is resized to
it. Writes ``transfer.csv`` (rows: where the perturbation comes from; columns: the victim; a last
row: each victim's random ℓp baseline), ``transfer.png``, the computed perturbations under
``perturbations/`` and ``metrics.json``.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, cast

import pandas as pd
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor

from uap_lightning import metrics
from uap_lightning.atomic import atomic_write, atomic_write_text
from uap_lightning.attacks import AttackSettings, ThreatModel, project_lp
from uap_lightning.baselines import DRAWS, mean_fooling_rate
from uap_lightning.config import model_preset
from uap_lightning.errors import ConfigError
from uap_lightning.perturbation_io import check_reading, read_perturbation_source
from uap_lightning.progress import Phase
from uap_lightning.report.figures import transfer_figure
from uap_lightning.rundir import METRICS_FILE, move_aside
from uap_lightning.task_configs import TransferTaskConfig
from uap_lightning.tasks.setup import Setup, Task, eval_fooling_rate, universal_perturbation
from uap_lightning.training import Victim
from uap_lightning.validation import check_victim_source

log = logging.getLogger(__name__)

TRANSFER_CSV = "transfer.csv"
TRANSFER_FIGURE = "transfer"  # transfer.png and transfer.pdf
PERTURBATIONS_DIR = "perturbations"


def check(cfg: DictConfig, attack: AttackSettings) -> None:
    """The victims name model presets and the run folders hold a perturbation."""
    if not cfg.task.victims:
        raise ConfigError("task.victims is empty; list model presets, e.g. task.victims=[cnn,lenet]")
    for entry in cfg.task.victims:
        try:
            check_victim_source(model_preset(entry), cfg.data)
        except ValueError as err:
            raise ConfigError(f"task.victims: {err}") from None
    for source in cfg.task.perturbations:
        check_reading(source, layout=cfg.perturbation.layout, scale=cfg.perturbation.scale)


def _labels(names: List[str]) -> List[str]:
    """``names`` made unique by numbering repeats (lenet, lenet-2, ...)."""
    seen: Dict[str, int] = {}
    labels = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        labels.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return labels


def _read_perturbation(source: Path, shape: Tuple[int, int, int], reading: Any) -> Tuple[str, Optional[str], Tensor]:
    """(a name for it, the model it was computed on or None, v C×H×W in [0,1] scale) of a
    perturbation file (read as ``reading``, the ``perturbation`` settings, say) or of an attack's
    run folder (named by its engine and the model it attacked, e.g. ``gd_uap on cnn``)."""
    v = read_perturbation_source(source, shape=shape, layout=reading.layout, scale=reading.scale, key=reading.key)
    if not source.is_dir():
        return source.stem, None, v
    try:
        recorded = json.loads((source / METRICS_FILE).read_text())
        return f"{recorded['method']} on {recorded['model']}", str(recorded["model"]), v
    except (OSError, ValueError, KeyError, TypeError):
        return source.name, None, v


def run(setup: Setup) -> Dict[str, Any]:
    """Score every perturbation on every victim; write the table, the heatmap and metrics.json."""
    cfg, threat = setup.cfg, setup.threat
    move_aside(setup.output_dir)
    configs = [model_preset(entry) for entry in cfg.task.victims]
    victim_labels = _labels([c.name for c in configs])
    inputs = victim_inputs(setup, configs)  # the setup each victim is scored on, and built for
    victims: List[Victim] = [own.victim(c, log_training=False) for c, own in zip(configs, inputs)]
    shape = cast(Tuple[int, int, int], tuple(setup.eval_images.shape[1:]))  # eval images are N×C×H×W

    if cfg.task.perturbations:
        read = [_read_perturbation(Path(source), shape, cfg.perturbation) for source in cfg.task.perturbations]
        source_labels = _labels([name for name, _, _ in read])
        computed_on = [model for _, model, _ in read]
        perturbations = [within_budget(v, label, threat) for (_, _, v), label in zip(read, source_labels)]
        title = f"fooling rate of each perturbation on each victim (random: {threat.symbol} noise, ε={threat.eps:g})"
    else:
        source_labels = list(victim_labels)
        computed_on = list(victim_labels)
        title = (
            f"{setup.attack.method} {threat.symbol} ε={threat.eps:g}: fooling rate of each perturbation on each victim"
        )
        perturbations = []
        for label, victim, own in zip(victim_labels, victims, inputs):
            log.info("computing a perturbation on %s (%d px) ...", label, own.image_size)
            perturbations.append(universal_perturbation(own, victim.net).perturbation)
        for label, v in zip(source_labels, perturbations):
            path = setup.output_dir / PERTURBATIONS_DIR / f"{label}.pt"
            atomic_write(path, functools.partial(torch.save, v.contiguous()))

    rates: List[List[float]] = [[] for _ in perturbations]
    random_rates, accuracies = {}, {}
    count = len(setup.eval_images)
    with Phase(log, f"scoring {len(perturbations)} perturbation(s) and random noise on {count} eval images") as phase:
        for label, victim, own in zip(victim_labels, victims, inputs):
            phase.part(f"{label}: its predictions")
            clean = own.predict(victim.net, own.eval_images)
            accuracies[label] = metrics.accuracy(clean, own.eval_labels_for(victim))
            for index, (row, v) in enumerate(zip(rates, perturbations)):
                phase.part(f"{label}: perturbation {index + 1} of {len(perturbations)}")
                row.append(eval_fooling_rate(own, victim.net, fit_to_size(v, own.image_size, threat), clean))
            phase.part(f"{label}: random {threat.symbol} noise")
            random_rates[label] = mean_fooling_rate(
                functools.partial(own.predict, victim.net, own.eval_images),
                clean,
                tuple(own.eval_images.shape[1:]),
                threat,
                torch.Generator().manual_seed(setup.seed + 1),
            )
    table = pd.DataFrame(rates, index=[f"perturbation from {label}" for label in source_labels], columns=victim_labels)
    table.loc[f"random {threat.symbol} noise"] = [random_rates[label] for label in victim_labels]
    table.index.name = "fooling rate"

    atomic_write_text(setup.output_dir / TRANSFER_CSV, table.to_csv())
    figure = transfer_figure(
        table.values,
        list(table.index),
        victim_labels,
        title,
        computed_on,
        [own.image_size for own in inputs],
        baseline=[random_rates[label] for label in victim_labels],
    )
    results = {
        "fooling_rate": {row: dict(table.loc[row]) for row in table.index[:-1]},
        "random_fooling_rate": random_rates,
        "random_draws": DRAWS,
        "clean_accuracy": accuracies,
        "victim_accuracy": {label: v.test_accuracy for label, v in zip(victim_labels, victims)},
        "victims": victim_labels,
        "input_size": {label: own.image_size for label, own in zip(victim_labels, inputs)},
        "sources": source_labels,
        "perturbation_folders": list(cfg.task.perturbations),
    }
    return setup.finish(
        results,
        "fooling rates (rows: perturbation; columns: victim)",
        table,
        figures={TRANSFER_FIGURE: figure},
        scalars=_scalars(table, results),
    )


def victim_inputs(setup: Setup, configs: List[Any]) -> List[Setup]:
    """The setup each victim of ``configs`` is scored on and built for: with ``task.native_sizes``
    the photographs at the input size its pretrained weights declare (:meth:`Setup.input_for`),
    else the run's."""
    native = bool(setup.cfg.task.native_sizes)
    return [setup.input_for(config) if native else setup for config in configs]


def within_budget(v: Tensor, label: str, threat: ThreatModel) -> Tensor:
    """``v`` (C×H×W, [0,1] scale) projected onto ``threat``'s ℓp ball, with a warning naming its norm
    when it lay outside: every perturbation is scored within the run's ε, at every size (the rule
    :func:`fit_to_size` applies after resizing)."""
    norm = metrics.norm_255(v, threat.p)
    if norm <= threat.eps * (1 + 1e-6):
        return v
    log.warning(
        "%s has %s norm %.4g, above attack.eps=%g: it is scored projected onto the ε-ball (set attack.eps "
        "to its norm to score it as it is)",
        label,
        threat.symbol,
        norm,
        threat.eps,
    )
    return project_lp(v, threat.radius, threat.p)


def fit_to_size(v: Tensor, size: int, threat: ThreatModel) -> Tensor:
    """``v`` (C×H×W, [0,1] scale) at ``size``×``size`` pixels: resized bilinearly (antialiased when
    shrinking) when its size differs, then projected onto ``threat``'s ℓp ball (an ℓ2 or ℓ1 norm
    grows with the pixel count)."""
    if tuple(v.shape[-2:]) == (size, size):
        return v
    resized = F.interpolate(
        v.unsqueeze(0), size=(size, size), mode="bilinear", align_corners=False, antialias=size < v.shape[-1]
    )[0]
    return project_lp(resized, threat.radius, threat.p)


def _scalars(table: pd.DataFrame, results: Dict[str, Any]) -> Dict[str, float]:
    """``table`` (a row per source of ``results["sources"]``, then the random baseline's) and the
    victims' accuracies as the loggers' tags: ``transfer/<source>/<victim>/fooling_rate``
    (``random_noise`` as the random baseline's source), ``transfer/clean_accuracy/<victim>``,
    ``transfer/victim_accuracy/<victim>``."""
    sources = [*results["sources"], "random_noise"]
    scalars = {
        f"transfer/{_tag(source)}/{_tag(victim)}/fooling_rate": float(rate)
        for source, (_, row) in zip(sources, table.iterrows())
        for victim, rate in row.items()
    }
    for key in ("clean_accuracy", "victim_accuracy"):
        scalars.update(
            {
                f"transfer/{key}/{_tag(victim)}": float(value)
                for victim, value in results[key].items()
                if value is not None
            }
        )
    return scalars


def _tag(label: str) -> str:
    """``label`` as one level of a logger's tag: spaces and slashes as underscores."""
    return re.sub(r"[\s/]+", "_", label)


TASK = Task("transfer", TransferTaskConfig, run, check)

"""The compare task (``task=compare``): engines × sources × seeds, every perturbation scored on every victim.

A cell is one (engine, source, attack seed): a perturbation computed with ``attack=<engine>`` on the
source (a model preset, ``model=<preset>``, or a list of presets, an ensemble,
``attack.ensemble=[a,b]``) with ``attack.seed=<seed>``, scored on the eval images of every victim
of ``task.victims`` (each at its own input size, as ``task=transfer`` scores, beside its random
ℓp-noise baseline). Each cell is a job of a multirun: the default sweeper expands
``task.engines`` × ``task.sources`` × ``task.seeds`` into them (:func:`pending_jobs`), one folder
per cell under the sweep folder (``<engine>-<source>-seed<seed>``), so any Hydra launcher runs
them (one after another, ``hydra/launcher=joblib`` in parallel, ``hydra/launcher=slurm`` on a
cluster), and a cell whose folder holds a ``metrics.json`` made with the same settings is not run
again. A cell writes ``perturbation.pt`` (C×H×W, [0,1] scale), ``perturbation.npy`` and, last,
``metrics.json``; the sweep's report assembles the table (:mod:`uap_lightning.report.compare`).
"""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import Tensor

from uap_lightning import metrics
from uap_lightning.atomic import atomic_write
from uap_lightning.attacks import AttackSettings, ThreatModel, engine_class, ensemble_engines
from uap_lightning.baselines import DRAWS, mean_fooling_rate
from uap_lightning.config import CONF_DIR, engine_label, model_preset
from uap_lightning.errors import ConfigError
from uap_lightning.perturbation_io import write_perturbation_npy
from uap_lightning.progress import Phase
from uap_lightning.report.compare import TASK_NAME, cell_name, source_label, write_plan
from uap_lightning.report.outputs import PERTURBATION_FILE, PERTURBATION_NPY
from uap_lightning.rundir import METRICS_FILE, move_aside
from uap_lightning.task_configs import CompareTaskConfig
from uap_lightning.tasks.attack import settings_fingerprint
from uap_lightning.tasks.setup import Setup, Task, ensemble_labels, eval_fooling_rate, universal_perturbation
from uap_lightning.tasks.transfer import fit_to_size, victim_inputs
from uap_lightning.training import Victim
from uap_lightning.validation import check_victim_source
from uap_lightning.victim_input import fit_data_to_victim

log = logging.getLogger(__name__)

# the keys a cell sets; the command line leaves them to task.engines, task.sources and task.seeds
CELL_KEYS = ("attack", "model", "attack.seed", "attack.ensemble")
# the task's keys that list cells: a cell's result does not depend on them
LIST_KEYS = ("engines", "sources", "seeds")
EXAMPLE = (
    "python -m uap_lightning.run -m task=compare 'task.engines=[sgd_uap,gd_uap]' 'task.sources=[cnn,lenet]' "
    "'task.seeds=[0,1]' 'task.victims=[cnn,lenet]'"
)


@dataclass(frozen=True)
class Cell:
    """One job of a compare: ``engine`` on ``source`` (model presets; two or more: an ensemble) with
    attack seed ``seed``."""

    engine: str
    source: Tuple[str, ...]
    seed: int

    @property
    def label(self) -> str:
        return source_label(self.source)

    @property
    def name(self) -> str:
        """The cell's folder under the sweep folder."""
        return cell_name(self.engine, self.source, self.seed)

    def overrides(self) -> List[str]:
        """The command-line overrides that make a run this cell, its folder included."""
        source = f"model={self.source[0]}" if len(self.source) == 1 else f"attack.ensemble=[{','.join(self.source)}]"
        return [f"attack={self.engine}", source, f"attack.seed={self.seed}", f"hydra.sweep.subdir='{self.name}'"]


@dataclass(frozen=True)
class Plan:
    """The cells of a compare, in table order, and why some (engine, source) pairs are not run."""

    cells: List[Cell]
    skipped: List[str]


def plan(task: DictConfig, data: DictConfig) -> Plan:
    """The cells of ``task.engines`` × ``task.sources`` × ``task.seeds`` (ensemble sources only with
    the engines that can attack an ensemble); ConfigError naming the key of a list that is empty,
    repeats itself or holds an unknown engine, an unknown preset or a seed that is no integer."""
    known = sorted(p.stem for p in (CONF_DIR / "attack").glob("*.yaml"))
    engines = _listed(task, "engines", "attack presets, e.g. task.engines=[sgd_uap,gd_uap]")
    for engine in engines:
        if engine not in known:
            raise ConfigError(f"task.engines: unknown engine {engine!r}; known: {', '.join(known)}")
    sources = [
        _source(entry, data) for entry in _listed(task, "sources", "model presets, e.g. task.sources=[cnn,lenet]")
    ]
    seeds = _listed(task, "seeds", "integer attack seeds, e.g. task.seeds=[0,1]")
    if any(isinstance(seed, bool) or not isinstance(seed, int) for seed in seeds):
        raise ConfigError(f"task.seeds must list integer attack seeds, e.g. task.seeds=[0,1]; got {seeds}")
    check_victims(task, data)
    cells, skipped = [], []
    for engine in engines:
        for source in sources:
            if len(source) > 1 and not engine_class(engine).averages_loss:
                skipped.append(
                    f"{engine} on {source_label(source)} ({engine} attacks one network; "
                    f"an ensemble takes {', '.join(ensemble_engines())})"
                )
                continue
            cells += [Cell(engine, source, seed) for seed in seeds]
    return Plan(cells, skipped)


def _listed(task: DictConfig, key: str, what: str) -> List[Any]:
    """``task.<key>`` as a list of plain values: not empty, no value twice."""
    values = OmegaConf.to_container(task[key], resolve=True) if isinstance(task[key], ListConfig) else task[key]
    if not isinstance(values, list) or not values:
        raise ConfigError(f"task.{key} is empty; list {what}")
    repeated = [v for i, v in enumerate(values) if v in values[:i]]
    if repeated:
        raise ConfigError(f"task.{key} lists {repeated[0]!r} twice; list each once")
    return values


def _source(entry: Any, data: DictConfig) -> Tuple[str, ...]:
    """The presets of one entry of ``task.sources`` (a preset name, or a list of two or more: an
    ensemble), each checked to be a preset that can be obtained on ``data``."""
    members = [entry] if isinstance(entry, str) else entry
    if not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members):
        raise ConfigError(f"task.sources: {entry!r} is neither a model preset nor a list of them (an ensemble)")
    if (len(members) == 1 and not isinstance(entry, str)) or len(set(members)) != len(members):
        raise ConfigError(f"task.sources: an ensemble lists two or more distinct presets; got {entry!r}")
    for member in members:
        try:
            check_victim_source(model_preset(member), data)
        except ValueError as err:
            raise ConfigError(f"task.sources: {err}") from None
    return tuple(members)


def check_victims(task: DictConfig, data: DictConfig) -> None:
    """``task.victims`` is not empty and names model presets that can be obtained on ``data``."""
    if not task.victims:
        raise ConfigError("task.victims is empty; list model presets, e.g. task.victims=[cnn,lenet]")
    for entry in task.victims:
        try:
            check_victim_source(model_preset(entry), data)
        except ValueError as err:
            raise ConfigError(f"task.victims: {err}") from None


def cell_of(cfg: DictConfig) -> Cell:
    """The cell the run ``cfg`` is (its ``attack``, source and ``attack.seed``); ConfigError when the
    run is none of its compare's cells (a run not made by the compare's sweep)."""
    members = tuple(str(m) for m in cfg.attack.get("ensemble") or ()) or (str(cfg.model.name),)
    cell = Cell(str(cfg.attack.method), members, cfg.attack.seed)
    if cell not in plan(cfg.task, cfg.data).cells:
        raise ConfigError(
            f"this run (attack={cell.engine}, source {cell.label}, attack.seed={cell.seed}) is no cell of "
            "task.engines × task.sources × task.seeds; task=compare makes its cells itself with the default "
            f"sweeper (hydra/sweeper=safe_basic): {EXAMPLE}"
        )
    return cell


def cell_fingerprint(cfg: DictConfig) -> str:
    """Hash of the settings a cell's result depends on: data, model, trainer, attack (as the attack
    task hashes it), the task but for its lists of cells, and the seed. ``cfg`` as the run sees
    it, its data fitted to a pretrained source's input (:func:`fitted`)."""
    sections: Dict[str, Any] = {
        key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("data", "model", "trainer", "attack", "task")
    }
    for key in LIST_KEYS:
        sections["task"].pop(key, None)
    # the data's files are not read: a sweep decides on a cell before loading anything
    return settings_fingerprint(OmegaConf.create({**sections, "seed": cfg.seed}), data_fingerprint="")


def fitted(cfg: DictConfig, given: Sequence[str]) -> DictConfig:
    """``cfg``'s data fitted to a pretrained source's input as the run's checks fit it
    (``fit_data_to_victim``, ``given``: the keys the command line set), without its log line."""
    fit_log = logging.getLogger(fit_data_to_victim.__module__)
    level = fit_log.level
    fit_log.setLevel(logging.WARNING)
    try:
        fit_data_to_victim(cfg, given)
    finally:
        fit_log.setLevel(level)
    return cfg


def pending_jobs(
    config: DictConfig, base: List[str], swept: List[str], compose: Callable[[List[str]], DictConfig]
) -> List[List[str]]:
    """The jobs (override lists) of the compare ``config`` (a multirun's config) whose cell is not
    complete in the sweep folder; writes the plan there. ``base``: the command line's overrides,
    ``swept``: the keys it sweeps (none may be), ``compose``: the config of a job's overrides.
    ConfigError for a command line that sweeps or sets a cell's keys, or for bad lists."""
    if swept:
        raise ConfigError(
            f"task=compare makes its jobs from task.engines, task.sources and task.seeds; it sweeps no other key "
            f"(got {', '.join(swept)}): run one compare per value, each with its own hydra.sweep.dir"
        )
    set_here = [key for key in (_key(o) for o in base) if key in CELL_KEYS]
    if set_here:
        raise ConfigError(
            f"task=compare sets {set_here[0]}= per cell; list engines in task.engines, sources in task.sources "
            f"(an ensemble as a list: task.sources=[cnn,[cnn,lenet]]) and attack seeds in task.seeds instead"
        )
    planned = plan(config.task, config.data)
    sweep_dir = Path(config.hydra.sweep.dir)
    write_plan(
        sweep_dir,
        [{"name": c.name, "engine": c.engine, "source": c.label, "seed": c.seed} for c in planned.cells],
        planned.skipped,
    )
    for reason in planned.skipped:
        log.warning("task=compare does not run %s", reason)
    jobs = [[*base, *cell.overrides()] for cell in planned.cells]
    pending = [job for cell, job in zip(planned.cells, jobs) if not _complete(sweep_dir / cell.name, job, compose)]
    done = len(jobs) - len(pending)
    state = (
        f"all {done} complete"
        if not pending
        else f"{done} complete, running the other {len(pending)}"
        if done
        else f"running all {len(pending)}"
    )
    log.info("task=compare: %d cells in %s; %s", len(jobs), sweep_dir, state)
    return pending


def _key(override: str) -> str:
    """The key an override sets (``attack.seed=0`` → ``attack.seed``)."""
    return override.split("=", 1)[0].lstrip("+~")


def _complete(folder: Path, job: List[str], compose: Callable[[List[str]], DictConfig]) -> bool:
    """Whether ``folder`` holds the finished cell of the overrides ``job``: a ``metrics.json`` whose
    fingerprint is that of ``job``'s config."""
    try:
        recorded = json.loads((folder / METRICS_FILE).read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return False
    try:
        cfg = compose(job)
    except (HydraException, OmegaConfBaseException, ValueError):  # the job fails alone when it is launched
        return False
    return recorded == cell_fingerprint(fitted(cfg, [_key(o) for o in job]))


def check(cfg: DictConfig, attack: AttackSettings) -> None:
    """The run is a cell of its compare's multirun and the lists name known engines and presets."""
    if HydraConfig.initialized() and HydraConfig.get().mode != RunMode.MULTIRUN:
        raise ConfigError(f"task=compare runs one job per (engine, source, seed) cell: add -m, e.g. {EXAMPLE}")
    cell_of(cfg)


def _score(
    own: Setup, victim: Victim, config: Any, sources: List[Any], v: Tensor, threat: ThreatModel
) -> Dict[str, Any]:
    """The cell's perturbation ``v`` on ``victim`` (fed ``own``'s eval images, v resized to them):
    its fooling rate beside the victim's random ℓp noise, whether it is white-box (the victim is,
    or is in, the ``sources``), the victim's accuracies and input size."""
    clean = own.predict(victim.net, own.eval_images)
    return {
        "fooling_rate": eval_fooling_rate(own, victim.net, fit_to_size(v, own.image_size, threat), clean),
        "white_box": any(_same_model(config, source) for source in sources),
        "random_fooling_rate": mean_fooling_rate(
            functools.partial(own.predict, victim.net, own.eval_images),
            clean,
            tuple(own.eval_images.shape[1:]),
            threat,
            torch.Generator().manual_seed(own.seed + 1),
        ),
        "clean_accuracy": metrics.accuracy(clean, own.eval_labels_for(victim)),
        "victim_accuracy": victim.test_accuracy,
        "input_size": own.image_size,
    }


def run(setup: Setup) -> Dict[str, Any]:
    """Compute the cell's perturbation, score it on every victim, write it and metrics.json."""
    cfg, threat = setup.cfg, setup.threat
    cell = cell_of(cfg)
    fingerprint = cell_fingerprint(cfg)  # the run's checks fitted its data already
    move_aside(setup.output_dir)
    configs = [model_preset(entry) for entry in cfg.task.victims]
    labels = ensemble_labels(configs)
    inputs = victim_inputs(setup, configs)  # the setup each victim is scored on, and built for
    victims = [own.victim(config, log_training=False) for config, own in zip(configs, inputs)]
    net, _ = setup.attacked()
    started = time.perf_counter()
    result = universal_perturbation(setup, net)
    seconds = time.perf_counter() - started
    v = result.perturbation
    sources = [model_preset(m) for m in cell.source] if len(cell.source) > 1 else [cfg.model]
    scores: Dict[str, Dict[str, Any]] = {}
    with Phase(log, f"scoring the perturbation and random noise on {len(victims)} victim(s)") as phase:
        for label, config, victim, own in zip(labels, configs, victims, inputs):
            phase.part(label)
            scores[label] = _score(own, victim, config, sources, v, threat)
    _write_perturbation(setup.output_dir, v)
    results = {
        "task": TASK_NAME,
        "cell": cell.name,
        "engine": cell.engine,
        "engine_label": engine_label(cfg.attack),
        "source": cell.label,
        "model": cell.label,
        "fingerprint": fingerprint,
        "attack_seconds": seconds,
        "norm_l2": metrics.norm_255(v, 2.0),
        "norm_linf": metrics.norm_255(v, float("inf")),
        "fooling_rate_attack_set": result.fooling_rate,
        "passes": result.passes,
        "best_pass": result.best_pass,
        "random_draws": DRAWS,
        "victims": scores,
    }
    table = pd.DataFrame(scores).T[["fooling_rate", "white_box", "random_fooling_rate", "clean_accuracy", "input_size"]]
    title = (
        f"{results['engine_label']} {threat.symbol} ε={threat.eps:g} on {cell.label}, attack seed {cell.seed} "
        f"({seconds:.1f} s, ‖v‖₂ {results['norm_l2']:.1f}): fooling rate on each victim"
    )
    return setup.finish(results, title, table.astype(object), scalars=_scalars(scores))


def _same_model(a: DictConfig, b: DictConfig) -> bool:
    """Whether the model configs ``a`` and ``b`` are the same settings (the same victim)."""
    return OmegaConf.to_container(a, resolve=True) == OmegaConf.to_container(b, resolve=True)


def _write_perturbation(run_dir: Path, v: torch.Tensor) -> None:
    """``perturbation.pt`` (C×H×W, [0,1] scale) and ``perturbation.npy`` (H×W×C, 0–255 units)."""
    v = v.detach().cpu().float().contiguous()
    atomic_write(run_dir / PERTURBATION_FILE, lambda f: torch.save(v, f))
    write_perturbation_npy(run_dir / PERTURBATION_NPY, v)


def _scalars(scores: Dict[str, Dict[str, Any]]) -> Dict[str, float]:
    """Each victim's rates as the loggers' ``compare/<victim>/fooling_rate`` and ``.../random_fooling_rate``."""
    return {
        f"compare/{victim}/{key}": float(s[key])
        for victim, s in scores.items()
        for key in ("fooling_rate", "random_fooling_rate")
    }


TASK = Task("compare", CompareTaskConfig, run, check)

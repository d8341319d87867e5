"""The attack task (``task=attack``, the default): one universal perturbation, evaluated.

Writes in the run folder: ``perturbation.pt``, ``perturbation.png``, ``curve.png``,
``examples.png``, ``labels.png``, TensorBoard events and, last, ``metrics.json``; the attack
state after each pass (``attack_state.ckpt``) lets the same command continue an interrupted
attack in the same folder. A generative engine (``attack=gap``) is trained by a Lightning Trainer
instead: its checkpoint (``last.ckpt``) plays the attack state's part, also when
``attack.max_passes`` is raised, and ``generator.pt`` holds the generator of the kept pass.
``attack_settings.json`` records the settings either was saved under, so that a run with other
settings can say which changed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import signal
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, cast

import torch
from lightning.fabric import Fabric
from lightning.fabric.plugins.environments import LightningEnvironment
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from uap_lightning import metrics
from uap_lightning.atomic import atomic_write_text
from uap_lightning.attacks import (
    AttackSettings,
    Ensemble,
    engine_class,
)
from uap_lightning.attacks.engines.gap import GAP
from uap_lightning.baselines import RandomBaselines, random_baselines
from uap_lightning.config import engine_label
from uap_lightning.errors import ConfigError, DamagedFileError, UserError
from uap_lightning.keys import keyed_hash
from uap_lightning.loggers import (
    instantiate_callbacks,
    instantiate_loggers,
    report_to_loggers,
    run_hparams,
)
from uap_lightning.loop import (
    AttackLoop,
    AttackOutcome,
    AttackProgressBar,
    AttackState,
    EvaluationSettings,
    train_generator,
)
from uap_lightning.models.gap_module import read_training_state
from uap_lightning.report import figures
from uap_lightning.report.outputs import write_run_outputs
from uap_lightning.report.summary import attack_summary, result_warnings, victim_name
from uap_lightning.rundir import GENERATOR_CHECKPOINT, METRICS_FILE, SETTINGS_FILE, STATE_FILE, move_aside
from uap_lightning.task_configs import AttackTaskConfig
from uap_lightning.tasks.setup import Setup, Task, progress_bars, victim_label_names
from uap_lightning.training import Victim

log = logging.getLogger(__name__)


# The settings whose change makes an earlier attack state of no use.
_FINGERPRINT_KEYS = ("data", "model", "trainer", "attack", "task", "seed")
# channels_last stays in: the memory format changes the convolutions' rounding, and a sign-step attack's path
_NOT_IN_FINGERPRINT = ("resume", "progress", "eval_batch_size", "compile", "devices", "strategy")
_FINAL_KEYS = (
    "fooling_rate",
    "fooling_rate_attack_set",
    "perturbed_accuracy",
    "clean_accuracy",
    "random_fooling_rate",
    "random_same_l2_fooling_rate",
    "norm_l2",
    "norm_linf",
    "victim_accuracy",
    "best_pass",
    "attack_seconds",
    "beats_random",
)
SELECTIONS = ("attack_set", "holdout")
_TARGETED_KEYS = ("targeted_success_rate", "targeted_success_rate_attack_set")
_HISTORY_KEYS = (
    "pass",
    "fooling_rate",
    "fooling_rate_attack_set",
    "perturbed_accuracy",
    "norm_l2",
    "norm_linf",
    "updates",
    "mean_inner_iterations",
    "seconds",
    "targeted_success_rate",
    "targeted_success_rate_attack_set",
)


def fingerprinted_settings(cfg: DictConfig, data_fingerprint: str, ignored: Tuple[str, ...] = ()) -> Dict[str, Any]:
    """Everything that determines the attack's result (not paths, loggers, resume), but the
    ``ignored`` attack keys: the groups of ``_FINGERPRINT_KEYS`` and the data's fingerprint."""
    settings: Dict[str, Any] = {
        key: OmegaConf.to_container(cfg[key], resolve=True) if key != "seed" else cfg.seed for key in _FINGERPRINT_KEYS
    }
    for key in (*_NOT_IN_FINGERPRINT, *ignored):
        settings["attack"].pop(key, None)
    settings["data_fingerprint"] = data_fingerprint
    return settings


def settings_fingerprint(cfg: DictConfig, data_fingerprint: str, ignored: Tuple[str, ...] = ()) -> str:
    """Hash of :func:`fingerprinted_settings`."""
    return keyed_hash(fingerprinted_settings(cfg, data_fingerprint, ignored))


def flat_settings(settings: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``settings`` as one level of dotted keys (``attack.eps``) with JSON values, as the settings
    record keeps them."""
    flat: Dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update(flat_settings(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.loads(json.dumps(value, default=str))
    return flat


def record_settings(run_dir: Path, fingerprint: str, settings: Dict[str, Any]) -> None:
    """Write the settings record (``attack_settings.json``): the flat ``settings`` the attack state
    or generator checkpoint of ``run_dir`` is saved under, with their ``fingerprint``."""
    record = {"fingerprint": fingerprint, "settings": settings}
    atomic_write_text(run_dir / SETTINGS_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")


def _changed_settings(run_dir: Path, saved_fingerprint: str, settings: Optional[Dict[str, Any]]) -> str:
    """ "attack.eps changed 10 → 8, ... since the saved state: " for the keys whose values differ
    between ``settings`` and the record of the state saved under ``saved_fingerprint``; "" when no
    such record is found (a state saved before runs recorded their settings) or no key differs."""
    if settings is None:
        return ""
    try:
        record = json.loads((run_dir / SETTINGS_FILE).read_text(encoding="utf-8"))
        saved = record["settings"] if record["fingerprint"] == saved_fingerprint else None
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    if not isinstance(saved, dict):
        return ""
    settings = flat_settings(settings)
    changed = [
        key for key in sorted({*saved, *settings}) if not _same(saved.get(key, _ABSENT), settings.get(key, _ABSENT))
    ]
    if not changed:
        return ""
    shown = [
        "the data's images changed"
        if key == "data_fingerprint"
        else f"{key} changed {_shown(saved.get(key, _ABSENT))} → {_shown(settings.get(key, _ABSENT))}"
        for key in changed[:_MAX_CHANGES]
    ]
    more = f" and {len(changed) - _MAX_CHANGES} more" if len(changed) > _MAX_CHANGES else ""
    return f"{', '.join(shown)}{more} since the saved state: "


_ABSENT = object()
_MAX_CHANGES = 8  # changed keys named in one warning


def _same(a: Any, b: Any) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def _shown(value: Any) -> str:
    """``value`` as a command line would set it: 10 (not 10.0), inf, true, null."""
    if value is _ABSENT:
        return "(absent)"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:g}" if math.isinf(value) or math.isnan(value) or value != int(value) else str(int(value))
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str)


def make_fabric(cfg: DictConfig, setup: Setup, name: str = "attack") -> Fabric:
    """A Fabric on ``attack.devices`` devices (several: processes it spawns, see
    :func:`attack_fabric_settings`) with the run's loggers (a run named ``name`` each), the progress
    display and the run's attack callbacks (the ``callbacks`` group's non-Lightning entries)."""
    progress = AttackProgressBar(enabled=progress_bars(cfg) and cfg.attack.progress, lines=cfg.attack.progress)
    return Fabric(
        accelerator=cfg.trainer.accelerator,
        loggers=instantiate_loggers(cfg.logger, name),
        callbacks=[progress, *instantiate_callbacks(cfg.callbacks)["attack"]],
        **attack_fabric_settings(cfg.attack),
    )


def attack_fabric_settings(attack_cfg: Any) -> Dict[str, Any]:
    """Fabric's ``devices`` (and, for several, ``strategy`` and cluster environment) for the
    attack. Several devices take ``ddp_spawn`` (``attack.strategy=auto`` too): the processes are
    spawned from this one, and Lightning's own environment numbers them, so SLURM's or torchrun's
    variables (one task per node) do not."""
    if attack_cfg.devices == 1:
        return {"devices": 1}
    strategy = "ddp_spawn" if attack_cfg.strategy == "auto" else attack_cfg.strategy
    return {"devices": attack_cfg.devices, "strategy": strategy, "plugins": [LightningEnvironment()]}


def attack_loop(setup: Setup, fabric: Fabric, fingerprint: str = "") -> AttackLoop:
    """The loop of the run's attack settings; it saves its state in the run folder."""
    return AttackLoop(
        fabric=fabric,
        settings=setup.attack,
        evaluation=EvaluationSettings(setup.cfg.attack.channels_last),
        state_path=setup.output_dir / STATE_FILE,
        fingerprint=fingerprint,
    )


def _resumable(
    state_path: Path, fingerprint: str, resume: bool, settings: Optional[Dict[str, Any]] = None
) -> Optional[AttackState]:
    """The state saved at ``state_path`` to continue from, when resuming is on and the state was
    saved with these settings (``fingerprint``, the hash of ``settings``: those that changed are
    named when the run folder's settings record tells)."""
    try:
        state = AttackState.load(state_path)
    except DamagedFileError as err:
        log.warning("%s; starting afresh", err)
        return None
    if state is None or not resume:
        return None
    if state.fingerprint != fingerprint:
        changes = _changed_settings(state_path.parent, state.fingerprint, settings)
        log.warning("%sthe run folder holds an attack with other settings; starting afresh", changes)
        return None
    log.info("continuing the attack saved after pass %d in %s", state.passes, state_path)
    return state


def _resumable_generator(
    path: Path, fingerprint: str, resume: bool, max_passes: int, settings: Optional[Dict[str, Any]] = None
) -> Optional[int]:
    """The passes of the generator checkpoint at ``path`` (``attack=gap``) to continue from, when
    resuming is on, the checkpoint was saved with these settings (``fingerprint``, the hash of
    ``settings``, which leave out ``attack.max_passes``; those that changed are named when the run
    folder's settings record tells) and holds at most ``max_passes`` passes."""
    try:
        state = read_training_state(path)
    except DamagedFileError as err:
        log.warning("%s; starting afresh", err)
        return None
    if state is None or not resume:
        return None
    if state.get("fingerprint") != fingerprint:
        changes = _changed_settings(path.parent, str(state.get("fingerprint")), settings)
        log.warning("%sthe run folder holds a generator trained with other settings; starting afresh", changes)
        return None
    passes = len(state["history"])
    if passes > max_passes:
        log.warning(
            "the run folder holds a generator trained for %d passes, more than attack.max_passes=%d; starting afresh",
            passes,
            max_passes,
        )
        return None
    log.info("continuing the generator saved after pass %d in %s", passes, path)
    return passes


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Inside, SIGTERM raises KeyboardInterrupt like Ctrl-C (main thread only; restored after)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(setup: Setup) -> Dict[str, Any]:
    """Compute, evaluate and write one universal perturbation; return the results written.

    Raises KeyboardInterrupt after writing the outputs of an interrupted attack.
    """
    cfg = setup.cfg
    setup, holdout = split_holdout(setup)
    generative = issubclass(engine_class(setup.attack.method), GAP)
    # more passes continue the same training of a generator: max_passes stays out of its fingerprint
    settings = fingerprinted_settings(cfg, setup.datamodule.fingerprint(), ("max_passes",) if generative else ())
    fingerprint = keyed_hash(settings)
    if generative:
        state = None
        resume_passes = _resumable_generator(
            setup.output_dir / GENERATOR_CHECKPOINT, fingerprint, cfg.attack.resume, setup.attack.max_passes, settings
        )
    else:
        state = _resumable(setup.output_dir / STATE_FILE, fingerprint, cfg.attack.resume, settings)
        resume_passes = None
    if state is None and resume_passes is None:
        move_aside(setup.output_dir)  # before any logger writes into the run folder
    else:
        (setup.output_dir / METRICS_FILE).unlink(missing_ok=True)
    record_settings(setup.output_dir, fingerprint, flat_settings(settings))  # beside the state the loop saves
    fabric = make_fabric(cfg, setup)
    loop = attack_loop(setup, fabric, fingerprint)
    net, members = setup.attacked()  # batch norm folded: the same function, faster to run and differentiate
    victim = members[0]
    eval_labels = setup.eval_labels_for(victim)
    with sigterm_interrupts():
        if generative:
            outcome = train_generator(
                loop,
                cast(GAP, setup.attack.engine()),  # generative: a GAP engine
                net,
                setup.attack_images,
                setup.eval_images,
                eval_labels,
                trainer_settings=generator_trainer_settings(cfg.trainer),
                run_dir=setup.output_dir,
                resume_passes=resume_passes,
            )
        else:
            outcome = loop.run(net, setup.attack_images, setup.eval_images, eval_labels, resume=state)
    baselines = random_baselines(
        lambda noise: loop.predict(net, setup.eval_images, noise),
        outcome.clean_eval_labels,
        setup.eval_images.shape[1:],
        setup.threat,
        outcome.result.perturbation,
        seed=setup.seed + 1,
    )
    label_names = victim_label_names(setup.class_names, victim)
    dominant = figures.dominant_labels(outcome.clean_eval_labels, outcome.perturbed_eval_labels, len(label_names))
    fooling_on_x = outcome.result.fooling_rate
    if setup.attack.target_class is not None:  # the result's rate is the targeted one: measure fooling on X
        kept_x = setup.predict(net, setup.attack_images, outcome.result.perturbation)
        fooling_on_x = metrics.fooling_rate(setup.predict(net, setup.attack_images), kept_x)
    results = attack_metrics(setup, victim, outcome, fooling_on_x, baselines, dominant, label_names)
    if isinstance(net, Ensemble):
        results.update(ensemble_metrics(setup, net, outcome.result.perturbation))
        results["victim_accuracy"] = results["clean_accuracy"]  # the ensemble's own
    selected = fooling_on_x
    if holdout is not None:
        selected = metrics.fooling_rate(
            setup.predict(net, holdout), setup.predict(net, holdout, outcome.result.perturbation)
        )
        results.update(fooling_rate_holdout=selected, holdout_images=len(holdout))
    results["objective"] = objective(selected, setup.threat.eps, cfg.task.target_fooling_rate)
    run_figures = attack_figures(setup, eval_labels, outcome, results, dominant, label_names)
    final = {f"final/{k}": float(results[k]) for k in _FINAL_KEYS + _TARGETED_KEYS if k in results}
    # the loggers the passes went to: the figures and final numbers at the last pass of the same run
    report_to_loggers(
        fabric.loggers,
        run_hparams(cfg, setup.attack),
        final,
        prefix="attack",
        figures=run_figures,
        step=results["passes"],
    )
    write_run_outputs(setup.output_dir, outcome.result.perturbation, run_figures, results)
    for line in attack_summary(results, setup.output_dir):
        log.info(line)
    for warning in result_warnings(results):
        log.warning(warning)
    if outcome.interrupted:
        raise KeyboardInterrupt(
            f"interrupted after pass {results['passes']}; run the same command again in the same run folder to continue"
        )
    return results


def attack_metrics(
    setup: Setup,
    victim: Victim,
    outcome: AttackOutcome,
    fooling_on_x: float,
    baselines: RandomBaselines,
    dominant: figures.DominantLabels,
    label_names: List[str],
) -> Dict[str, Any]:
    """metrics.json's content for an attack run; ``fooling_on_x`` is the fooling rate of the kept
    perturbation on X (in targeted mode the attack's own rate on X is the targeted success rate)."""
    cfg, final, result = setup.cfg, outcome.final, outcome.result
    results: Dict[str, Any] = {
        "fooling_rate": final["fooling_rate"],
        "fooling_rate_attack_set": fooling_on_x,
        "clean_accuracy": final["clean_accuracy"],
        "perturbed_accuracy": final["perturbed_accuracy"],
        "random_fooling_rate": baselines.same_norm,
        "random_same_l2_fooling_rate": baselines.same_l2,
        "random_draws": baselines.draws,
        "beats_random": baselines.beaten_by(final["fooling_rate"]),
        "norm_l2": final["norm_l2"],
        "norm_linf": final["norm_linf"],
        "eps": setup.threat.eps,
        "p": setup.threat.p_name,
        "delta": setup.attack.delta,
        "method": setup.attack.method,
        "engine": engine_label(cfg.attack),
        "keep": setup.attack.keep,
        "best_pass": result.best_pass,
        "passes": result.passes,
        "converged": result.converged,
        "interrupted": outcome.interrupted,
        "attack_seconds": final["attack_seconds"],
        "victim_accuracy": victim.test_accuracy if victim.test_accuracy is not None else final["clean_accuracy"],
        "victim_source": victim.source,
        "victim_train_seconds": victim.train_seconds,
        "attack_images": len(setup.attack_images),
        "eval_images": len(setup.eval_images),
        "eval_source": setup.datamodule.eval_source,
        "dominant_label": dominant.label,
        "dominant_label_name": None if dominant.label is None else label_names[dominant.label],
        "dominant_label_share": dominant.share,
        "num_classes": setup.num_classes,
        "data": cfg.data.name,
        "model": cfg.model.name,
        "model_settings": setup.victim_settings(),
        "seed": cfg.seed,
        "attack_seed": setup.seed,
        "threads": torch.get_num_threads(),
        "history": [{k: record[k] for k in _HISTORY_KEYS if k in record} for record in outcome.history],
    }
    if cfg.task.target_fooling_rate is not None:
        results["target_fooling_rate"] = cfg.task.target_fooling_rate
    if setup.attack.target_class is not None:
        results["target_class"] = setup.attack.target_class
        results["targeted_success_rate"] = final["targeted_success_rate"]
        results["targeted_success_rate_attack_set"] = result.fooling_rate
    return results


def ensemble_metrics(setup: Setup, net: Ensemble, perturbation: Tensor) -> Dict[str, Any]:
    """What metrics.json adds for an attack on an ensemble: the members' names as the model, and each
    member's fooling rate on the eval set (fed the images at its input size) and input size."""
    members = {}
    for index, name in enumerate(net.names):
        member = net.member(index)
        clean = setup.predict(member, setup.eval_images)
        members[name] = {
            "fooling_rate": metrics.fooling_rate(clean, setup.predict(member, setup.eval_images, perturbation)),
            "input_size": net.sizes[index] or setup.image_size,
        }
    return {"model": "+".join(net.names), "ensemble": members}


def split_holdout(setup: Setup) -> Tuple[Setup, Optional[Tensor]]:
    """With ``task.selection=holdout``: the setup with X reduced to the attack's part, and the
    held-out images (``task.holdout_fraction`` of X, drawn with the attack seed); else (setup, None)."""
    if setup.cfg.task.selection != "holdout":
        return setup, None
    order = torch.randperm(len(setup.attack_images), generator=torch.Generator().manual_seed(setup.seed))
    held = max(1, int(round(setup.cfg.task.holdout_fraction * len(order))))
    if held >= len(order):
        raise ConfigError(
            f"task.holdout_fraction={setup.cfg.task.holdout_fraction} of {len(order)} images leaves none "
            "to attack; lower it or raise data.attack_images"
        )
    kept = order[held:].sort().values
    reduced = dataclasses.replace(
        setup, attack_images=setup.attack_images[kept], attack_labels=setup.attack_labels[kept]
    )
    return reduced, setup.attack_images[order[:held].sort().values]


def objective(fooling_rate: float, eps: float, target: Optional[float]) -> float:
    """What Hydra sweepers optimise: the fooling rate (maximise), or, with a target fooling rate,
    ε + 255·max(0, target − fooling rate)/target (minimise: ε once the target is reached)."""
    if target is None:
        return fooling_rate
    return eps + 255.0 * max(0.0, target - fooling_rate) / target


def generator_trainer_settings(trainer_cfg: Any) -> Dict[str, Any]:
    """The run's ``trainer`` settings the Trainer of a generative engine takes: device kind,
    precision and determinism (its epochs are the attack's passes, its devices the attack's one)."""
    return {
        "accelerator": trainer_cfg.accelerator,
        "precision": trainer_cfg.precision,
        "deterministic": trainer_cfg.deterministic,
    }


def check_generator(cfg: DictConfig, attack: AttackSettings) -> None:
    """ConfigError for settings a generative engine (``attack=gap``) trained by a Lightning Trainer
    cannot take (several devices, augmentation, compiled predictions), images too small for its
    generator, and ``attack.generator_weights`` of another shape than that generator."""
    for key, refused in (
        ("devices", cfg.attack.devices != 1),
        ("augment", attack.augment),
        ("compile", attack.compile),
    ):
        if refused:
            raise ConfigError(
                f"attack={attack.method} trains its generator with a Lightning Trainer on one device, "
                f"on X as it is; attack.{key}={cfg.attack[key]} is not supported with it"
            )
    try:
        # called for generative engines only: a GAP engine
        cast(GAP, attack.engine()).build((cfg.data.in_channels, cfg.data.image_size, cfg.data.image_size))
    except UserError:
        raise
    except ValueError as err:  # images too small for the generator
        raise ConfigError(str(err)) from None


def check(cfg: DictConfig, attack: AttackSettings) -> None:
    """A target fooling rate, when given, lies in (0, 1]; the selection is known and leaves X and
    the holdout at least one image each; a generative engine's settings fit it (:func:`check_generator`)."""
    if cfg.task.selection not in SELECTIONS:
        raise ConfigError(f"task.selection must be one of {', '.join(SELECTIONS)}; got {cfg.task.selection!r}")
    if cfg.task.selection == "holdout" and not 0.0 < cfg.task.holdout_fraction < 1.0:
        raise ConfigError(f"task.holdout_fraction must lie in (0, 1); got {cfg.task.holdout_fraction}")
    target = cfg.task.target_fooling_rate
    if target is not None and not 0.0 < target <= 1.0:
        raise ConfigError(f"task.target_fooling_rate must lie in (0, 1] or be null; got {target}")
    if issubclass(engine_class(attack.method), GAP):
        check_generator(cfg, attack)


def attack_figures(
    setup: Setup,
    eval_labels: Tensor,
    outcome: AttackOutcome,
    m: Dict[str, Any],
    dominant: figures.DominantLabels,
    label_names: List[str],
) -> Dict[str, Figure]:
    """curve, perturbation, examples and labels figures of an attack run."""
    v = outcome.result.perturbation
    count = max(1, min(setup.cfg.extras.example_images, len(setup.eval_images)))
    fooled = outcome.clean_eval_labels.cpu() != outcome.perturbed_eval_labels.cpu()
    chosen = figures.pick_examples(setup.eval_labels, count, seed=setup.seed, first_class=dominant.label, fooled=fooled)
    clean = setup.eval_images[chosen]
    title = (
        f"{m.get('engine', m['method'])} {setup.threat.symbol} ε={m['eps']:g}: fooling rate {m['fooling_rate']:.2f}"
        f"\n{figures.examples_caption(fooled[chosen])}"
    )
    return {
        "curve": figures.curve_figure(
            outcome.history,
            m["best_pass"] or None,
            {
                f"random {setup.threat.symbol} noise": m["random_fooling_rate"],
                "random direction, same ℓ2": m["random_same_l2_fooling_rate"],
            },
            title=f"{m['method']} {setup.threat.symbol} ε={m['eps']:g} on {victim_name(m)}",
        ),
        "perturbation": figures.perturbation_figure(v, setup.threat),
        "examples": figures.examples_figure(
            clean,
            metrics.perturb(clean, v.to(clean.device)),
            eval_labels[chosen].tolist(),
            outcome.clean_eval_labels[chosen].tolist(),
            outcome.perturbed_eval_labels[chosen].tolist(),
            label_names,
            title,
        ),
        "labels": figures.labels_figure(dominant, label_names),
    }


TASK = Task("attack", AttackTaskConfig, run, check, objective="objective")

"""The stack's own loggers and callbacks, from ``_target_`` configs (the ``logger`` and ``callbacks``
groups, as in the Lightning-Hydra template), and what a run reports to the loggers.

``logger`` maps names to logger configs (``logger=[tensorboard,csv]`` composes two); each phase of
a run (victim training, the attack, a task's report) gets its own instance, told apart by the
logger's own run name (TensorBoard: ``<run dir>/tensorboard/<what ran>/<phase>``, the middle folder
from the ``uap_run_name`` resolver, e.g. ``deepfool_uap-linf-eps10-cnn-digits``; CSV:
``<run dir>/csv/<phase>``; wandb: the run's name; MLflow: the run name). wandb and MLflow keep
their console lines to themselves (their files in the run folder keep them). ``callbacks`` maps
names to callback configs: Lightning callbacks go to the Trainer that trains the victim, any other
object to the attack's Fabric (its ``on_attack_start``/``on_attack_pass_end``/``on_passes_done``/
``on_attack_end`` hooks).

A run's HPARAMS (:func:`run_hparams`) are flat ``group/key`` names with values of their own type and
no nulls: in a sweep the keys the job sets, in a single run the attack, victim, data and seed.

Only classes of an allow-list of packages are instantiated (:func:`check_targets`): a config file
names a class to build, and a class can run code when built.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from lightning.fabric.loggers import Logger
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.utils.tensorboard.summary import hparams as hparams_summary

from uap_lightning.attacks import AttackSettings
from uap_lightning.errors import ConfigError

# Packages whose classes a ``_target_`` in a logger or callback config may name.
ALLOWED_TARGET_PACKAGES = (
    "lightning.pytorch.loggers.",
    "lightning.fabric.loggers.",
    "lightning.pytorch.callbacks.",
    "uap_lightning.",
)
# The argument of each logger class (and its subclasses) that names the run of one phase.
PHASE_ARGUMENTS = {
    "TensorBoardLogger": "version",
    "CSVLogger": "version",
    "WandbLogger": "name",
    "MLFlowLogger": "run_name",
}
# Groups of a run's config that say where and how it reports, not what it computes: never hparams.
NOT_HPARAMS = ("hydra", "paths", "logger", "callbacks", "extras")
# Library loggers whose information lines (database set-up, migrations) stay off the console.
QUIET_LIBRARY_LOGGERS = ("mlflow", "alembic")

HParam = Union[bool, int, float, str]
_ABSENT = object()  # what OmegaConf.select returns for a key the config lacks


def check_targets(group: str, configs: Mapping[str, Any]) -> None:
    """ConfigError naming ``<group>.<name>`` for an entry without a ``_target_`` or whose class lies
    outside :data:`ALLOWED_TARGET_PACKAGES`."""
    for name, config in (configs or {}).items():
        target = config.get("_target_") if isinstance(config, Mapping) else None
        if not isinstance(target, str):
            raise ConfigError(f"{group}.{name} needs a _target_: the class to build")
        if not target.startswith(ALLOWED_TARGET_PACKAGES):
            raise ConfigError(
                f"{group}.{name}._target_={target} is not allowed: {group} entries may build classes of "
                f"{', '.join(p.rstrip('.') for p in ALLOWED_TARGET_PACKAGES)} only"
            )


def instantiate_loggers(configs: Mapping[str, Any], phase: str) -> List[Logger]:
    """One logger per entry of ``configs`` (the ``logger`` group), each naming its run ``phase``."""
    check_targets("logger", configs)
    loggers = []
    for config in (configs or {}).values():
        logger_class = get_class(str(config["_target_"]))
        argument = next(
            (PHASE_ARGUMENTS[c.__name__] for c in logger_class.__mro__ if c.__name__ in PHASE_ARGUMENTS), None
        )
        _quiet(logger_class, offline=bool(config.get("offline", False)))
        loggers.append(instantiate(config, **({argument: phase} if argument else {})))
    return loggers


def _quiet(logger_class: type, offline: bool) -> None:
    """Before a logger of ``logger_class`` is built, keep its banners, tips and set-up lines off the
    console: wandb silent (and ``offline`` as its config says); MLflow's and its database's
    information lines, and Lightning's note that it creates the MLflow experiment, dropped."""
    if issubclass(logger_class, WandbLogger):
        import wandb

        # the process's wandb settings, before its first run: a run's own settings apply only after
        # wandb has printed its first warnings
        mode: Dict[str, Any] = {"mode": "offline"} if offline else {}
        wandb.setup(settings=wandb.Settings(silent=True, **mode))
    elif issubclass(logger_class, MLFlowLogger):
        import mlflow  # noqa: F401  (it sets its loggers' levels on import; they are set here after)

        for name in QUIET_LIBRARY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        lightning_mlflow = logging.getLogger("lightning.pytorch.loggers.mlflow")
        if not any(isinstance(f, _NewExperimentLine) for f in lightning_mlflow.filters):
            lightning_mlflow.addFilter(_NewExperimentLine())


class _NewExperimentLine(logging.Filter):
    """Drops Lightning's warning that an MLflow experiment is created: the first run of every new
    store creates it, which asks nothing of the user."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Experiment with name")


class PhaseWandbLogger(WandbLogger):
    """Lightning's WandbLogger with a wandb run of its own for each phase: a run that an earlier
    phase left open in this process is finished, not joined (Lightning's logger joins it). wandb's
    cache, config, data and artifact folders lie in ``save_dir`` (the run folder) instead of the
    home folder, and its error reporting is off (variables the user set win); only the debug logs
    of wandb's own service processes go to the user's cache folder (``~/.cache/wandb/logs``)."""

    def __init__(self, *args: Any, save_dir: str = ".", **kwargs: Any) -> None:
        for variable, folder in (
            ("WANDB_CACHE_DIR", "cache"),
            ("WANDB_CONFIG_DIR", "config"),
            ("WANDB_DATA_DIR", "data"),
            ("WANDB_ARTIFACT_DIR", "artifacts"),
        ):
            os.environ.setdefault(variable, os.path.join(save_dir, "wandb", folder))
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        kwargs["save_dir"] = save_dir  # by keyword: *args holds at most the run's name
        super().__init__(*args, **kwargs)

    @property
    def experiment(self) -> Any:
        """The phase's wandb run, started on first use."""
        if self._experiment is None:
            import wandb

            if wandb.run is not None:
                wandb.finish()
        return super().experiment


class LocalMLFlowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger with MLflow's usage telemetry off (it writes
    ``~/.config/mlflow/telemetry.json`` and reports usage otherwise; a user's own
    ``MLFLOW_DISABLE_TELEMETRY`` wins), so that a run writes only into its run folder."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        super().__init__(*args, **kwargs)


def run_hparams(cfg: DictConfig, attack: AttackSettings) -> Dict[str, HParam]:
    """The run's HPARAMS: the settings that tell it apart, as flat ``group/key`` names, nulls left
    out. A job of a sweep: the settings the job's overrides set (``attack/eps``; a config group by
    its option: ``model``). A single run: the settings its overrides set, and the attack (ε in 0–255
    units, the engine's options), the victim, the data, the seeds and the size of X."""
    overrides, sweep = _job_overrides()
    params = _override_values(cfg, overrides)
    if not sweep:
        params.update(_key_settings(cfg, attack))  # ε in 0–255 units, whatever units it was given in
    return {key: value for key, value in params.items() if value is not None}


def _key_settings(cfg: DictConfig, attack: AttackSettings) -> Dict[str, Any]:
    """The settings that determine a single run's perturbation."""
    settings = {
        "method": attack.method,
        "eps": attack.threat.eps,
        "p": attack.threat.p_name,
        "delta": attack.delta,
        "max_passes": attack.max_passes,
        "keep": attack.keep,
        "clip": attack.clip,
        "target_class": attack.target_class,
        "seed": attack.seed,
        "augment": attack.augment,
        "input_diversity": attack.input_diversity or None,
        "resolution": attack.resolution,
        "ensemble": "+".join(
            str(OmegaConf.select(OmegaConf.create({"e": e}), "e.preset") or e) for e in cfg.attack.get("ensemble") or []
        )
        or None,
        **attack.options,
    }
    return {
        **{f"attack/{key}": value for key, value in settings.items()},
        "model": cfg.model.name,
        "model/arch": cfg.model.get("arch"),
        "data": cfg.data.name,
        "data/attack_images": cfg.data.get("attack_images"),
        "seed": cfg.seed,
    }


def _job_overrides() -> Tuple[Sequence[str], bool]:
    """(this Hydra job's command-line overrides, whether it is a job of a multirun); ((), False)
    outside a Hydra app."""
    if not HydraConfig.initialized():
        return (), False
    hydra_cfg = HydraConfig.get()
    return list(hydra_cfg.overrides.task), hydra_cfg.mode == RunMode.MULTIRUN


def _override_values(cfg: DictConfig, overrides: Sequence[str]) -> Dict[str, Any]:
    """``{group/key: value}`` of the settings ``overrides`` set, each of the type the run's config
    holds; a config group (``model=cnn``, ``experiment=...``) or a list by the override's text;
    deletions, nulls and the groups of :data:`NOT_HPARAMS` left out."""
    values: Dict[str, Any] = {}
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if override.is_delete() or re.split(r"[./]", key)[0] in NOT_HPARAMS:
            continue
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is _ABSENT or isinstance(value, (DictConfig, ListConfig)):
            value = override.get_value_string()
        if value is not None:
            values[key.replace(".", "/")] = value
    return values


def log_outcome(
    logger: Logger, hparams: Mapping[str, HParam], metrics: Mapping[str, float], step: Optional[int] = None
) -> None:
    """A run's ``hparams`` and final ``metrics`` to ``logger``: TensorBoard files them as the run's
    HPARAMS entry (the metrics as scalars at step 0); the others get the hparams as parameters and
    the metrics at ``step``."""
    if isinstance(logger, TensorBoardLogger):
        log_session(logger, hparams, metrics)
        return
    logger.log_hyperparams(dict(hparams))
    if metrics:
        logger.log_metrics(dict(metrics), step=step)


def report_to_loggers(
    loggers: Iterable[Logger],
    hparams: Mapping[str, HParam],
    final: Mapping[str, float],
    *,
    prefix: str,
    figures: Optional[Mapping[str, Any]] = None,
    step: Optional[int] = None,
    steps: Optional[Mapping[int, Mapping[str, float]]] = None,
    text: Optional[str] = None,
) -> None:
    """A finished run's report to each of ``loggers``, which it then finalises: ``steps`` (step →
    {tag: value}) at their steps, then the ``hparams`` with the ``final`` numbers
    (:func:`log_outcome`, at ``step``); TensorBoard also gets the ``figures`` (matplotlib figures,
    ``<prefix>/<name>`` at ``step``) and ``text`` (``<prefix>/table``)."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            for name, figure in (figures or {}).items():
                logger.experiment.add_figure(f"{prefix}/{name}", figure, global_step=step, close=False)
            if text is not None:
                logger.experiment.add_text(f"{prefix}/table", text)
        for at, values in sorted((steps or {}).items()):
            logger.log_metrics(dict(values), step=at)
        log_outcome(logger, hparams, final, step=step)
        logger.finalize("success")


def log_session(logger: TensorBoardLogger, hparams: Mapping[str, HParam], metrics: Mapping[str, float]) -> None:
    """The run as one session of TensorBoard's HParams view: its ``hparams`` and its ``metrics``
    (scalars at step 0). Only the session's own records are written, no experiment record: a
    logdir holding one would make TensorBoard show that run's metrics alone for every session
    (attack, sweep, transfer and geometry runs each log other metrics); without one it lists the
    metrics of all the sessions under the logdir."""
    if metrics:
        logger.log_metrics(dict(metrics), step=0)
    _, session_start, session_end = hparams_summary(dict(hparams), dict(metrics))
    writer = logger.experiment._get_file_writer()
    writer.add_summary(session_start)
    writer.add_summary(session_end)
    logger.experiment.flush()


def instantiate_callbacks(configs: Mapping[str, Any]) -> Dict[str, List[Any]]:
    """The ``callbacks`` group built: ``{"training": [Lightning callbacks], "attack": [the others]}``."""
    check_targets("callbacks", configs)
    built = [instantiate(config) for config in (configs or {}).values()]
    return {
        "training": [c for c in built if isinstance(c, L.Callback)],
        "attack": [c for c in built if not isinstance(c, L.Callback)],
    }

"""Checks of a run's settings that need neither data nor a model, done before any heavy work."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from uap_lightning.attacks import AttackSettings, ThreatModel, engine_class, ensemble_engines
from uap_lightning.attacks.projections import check_resolution
from uap_lightning.attacks.threat import p_name
from uap_lightning.config import attack_schemas, model_preset
from uap_lightning.config_errors import engines_taking, other_engines_option_message, unknown_key_message
from uap_lightning.data import dataset_class
from uap_lightning.data.sample_folder import no_training_split_message
from uap_lightning.errors import ConfigError
from uap_lightning.loggers import check_targets
from uap_lightning.models.layouts import renames
from uap_lightning.models.zoo import IMAGENET_PRETRAINED, check_weights_source
from uap_lightning.training import check_training_processes, resolve_adversarial
from uap_lightning.victim_input import command_line_keys, victim_input

log = logging.getLogger(__name__)

_GPU_ACCELERATORS = ("gpu", "cuda")
# attack.strategy: the attack spawns its processes from this one (auto: ddp_spawn for several devices)
ATTACK_STRATEGIES = ("auto", "ddp_spawn")


def check_schema(cfg: DictConfig) -> None:
    """Refuse keys the schema does not know, including those added with ``+`` (Hydra lets
    ``+key=value`` through a structured config), and an ``attack.method`` or ``task.name``
    that differs from the preset chosen with ``attack=NAME`` / ``task=NAME`` (each preset's schema
    names its engine or task in the default of that key)."""
    for group, name_key in (("attack", "method"), ("task", "name")):
        node = cfg[group]
        chosen = node[name_key]
        preset = _schema_default(OmegaConf.get_type(node), name_key)
        if chosen != preset:
            known = f"; choose one of {', '.join(attack_schemas())}" if group == "attack" else ""
            raise ConfigError(
                f"{group}.{name_key}={chosen} does not match the {group} preset ({group}={preset}); pick it with "
                f"{group}={chosen} (its settings differ) instead of {group}.{name_key}={chosen}{known}"
            )
    _check_known_keys(cfg, "")


def _schema_default(schema: Any, key: str) -> Any:
    """The default of field ``key`` of the dataclass ``schema`` (None: not a dataclass or no such field)."""
    fields = {f.name: f.default for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else {}
    return fields.get(key)


def _check_known_keys(node: Any, prefix: str) -> None:
    if not isinstance(node, DictConfig):
        return
    schema = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(schema):
        known = [f.name for f in dataclasses.fields(schema)]
        unknown = [key for key in node.keys() if key not in known]
        if unknown:
            name = str(unknown[0])
            owners = engines_taking(name)
            if prefix == "attack." and owners:
                raise ConfigError(other_engines_option_message(name, "", owners, str(node.get("method"))))
            raise ConfigError(unknown_key_message(prefix, name, known))
    for key in node.keys():
        if key != "hydra":
            _check_known_keys(node._get_node(key), f"{prefix}{key!s}.")


def resolve_threat(cfg: DictConfig) -> ThreatModel:
    """The run's threat model: ``attack.eps``, or the data preset's default ε for ``attack.p``."""
    try:
        p = p_name(cfg.attack.p)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    given = not OmegaConf.is_interpolation(cfg.attack, "eps")  # not the data preset's default
    eps = cfg.attack.eps  # left out: the preset's (config.default_eps, through its resolver)
    if eps is None:
        raise ConfigError(
            f"attack.eps is not set and data={cfg.data.name} has no default ε for p={p}; "
            f"set attack.eps=<ε in 0–255 pixel units>"
        )
    scale = cfg.attack.eps_scale if given else 255  # the presets' defaults are in 0–255 units
    try:
        threat = ThreatModel.in_units(eps, cfg.attack.p, scale)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if threat.below_one_level:
        log.warning("%s", threat.unit_advice())
    return threat


def attack_settings(cfg: DictConfig) -> AttackSettings:
    """The run's :class:`AttackSettings`, built once from ``attack`` (the threat model resolved,
    the seed ``attack.seed`` or ``seed``); ConfigError naming the key of a value that cannot work."""
    attack = cfg.attack
    try:
        options = {name: attack[name] for name in engine_class(attack.method).option_names()}
        values = {**attack, "seed": int(cfg.seed if attack.seed is None else attack.seed)}
        return AttackSettings.from_values(resolve_threat(cfg), values, options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"attack settings: {err}") from None


def check_victim_source(model_cfg: Any, data_cfg: Any) -> None:
    """ConfigError when the victim of ``model_cfg`` cannot be obtained on ``data_cfg``: pretrained
    weights asked of a model that ships none or that are not found, or training asked on data without a
    training split, or a width below one channel."""
    if model_cfg.get("width") is not None and model_cfg.width < 1:
        raise ConfigError(
            f"model.width={model_cfg.width}: the first convolution needs at least 1 channel "
            f"(model={model_cfg.name}'s preset uses {_preset_width(model_cfg.name)})"
        )
    if model_cfg.pretrained and model_cfg.name not in IMAGENET_PRETRAINED:
        raise ConfigError(
            f"model.pretrained=true but model={model_cfg.name} has no pretrained weights (those that have: "
            f"{', '.join(IMAGENET_PRETRAINED)}); train it (model.pretrained=false) or give model.checkpoint=PATH"
        )
    check_weights_source(model_cfg)
    if not dataset_class(data_cfg.name).has_training_split and not (model_cfg.pretrained or model_cfg.checkpoint):
        raise ConfigError(no_training_split_message(data_cfg))
    if (model_cfg.layout or model_cfg.key_map) and not model_cfg.checkpoint:
        raise ConfigError("model.layout and model.key_map rename the keys of model.checkpoint, which is not set")
    renames(model_cfg.layout, model_cfg.key_map)


def _preset_width(name: str) -> Any:
    """The ``width`` of the model preset ``name`` (the schema's default when it sets none)."""
    try:
        return model_preset(name).width
    except ValueError:
        return "another width"


def check_accelerator(accelerator: str) -> None:
    """ConfigError when ``accelerator`` asks for a GPU and this machine has none."""
    if accelerator in _GPU_ACCELERATORS and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accelerator} (trainer=gpu) needs a CUDA GPU and none is visible here; "
            "use trainer=default (CPU)"
        )


def check_attack_devices(attack_cfg: Any, accelerator: str) -> None:
    """ConfigError naming ``attack.devices`` or ``attack.strategy`` when the attack cannot run on
    them: fewer than one device, more GPUs than this machine has, or a strategy that would start
    its processes by running the whole command again."""
    devices, strategy = attack_cfg.devices, attack_cfg.strategy
    if devices < 1:
        raise ConfigError(f"attack.devices must be at least 1; got {devices}")
    if strategy not in ATTACK_STRATEGIES:
        raise ConfigError(
            f"attack.strategy={strategy} is not supported: the attack spawns its processes from this one "
            f"(attack.strategy: {' | '.join(ATTACK_STRATEGIES)}); a strategy such as ddp would run the whole "
            "command again per process. Under SLURM run one task per node (--ntasks-per-node=1, submitit "
            "tasks_per_node=1) with attack.devices=<GPUs of the node>"
        )
    if accelerator in _GPU_ACCELERATORS and devices > torch.cuda.device_count():
        raise ConfigError(f"attack.devices={devices} but this machine has {torch.cuda.device_count()} GPU(s)")


def validate(cfg: DictConfig) -> AttackSettings:
    """Check every setting that can be checked without data or a model, image sizes as they will be
    once image-file data is fitted to a pretrained victim's input (:func:`victim_input`); return the
    attack's settings. ``cfg`` is only read: the fitting is part of preparing the run."""
    check_schema(cfg)
    attack = attack_settings(cfg)
    if cfg.model.checkpoint and not Path(cfg.model.checkpoint).is_file():
        raise ConfigError(f"model.checkpoint={cfg.model.checkpoint} is not a file; give the path of your weights")
    resolve_adversarial(cfg.model, cfg.data)  # model.adversarial and its radius and step
    check_victim_source(cfg.model, cfg.data)
    if cfg.paths.lock_timeout <= 0:
        raise ConfigError(f"paths.lock_timeout must be a positive number of seconds; got {cfg.paths.lock_timeout}")
    target = attack.target_class
    if target is not None and cfg.data.num_classes is not None and target >= cfg.data.num_classes:
        raise ConfigError(f"attack.target_class={target} is not a class of data={cfg.data.name}")
    check_targets("logger", cfg.logger)
    check_targets("callbacks", cfg.callbacks)
    if cfg.trainer.max_epochs < 1:
        raise ConfigError(
            f"trainer.max_epochs={cfg.trainer.max_epochs}: a victim trained for no epoch is untrained; set at least 1"
        )
    check_accelerator(cfg.trainer.accelerator)
    check_training_processes(cfg.trainer)
    check_attack_devices(cfg.attack, cfg.trainer.accelerator)
    fitted = victim_input(cfg, command_line_keys())
    check_ensemble(cfg, attack)
    image_size = cfg.data.get("image_size") if fitted is None else fitted.image_size
    if image_size is not None:
        try:
            check_resolution(attack.resolution, (image_size, image_size))
        except ValueError as err:
            raise ConfigError(str(err)) from None
    return attack


ENSEMBLE_TASKS = ("attack", "compare")


def check_ensemble(cfg: DictConfig, attack: AttackSettings) -> None:
    """ConfigError naming ``attack.ensemble`` unless it is empty or lists at least two victims that
    can be obtained on the run's data, for an engine that takes an ensemble, in a task that attacks one."""
    entries = list(cfg.attack.get("ensemble") or [])
    if not entries:
        return
    if cfg.task.name not in ENSEMBLE_TASKS:
        raise ConfigError(
            f"attack.ensemble is for task={' or task='.join(ENSEMBLE_TASKS)}; task={cfg.task.name} "
            "attacks one victim at a time (leave attack.ensemble=[])"
        )
    if len(entries) < 2:
        raise ConfigError(
            f"attack.ensemble lists {len(entries)} victim; an ensemble needs at least two "
            "(for one victim use model=NAME and attack.ensemble=[])"
        )
    if not engine_class(attack.method).averages_loss:
        raise ConfigError(
            f"attack.ensemble: attack={attack.method} cannot attack an ensemble (its step follows one "
            f"network); use attack={' or attack='.join(ensemble_engines())}"
        )
    for entry in entries:
        try:
            check_victim_source(model_preset(entry), cfg.data)
        except ValueError as err:
            raise ConfigError(f"attack.ensemble: {err}") from None

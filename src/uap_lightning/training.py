"""Get a victim: the user's checkpoint, pretrained weights, the cache, or Lightning training.

A victim depends on the data, its model settings, its training settings and a seed, and on
nothing else of a run, so one process can obtain several victims (each trained at most once
across runs and processes, through the cache).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, cast

import lightning as L
import torch
from lightning.pytorch.plugins.environments import LightningEnvironment
from lightning.pytorch.strategies import SingleDeviceStrategy, StrategyRegistry
from omegaconf import DictConfig, OmegaConf

from uap_lightning.config import ModelConfig, default_eps
from uap_lightning.data.base import UAPDataModule, config_value
from uap_lightning.errors import ConfigError, NonFiniteError
from uap_lightning.models import VictimClassifier, build_backbone, load_weights, output_classes
from uap_lightning.models.cache import cache_entry, load_or_train
from uap_lightning.models.victim import ADVERSARIAL_MODES
from uap_lightning.models.zoo import normalisation
from uap_lightning.units import to_image_scale

log = logging.getLogger(__name__)

INTERRUPTED_TRAINING = "interrupted while training the victim; nothing was cached, the next run trains it again"

# Data keys that do not change the trained victim (attack/eval selection, loader settings).
_DATA_KEYS_NOT_IN_VICTIM = (
    "attack_images",
    "eval_images",
    "default_eps",
    "num_workers",
    "download",
    "max_image_pixels",
)
# Model keys that select weights rather than training them.
_MODEL_KEYS_NOT_IN_VICTIM = ("checkpoint", "trust_checkpoint", "layout", "key_map", "weights")
# Trainer keys that do not change the trained weights.
_TRAINER_KEYS_NOT_IN_VICTIM = ("enable_progress_bar", "log_every_n_steps")


@dataclass
class Victim:
    """A ready victim and where it came from."""

    module: VictimClassifier
    source: str  # "trained" | "cache" | "checkpoint" | "pretrained"
    test_accuracy: Optional[float]  # on the full test split, None when not measured
    train_seconds: Optional[float]
    cache_dir: Optional[str]

    @property
    def net(self):
        """The network to attack: [0,1] images N×C×H×W → logits."""
        return self.module.net


@dataclass
class TrainingLogs:
    """How victim training reports: its loggers (built for this phase), extra Lightning callbacks,
    whether a progress bar is drawn, and the folder Lightning writes in (None: the working directory)."""

    loggers: List[Any] = field(default_factory=list)
    callbacks: List[Any] = field(default_factory=list)
    progress_bar: bool = False
    log_dir: Optional[str] = None


def resolve_adversarial(model_cfg: Any, data_cfg: Any) -> Any:
    """``model_cfg`` with the defaults of universal adversarial training filled in (0–255 units):
    ``adversarial_eps`` (None: the ℓ∞ ε of ``data_cfg.default_eps``) and ``adversarial_step``
    (None: ``adversarial_eps`` / 2, measured on digits to defend where ε/10 did not); ``model_cfg``
    itself when ``model.adversarial`` is unset.

    ConfigError naming the key for an unknown mode, a non-positive number, or a radius or step
    given without ``model.adversarial``.
    """
    mode, eps, step = model_cfg.adversarial, model_cfg.adversarial_eps, model_cfg.adversarial_step
    if mode is None:
        for key, value in (("adversarial_eps", eps), ("adversarial_step", step)):
            if value is not None:
                raise ConfigError(f"model.{key}={value} needs model.adversarial=uat; drop it or set model.adversarial")
        return model_cfg
    if mode not in ADVERSARIAL_MODES:
        raise ConfigError(f"unknown model.adversarial={mode!r}; known: {', '.join(ADVERSARIAL_MODES)} (null: none)")
    if eps is None:
        eps = default_eps(data_cfg, "inf")
        if eps is None:
            raise ConfigError(
                f"model.adversarial_eps is not set and data={config_value(data_cfg, 'name')} has no default ℓ∞ ε; "
                "set model.adversarial_eps=<ε in 0–255 pixel units>"
            )
    step = eps / 2 if step is None else step
    for key, value in (("adversarial_eps", eps), ("adversarial_step", step)):
        if not (math.isfinite(value) and 0 < value <= 255):
            raise ConfigError(f"model.{key} must lie in (0, 255] (0–255 pixel units); got {value}")
    filled: Dict[str, Any] = {"adversarial_eps": float(eps), "adversarial_step": float(step)}
    if dataclasses.is_dataclass(model_cfg):
        return dataclasses.replace(cast(ModelConfig, model_cfg), **filled)  # a dataclass instance: a ModelConfig
    return OmegaConf.merge(model_cfg, filled)


def build_victim(model_cfg: Any, trainer_cfg: Any, datamodule: UAPDataModule) -> VictimClassifier:
    """An untrained victim (normalisation + backbone) shaped for ``datamodule``; ``model_cfg``'s
    adversarial settings, when ``model.adversarial`` is set, were filled in by
    :func:`resolve_adversarial`."""
    channels, size, _ = datamodule.image_shape
    adversarial = model_cfg.adversarial is not None
    backbone = build_backbone(model_cfg, num_classes=datamodule.num_classes, in_channels=channels, image_size=size)
    mean, std = normalisation(model_cfg, datamodule.mean, datamodule.std)
    return VictimClassifier(
        backbone,
        mean=mean,
        std=std,
        num_classes=output_classes(model_cfg, datamodule.num_classes),
        optimizer=model_cfg.optimizer,
        lr=model_cfg.lr,
        momentum=model_cfg.momentum,
        weight_decay=model_cfg.weight_decay,
        scheduler=model_cfg.scheduler,
        label_smoothing=model_cfg.label_smoothing,
        max_epochs=trainer_cfg.max_epochs,
        augment=model_cfg.augment,
        adversarial=model_cfg.adversarial,
        adversarial_eps=to_image_scale(model_cfg.adversarial_eps) if adversarial else None,
        adversarial_step=to_image_scale(model_cfg.adversarial_step) if adversarial else None,
        image_shape=datamodule.image_shape if adversarial else None,
    )


def _plain(node: Any, drop: tuple) -> Dict[str, Any]:
    """The settings of ``node`` but ``drop`` and those left unset (None), so that a new
    optional setting does not change the key of victims trained without it."""
    node = node if isinstance(node, DictConfig) else OmegaConf.structured(node)
    values = cast(Dict[str, Any], OmegaConf.to_container(node, resolve=True))  # a DictConfig's: a dict
    return {k: v for k, v in values.items() if k not in drop and v is not None}


def victim_spec(
    model_cfg: Any, trainer_cfg: Any, datamodule: UAPDataModule, seed: int, callbacks_cfg: Optional[Any] = None
) -> Dict[str, Any]:
    """Everything that determines a trained victim: the data (its settings and a fingerprint of
    its decoded contents), the model and training settings, the training callbacks (when there
    are any: early stopping changes the weights) and the seed."""
    data = _plain(datamodule.cfg, _DATA_KEYS_NOT_IN_VICTIM)
    if data.get("root"):
        data["root"] = os.path.abspath(data["root"])
    data["num_classes"] = datamodule.num_classes
    data["class_names"] = list(datamodule.class_names)
    data["fingerprint"] = datamodule.fingerprint()
    spec = {
        "data": data,
        "model": _plain(model_cfg, _MODEL_KEYS_NOT_IN_VICTIM),
        "trainer": _plain(trainer_cfg, _TRAINER_KEYS_NOT_IN_VICTIM),
        "seed": int(seed),
    }
    if callbacks_cfg:
        spec["callbacks"] = OmegaConf.to_container(callbacks_cfg, resolve=True)
    return spec


def obtain_victim(
    model_cfg: Any,
    trainer_cfg: Any,
    datamodule: UAPDataModule,
    *,
    seed: int,
    cache_dir: str,
    lock_timeout: float,
    logs: Optional[TrainingLogs] = None,
    callbacks_cfg: Optional[Any] = None,
) -> Victim:
    """The victim of ``model_cfg`` trained with ``trainer_cfg`` on ``datamodule``, trained at most
    once per spec across runs and processes (waiting at most ``lock_timeout`` seconds for
    another process training it)."""
    logs = logs or TrainingLogs()
    model_cfg = resolve_adversarial(model_cfg, datamodule.cfg)
    module = build_victim(model_cfg, trainer_cfg, datamodule)
    if model_cfg.checkpoint:
        load_weights(
            module.net,
            model_cfg.checkpoint,
            model_name=model_cfg.name,
            trust=model_cfg.trust_checkpoint,
            layout=config_value(model_cfg, "layout"),
            key_map=config_value(model_cfg, "key_map", ()),
        )
        check_finite_weights(module.net, f"model.checkpoint={model_cfg.checkpoint}")
        return Victim(module, "checkpoint", None, None, None)
    if model_cfg.pretrained:
        check_finite_weights(module.net, f"the pretrained weights of model={model_cfg.name}")
        return Victim(module, "pretrained", None, None, None)

    spec = victim_spec(model_cfg, trainer_cfg, datamodule, seed, callbacks_cfg)
    entry = cache_entry(cache_dir, model_cfg.name, spec)

    def train() -> Dict[str, Any]:
        return train_victim(module, trainer_cfg, datamodule, seed=seed, logs=logs)

    info, hit = load_or_train(entry, module.net, train, timeout=lock_timeout)
    if hit:
        log.info("victim %s loaded from the cache: %s", model_cfg.name, entry.directory)
    return Victim(
        module,
        "cache" if hit else "trained",
        info.get("test_accuracy"),
        info.get("train_seconds"),
        str(entry.directory),
    )


def lightning_trainer(trainer_cfg: Any, logs: TrainingLogs, **overrides: Any) -> L.Trainer:
    """A Lightning Trainer from the ``trainer`` settings, logging as ``logs`` says; ``overrides``
    replace settings, except ``callbacks``, which join the logs' callbacks and the epoch log."""
    progress_bar = logs.progress_bar and trainer_cfg.enable_progress_bar
    callbacks = [*logs.callbacks, *overrides.pop("callbacks", [])]
    settings = dict(
        max_epochs=trainer_cfg.max_epochs,
        accelerator=trainer_cfg.accelerator,
        devices=trainer_cfg.devices,
        precision=trainer_cfg.precision,
        deterministic=trainer_cfg.deterministic,
        enable_progress_bar=progress_bar,
        callbacks=callbacks if progress_bar else [*callbacks, EpochLog()],
        log_every_n_steps=trainer_cfg.log_every_n_steps,
        limit_train_batches=trainer_cfg.limit_train_batches,
        logger=list(logs.loggers) or False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=logs.log_dir or os.getcwd(),
    )
    settings.update(_process_settings(trainer_cfg))
    settings.update(overrides)
    return L.Trainer(**settings)


# Start methods of the strategies whose processes start from this one; victim training runs in
# this process, inside the victim cache's lock (see check_training_processes).
_STARTED_HERE = ("spawn", "fork", "forkserver")
# The Trainer settings of a one-process test after a fit on several processes.
_ONE_PROCESS = {"devices": 1, "num_nodes": 1, "strategy": "auto", "plugins": None}


def _starts_processes_here(strategy: str) -> bool:
    """Whether Lightning's ``strategy`` spawns or forks its processes from this one."""
    if strategy not in StrategyRegistry:
        return False
    return StrategyRegistry[strategy]["init_params"].get("start_method") in _STARTED_HERE


def _one_process(strategy: str) -> bool:
    """Whether Lightning's ``strategy`` trains in this process alone (single_device and the like)."""
    return issubclass(StrategyRegistry[strategy]["strategy"], SingleDeviceStrategy)


def _process_settings(trainer_cfg: Any) -> Dict[str, Any]:
    """``strategy`` and ``num_nodes`` when set; with a strategy that spawns or forks its processes,
    Lightning's own cluster environment, so that SLURM's or torchrun's variables (one task per
    node) do not number the processes spawned here."""
    settings: Dict[str, Any] = {}
    strategy = config_value(trainer_cfg, "strategy")
    num_nodes = config_value(trainer_cfg, "num_nodes")
    if strategy is not None:
        settings["strategy"] = strategy
        if _starts_processes_here(strategy):
            settings["plugins"] = [LightningEnvironment()]
    if num_nodes is not None:
        settings["num_nodes"] = num_nodes
    return settings


def _device_count(trainer_cfg: Any) -> int:
    """How many devices ``trainer.devices`` asks for ("auto" and -1: every GPU, one CPU process)."""
    devices = trainer_cfg.devices
    if isinstance(devices, str):
        text = devices.strip()
        if "," in text:
            return len([part for part in text.split(",") if part.strip()])
        if text != "auto" and not text.lstrip("-").isdigit():
            raise ConfigError(f"trainer.devices={devices!r} is not a count, a list of indices, auto or -1")
        devices = text if text == "auto" else int(text)
    if devices in ("auto", -1):
        gpus = trainer_cfg.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
        return torch.cuda.device_count() if gpus else 1
    return devices if isinstance(devices, int) else len(devices)


def check_training_processes(trainer_cfg: Any) -> None:
    """ConfigError naming ``trainer.strategy`` or ``trainer.num_nodes`` when victim training would
    start processes that run the whole command again (Lightning's ddp, fsdp or deepspeed, or no
    strategy with several devices, for which Lightning picks ddp), or run on several machines:
    this process trains inside the victim cache's lock, and those processes would wait for it."""
    strategy = config_value(trainer_cfg, "strategy")
    num_nodes = config_value(trainer_cfg, "num_nodes", 1)
    how = (
        "use trainer.strategy=ddp_spawn (processes spawned from this one) with trainer.devices=<processes or "
        "GPUs>; under SLURM run one task per node (--ntasks-per-node=1, submitit tasks_per_node=1) with "
        "trainer.devices=<GPUs of the node>"
    )
    if num_nodes < 1:
        raise ConfigError(f"trainer.num_nodes must be at least 1 (or null); got {num_nodes}")
    if num_nodes > 1:
        raise ConfigError(
            f"trainer.num_nodes={num_nodes}: a victim is trained inside the victim cache's lock by one process "
            f"per run, which processes on other machines would wait for; train on one machine: {how}"
        )
    if strategy in (None, "auto"):
        if _device_count(trainer_cfg) > 1:
            raise ConfigError(
                f"trainer.devices={trainer_cfg.devices} with trainer.strategy={strategy or 'null'}: "
                "Lightning would pick ddp, which starts the other processes by running the whole command again, "
                f"and they would wait for the victim cache's lock that this process holds; {how}"
            )
        return
    if strategy not in StrategyRegistry:
        raise ConfigError(f"unknown trainer.strategy={strategy!r}; known: {', '.join(StrategyRegistry)}")
    if not (_starts_processes_here(strategy) or _one_process(strategy)):
        raise ConfigError(
            f"trainer.strategy={strategy} starts the other processes by running the whole command again, and they "
            f"would wait for the victim cache's lock that this process holds while it trains; {how}"
        )


class EpochLog(L.Callback):
    """One log line per training epoch (loss and accuracies), where no progress bar is drawn."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        names = ("train_loss_epoch", "train_acc", "val_loss", "val_acc")
        shown = {k: float(trainer.callback_metrics[k]) for k in names if k in trainer.callback_metrics}
        values = ", ".join(f"{k.removesuffix('_epoch')} {v:.4f}" for k, v in shown.items())
        log.info("victim epoch %d/%d: %s", trainer.current_epoch + 1, trainer.max_epochs, values)


def check_finite_weights(net: Any, source: str) -> None:
    """NonFiniteError naming ``source`` when a parameter or buffer of ``net`` holds NaN or infinity."""
    bad = [
        name
        for name, tensor in net.state_dict().items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]
    if bad:
        raise NonFiniteError(
            f"the weights from {source} hold NaN or infinite values ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}); a victim with them fools nothing meaningful"
        )


def train_victim(
    module: VictimClassifier, trainer_cfg: Any, datamodule: UAPDataModule, *, seed: int, logs: TrainingLogs
) -> Dict[str, Any]:
    """Train ``module`` in place with a Lightning Trainer; return test accuracy and seconds.

    On several processes (a strategy that spawns them, see :func:`check_training_processes`) the
    fit runs in the spawned workers and Lightning loads rank 0's weights back into ``module``; the
    test then runs here on one device, so that every test image counts once (a distributed
    sampler would pad the split to a multiple of the world size)."""
    L.seed_everything(seed, workers=True, verbose=False)
    trainer = lightning_trainer(trainer_cfg, logs)
    start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule)
    except (KeyboardInterrupt, SystemExit):  # Lightning ends an interrupted fit with SystemExit
        if trainer.interrupted:
            raise KeyboardInterrupt(INTERRUPTED_TRAINING) from None
        raise
    seconds = time.perf_counter() - start
    check_finite_weights(module.net, "victim training (its loss diverged: lower model.lr)")
    tester = trainer if trainer.world_size == 1 else lightning_trainer(trainer_cfg, logs, **_ONE_PROCESS)
    results = tester.test(module, datamodule=datamodule, verbose=False)
    accuracy = float(results[0]["test_acc"]) if results else None
    log.info("victim trained in %.1f s, test accuracy %.4f", seconds, float("nan") if accuracy is None else accuracy)
    return {
        "test_accuracy": accuracy,
        "train_seconds": seconds,
        "epochs": trainer_cfg.max_epochs,
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "log_dir": str(Path(logs.log_dir).resolve()) if logs.log_dir else None,
    }

"""Get a victim: the user's checkpoint, pretrained weights, the cache, or Lightning training.

A victim depends on the data, its model settings, its training settings and a seed, and on
nothing else of a run, so one process can obtain several victims (each trained at most once
across runs and processes, through the cache).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import lightning as L
from omegaconf import DictConfig, OmegaConf

from uap_lightning.data.base import UAPDataModule
from uap_lightning.models import VictimClassifier, build_backbone, load_weights, output_classes
from uap_lightning.models.cache import cache_entry, load_or_train

log = logging.getLogger(__name__)

# Data keys that do not change the trained victim (attack/eval selection, loader settings).
_DATA_KEYS_NOT_IN_VICTIM = ("attack_images", "eval_images", "default_eps", "num_workers", "download")
# Model keys that select weights rather than training them.
_MODEL_KEYS_NOT_IN_VICTIM = ("checkpoint", "trust_checkpoint")
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
    model_name: str = ""

    @property
    def net(self):
        """The network to attack: [0,1] images N×C×H×W → logits."""
        return self.module.net


@dataclass
class TrainingLogs:
    """Where victim training logs: a folder (None: nowhere) and which loggers."""

    log_dir: Optional[str] = None
    tensorboard: bool = False
    progress_bar: bool = False


def build_victim(model_cfg: Any, trainer_cfg: Any, datamodule: UAPDataModule) -> VictimClassifier:
    """An untrained victim (normalisation + backbone) shaped for ``datamodule``."""
    channels, size, _ = datamodule.image_shape
    backbone = build_backbone(model_cfg, num_classes=datamodule.num_classes, in_channels=channels, image_size=size)
    return VictimClassifier(
        backbone,
        mean=list(datamodule.mean),
        std=list(datamodule.std),
        num_classes=output_classes(model_cfg, datamodule.num_classes),
        optimizer=model_cfg.optimizer,
        lr=model_cfg.lr,
        momentum=model_cfg.momentum,
        weight_decay=model_cfg.weight_decay,
        scheduler=model_cfg.scheduler,
        label_smoothing=model_cfg.label_smoothing,
        max_epochs=trainer_cfg.max_epochs,
        augment=model_cfg.augment,
    )


def _plain(node: Any, drop: tuple) -> Dict[str, Any]:
    """The settings of ``node`` but ``drop`` and those left unset (None), so that a new
    optional setting does not change the key of victims trained without it."""
    node = node if isinstance(node, DictConfig) else OmegaConf.structured(node)
    values = OmegaConf.to_container(node, resolve=True)
    return {k: v for k, v in values.items() if k not in drop and v is not None}


def victim_spec(model_cfg: Any, trainer_cfg: Any, datamodule: UAPDataModule, seed: int) -> Dict[str, Any]:
    """Everything that determines a trained victim: the data (its settings and a fingerprint of
    its decoded contents), the model and training settings, and the seed."""
    data = _plain(datamodule.cfg, _DATA_KEYS_NOT_IN_VICTIM)
    if data.get("root"):
        data["root"] = os.path.abspath(data["root"])
    data["num_classes"] = datamodule.num_classes
    data["class_names"] = list(datamodule.class_names)
    data["fingerprint"] = datamodule.fingerprint()
    return {
        "data": data,
        "model": _plain(model_cfg, _MODEL_KEYS_NOT_IN_VICTIM),
        "trainer": _plain(trainer_cfg, _TRAINER_KEYS_NOT_IN_VICTIM),
        "seed": int(seed),
    }


def obtain_victim(
    model_cfg: Any,
    trainer_cfg: Any,
    datamodule: UAPDataModule,
    *,
    seed: int,
    cache_dir: str,
    lock_timeout: float,
    logs: Optional[TrainingLogs] = None,
) -> Victim:
    """The victim of ``model_cfg`` trained with ``trainer_cfg`` on ``datamodule``, trained at most
    once per spec across runs and processes (waiting at most ``lock_timeout`` seconds for
    another process training it)."""
    logs = logs or TrainingLogs()
    module = build_victim(model_cfg, trainer_cfg, datamodule)
    if model_cfg.checkpoint:
        load_weights(module.net, model_cfg.checkpoint, model_name=model_cfg.name, trust=model_cfg.trust_checkpoint)
        return Victim(module, "checkpoint", None, None, None, model_cfg.name)
    if model_cfg.pretrained:
        return Victim(module, "pretrained", None, None, None, model_cfg.name)

    spec = victim_spec(model_cfg, trainer_cfg, datamodule, seed)
    entry = cache_entry(cache_dir, model_cfg.name, spec)

    def train() -> Dict[str, Any]:
        return train_victim(module, trainer_cfg, datamodule, seed=seed, logs=logs) | {"spec": spec}

    info, hit = load_or_train(entry, module.net, train, timeout=lock_timeout)
    if hit:
        log.info("victim %s loaded from the cache: %s", model_cfg.name, entry.directory)
    return Victim(
        module,
        "cache" if hit else "trained",
        info.get("test_accuracy"),
        info.get("train_seconds"),
        str(entry.directory),
        model_cfg.name,
    )


def lightning_trainer(trainer_cfg: Any, logs: TrainingLogs, **overrides: Any) -> L.Trainer:
    """A Lightning Trainer from the ``trainer`` settings, logging as ``logs`` says."""
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = (
        TensorBoardLogger(save_dir=logs.log_dir, name="tensorboard", version="victim", default_hp_metric=False)
        if logs.log_dir and logs.tensorboard
        else False
    )
    settings = dict(
        max_epochs=trainer_cfg.max_epochs,
        accelerator=trainer_cfg.accelerator,
        devices=trainer_cfg.devices,
        precision=trainer_cfg.precision,
        deterministic=trainer_cfg.deterministic,
        enable_progress_bar=logs.progress_bar and trainer_cfg.enable_progress_bar,
        log_every_n_steps=trainer_cfg.log_every_n_steps,
        limit_train_batches=trainer_cfg.limit_train_batches,
        logger=logger,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=logs.log_dir or os.getcwd(),
    )
    settings.update(overrides)
    return L.Trainer(**settings)


def train_victim(
    module: VictimClassifier, trainer_cfg: Any, datamodule: UAPDataModule, *, seed: int, logs: TrainingLogs
) -> Dict[str, Any]:
    """Train ``module`` in place with a Lightning Trainer; return test accuracy and seconds."""
    L.seed_everything(seed, workers=True, verbose=False)
    trainer = lightning_trainer(trainer_cfg, logs)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - start
    results = trainer.test(module, datamodule=datamodule, verbose=False)
    accuracy = float(results[0]["test_acc"]) if results else None
    log.info("victim trained in %.1f s, test accuracy %.4f", seconds, accuracy or float("nan"))
    return {
        "test_accuracy": accuracy,
        "train_seconds": seconds,
        "epochs": trainer_cfg.max_epochs,
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "log_dir": str(Path(logs.log_dir).resolve()) if logs.log_dir else None,
    }

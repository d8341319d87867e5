"""Get the victim of a run: the user's checkpoint, pretrained weights, the cache, or Lightning training."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from uap_lightning.data.base import UAPDataModule
from uap_lightning.models import VictimClassifier, build_backbone, load_weights, output_classes
from uap_lightning.models.cache import cache_entry, load_or_train

log = logging.getLogger(__name__)

# Data keys that do not change the trained victim (attack/eval selection, loader settings).
_DATA_KEYS_NOT_IN_VICTIM = ("attack_images", "eval_images", "default_eps", "num_workers", "download")
# Model keys that select weights rather than training them.
_MODEL_KEYS_NOT_IN_VICTIM = ("checkpoint",)
# Trainer keys that do not change the trained weights.
_TRAINER_KEYS_NOT_IN_VICTIM = ("enable_progress_bar", "log_every_n_steps", "devices")


@dataclass
class Victim:
    """A ready victim and where it came from."""

    module: VictimClassifier
    source: str  # "trained" | "cache" | "checkpoint" | "pretrained"
    test_accuracy: Optional[float]  # on the full test split, None when not measured
    train_seconds: Optional[float]
    cache_dir: Optional[str]


def build_victim(cfg: DictConfig, datamodule: UAPDataModule) -> VictimClassifier:
    """An untrained victim (normalisation + backbone) shaped for ``datamodule``."""
    channels, size, _ = datamodule.image_shape
    backbone = build_backbone(
        cfg.model, num_classes=datamodule.num_classes, in_channels=channels, image_size=size
    )
    return VictimClassifier(
        backbone,
        mean=list(datamodule.mean),
        std=list(datamodule.std),
        num_classes=output_classes(cfg.model, datamodule.num_classes),
        optimizer=cfg.model.optimizer,
        lr=cfg.model.lr,
        momentum=cfg.model.momentum,
        weight_decay=cfg.model.weight_decay,
        scheduler=cfg.model.scheduler,
        label_smoothing=cfg.model.label_smoothing,
        max_epochs=cfg.trainer.max_epochs,
        augment=cfg.model.augment,
    )


def victim_spec(cfg: DictConfig, datamodule: UAPDataModule) -> Dict[str, Any]:
    """Everything that determines a trained victim: data, model, training settings, seed."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    for key in _DATA_KEYS_NOT_IN_VICTIM:
        data.pop(key, None)
    if data.get("root"):
        data["root"] = os.path.abspath(data["root"])
    data["num_classes"] = datamodule.num_classes
    data["class_names"] = list(datamodule.class_names)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    for key in _MODEL_KEYS_NOT_IN_VICTIM:
        model.pop(key, None)
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    for key in _TRAINER_KEYS_NOT_IN_VICTIM:
        trainer.pop(key, None)
    return {"data": data, "model": model, "trainer": trainer, "seed": cfg.seed}


def obtain_victim(cfg: DictConfig, datamodule: UAPDataModule, log_dir: Optional[str]) -> Victim:
    """The victim of this run, trained at most once per spec across runs and processes."""
    module = build_victim(cfg, datamodule)
    if cfg.model.checkpoint:
        load_weights(module.net, cfg.model.checkpoint)
        return Victim(module, "checkpoint", None, None, None)
    if cfg.model.pretrained:
        return Victim(module, "pretrained", None, None, None)

    entry = cache_entry(cfg.paths.cache_dir, cfg.model.name, victim_spec(cfg, datamodule))

    def train() -> Dict[str, Any]:
        return train_victim(cfg, module, datamodule, log_dir) | {"spec": victim_spec(cfg, datamodule)}

    info, hit = load_or_train(entry, module.net, train)
    if hit:
        log.info("Victim loaded from the cache: %s", entry.directory)
    return Victim(
        module,
        "cache" if hit else "trained",
        info.get("test_accuracy"),
        info.get("train_seconds"),
        str(entry.directory),
    )


def train_victim(
    cfg: DictConfig, module: VictimClassifier, datamodule: UAPDataModule, log_dir: Optional[str]
) -> Dict[str, Any]:
    """Train ``module`` in place with a Lightning Trainer; return test accuracy and seconds."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    logger = (
        TensorBoardLogger(save_dir=log_dir, name="tensorboard", version="victim", default_hp_metric=False)
        if log_dir and cfg.logger.tensorboard
        else False
    )
    trainer = L.Trainer(
        max_epochs=cfg.trainer.max_epochs,
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        precision=cfg.trainer.precision,
        deterministic=cfg.trainer.deterministic,
        enable_progress_bar=cfg.trainer.enable_progress_bar,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        limit_train_batches=cfg.trainer.limit_train_batches,
        logger=logger,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=log_dir or os.getcwd(),
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - start
    results = trainer.test(module, datamodule=datamodule, verbose=False)
    accuracy = float(results[0]["test_acc"]) if results else None
    log.info("Victim trained in %.1f s, test accuracy %.4f", seconds, accuracy or float("nan"))
    return {
        "test_accuracy": accuracy,
        "train_seconds": seconds,
        "epochs": cfg.trainer.max_epochs,
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "log_dir": str(Path(log_dir).resolve()) if log_dir else None,
    }

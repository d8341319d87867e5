"""The fine-tuning defence (``task=finetune``; Moosavi-Dezfooli et al., CVPR 2017, §3, "fine-tuning
with universal perturbations"): fine-tune the victim on training images perturbed by universal
perturbations of the current network, then attack the fine-tuned network afresh.

"before" attacks a copy of the run's victim (the cached victim is never changed) with the run's
``attack`` settings, X and seed, as the attack task does. Each of ``task.rounds`` rounds then
1. computes a pool of ``task.pool_size`` universal perturbations on the current network, member k
   on its own X (``data.attack_images`` fit-set images drawn with seed attack seed + 1 + k);
2. fine-tunes ``task.epochs`` epochs on the training split, each image of a batch replaced with
   probability ``task.probability`` by clip(x + v), v drawn uniformly from the pool;
3. measures clean accuracy on the eval set and the fooling rate of a fresh universal perturbation
   (the run's X and seed, as "before").
Fine-tuning keeps the victim's training recipe (optimizer, scheduler, weight decay, augmentation,
adversarial training) with peak learning rate ``task.lr`` (None: model.lr / 10); every round starts
a new optimizer and scheduler over that round's ``task.epochs`` epochs. No validation runs during
fine-tuning: the eval set judges each round.

Writes ``finetune.csv`` (one row per stage: "before", "round 1", ...), the loggers' files of each
round (version ``finetune_round<r>`` under ``tensorboard/`` and ``csv/``) and, last, ``metrics.json``.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from typing import Any, Dict, List

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig
from torch import Tensor, nn

from uap_lightning import metrics
from uap_lightning.atomic import atomic_write_text
from uap_lightning.attacks import AttackSettings
from uap_lightning.baselines import mean_fooling_rate
from uap_lightning.data import dataset_class
from uap_lightning.errors import ConfigError
from uap_lightning.loggers import instantiate_callbacks, instantiate_loggers
from uap_lightning.models import VictimClassifier
from uap_lightning.rundir import move_aside
from uap_lightning.task_configs import FinetuneTaskConfig
from uap_lightning.tasks.setup import Setup, Task, eval_fooling_rate, progress_bars, universal_perturbation
from uap_lightning.training import TrainingLogs, lightning_trainer

log = logging.getLogger(__name__)

FINETUNE_CSV = "finetune.csv"


def check(cfg: DictConfig, attack: AttackSettings) -> None:
    """Rounds, epochs and pool size are at least 1; 0 < probability ≤ 1; lr, when set, positive; the
    data has a training split to fine-tune on."""
    task = cfg.task
    if not dataset_class(cfg.data.name).has_training_split:
        raise ConfigError(
            f"task=finetune fine-tunes on training images, and data={cfg.data.name} has no training split"
        )
    for key in ("rounds", "epochs", "pool_size"):
        if task[key] < 1:
            raise ConfigError(f"task.{key} must be at least 1; got {task[key]}")
    if not 0.0 < task.probability <= 1.0:
        raise ConfigError(f"task.probability must lie in (0, 1]; got {task.probability}")
    if task.lr is not None and not (math.isfinite(task.lr) and task.lr > 0):
        raise ConfigError(f"task.lr must be a positive learning rate or null (model.lr / 10); got {task.lr}")


class PoolPerturbation(Callback):
    """Before each training batch: every image, with probability ``probability``, becomes
    clip(x + v) (clipped to [0,1] when ``clip``) for v drawn uniformly from ``pool``
    (K×C×H×W, [0,1] scale); labels become the victim's output indices through ``label_map``
    (int64, one entry per data class). Draws come from ``generator`` (CPU), so runs repeat."""

    def __init__(self, pool: Tensor, probability: float, generator: torch.Generator, label_map: Tensor, clip: bool):
        self.pool = pool
        self.probability = float(probability)
        self.generator = generator
        self.label_map = label_map
        self.clip = clip

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        images, labels = batch  # changed in place: the training step sees these tensors
        count = images.shape[0]
        perturbed = torch.rand(count, generator=self.generator) < self.probability
        members = torch.randint(len(self.pool), (count,), generator=self.generator)
        rows = perturbed.nonzero().squeeze(1).to(images.device)
        noise = self.pool[members[perturbed]].to(images.device)
        images[rows] = metrics.perturb(images[rows], noise, self.clip)
        labels.copy_(self.label_map.to(labels.device)[labels])


def finetuning_module(victim: VictimClassifier, lr: float, epochs: int) -> VictimClassifier:
    """A new VictimClassifier on a copy of ``victim``'s backbone, with ``victim``'s settings but
    peak learning rate ``lr`` and a schedule over ``epochs`` epochs; ``victim`` stays as it is."""
    settings = {**victim.hparams, "lr": float(lr), "max_epochs": int(epochs)}
    return VictimClassifier(copy.deepcopy(victim.backbone), **settings)


def perturbation_pool(setup: Setup, net: nn.Module, size: int) -> Tensor:
    """``size`` universal perturbations of ``net`` (K×C×H×W, [0,1] scale) with the run's ``attack``
    settings, member k on its own X of ``data.attack_images`` images (seed attack seed + 1 + k)."""
    members = []
    for k in range(size):
        seed = setup.seed + 1 + k
        images, _ = setup.datamodule.attack_set(len(setup.attack_images), seed=seed)
        members.append(universal_perturbation(setup, net, images, seed=seed).perturbation.detach().cpu())
    return torch.stack(members)


def fine_tune(setup: Setup, module: VictimClassifier, callback: PoolPerturbation, round_index: int) -> None:
    """``task.epochs`` epochs of ``module`` on the training split with ``callback`` perturbing the
    batches (a Lightning Trainer from the run's ``trainer`` settings, seeded per round)."""
    cfg = setup.cfg
    logs = TrainingLogs(
        loggers=instantiate_loggers(cfg.logger, f"finetune_round{round_index}"),
        callbacks=instantiate_callbacks(cfg.callbacks)["training"],
        progress_bar=progress_bars(cfg),
        log_dir=str(setup.output_dir),
    )
    trainer = lightning_trainer(
        cfg.trainer,
        logs,
        max_epochs=cfg.task.epochs,
        callbacks=[callback],
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    L.seed_everything(cfg.seed + round_index, workers=True, verbose=False)
    module.train()  # the victim's backbone comes in eval mode, and Lightning keeps the modes it finds
    trainer.fit(module, datamodule=setup.datamodule)


def evaluate_stage(setup: Setup, net: nn.Module, eval_labels: Tensor, stage: str, started: float) -> Dict[str, Any]:
    """One row of finetune.csv: clean accuracy of ``net`` on the eval set, and the eval fooling
    rate of a fresh universal perturbation (the run's X and seed) beside a random perturbation of
    ℓp norm ε (mean of the baseline's draws); norms in 0–255 units; seconds since ``started``."""
    threat = setup.threat
    v = universal_perturbation(setup, net).perturbation
    clean = setup.predict(net, setup.eval_images)
    random_rate = mean_fooling_rate(
        lambda noise: setup.predict(net, setup.eval_images, noise),
        clean,
        setup.eval_images.shape[1:],
        threat,
        torch.Generator().manual_seed(setup.seed + 1),
    )
    return {
        "stage": stage,
        "clean_accuracy": metrics.accuracy(clean, eval_labels),
        "fooling_rate": eval_fooling_rate(setup, net, v, clean),
        "random_fooling_rate": random_rate,
        "norm_l2": metrics.norm_255(v, 2.0),
        "norm_linf": metrics.norm_255(v, math.inf),
        "seconds": time.perf_counter() - started,
    }


def run(setup: Setup) -> Dict[str, Any]:
    """Measure, fine-tune round by round, measure again; write finetune.csv and metrics.json."""
    cfg, task = setup.cfg, setup.cfg.task
    lr = cfg.model.lr / 10 if task.lr is None else task.lr
    move_aside(setup.output_dir)
    victim = setup.victim()
    module = finetuning_module(victim.module, lr, task.epochs)
    eval_labels = setup.eval_labels_for(victim)
    label_map = setup.labels_for(victim, torch.arange(setup.num_classes))
    generator = torch.Generator().manual_seed(setup.seed)  # which images, which pool member
    rows: List[Dict[str, Any]] = [evaluate_stage(setup, module.net, eval_labels, "before", time.perf_counter())]
    _log_row(rows[-1])
    for round_index in range(1, task.rounds + 1):
        started = time.perf_counter()
        pool = perturbation_pool(setup, module.net, task.pool_size)
        callback = PoolPerturbation(pool, task.probability, generator, label_map, clip=setup.attack.clip)
        fine_tune(setup, module, callback, round_index)
        rows.append(evaluate_stage(setup, module.net, eval_labels, f"round {round_index}", started))
        _log_row(rows[-1])
    table = pd.DataFrame(rows)
    atomic_write_text(setup.output_dir / FINETUNE_CSV, table.to_csv(index=False))
    before, after = rows[0], rows[-1]
    results = {
        "clean_accuracy_before": before["clean_accuracy"],
        "fooling_rate_before": before["fooling_rate"],
        "clean_accuracy_after": after["clean_accuracy"],
        "fooling_rate_after": after["fooling_rate"],
        "rows": rows,
        "rounds": task.rounds,
        "epochs": task.epochs,
        "pool_size": task.pool_size,
        "probability": task.probability,
        "lr": lr,
    }
    return setup.finish(results, "fine-tuning with universal perturbations", table, index=False)


def _log_row(row: Dict[str, Any]) -> None:
    log.info(
        "%-8s clean accuracy %.4f, fooling rate %.4f (random %.4f), %.1f s",
        row["stage"],
        row["clean_accuracy"],
        row["fooling_rate"],
        row["random_fooling_rate"],
        row["seconds"],
    )


TASK = Task("finetune", FinetuneTaskConfig, run, check, objective="fooling_rate_after")

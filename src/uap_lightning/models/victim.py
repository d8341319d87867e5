"""The victim classifier: normalisation + backbone, trained as a LightningModule."""

from __future__ import annotations

from typing import Any, Sequence, Tuple

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from uap_lightning.errors import ConfigError

from .augment import random_crop_flip
from .normalize import Normalize

OPTIMIZERS = ("sgd", "adam")
SCHEDULERS = ("onecycle", "cosine", "none")


class VictimClassifier(L.LightningModule):
    """``net = Sequential(Normalize(mean, std), backbone)``: N×C×H×W images in [0,1]
    → N×num_classes logits, so a perturbation lives in pixel space.

    Trains with cross-entropy (optional label smoothing) and logs ``{stage}_loss`` and
    ``{stage}_acc`` (top-1, micro-averaged) per epoch for stage train/val/test.
    ``optimizer``: sgd (momentum, Nesterov off) | adam; ``weight_decay`` is an L2 term.
    ``scheduler``: onecycle (peak ``lr``, stepped per batch) | cosine (per epoch over
    ``max_epochs``) | none. ``augment``: random crop (pad H/8) + horizontal flip of
    training batches.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        num_classes: int,
        optimizer: str = "sgd",
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        scheduler: str = "onecycle",
        label_smoothing: float = 0.0,
        max_epochs: int = 10,
        augment: bool = False,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown model.optimizer={optimizer!r}; known: {', '.join(OPTIMIZERS)}")
        if scheduler not in SCHEDULERS:
            raise ConfigError(f"unknown model.scheduler={scheduler!r}; known: {', '.join(SCHEDULERS)}")
        mean, std = [float(m) for m in mean], [float(s) for s in std]  # plain lists in hparams
        self.save_hyperparameters(ignore=["backbone"])
        self.net = nn.Sequential(Normalize(mean, std), backbone)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    @property
    def backbone(self) -> nn.Module:
        """The backbone (normalised images → logits)."""
        return self.net[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: N×C×H×W in [0,1] → N×num_classes logits."""
        return self.net(x)

    def _step(self, batch: Tuple[torch.Tensor, torch.Tensor], stage: str, acc: MulticlassAccuracy) -> torch.Tensor:
        x, y = batch
        if stage == "train" and self.hparams.augment:
            x = random_crop_flip(x, pad=max(1, x.shape[-1] // 8))
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        acc(logits, y)
        on_step = stage == "train"
        self.log(f"{stage}_loss", loss, on_step=on_step, on_epoch=True, prog_bar=True)
        self.log(f"{stage}_acc", acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train", self.train_acc)

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val", self.val_acc)

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "test", self.test_acc)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params = self.parameters()
        if hp.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay
            )
        else:
            opt = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.scheduler == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(
                opt,
                max_lr=hp.lr,
                total_steps=max(1, int(self.trainer.estimated_stepping_batches)),
                cycle_momentum=False,
            )
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        if hp.scheduler == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, hp.max_epochs))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
        return opt

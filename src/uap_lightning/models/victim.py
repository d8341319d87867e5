"""The victim classifier: normalisation + backbone, trained as a LightningModule."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from uap_lightning import metrics
from uap_lightning.errors import ConfigError

from .augment import random_crop_flip
from .normalize import Normalize

OPTIMIZERS = ("sgd", "adam")
SCHEDULERS = ("onecycle", "cosine", "none")
ADVERSARIAL_MODES = ("uat",)  # model.adversarial: universal adversarial training


class VictimClassifier(L.LightningModule):
    """``net = Sequential(Normalize(mean, std), backbone)``: N×C×H×W images in [0,1]
    → N×num_classes logits, so a perturbation lives in pixel space.

    Trains with cross-entropy (optional label smoothing) and logs ``{stage}_loss`` and
    ``{stage}_acc`` (top-1, micro-averaged) per epoch for stage train/val/test.
    ``optimizer``: sgd (momentum, Nesterov off) | adam; ``weight_decay`` is an L2 term.
    ``scheduler``: onecycle (peak ``lr``, stepped per batch) | cosine (per epoch over
    ``max_epochs``) | none. ``augment``: random crop (pad H/8) + horizontal flip of
    training batches.

    ``adversarial="uat"``: universal adversarial training (Shafahi et al., AAAI 2020). One
    perturbation ``uat_perturbation`` (a buffer, C×H×W = ``image_shape``, [0,1] scale, zeros at
    start) is added to every training batch (after augmentation, clipped to [0,1]); each batch's
    loss both trains the weights and moves the perturbation one signed-gradient step
    ``adversarial_step`` up the loss, projected onto the ℓ∞ ball of radius ``adversarial_eps``
    (both [0,1] scale). Logs ``train_uat_linf``, the perturbation's ℓ∞ norm in 0–255 units.
    """

    uat_perturbation: torch.Tensor  # the buffer of adversarial="uat", registered in __init__

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
        adversarial: Optional[str] = None,
        adversarial_eps: Optional[float] = None,
        adversarial_step: Optional[float] = None,
        image_shape: Optional[Sequence[int]] = None,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown model.optimizer={optimizer!r}; known: {', '.join(OPTIMIZERS)}")
        if scheduler not in SCHEDULERS:
            raise ConfigError(f"unknown model.scheduler={scheduler!r}; known: {', '.join(SCHEDULERS)}")
        if adversarial not in (None, *ADVERSARIAL_MODES):
            raise ConfigError(
                f"unknown model.adversarial={adversarial!r}; known: {', '.join(ADVERSARIAL_MODES)} (null: none)"
            )
        mean, std = [float(m) for m in mean], [float(s) for s in std]  # plain lists in hparams
        if image_shape is not None:
            image_shape = [int(n) for n in image_shape]
        self.save_hyperparameters(ignore=["backbone"])
        self.net = nn.Sequential(Normalize(mean, std), backbone)
        if adversarial == "uat":
            if image_shape is None or adversarial_eps is None or adversarial_step is None:
                raise ValueError("adversarial='uat' needs image_shape, adversarial_eps and adversarial_step")
            self.register_buffer("uat_perturbation", torch.zeros(image_shape))
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
        hp: Any = self.hparams  # the __init__ arguments, by name
        if stage == "train" and hp.augment:
            x = random_crop_flip(x, pad=max(1, x.shape[-1] // 8))
        universal = stage == "train" and hp.adversarial == "uat"
        if universal:
            perturbation = self.uat_perturbation.clone().requires_grad_(True)
            x = metrics.perturb(x, perturbation)
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=hp.label_smoothing)
        if universal:
            self._uat_step(loss, perturbation)
        acc(logits, y)
        on_step = stage == "train"
        self.log(f"{stage}_loss", loss, on_step=on_step, on_epoch=True, prog_bar=True)
        self.log(f"{stage}_acc", acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def _uat_step(self, loss: torch.Tensor, perturbation: torch.Tensor) -> None:
        """v ← clamp(v + step·sign(∇_v loss), −eps, eps), from the loss of this batch on clip(x + v);
        the graph is kept for the weights' backward."""
        (grad,) = torch.autograd.grad(loss, perturbation, retain_graph=True)
        hp: Any = self.hparams
        with torch.no_grad():
            self.uat_perturbation.add_(grad.sign(), alpha=hp.adversarial_step)
            self.uat_perturbation.clamp_(-hp.adversarial_eps, hp.adversarial_eps)
        self.log("train_uat_linf", metrics.norm_255(self.uat_perturbation, math.inf), on_step=False, on_epoch=True)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train", self.train_acc)

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val", self.val_acc)

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "test", self.test_acc)

    def configure_optimizers(self) -> Any:
        hp: Any = self.hparams
        params = self.parameters()
        if hp.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay
            )
        else:
            opt = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.scheduler == "onecycle":
            sched: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.OneCycleLR(
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

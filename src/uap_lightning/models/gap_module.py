"""GAP's generator as a LightningModule, so that a Lightning Trainer trains it (``attack=gap``).

The module wraps the engine (:class:`~uap_lightning.attacks.engines.gap.GAP`): the engine's generator is
its one submodule (trained and checkpointed), the engine's ``fooling_loss`` its training loss and
the engine's ``make_optimizer`` its optimizer, so the Trainer trains what ``GAP.run_pass`` trains.
An epoch is one pass over X in the order the engine's passes take (the k-th ``torch.randperm`` of a
generator seeded with the attack seed), so on the CPU the Trainer and ``run_passes`` reach the same
perturbation.

After each epoch the module measures the perturbation's rate on X (fooling rate, or targeted
success rate), logs it and the epoch's mean fooling loss (``train/...``), keeps the perturbation and
the generator weights of the best (or last, ``settings.keep``) pass, hands the pass to
``record_pass`` (the attack loop's evaluation on the eval set) and stops the Trainer once the rate
reaches 1 − δ. Its history and kept pass travel in the Lightning checkpoint, so that
``trainer.fit(ckpt_path=...)`` continues where an earlier run stopped.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, cast

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from uap_lightning.attacks import AttackSettings, KeptPerturbation, PassReport, PassStats, UAPResult, attack_set_rate
from uap_lightning.attacks.engines.gap import GAP, generator_state
from uap_lightning.errors import DamagedFileError

STATE_KEY = "uap_gap"  # the checkpoint entry holding the attack's state

# (the pass's report, its seconds, the attack's seconds so far) -> the pass's record
PassRecorder = Callable[[PassReport, float, float], Dict[str, Any]]


class PassOrder(Sampler[int]):
    """The order of ``count`` images in epoch ``epoch`` (0-based, set by the Trainer through
    ``set_epoch``): the (epoch+1)-th ``torch.randperm(count)`` of a generator seeded with ``seed``,
    the order ``run_passes`` gives the engine's pass ``epoch``."""

    def __init__(self, count: int, seed: int) -> None:
        self.count, self.seed, self.epoch = count, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        draws = torch.Generator().manual_seed(self.seed)
        for _ in range(self.epoch + 1):
            order = torch.randperm(self.count, generator=draws)
        return iter(order.tolist())

    def __len__(self) -> int:
        return self.count


class GAPModule(L.LightningModule):
    """GAP's generator trained on X (N×C×H×W in [0,1]) against ``victim`` with the engine's loss.

    Arguments:
        engine: the GAP engine (its generator is built here for X's image shape).
        victim: images in [0,1] → logits, in eval mode with frozen parameters; kept outside the
            module's tree (not trained, not checkpointed, left in eval mode by the Trainer) and
            moved to the module's device when fitting starts.
        images, clean_labels: X and the victim's (N,) predictions on it.
        settings: the run's attack settings (seed, δ, keep, target, batch size for predictions).
        fingerprint: saved in the checkpoint, to tell whether it belongs to the same settings.
        record_pass: the attack loop's record of a pass (see :data:`PassRecorder`); None: a record
            of the rate on X and the times only.
    """

    victim: nn.Module  # in the instance's __dict__, not a registered submodule (see __init__)

    def __init__(
        self,
        engine: GAP,
        victim: nn.Module,
        images: Tensor,
        clean_labels: Tensor,
        settings: AttackSettings,
        *,
        fingerprint: str = "",
        record_pass: Optional[PassRecorder] = None,
    ) -> None:
        super().__init__()
        self.engine = engine
        self.generator = engine.build(images.shape[1:], dtype=images.dtype)
        self.__dict__["victim"] = victim  # bypasses nn.Module's registration: not a submodule
        self.images, self.clean_labels = images, clean_labels
        self.settings = settings
        self.fingerprint = fingerprint
        self.record_pass = record_pass
        self.aims: Optional[Tensor] = None
        self.history: List[Dict[str, Any]] = []
        self.kept: Optional[KeptPerturbation] = None
        self.kept_weights: Optional[Dict[str, Tensor]] = None
        self.last_perturbation: Optional[Tensor] = None
        self._epoch_started = 0.0

    def on_fit_start(self) -> None:
        self.victim.to(self.device)
        self.aims = self.engine.aims(self.victim, self.images)

    def train_dataloader(self) -> DataLoader:
        assert self.aims is not None  # set in on_fit_start
        return DataLoader(
            TensorDataset(self.images, self.aims),
            batch_size=self.engine.options.batch_size,
            sampler=PassOrder(len(self.images), self.settings.seed),
        )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.engine.make_optimizer()

    def on_train_start(self) -> None:
        if self.history and self.history[-1][self.settings.rate_on_x_key] >= 1.0 - self.settings.delta:
            self.trainer.should_stop = True  # resumed after the attack had reached 1 − δ

    def on_train_epoch_start(self) -> None:
        self._epoch_started = time.perf_counter()

    def training_step(self, batch: List[Tensor], batch_idx: int) -> Tensor:
        images, aims = batch
        loss = self.engine.fooling_loss(self.victim, images, aims)
        self.log("train/fooling_loss", loss, on_step=False, on_epoch=True, batch_size=len(images))
        return loss

    def on_train_epoch_end(self) -> None:
        pass_index = self.current_epoch + 1
        v = self.engine.perturbation()
        rate = attack_set_rate(self.victim, self.images, self.clean_labels, v, self.settings)
        self.log(f"train/{self.settings.rate_on_x_key}", rate)
        if self.settings.keep == "last" or self.kept is None or rate > self.kept.fooling_rate:
            self.kept = KeptPerturbation(v.cpu(), rate, pass_index)
            self.kept_weights = generator_state(self.generator)
        self.last_perturbation = v.cpu()
        seconds = time.perf_counter() - self._epoch_started
        elapsed = seconds + (self.history[-1]["attack_seconds"] if self.history else 0.0)
        batches = cast(int, self.trainer.num_training_batches)  # finite: the loader over X has a length
        report = PassReport(pass_index, v, PassStats(batches, 0.0), rate, self.kept)
        if self.record_pass is not None:
            record = self.record_pass(report, seconds, elapsed)
        else:
            record = {
                "pass": pass_index,
                self.settings.rate_on_x_key: rate,
                "seconds": seconds,
                "attack_seconds": elapsed,
            }
        self.history.append(record)
        if rate >= 1.0 - self.settings.delta:
            self.trainer.should_stop = True

    def result(self) -> Optional[UAPResult]:
        """The attack's result after the passes run so far (None before the first)."""
        if self.kept is None:
            return None
        return UAPResult(
            perturbation=self.kept.perturbation,
            fooling_rate=self.kept.fooling_rate,
            history=[dict(record) for record in self.history],
            passes=len(self.history),
            converged=self.history[-1][self.settings.rate_on_x_key] >= 1.0 - self.settings.delta,
            best_pass=self.kept.pass_index,
            last_perturbation=self.last_perturbation,
        )

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        kept = self.kept
        checkpoint[STATE_KEY] = {
            "fingerprint": self.fingerprint,
            "history": [dict(record) for record in self.history],
            "kept_perturbation": None if kept is None else kept.perturbation,
            "kept_fooling_rate": None if kept is None else kept.fooling_rate,
            "kept_pass": None if kept is None else kept.pass_index,
            "kept_weights": self.kept_weights,
            "last_perturbation": self.last_perturbation,
        }

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        state = checkpoint[STATE_KEY]
        self.history = [dict(record) for record in state["history"]]
        if state["kept_pass"] is not None:
            self.kept = KeptPerturbation(
                state["kept_perturbation"], float(state["kept_fooling_rate"]), int(state["kept_pass"])
            )
        self.kept_weights = state["kept_weights"]
        self.last_perturbation = state["last_perturbation"]


def read_training_state(path: Path) -> Optional[Dict[str, Any]]:
    """The attack state a :class:`GAPModule` saved in the Lightning checkpoint at ``path`` (read
    tensors-only), or None when there is no such file; DamagedFileError when it cannot be read."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)[STATE_KEY]
    except Exception as err:  # any failure to read it means the training cannot continue from it
        raise DamagedFileError(f"generator checkpoint {path} cannot be read: {str(err).splitlines()[0]}") from None

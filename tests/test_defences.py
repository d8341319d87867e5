"""Defences on digits, small settings: fine-tuning with universal perturbations (``task=finetune``)
and universal adversarial training (``model.adversarial=uat``).

Victims are shared through one cache per module. Torch runs on one thread here: the batches are
tiny, so more threads only contend, and trained weights (hence the measured numbers below) depend
on the thread count.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import compose_config
from uap_lightning import metrics
from uap_lightning.config import ModelConfig
from uap_lightning.data import build_datamodule
from uap_lightning.errors import ConfigError
from uap_lightning.models import VictimClassifier, build_backbone
from uap_lightning.models.cache import cache_entry
from uap_lightning.tasks import run_task
from uap_lightning.tasks.finetune import PoolPerturbation
from uap_lightning.tasks.setup import prepare
from uap_lightning.training import resolve_adversarial, victim_spec
from uap_lightning.validation import validate

SMALL = ("trainer.max_epochs=10", "data.attack_images=200", "attack.max_passes=3", "attack.eps=64", "logger=none")
ROW_COLUMNS = ("stage", "clean_accuracy", "fooling_rate", "random_fooling_rate", "norm_l2", "norm_linf", "seconds")
METRIC_KEYS = (
    "clean_accuracy_before",
    "fooling_rate_before",
    "clean_accuracy_after",
    "fooling_rate_after",
    "rows",
    "eps",
    "p",
    "method",
    "rounds",
    "epochs",
    "pool_size",
    "probability",
    "data",
    "model",
    "seed",
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def victim_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("victims")


def small_config(root: Path, cache: Path, *overrides: str):
    """A digits config with SMALL settings, outputs in ``root`` and victims in ``cache``."""
    return compose_config([*SMALL, f"paths.cache_dir={cache}", *overrides], root)


@pytest.fixture(scope="module")
def finetune_runs(tmp_path_factory, victim_cache):
    """[(config, results)] of two runs of the same tiny fine-tuning (2 rounds of 1 epoch, pools of
    1, X of 100, 2 passes) in two run folders."""
    settings = ("task=finetune", "task.rounds=2", "task.epochs=1", "task.pool_size=1")
    settings += ("data.attack_images=100", "attack.max_passes=2")
    runs = []
    for _ in range(2):
        cfg = small_config(tmp_path_factory.mktemp("finetune"), victim_cache, *settings)
        runs.append((cfg, run_task(cfg)))
    return runs


@pytest.fixture(scope="module")
def uat_victim(tmp_path_factory, victim_cache):
    """(setup, victim) of the SMALL victim trained with universal adversarial training."""
    cfg = small_config(tmp_path_factory.mktemp("uat"), victim_cache, "model.adversarial=uat")
    setup = prepare(cfg, validate(cfg))
    return setup, setup.victim(log_training=False)


# -- task=finetune ------------------------------------------------------------------------------


def test_finetune_writes_its_table_and_metrics(finetune_runs):
    cfg, results = finetune_runs[0]
    run_dir = Path(cfg.paths.output_dir)
    table = pd.read_csv(run_dir / "finetune.csv")
    assert list(table.columns) == list(ROW_COLUMNS)
    assert list(table["stage"]) == ["before", "round 1", "round 2"]
    assert (table["norm_linf"] <= 64 + 1e-3).all()
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert set(METRIC_KEYS) <= set(saved)
    assert (saved["rounds"], saved["epochs"], saved["pool_size"], saved["probability"]) == (2, 1, 1, 0.5)
    assert saved["fooling_rate_before"] == pytest.approx(table["fooling_rate"].iloc[0])
    assert saved["fooling_rate_after"] == pytest.approx(table["fooling_rate"].iloc[-1])
    assert saved["clean_accuracy_after"] == pytest.approx(table["clean_accuracy"].iloc[-1])
    assert saved["clean_accuracy_after"] > 0.9
    assert results["rows"] == saved["rows"]


def test_finetune_repeats_its_numbers(finetune_runs):
    (_, first), (_, second) = finetune_runs
    assert [{k: v for k, v in row.items() if k != "seconds"} for row in first["rows"]] == [
        {k: v for k, v in row.items() if k != "seconds"} for row in second["rows"]
    ]


@pytest.mark.slow
def test_finetuning_at_the_defaults_keeps_accuracy_and_attacks_afresh(tmp_path, victim_cache):
    """The task's defaults (2 rounds of 3 epochs, pools of 4, X of 500, 10 passes) with the
    batched DeepFool engine, ℓ∞ ε=64, 10-epoch cnn: the fine-tuned victim keeps its clean accuracy
    and every round's fresh perturbation is scored against random noise of its norm.

    Whether fine-tuning lowers the fresh attack's fooling rate on digits depends on the victim and
    the seed, so it is not claimed. Measured (eval set, 360 images), before → round 1 → round 2:
    0.356 → 0.403 → 0.378 (clean 0.994 → 0.983 → 0.975) on this victim; on an earlier one
    0.372 → 0.333 → 0.239."""
    cfg = compose_config(
        [
            "task=finetune",
            "attack=deepfool_uap_batched",
            "attack.eps=64",
            "logger=none",
            f"paths.cache_dir={victim_cache}",
        ],
        tmp_path,
    )
    results = run_task(cfg)
    assert [row["stage"] for row in results["rows"]] == ["before", "round 1", "round 2"]
    assert results["clean_accuracy_after"] >= results["clean_accuracy_before"] - 0.03
    for row in results["rows"]:
        assert row["fooling_rate"] > row["random_fooling_rate"], row["stage"]


def test_pool_perturbation_replaces_a_share_of_images_repeatably():
    pool = torch.stack([torch.full((1, 4, 4), 0.5), torch.full((1, 4, 4), -0.5)])

    def perturbed_batch(seed: int):
        images, labels = torch.full((400, 1, 4, 4), 0.25), torch.arange(400) % 3
        callback = PoolPerturbation(pool, 0.5, torch.Generator().manual_seed(seed), torch.tensor([2, 0, 1]), clip=True)
        callback.on_train_batch_start(None, None, (images, labels), 0)
        return images, labels

    images, labels = perturbed_batch(0)
    values = images.flatten(1)
    assert (values == values[:, :1]).all()  # a whole image takes one pool member
    first = values[:, 0]
    assert set(first.unique().tolist()) == {0.0, 0.25, 0.75}  # 0.25 - 0.5 clipped to 0
    assert 0.4 < (first != 0.25).float().mean().item() < 0.6
    assert labels.tolist() == [[2, 0, 1][i % 3] for i in range(400)]
    again, _ = perturbed_batch(0)
    assert torch.equal(images, again)
    assert not torch.equal(images, perturbed_batch(1)[0])


def test_training_step_sees_the_perturbed_batch():
    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(()))
            self.batches = []

        def training_step(self, batch, batch_idx):
            self.batches.append(batch[0].clone())
            return self.weight * batch[0].sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    loader = DataLoader(TensorDataset(torch.zeros(8, 1, 2, 2), torch.zeros(8, dtype=torch.long)), batch_size=4)
    callback = PoolPerturbation(
        torch.full((1, 1, 2, 2), 0.3), 1.0, torch.Generator().manual_seed(0), torch.arange(1), True
    )
    recorder = Recorder()
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(recorder, loader)
    assert len(recorder.batches) == 2
    assert all(torch.allclose(batch, torch.full_like(batch, 0.3)) for batch in recorder.batches)


# -- model.adversarial=uat ----------------------------------------------------------------------


def test_uat_victim_has_its_own_cache_entry(make_cfg):
    standard, uat = make_cfg(*SMALL), make_cfg(*SMALL, "model.adversarial=uat")
    datamodule = build_datamodule(standard.data, cache_dir=standard.paths.cache_dir)
    datamodule.setup("fit")

    def spec(cfg):
        model = resolve_adversarial(cfg.model, datamodule.cfg)
        return victim_spec(model, cfg.trainer, datamodule, cfg.seed)

    eps = float(standard.data.default_eps["inf"])
    adversarial = {k: v for k, v in spec(uat)["model"].items() if k.startswith("adversarial")}
    assert adversarial == {"adversarial": "uat", "adversarial_eps": eps, "adversarial_step": pytest.approx(eps / 2)}
    assert not any(k.startswith("adversarial") for k in spec(standard)["model"])  # earlier keys unchanged
    assert spec(uat) != spec(standard)
    entries = [cache_entry(standard.paths.cache_dir, "cnn", spec(cfg)).directory for cfg in (standard, uat)]
    assert entries[0] != entries[1]
    explicit = make_cfg(
        *SMALL, "model.adversarial=uat", f"model.adversarial_eps={eps}", f"model.adversarial_step={eps / 2}"
    )
    assert spec(explicit) == spec(uat)  # the defaults, written out, are the same victim


def test_uat_training_perturbation_stays_within_eps(uat_victim):
    setup, victim = uat_victim
    assert victim.source == "trained"
    eps = setup.cfg.data.default_eps["inf"] / 255
    v = victim.module.uat_perturbation
    assert v.shape == (1, 8, 8)
    assert eps / 2 <= v.abs().max().item() <= eps + 1e-6


@pytest.mark.filterwarnings("ignore:.*self.log.*:UserWarning")  # no Trainer attached
def test_uat_step_is_a_signed_gradient_step_projected_onto_the_ball():
    torch.manual_seed(0)
    eps, step = 0.1, 0.04
    module = VictimClassifier(
        build_backbone(ModelConfig(name="cnn", width=8), num_classes=10, in_channels=1, image_size=8),
        mean=[0.3],
        std=[0.4],
        num_classes=10,
        adversarial="uat",
        adversarial_eps=eps,
        adversarial_step=step,
        image_shape=(1, 8, 8),
    )
    images, labels = torch.rand(16, 1, 8, 8), torch.randint(10, (16,))
    for _ in range(4):
        v = module.uat_perturbation.clone().requires_grad_(True)
        loss = F.cross_entropy(module(metrics.perturb(images, v)), labels)
        (grad,) = torch.autograd.grad(loss, v)
        expected = (v.detach() + step * grad.sign()).clamp(-eps, eps)
        module.training_step((images, labels), 0).backward()
        assert torch.allclose(module.uat_perturbation, expected)
    assert module.uat_perturbation.abs().max().item() == pytest.approx(eps)


# -- settings -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, key",
    [
        (("task=finetune", "task.rounds=0"), "task.rounds"),
        (("task=finetune", "task.epochs=0"), "task.epochs"),
        (("task=finetune", "task.pool_size=0"), "task.pool_size"),
        (("task=finetune", "task.probability=1.5"), "task.probability"),
        (("task=finetune", "task.lr=0"), "task.lr"),
        (("model.adversarial=pgd",), "model.adversarial"),
        (("model.adversarial=uat", "model.adversarial_eps=0"), "model.adversarial_eps"),
        (("model.adversarial_step=5",), "model.adversarial_step"),
    ],
)
def test_bad_defence_settings_fail_before_any_training(make_cfg, overrides, key):
    cfg = make_cfg("logger=none", *overrides)
    with pytest.raises(ConfigError, match=re.escape(key)):
        run_task(cfg)
    assert not (Path(cfg.paths.cache_dir) / "victims").exists()

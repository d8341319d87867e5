"""Training and attacking on several processes: two CPU processes (gloo, ddp_spawn) against one."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
from lightning.fabric import Fabric
from lightning.fabric.plugins.environments import LightningEnvironment
from torch import nn

from attack_helpers import digits_victim, single_thread
from uap_lightning import metrics
from uap_lightning.attacks import (
    SGDUAP,
    AttackSettings,
    BatchedDeepFoolUAP,
    DeepFoolUAP,
    ThreatModel,
    TorchDistributed,
    distributed,
)
from uap_lightning.attacks.base import UniversalAttack
from uap_lightning.data import build_datamodule
from uap_lightning.errors import ConfigError
from uap_lightning.loop import AttackLoop, AttackState
from uap_lightning.rundir import STATE_FILE
from uap_lightning.tasks import run_task
from uap_lightning.tasks.attack import attack_fabric_settings
from uap_lightning.training import TrainingLogs, lightning_trainer, obtain_victim
from uap_lightning.validation import validate

WORLD = 2
PASSES = 2
THREAT = ThreatModel.parse(64, "inf")
ENGINES = {
    "sgd_sign_l2": SGDUAP(ThreatModel.parse(400, 2), batch_size=32, max_passes=PASSES),
    "sgd_adam": SGDUAP(THREAT, batch_size=32, optimizer="adam", max_passes=PASSES),
    "batched": BatchedDeepFoolUAP(THREAT, batch_size=32),
    "sequential": DeepFoolUAP(THREAT),
}


def as_one_slurm_task(monkeypatch) -> None:
    """The variables srun sets in a job of one task on one node (submitit's tasks_per_node=1):
    Lightning would number the processes spawned for several devices from them (all rank 0 of 1)."""
    job = {
        "SLURM_JOB_ID": "4321",
        "SLURM_JOB_NAME": "submitit",
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NNODES": "1",
        "SLURM_NODELIST": "localhost",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
    }
    for name, value in job.items():
        monkeypatch.setenv(name, value)


def _passes_on_rank(fabric: Fabric, engines: Dict[str, UniversalAttack], model: nn.Module, images: torch.Tensor):
    """In each spawned process: ``PASSES`` passes of every engine on the same X, sharing the work.

    Rank 0 returns, per engine, its v and the v of every rank (W×C×H×W) as numpy arrays."""
    torch.set_num_threads(1)
    reducer = TorchDistributed(fabric.device)
    clean = distributed.predict(model, images, reducer=reducer)
    found = {}
    for name, engine in engines.items():
        v, generator = torch.zeros(images.shape[1:]), torch.Generator().manual_seed(0)
        for index in range(PASSES):
            v, _ = engine.run_pass(model, v, images, clean, generator, pass_index=index, reducer=reducer)
        every_rank = distributed.gather(reducer, v.unsqueeze(0), reducer.world_size)
        found[name] = (v.numpy(), every_rank.numpy())
    return found if fabric.is_global_zero else None


def one_process(engine: UniversalAttack, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """v after ``PASSES`` passes of ``engine`` in this process (one thread)."""
    with single_thread():
        clean = metrics.predict(model, images)
        v, generator = torch.zeros(images.shape[1:]), torch.Generator().manual_seed(0)
        for index in range(PASSES):
            v, _ = engine.run_pass(model, v, images, clean, generator, pass_index=index)
    return v


@pytest.fixture(scope="module")
def engine_runs():
    """Every engine on the digits victim's 150 attack images, on two processes and on one."""
    model, attack_images, eval_images = digits_victim()
    fabric = Fabric(accelerator="cpu", devices=WORLD, strategy="ddp_spawn", plugins=[LightningEnvironment()])
    shared = fabric.launch(_passes_on_rank, ENGINES, model, attack_images)
    alone = {name: one_process(engine, model, attack_images) for name, engine in ENGINES.items()}
    return model, eval_images, shared, alone


def test_every_rank_holds_the_same_v(engine_runs):
    _, _, shared, _ = engine_runs
    for name, (v, every_rank) in shared.items():
        assert every_rank.shape == (WORLD, *v.shape), name
        assert all(np.array_equal(rank_v, v) for rank_v in every_rank), name


def test_sgd_uap_on_two_processes_gives_the_v_of_one(engine_runs):
    """Same global batch: the summed gradient of the shards is the batch gradient (float rounding)."""
    _, _, shared, alone = engine_runs
    for name in ("sgd_sign_l2", "sgd_adam"):
        v = torch.from_numpy(shared[name][0])
        assert float(v.abs().max()) > 0, name
        torch.testing.assert_close(v, alone[name], atol=1e-5, rtol=1e-4)


def test_batched_deepfool_on_two_processes_fools_as_much_as_on_one(engine_runs):
    model, eval_images, shared, alone = engine_runs
    clean = metrics.predict(model, eval_images)
    rates = [
        metrics.fooling_rate(clean, metrics.predict(model, eval_images, v))
        for v in (torch.from_numpy(shared["batched"][0]), alone["batched"])
    ]
    assert rates[1] > 0.2 and abs(rates[0] - rates[1]) <= 0.02, rates


def test_sequential_deepfool_on_two_processes_gives_exactly_the_v_of_one(engine_runs):
    _, _, shared, alone = engine_runs
    v = torch.from_numpy(shared["sequential"][0])
    assert float(v.abs().max()) > 0
    assert torch.equal(v, alone["sequential"])


def test_gather_puts_each_rank_shard_in_place():
    class FakeRank:
        """Rank ``rank`` of 3, whose sum over ranks adds the other ranks' shards."""

        world_size = 3

        def __init__(self, rank: int, rows: int) -> None:
            self.rank, self.rows = rank, rows

        def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
            for other in range(self.world_size):
                if other != self.rank:
                    tensor[other :: self.world_size] += torch.arange(self.rows)[other :: self.world_size]
            return tensor

    items = torch.arange(7)
    for rank in range(3):
        reducer = FakeRank(rank, 7)
        assert torch.equal(distributed.gather(reducer, distributed.shard(reducer, items), 7), items)


# -- the attack task: two processes against one -------------------------------------------------

RUN = (
    "attack=deepfool_uap",
    "attack.eps=64",
    "attack.max_passes=2",
    "attack.delta=0.01",
    "data.attack_images=200",
    "trainer.max_epochs=3",
)


def attack_files(run_dir: Path) -> List[str]:
    """The files of ``run_dir`` but the victim's logs, TensorBoard event files named ``events``."""
    names = (str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file() and "victim" not in p.parts)
    return sorted(re.sub(r"events\.out\.tfevents\..*", "events", name) for name in names)


def interrupt_after_first_pass(monkeypatch) -> None:
    """Make the (one-process) loop raise KeyboardInterrupt, as Ctrl-C would, once pass 1 is saved."""
    save = AttackLoop._save

    def save_then_interrupt(self, state):
        save(self, state)
        if state.passes == 1 and not state.finished:
            raise KeyboardInterrupt("test")

    monkeypatch.setattr(AttackLoop, "_save", save_then_interrupt)


@pytest.mark.slow
def test_the_attack_on_two_processes_writes_what_one_writes(make_cfg, tmp_path, monkeypatch):
    """deepfool_uap with attack.devices=2: the v, rates and history of one process, the same files
    (one writer each: a single TensorBoard events file), a state saved after each pass, and an
    attack interrupted on one process continued on two to the same v; inside a one-task SLURM job."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the workers compute as this process does on one thread
    as_one_slurm_task(monkeypatch)

    def attack(folder: str, devices: int):
        cfg = make_cfg(*RUN, f"attack.devices={devices}", f"paths.output_dir={tmp_path / folder}")
        assert Fabric(accelerator="cpu", **attack_fabric_settings(cfg.attack)).world_size == devices
        with single_thread():
            return run_task(cfg)

    one, two = attack("one", 1), attack("two", 2)
    for key in ("fooling_rate", "fooling_rate_attack_set", "clean_accuracy", "perturbed_accuracy", "passes"):
        assert two[key] == one[key], key
    assert [h["fooling_rate"] for h in two["history"]] == [h["fooling_rate"] for h in one["history"]]
    assert two["victim_source"] == "cache"  # trained once, by the first run
    v1, v2 = (torch.load(tmp_path / folder / "perturbation.pt", weights_only=True) for folder in ("one", "two"))
    assert torch.equal(v1, v2) and float(v2.abs().max()) > 0
    assert attack_files(tmp_path / "two") == attack_files(tmp_path / "one")  # one events file: one writer
    state = AttackState.load(tmp_path / "two" / STATE_FILE)
    assert state.finished and state.passes == two["passes"]
    assert torch.equal(state.kept.perturbation, v2)
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["fooling_rate"] == two["fooling_rate"]

    with monkeypatch.context() as patch:
        interrupt_after_first_pass(patch)
        with pytest.raises(KeyboardInterrupt):
            attack("resumed", 1)
    first_pass = AttackState.load(tmp_path / "resumed" / STATE_FILE).history[0]
    resumed = attack("resumed", 2)
    assert [h["pass"] for h in resumed["history"]] == [1, 2]
    assert resumed["history"][0]["seconds"] == first_pass["seconds"]  # pass 1 came from the saved state
    assert resumed["fooling_rate"] == one["fooling_rate"]
    assert torch.equal(torch.load(tmp_path / "resumed" / "perturbation.pt", weights_only=True), v1)


# -- victim training ---------------------------------------------------------------------------


@pytest.mark.slow
def test_victim_trains_once_on_two_spawned_processes(make_cfg, monkeypatch):
    """trainer.strategy=ddp_spawn trainer.devices=2, inside a one-task SLURM job: the weights come
    back to this process, the test accuracy is theirs on the whole test split, and the cache
    serves them next time."""
    as_one_slurm_task(monkeypatch)
    cfg = make_cfg("trainer.strategy=ddp_spawn", "trainer.devices=2", "trainer.max_epochs=5", "logger=none")
    validate(cfg)
    assert lightning_trainer(cfg.trainer, TrainingLogs()).world_size == 2
    datamodule = build_datamodule(cfg.data, cache_dir=cfg.paths.cache_dir)
    datamodule.setup("fit")

    def victim():
        return obtain_victim(
            cfg.model,
            cfg.trainer,
            datamodule,
            seed=cfg.seed,
            cache_dir=cfg.paths.cache_dir,
            lock_timeout=60,
            logs=TrainingLogs(),
        )

    trained = victim()
    assert trained.source == "trained" and trained.test_accuracy > 0.8
    splits = datamodule.splits
    trained.net.eval()
    accuracy = metrics.accuracy(metrics.predict(trained.net, splits.test_images.float()), splits.test_labels)
    assert accuracy == pytest.approx(trained.test_accuracy, abs=1e-6)

    cached = victim()
    assert cached.source == "cache" and cached.test_accuracy == trained.test_accuracy
    for (name, weight), cached_weight in zip(trained.net.state_dict().items(), cached.net.state_dict().values()):
        assert torch.equal(weight, cached_weight), name


@pytest.mark.parametrize(
    "overrides, key",
    [
        (("trainer.strategy=ddp", "trainer.devices=2"), "trainer.strategy=ddp"),
        (("trainer.devices=2",), "trainer.strategy=null"),
        (("trainer.strategy=ddp_spawn", "trainer.num_nodes=2"), "trainer.num_nodes=2"),
        (("trainer.strategy=no_such_strategy",), "trainer.strategy"),
        (("attack.devices=2", "attack.strategy=ddp"), "attack.strategy=ddp"),
        (("attack.devices=0",), "attack.devices"),
    ],
)
def test_strategies_that_would_rerun_the_command_are_refused(make_cfg, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as refused:
        validate(make_cfg(*overrides))
    if "ddp" in key:
        assert "ddp_spawn" in str(refused.value) and "SLURM" in str(refused.value)


def test_spawning_strategies_pass_the_checks(make_cfg):
    validate(make_cfg("trainer.strategy=ddp_spawn", "trainer.devices=2", "attack.devices=2"))
    validate(make_cfg("trainer.strategy=single_device", "attack.strategy=ddp_spawn"))


@pytest.mark.slow
def test_two_processes_return_an_outcome_larger_than_a_pipe_holds(tmp_path):
    """The outcome of 12,000 eval images (two label vectors, about 190 KB) comes back from the workers:
    returned through Fabric's launcher it would block the worker on a full pipe forever."""
    model, attack_images, _ = digits_victim()
    eval_images = torch.rand(12_000, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    eval_labels = torch.zeros(12_000, dtype=torch.long)
    fabric = Fabric(accelerator="cpu", devices=WORLD, strategy="ddp_spawn", plugins=[LightningEnvironment()])
    settings = AttackSettings(THREAT, method="sgd_uap", options={"batch_size": 32}, max_passes=1)
    loop = AttackLoop(fabric, settings, state_path=tmp_path / STATE_FILE)
    outcome = loop.run(model, attack_images, eval_images, eval_labels)
    assert outcome.perturbed_eval_labels.shape == (12_000,) and outcome.clean_eval_labels.shape == (12_000,)
    assert outcome.result.passes == 1 and len(outcome.history) == 1
    assert float(outcome.result.perturbation.abs().max()) > 0

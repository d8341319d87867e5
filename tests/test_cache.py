"""Victim cache: hit, miss, concurrent access, and reuse across runs."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest
import torch
from torch import nn

from uap_lightning.data import build_datamodule
from uap_lightning.models.cache import cache_entry, load_or_train, victim_key
from uap_lightning.training import obtain_victim, victim_spec


def victim_of(cfg, datamodule):
    """The run's victim, as the shared setup obtains it."""
    return obtain_victim(
        cfg.model, cfg.trainer, datamodule, seed=cfg.seed, cache_dir=cfg.paths.cache_dir, lock_timeout=60
    )


def spec_of(cfg, datamodule):
    """The cache spec of the run's victim."""
    return victim_spec(cfg.model, cfg.trainer, datamodule, cfg.seed)


def _train_counting(cache_dir: str, counter: str, seconds: float) -> float:
    """Train a tiny net under the cache lock, appending a line to ``counter`` per training."""
    torch.manual_seed(0)
    net = nn.Linear(4, 2)

    def train():
        with open(counter, "a") as f:
            f.write("trained\n")
        time.sleep(seconds)
        with torch.no_grad():
            net.weight.fill_(0.25)
        return {"test_accuracy": 1.0}

    load_or_train(cache_entry(cache_dir, "linear", {"spec": 1}), net, train)
    return float(net.weight[0, 0].detach())


def test_key_depends_on_content_not_order():
    assert victim_key({"a": 1, "b": 2}) == victim_key({"b": 2, "a": 1})
    assert victim_key({"a": 1}) != victim_key({"a": 2})


def test_miss_then_hit(tmp_path):
    counter = tmp_path / "count.txt"
    assert _train_counting(str(tmp_path), str(counter), 0.0) == 0.25
    assert _train_counting(str(tmp_path), str(counter), 0.0) == 0.25
    assert counter.read_text().count("trained") == 1


@pytest.mark.slow
def test_concurrent_runs_train_once(tmp_path):
    counter = tmp_path / "count.txt"
    ctx = mp.get_context("spawn")
    with ctx.Pool(3) as pool:
        weights = pool.starmap(_train_counting, [(str(tmp_path), str(counter), 1.0)] * 3)
    assert weights == [0.25, 0.25, 0.25]
    assert counter.read_text().count("trained") == 1
    assert not list((tmp_path / "victims").glob("*/.*.tmp"))


def test_failed_training_leaves_no_entry(tmp_path):
    entry = cache_entry(tmp_path, "linear", {"spec": 2})

    def boom():
        raise RuntimeError("interrupted")

    try:
        load_or_train(entry, nn.Linear(2, 2), boom)
    except RuntimeError:
        pass
    assert not entry.exists()


def test_victim_trained_once_and_reused(make_cfg, tmp_path):
    base = ("trainer.max_epochs=2", "logger=none")
    cfg = make_cfg(*base)
    datamodule = build_datamodule(cfg.data, cache_dir=cfg.paths.cache_dir)
    datamodule.setup("fit")
    first = victim_of(cfg, datamodule)
    second = victim_of(cfg, datamodule)
    assert (first.source, second.source) == ("trained", "cache")
    assert second.test_accuracy == first.test_accuracy
    for a, b in zip(first.module.net.state_dict().values(), second.module.net.state_dict().values()):
        assert torch.equal(a, b)
    # attack settings do not change the victim; training settings do
    assert spec_of(make_cfg(*base, "attack.eps=3", "data.attack_images=10"), datamodule) == spec_of(cfg, datamodule)
    assert spec_of(make_cfg(*base, "seed=1"), datamodule) != spec_of(cfg, datamodule)
    assert spec_of(make_cfg(*base, "model.lr=0.5"), datamodule) != spec_of(cfg, datamodule)

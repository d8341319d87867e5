"""Trust: no file runs code, damaged or stale state is caught and healed, locks name their holder."""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from uap_lightning.config import DataConfig, ModelConfig
from uap_lightning.data import build_datamodule
from uap_lightning.data import cache as data_cache
from uap_lightning.data.torchvision_sets import read_cifar_pickle
from uap_lightning.errors import DamagedFileError, UntrustedFileError
from uap_lightning.locking import LockTimeoutError, held_lock, read_owner
from uap_lightning.models import VictimClassifier, build_backbone, load_weights
from uap_lightning.models.cache import cache_entry, load_or_train
from uap_lightning.training import obtain_victim


class Payload:
    """Unpickling this runs ``touch <marker>``: what an attacker's file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Note:
    """A harmless custom object, as some training scripts store in their checkpoints."""

    def __init__(self, text: str) -> None:
        self.text = text


def small_net() -> nn.Module:
    return build_backbone(ModelConfig(name="cnn", width=8), num_classes=10, in_channels=1, image_size=8)


def payload_checkpoint(tmp_path: Path, zip_format: bool = True) -> tuple:
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.ckpt"
    payload = {"state_dict": small_net().state_dict(), "hyper_parameters": Payload(marker)}
    torch.save(payload, path, _use_new_zipfile_serialization=zip_format)
    return path, marker


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_payload_checkpoint_is_refused_and_never_runs(tmp_path, zip_format):
    path, marker = payload_checkpoint(tmp_path, zip_format)
    with pytest.raises(UntrustedFileError, match="model.trust_checkpoint=true") as info:
        load_weights(small_net(), path)
    assert "posix.system" in str(info.value) or "os.system" in str(info.value)
    assert not marker.exists()


def test_cli_refuses_a_payload_checkpoint_with_one_message(tmp_path, monkeypatch, capfd):
    from cli_runner import run_in_process

    path, marker = payload_checkpoint(tmp_path)
    arguments = (
        f"model.checkpoint={path}",
        f"hydra.run.dir={tmp_path / 'run'}",
        "attack.max_passes=1",
        "data.attack_images=20",
        "logger=none",
    )
    done = run_in_process(monkeypatch, capfd, tmp_path, *arguments, env={"UAP_CACHE_DIR": str(tmp_path / "cache")})
    assert done.returncode == 2, done.stderr[-2000:]
    assert "trust_checkpoint" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert not marker.exists()
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_trusted_checkpoint_loads_with_a_warning(tmp_path, caplog, zip_format):
    source = small_net()
    path = tmp_path / "with_note.pt"
    torch.save(
        {"state_dict": source.state_dict(), "note": Note("trained on digits")},
        path,
        _use_new_zipfile_serialization=zip_format,
    )
    with pytest.raises(UntrustedFileError, match="Note"):
        load_weights(small_net(), path)
    target = small_net()
    with caplog.at_level(logging.WARNING):
        load_weights(target, path, trust=True)
    assert "full unpickling" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "text"])
def test_damaged_checkpoint_names_the_file(tmp_path, damage):
    path = tmp_path / "weights.pt"
    torch.save(small_net().state_dict(), path)
    content = path.read_bytes()
    path.write_bytes(
        {"truncated": content[: len(content) // 2], "random bytes": os.urandom(4096), "text": b"not weights"}[damage]
    )
    with pytest.raises(DamagedFileError, match=str(path)):
        load_weights(small_net(), path)


def test_payload_in_a_cifar_batch_is_refused(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "data_batch_1"
    with open(path, "wb") as handle:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": Payload(marker)}, handle)
    with pytest.raises(UntrustedFileError, match="posix.system|os.system"):
        read_cifar_pickle(path)
    assert not marker.exists()


def test_payload_in_the_dataset_cache_is_never_loaded(tmp_path, caplog):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "datasets" / "entry.pt"
    path.parent.mkdir()
    torch.save({"images": Payload(marker)}, path)
    with caplog.at_level(logging.WARNING):
        assert data_cache.load(path) is None
    assert "ignoring unreadable dataset cache" in caplog.text
    assert not marker.exists()


# -- the victim cache heals itself ------------------------------------------------------


def counting_trainer(net: nn.Module, calls: list):
    def train():
        calls.append(1)
        with torch.no_grad():
            for param in net.parameters():
                param.fill_(0.5)
        return {"test_accuracy": 0.9}

    return train


def break_weights(entry, how: str, tmp_path: Path) -> None:
    weights = entry.weights_path
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    elif how == "random bytes":
        weights.write_bytes(os.urandom(2048))
    elif how == "garbage info":
        entry.info_path.write_text("{ not json")
    elif how == "zeroed weights":
        torch.save({k: torch.zeros_like(v) for k, v in torch.load(weights, weights_only=True).items()}, weights)
    elif how == "wrong shapes":
        torch.save(nn.Linear(3, 3).state_dict(), weights)
    elif how == "payload":
        torch.save({"weight": Payload(tmp_path / "payload-ran")}, weights)


@pytest.mark.parametrize(
    "how", ["truncated", "random bytes", "garbage info", "zeroed weights", "wrong shapes", "payload"]
)
def test_damaged_cache_entry_is_reported_moved_aside_and_retrained(tmp_path, caplog, how):
    entry = cache_entry(tmp_path, "linear", {"spec": 1})
    calls: list = []
    net = nn.Linear(4, 2)
    load_or_train(entry, net, counting_trainer(net, calls))
    break_weights(entry, how, tmp_path)

    fresh = nn.Linear(4, 2)
    with caplog.at_level(logging.WARNING):
        info, hit = load_or_train(entry, fresh, counting_trainer(fresh, calls))
    assert not hit and len(calls) == 2
    assert str(entry.directory) in caplog.text and "training the victim again" in caplog.text
    assert len(list(tmp_path.glob("victims/linear-*.damaged-*"))) == 1
    assert not (tmp_path / "payload-ran").exists()
    again = nn.Linear(4, 2)
    assert load_or_train(entry, again, counting_trainer(again, calls))[1] and len(calls) == 2
    assert torch.equal(again.weight, torch.full((2, 4), 0.5))
    assert info["weights_sha256"] and info["test_accuracy"] == 0.9


def make_folders(root: Path) -> None:
    """Three classes of 8×8 solid-colour images, distinct per class."""
    for split, count in (("train", 12), ("test", 4)):
        for label, name in enumerate(("a", "b", "c")):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                colour = (80 * label + 10 + index, 200 - 60 * label, 30 + index)
                Image.new("RGB", (8, 8), colour).save(folder / f"{index:03d}.png")


def test_changed_image_folder_trains_a_new_victim(tmp_path):
    """Swapping two classes' files (same names, same count) must not reuse the old victim."""
    root = tmp_path / "images"
    make_folders(root)
    data = DataConfig(
        name="imagefolder",
        root=str(root),
        in_channels=3,
        image_size=8,
        attack_images=3,
        val_fraction=0.0,
        batch_size=12,
        mean=[0.5] * 3,
        std=[0.25] * 3,
    )
    model = ModelConfig(name="cnn", width=8, optimizer="adam", lr=0.01)
    from uap_lightning.config import TrainerConfig

    trainer = TrainerConfig(max_epochs=1, enable_progress_bar=False)

    def victim():
        datamodule = build_datamodule(data, cache_dir=str(tmp_path / "cache"))
        datamodule.setup()
        return obtain_victim(model, trainer, datamodule, seed=0, cache_dir=str(tmp_path / "cache"), lock_timeout=60)

    assert victim().source == "trained"
    assert victim().source == "cache"
    for split in ("train", "test"):
        a, b, swap = root / split / "a", root / split / "b", root / split / "swap"
        a.rename(swap)
        b.rename(a)
        swap.rename(b)
    assert victim().source == "trained"


# -- locks ------------------------------------------------------------------------------

HOLDER = """
import sys, time
from pathlib import Path
from uap_lightning.locking import held_lock
with held_lock(Path(sys.argv[1]), what="a test", timeout=5):
    Path(sys.argv[2]).touch()
    time.sleep(float(sys.argv[3]))
"""


def start_holder(tmp_path: Path, seconds: float) -> subprocess.Popen:
    lock, ready = tmp_path / "victim.lock", tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock), str(ready), str(seconds)])
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert time.monotonic() < deadline and holder.poll() is None, "the holder did not take the lock"
        time.sleep(0.05)
    return holder


def test_lock_wait_is_logged_and_times_out_naming_the_holder(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr("uap_lightning.locking.REPORT_SECONDS", 0.2)
    holder = start_holder(tmp_path, 30)
    try:
        with caplog.at_level(logging.INFO, logger="uap_lightning.locking"):
            with pytest.raises(LockTimeoutError, match=f"pid {holder.pid}") as info:
                with held_lock(tmp_path / "victim.lock", what="the victim", timeout=1.5):
                    pass
        assert "paths.lock_timeout" in str(info.value)
        assert f"held by pid {holder.pid}" in caplog.text
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_killed_process_is_taken_over(tmp_path, caplog):
    holder = start_holder(tmp_path, 30)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert read_owner(tmp_path / "victim.lock")["pid"] == holder.pid  # it left its record behind
    with caplog.at_level(logging.WARNING):
        with held_lock(tmp_path / "victim.lock", what="the victim", timeout=5):
            assert read_owner(tmp_path / "victim.lock")["pid"] == os.getpid()
    assert "no longer running" in caplog.text
    assert read_owner(tmp_path / "victim.lock") is None


# -- the Python API -----------------------------------------------------------------------


def digits_like(n: int = 12) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_api_casts_float64_and_float16_images(dtype):
    import uap_lightning

    torch.manual_seed(0)
    model = small_net()
    result = uap_lightning.compute_uap(model, digits_like().to(dtype), eps=64, max_passes=1)
    assert result.perturbation.dtype == torch.float32
    assert 0.0 <= uap_lightning.fooling_rate(model, digits_like().to(dtype), result.perturbation) <= 1.0


def test_api_names_a_model_that_does_not_return_logits():
    import uap_lightning

    class TupleModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = small_net()

        def forward(self, x):
            return self.net(x), x

    with pytest.raises(ValueError, match="logits tensor.*tuple"):
        uap_lightning.compute_uap(TupleModel(), digits_like(), eps=64, max_passes=1)
    with pytest.raises(ValueError, match="logits tensor"):
        uap_lightning.fooling_rate(TupleModel(), digits_like(), torch.zeros(1, 8, 8))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_api_refuses_non_finite_perturbations(bad):
    import uap_lightning

    v = torch.zeros(1, 8, 8)
    v[0, 0, 0] = bad
    with pytest.raises(ValueError, match="finite"):
        uap_lightning.fooling_rate(small_net(), digits_like(), v)


def test_victim_checkpoint_round_trip_through_the_lightning_module(tmp_path):
    """A Lightning module's own state dict (normalisation + backbone) loads tensors-only."""
    victim = VictimClassifier(small_net(), mean=[0.5], std=[0.25], num_classes=10)
    path = tmp_path / "victim.pt"
    torch.save({"state_dict": victim.state_dict(), "hyper_parameters": dict(victim.hparams)}, path)
    fresh = VictimClassifier(small_net(), mean=[0.5], std=[0.25], num_classes=10)
    load_weights(fresh.net, path)
    assert all(torch.equal(a, b) for a, b in zip(victim.state_dict().values(), fresh.state_dict().values()))
    assert json.dumps(dict(victim.hparams))


def test_payload_in_an_attack_state_is_never_loaded(tmp_path, caplog):
    """A run folder's attack_state.ckpt is read tensors-only: a payload there is refused, the
    attack starts afresh."""
    from uap_lightning.tasks.attack import _resumable

    marker = tmp_path / "payload-ran"
    state = tmp_path / "attack_state.ckpt"
    torch.save({"version": 1, "history": Payload(marker)}, state)
    with caplog.at_level(logging.WARNING):
        assert _resumable(state, "any settings", resume=True) is None
    assert "cannot be read" in caplog.text and not marker.exists()

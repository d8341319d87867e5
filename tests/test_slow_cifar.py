"""Longer checks on the CIFAR-10 JPEG copy ($UAP_DATA_DIR/cifar10-jpeg); skipped when it is absent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from uap_lightning.attacks.engines import ENGINES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir() -> Path:
    value = os.environ.get("UAP_DATA_DIR")
    if not value or not (Path(value) / "cifar10-jpeg").is_dir():
        pytest.skip("UAP_DATA_DIR does not point to a folder containing cifar10-jpeg")
    return Path(value).resolve()


def _python(module: str, run_dir: Path, data_dir: Path, *overrides: str):
    """``python -m module`` from ``run_dir``'s parent with its own cache, writing into ``run_dir``."""
    cwd = run_dir.parent
    env = {**os.environ, "UAP_DATA_DIR": str(data_dir), "UAP_CACHE_DIR": str(cwd / "cache")}
    command = [
        sys.executable,
        "-m",
        module,
        *overrides,
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={run_dir}",
    ]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=3000)


def test_cli_attacks_a_resnet20_on_the_cifar_copy(tmp_path, data_dir):
    """The documented CIFAR command on the copy, with a short victim training and a small attack."""
    run_dir = tmp_path / "run"
    done = _python(
        "uap_lightning.run",
        run_dir,
        data_dir,
        "data=imagefolder",
        f"data.root={data_dir / 'cifar10-jpeg'}",
        "model=resnet20",
        "attack.eps=8",
        "attack.p=inf",
        "trainer.max_epochs=1",
        "data.attack_images=200",
        "data.eval_images=1000",
        "attack.max_passes=2",
        "extras.progress_bar=false",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["eval_images"] == 1000 and metrics["attack_images"] == 200
    assert metrics["victim_accuracy"] > 0.25  # well above chance (0.1) after one epoch
    assert metrics["norm_linf"] <= 8 + 1e-3
    assert metrics["fooling_rate"] > metrics["random_fooling_rate"]
    v = torch.load(run_dir / "perturbation.pt", weights_only=True)
    assert v.shape == (3, 32, 32)


def test_benchmark_preset_on_the_cifar_copy(tmp_path, data_dir):
    """The benchmark of record, shrunk: a short victim, 100 images, one pass, every row."""
    run_dir = tmp_path / "bench"
    done = _python(
        "uap_lightning.bench",
        run_dir,
        data_dir,
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=0.1",
        "data.attack_images=100",
        "data.eval_images=500",
        "attack.max_passes=1",
        "task.efficiency_batches=1",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((run_dir / "bench.json").read_text())
    assert [row["method"] for row in report["rows"]] == ["naive", "art", *ENGINES]
    assert report["settings"]["eval_images"] == 500 and report["victim"]["model"] == "resnet20"

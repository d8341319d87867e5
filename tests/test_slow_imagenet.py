"""The ImageNet headline's command on the real photographs ($UAP_DATA_DIR/imagenet-samples) and the
real EfficientNet-Lite0 from its wheel, kept small; skipped when the photographs are absent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir() -> Path:
    value = os.environ.get("UAP_DATA_DIR")
    if not value or not (Path(value) / "imagenet-samples" / "val").is_dir():
        pytest.skip("UAP_DATA_DIR does not point to a folder containing imagenet-samples")
    return Path(value).resolve()


def test_imagenet_lite0_experiment_runs_and_the_victim_is_accurate(tmp_path, data_dir):
    """experiment=imagenet_lite0 with a tiny X and one pass: Lite0 classifies more than 0.8 of 100
    held-out photographs, X and the evaluation set do not overlap, every file is written."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "UAP_DATA_DIR": str(data_dir), "UAP_CACHE_DIR": str(tmp_path / "cache")}
    command = [
        sys.executable,
        "-m",
        "uap_lightning.run",
        "experiment=imagenet_lite0",
        "data.attack_images=20",
        "data.eval_images=100",
        "attack.max_passes=1",
        "extras.progress_bar=false",
        f"hydra.run.dir={run_dir}",
    ]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout + done.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["model"] == "efficientnet_lite0" and metrics["victim_source"] == "pretrained"
    assert metrics["eval_images"] == 100 and metrics["attack_images"] == 20
    assert metrics["eval_source"] == "images not in X"
    assert metrics["clean_accuracy"] > 0.8
    assert metrics["eps"] == 10 and metrics["p"] == "inf" and metrics["norm_linf"] <= 10 + 1e-3
    published = np.load(run_dir / "perturbation.npy")
    assert published.shape == (224, 224, 3) and published.dtype == np.float32
    assert np.abs(published).max() <= 10 + 1e-3
    for name in ("perturbation.pt", "curve.png", "perturbation.png", "examples.png", "labels.png"):
        assert (run_dir / name).is_file(), name
    assert "pass 1/1: fooling on X" in done.stdout

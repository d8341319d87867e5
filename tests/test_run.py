"""The run entry point: the CLI from another directory, its outputs, and errors before heavy work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from uap_lightning.data import build_datamodule
from uap_lightning.tasks import run_task as run
from uap_lightning.tasks import setup as task_setup
from uap_lightning.training import obtain_victim
from uap_lightning.validation import ConfigError

# A short digits run: a 3-epoch cnn victim, 200 attack images, 2 passes.
FAST = (
    "trainer.max_epochs=3",
    "data.attack_images=200",
    "attack.max_passes=2",
    "extras.progress_bar=false",
    "trainer.enable_progress_bar=false",
)

REQUIRED_KEYS = {
    "fooling_rate",
    "fooling_rate_attack_set",
    "clean_accuracy",
    "perturbed_accuracy",
    "norm_l2",
    "norm_linf",
    "eps",
    "p",
    "delta",
    "passes",
    "converged",
    "attack_seconds",
    "victim_accuracy",
    "attack_images",
    "eval_images",
    "history",
}
HISTORY_KEYS = {
    "pass",
    "fooling_rate",
    "fooling_rate_attack_set",
    "perturbed_accuracy",
    "norm_l2",
    "norm_linf",
    "seconds",
}


def cli(run_dir: Path, cache_dir: Path, *overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m uap_lightning.run`` in ``cwd``, writing into ``run_dir``."""
    env = {**os.environ, "UAP_CACHE_DIR": str(cache_dir)}
    env.pop("UAP_DATA_DIR", None)
    command = [sys.executable, "-m", "uap_lightning.run", f"hydra.run.dir={run_dir}", *FAST, *overrides]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """The same CLI run twice from an unrelated working directory (second one hits the victim cache)."""
    root = tmp_path_factory.mktemp("cli")
    cwd = root / "elsewhere"
    cwd.mkdir()
    runs = []
    for name in ("first", "second"):
        done = cli(root / name, root / "cache", "attack.eps=64", "attack.p=inf", cwd=cwd)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append((root / name, done.stdout))
    return runs


def test_cli_writes_every_output(cli_runs):
    run_dir, stdout = cli_runs[0]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert REQUIRED_KEYS <= metrics.keys()
    assert metrics["p"] == "inf" and metrics["eps"] == 64 and metrics["attack_images"] == 200
    assert metrics["eval_images"] == 360  # digits: the fixed 20% test split
    assert len(metrics["history"]) == metrics["passes"] >= 1
    assert all(HISTORY_KEYS <= entry.keys() for entry in metrics["history"])
    assert [entry["pass"] for entry in metrics["history"]] == list(range(1, metrics["passes"] + 1))
    assert metrics["victim_source"] == "trained" and metrics["victim_accuracy"] > 0.8

    v = torch.load(run_dir / "perturbation.pt", weights_only=True)
    assert v.shape == (1, 8, 8) and v.dtype == torch.float32
    assert float(v.abs().max()) <= 64 / 255 + 1e-6
    assert abs(metrics["norm_linf"] - float(v.abs().max()) * 255) < 1e-3

    for name in ("perturbation.png", "examples.png", ".hydra/config.yaml", ".hydra/overrides.yaml"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tensorboard").glob("*/attack/events.out.tfevents.*"))
    assert list((run_dir / "tensorboard").glob("*/victim/events.out.tfevents.*"))
    assert "fooling" in stdout and str(run_dir.resolve()) in stdout


def test_cli_is_deterministic_and_reuses_the_victim(cli_runs):
    (first, _), (second, _) = cli_runs
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (first, second))
    assert m2["victim_source"] == "cache" and m2["victim_accuracy"] == m1["victim_accuracy"]
    v1, v2 = (torch.load(d / "perturbation.pt", weights_only=True) for d in (first, second))
    assert torch.equal(v1, v2)
    assert m1["fooling_rate"] == m2["fooling_rate"]


def test_tensorboard_has_scalars_images_and_hparams(cli_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = cli_runs[0]
    attack_run = next((run_dir / "tensorboard").glob("*/attack"))
    events = EventAccumulator(str(attack_run))
    events.Reload()
    tags = events.Tags()
    assert {"attack/fooling_rate", "attack/perturbed_accuracy", "attack/norm_l2", "attack/norm_linf"} <= set(
        tags["scalars"]
    )
    assert any("perturbation" in tag for tag in tags["images"])
    assert any("examples" in tag for tag in tags["images"])
    hparams_runs = [p for p in attack_run.rglob("events.out.tfevents.*")]
    assert any(b"_hparams_/session_start_info" in p.read_bytes() for p in hparams_runs)


def test_cli_rejects_a_typo_naming_the_key(tmp_path, monkeypatch, capfd):
    from cli_runner import run_in_process

    monkeypatch.delenv("UAP_DATA_DIR", raising=False)
    arguments = (f"hydra.run.dir={tmp_path / 'run'}", *FAST, "attack.epz=3")
    done = run_in_process(monkeypatch, capfd, tmp_path, *arguments, env={"UAP_CACHE_DIR": str(tmp_path / "cache")})
    assert done.returncode != 0
    assert "epz" in done.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_uap_fools_far_more_than_random_noise(make_cfg):
    """ℓ2 ε=480 on digits: the perturbation beats both random baselines by far, and each baseline
    equals an independent recomputation (5 Gaussian directions scaled to the norm, eval mode)."""
    cfg = make_cfg(*FAST, "attack.p=2", "attack.eps=480", "attack.max_passes=3", "logger=none")
    metrics = run(cfg)
    assert metrics["fooling_rate"] > max(metrics["random_fooling_rate"], metrics["random_same_l2_fooling_rate"]) + 0.25
    assert metrics["perturbed_accuracy"] < metrics["clean_accuracy"] - 0.2
    assert metrics["beats_random"] is True and metrics["random_draws"] == 5

    datamodule = build_datamodule(cfg.data, cache_dir=cfg.paths.cache_dir)
    datamodule.setup("fit")
    victim = obtain_victim(
        cfg.model, cfg.trainer, datamodule, seed=cfg.seed, cache_dir=cfg.paths.cache_dir, lock_timeout=60
    )
    assert victim.source == "cache"
    images, _ = datamodule.eval_set()
    net = victim.module.net.eval()
    clean = net(images).argmax(1)
    v = torch.load(Path(cfg.paths.output_dir) / "perturbation.pt", weights_only=True)
    generator = torch.Generator().manual_seed(cfg.seed + 1)

    def mean_rate(norm_255):
        rates = []
        for _ in range(5):
            direction = torch.randn(images.shape[1:], generator=generator)
            noise = direction / direction.norm() * norm_255 / 255
            rates.append((net((images + noise).clamp(0, 1)).argmax(1) != clean).float().mean().item())
        return sum(rates) / 5

    assert metrics["random_fooling_rate"] == pytest.approx(mean_rate(480.0), abs=1e-6)
    assert metrics["random_same_l2_fooling_rate"] == pytest.approx(mean_rate(float(v.norm()) * 255), abs=1e-6)


@pytest.mark.parametrize(
    "override, message",
    [
        ("attack.delta=1.5", "attack.delta"),
        ("attack.max_passes=0", "attack.max_passes"),
        ("attack.p=3", "p"),
        ("attack.target_class=12", "attack.target_class"),
        ("attack.method=pgd", "pgd"),
        ("model.checkpoint=/no/such/weights.pt", "model.checkpoint"),
        ("attack.num_candidates=1", "num_candidates"),
    ],
)
def test_bad_settings_fail_before_any_heavy_work(make_cfg, monkeypatch, override, message):
    def no_data(*args, **kwargs):
        raise AssertionError("data was loaded before the settings were checked")

    monkeypatch.setattr(task_setup, "build_datamodule", no_data)
    with pytest.raises(ConfigError, match=message):
        run(make_cfg(override))


def test_missing_eps_default_names_the_setting(make_cfg):
    cfg = make_cfg("attack.eps=null")
    cfg.data.default_eps = {}
    with pytest.raises(ConfigError, match="attack.eps"):
        run(cfg)


def test_failure_while_writing_leaves_no_metrics(make_cfg, monkeypatch, tmp_path):
    cfg = make_cfg(*FAST, "attack.max_passes=1", "logger=none")
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text("{}")  # a stale file from an earlier run

    def broken_png(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("uap_lightning.report.outputs.save_figure", broken_png)
    with pytest.raises(OSError, match="disk full"):
        run(cfg)
    assert not (run_dir / "metrics.json").exists()
    assert not list(run_dir.glob("*.tmp")) and not list(run_dir.glob(".*.tmp"))

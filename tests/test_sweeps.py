"""Beyond one job: launchers, the Optuna search preset, a quiet console, loggers, the debug preset."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from conftest import CONF_DIR
from uap_lightning.config import register_configs
from uap_lightning.tasks import task_schemas

SMALL = ("trainer.max_epochs=3", "data.attack_images=100", "attack.max_passes=1")


def cli(tmp_path: Path, *arguments: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m uap_lightning.run`` in ``tmp_path`` with its own victim cache, output captured (no terminal)."""
    env = {**os.environ, "UAP_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("UAP_DATA_DIR", None)
    return subprocess.run(
        [sys.executable, "-m", "uap_lightning.run", *arguments],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def hydra_config(*overrides: str):
    register_configs(task_schemas())
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize(
    "launcher, target",
    [
        ("joblib", "JoblibLauncher"),
        ("slurm", "SlurmLauncher"),
        ("local", "LocalLauncher"),
        ("submitit_slurm", "SlurmLauncher"),
    ],
)
def test_launcher_configs_compose(launcher, target):
    cfg = hydra_config(f"hydra/launcher={launcher}")
    assert cfg.hydra.launcher._target_.endswith(target)
    if launcher in ("slurm", "local"):
        assert cfg.hydra.launcher.timeout_min == 240 and cfg.hydra.launcher.tasks_per_node == 1
    if launcher == "slurm":
        assert cfg.hydra.launcher.partition is None and cfg.hydra.launcher.gpus_per_node == 1


def test_optuna_preset_searches_the_smallest_eps():
    cfg = hydra_config("hparams_search=smallest_eps")
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.sweeper.direction == "minimize" and "attack.eps" in cfg.hydra.sweeper.params
    assert cfg.task.target_fooling_rate == 0.4


def test_objective_is_eps_once_the_target_is_reached():
    from uap_lightning.tasks.attack import objective

    assert objective(0.7, 64.0, None) == 0.7
    assert objective(0.5, 64.0, 0.4) == 64.0
    assert objective(0.2, 32.0, 0.4) == pytest.approx(32.0 + 127.5)
    assert objective(0.2, 32.0, 0.4) > objective(0.41, 128.0, 0.4)


@pytest.mark.slow
def test_a_two_worker_joblib_sweep_trains_the_victim_once(tmp_path):
    """Four jobs on two workers and an empty cache: the victim is trained once, the others wait and load it."""
    sweep = tmp_path / "sweep"
    done = cli(
        tmp_path,
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "attack.eps=32,48,64,80",
        *SMALL,
        "logger=none",
        f"hydra.sweep.dir={sweep}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = pd.read_csv(sweep / "summary.csv")
    assert summary["status"].tolist() == ["ok"] * 4
    assert sorted(summary["victim_source"]) == ["cache", "cache", "cache", "trained"]
    assert len([p for p in (tmp_path / "cache" / "victims").iterdir() if p.is_dir()]) == 1


@pytest.mark.slow
def test_optuna_search_runs_and_names_the_best_eps(tmp_path):
    sweep = tmp_path / "search"
    done = cli(
        tmp_path,
        "hparams_search=smallest_eps",
        "hydra.sweeper.n_trials=2",
        *SMALL,
        "logger=none",
        f"hydra.sweep.dir={sweep}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Best parameters" in done.stdout + done.stderr
    assert (sweep / "optimization_results.yaml").is_file()
    assert len(pd.read_csv(sweep / "summary.csv")) == 2


@pytest.mark.slow
def test_the_default_run_is_quiet_off_a_terminal_and_logs_its_summary(tmp_path):
    """What `make run` prints when its output is not a terminal: a few lines, the summary also in run.log."""
    run_dir = tmp_path / "run"
    done = cli(tmp_path, f"hydra.run.dir={run_dir}", "logger=[tensorboard,csv]", "trainer.max_epochs=3")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (done.stdout + done.stderr).splitlines()
    assert len(lines) < 60, "\n".join(lines)
    assert not any("Tip" in line or "GPU available" in line or "LeafSpec" in line for line in lines)
    log = (run_dir / "run.log").read_text()
    assert "fooling" in log and "random" in log and "victim epoch 3/3" in log
    for version in ("victim", "attack"):
        table = pd.read_csv(run_dir / "csv" / version / "metrics.csv")
        assert len(table) > 0
    assert "final/fooling_rate" in pd.read_csv(run_dir / "csv" / "attack" / "metrics.csv").columns


@pytest.mark.slow
def test_cfg_job_resolve_and_the_debug_preset(tmp_path):
    shown = cli(tmp_path, "--cfg", "job", "--resolve")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "output_dir: null" in shown.stdout
    done = cli(tmp_path, "debug=default", f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_tensorboard_hparams_hold_the_summary_and_only_the_engine_keys(make_cfg):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from uap_lightning.tasks import run_task

    cfg = make_cfg(*SMALL, "logger=tensorboard")
    run_task(cfg)
    folder = next((Path(cfg.paths.output_dir) / "tensorboard").glob("*/attack"))
    content = b"".join(p.read_bytes() for p in folder.rglob("events.out.tfevents.*"))
    for key in (
        "final/random_fooling_rate",
        "final/random_same_l2_fooling_rate",
        "final/beats_random",
        "final/norm_l2",
        "final/victim_accuracy",
        "attack/deepfool_norm",
    ):
        assert key.encode() in content, key
    assert b"attack/beta" not in content and b"attack/aggregate" not in content
    events = EventAccumulator(str(folder))
    events.Reload()
    assert "attack/kept_pass" in events.Tags()["scalars"]

"""The stack's loggers and callbacks from `_target_` configs, the allow-list of what they may build,
and the config tree printed at start."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from uap_lightning.console import print_config_tree
from uap_lightning.errors import ConfigError
from uap_lightning.loggers import instantiate_callbacks, instantiate_loggers
from uap_lightning.tasks import run_task

SMALL = ("trainer.max_epochs=2", "data.attack_images=60", "attack.max_passes=1", "attack.eps=64")


def test_every_logger_preset_builds_one_run_per_phase(make_cfg, tmp_path):
    """logger=[tensorboard,csv] builds Lightning's loggers, each run named after the phase."""
    cfg = make_cfg("logger=[tensorboard,csv]")
    loggers = instantiate_loggers(cfg.logger, "victim")
    assert [type(logger).__name__ for logger in loggers] == ["TensorBoardLogger", "CSVLogger"]
    assert all(logger.version == "victim" for logger in loggers)
    assert instantiate_loggers(make_cfg("logger=none").logger, "attack") == []


def test_wandb_and_mlflow_log_offline_into_the_run_folder(make_cfg, monkeypatch):
    """logger=[wandb,mlflow] runs without a network: wandb's offline run and MLflow's SQLite store lie
    in the run folder, with the attack's final metrics."""
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = make_cfg(*SMALL, "logger=[wandb,mlflow]")
    run_task(cfg)
    run_dir = Path(cfg.paths.output_dir)
    assert list((run_dir / "wandb").glob("offline-run-*")), "no offline wandb run"
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = client.search_runs(client.get_experiment_by_name("uap_lightning").experiment_id)
    assert {run.info.run_name for run in runs} >= {"victim", "attack"}
    assert any("final/fooling_rate" in run.data.metrics for run in runs)


def test_training_callbacks_reach_the_trainer_and_key_the_victim(make_cfg):
    """callbacks=early_stopping goes to victim training (a Lightning callback) and makes its own cache entry."""
    cfg = make_cfg(*SMALL, "callbacks=early_stopping", "logger=none")
    built = instantiate_callbacks(cfg.callbacks)
    assert [type(c).__name__ for c in built["training"]] == ["EarlyStopping"] and built["attack"] == []
    with_callback = run_task(cfg)
    without = run_task(make_cfg(*SMALL, "logger=none"))
    assert with_callback["victim_source"] == "trained" and without["victim_source"] == "trained"


@pytest.mark.parametrize("group", ["logger", "callbacks"])
def test_a_target_outside_the_allow_list_is_refused_before_it_is_built(make_cfg, group, tmp_path):
    """A _target_ naming a class outside the allowed packages ends in ConfigError naming the entry; nothing runs."""
    marker = tmp_path / "ran"
    cfg = make_cfg(*SMALL, "logger=none", f"+{group}.evil._target_=pathlib.Path.touch",
                   f"+{group}.evil.self={marker}")
    with pytest.raises(ConfigError, match=rf"{group}.evil._target_=pathlib.Path.touch is not allowed"):
        run_task(cfg)
    assert not marker.exists()


def test_the_config_tree_is_printed_when_asked(capsys):
    """extras.print_config=true prints every group of the config as a tree; false prints nothing."""
    cfg = OmegaConf.create({"data": {"name": "digits"}, "attack": {"eps": 64}, "seed": 0})
    print_config_tree(cfg, True)
    shown = capsys.readouterr().out
    assert "config" in shown and "data" in shown and "digits" in shown and "eps" in shown
    print_config_tree(cfg, False)
    assert capsys.readouterr().out == ""


def test_task_reports_reach_the_loggers(make_cfg):
    """A task's results (here transfer's) go to the run's loggers: a CSV run named after the task."""
    cfg = make_cfg(*SMALL, "task=transfer", "task.victims=[cnn]", "logger=csv")
    run_task(cfg)
    table = pd.read_csv(Path(cfg.paths.output_dir) / "csv" / "transfer" / "metrics.csv")
    assert "transfer/random_draws" in table.columns

"""The stack's loggers and callbacks from `_target_` configs, the allow-list of what they may build,
what reaches TensorBoard (scalars of every task, HPARAMS, readable run folders), quiet tracking
loggers, `make tensorboard`, and the config tree printed at start."""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata

from conftest import CONF_DIR, compose_config
from uap_lightning.config import register_configs
from uap_lightning.console import print_config_tree
from uap_lightning.errors import ConfigError
from uap_lightning.loggers import instantiate_callbacks, instantiate_loggers, run_hparams
from uap_lightning.tasks import run_task, task_schemas
from uap_lightning.validation import attack_settings

SMALL = ("trainer.max_epochs=2", "data.attack_images=60", "attack.max_passes=1", "attack.eps=64")
REPO = Path(__file__).resolve().parents[1]
RUN_NAME = "deepfool_uap-linf-eps64-cnn-digits"  # what SMALL runs: engine, norm, ε, victim, data


def events_of(folder: Path) -> EventAccumulator:
    """The TensorBoard events of the run in ``folder``, read back."""
    assert list(folder.glob("events.out.tfevents.*")), f"no TensorBoard run in {folder}"
    events = EventAccumulator(str(folder))
    events.Reload()
    return events


def scalars_of(events: EventAccumulator) -> Dict[str, Dict[int, float]]:
    """{tag: {step: value}} of every scalar of ``events``."""
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def hparams_of(events: EventAccumulator) -> Dict[str, Any]:
    """The HPARAMS entry of ``events``' run: {name: value of its own type}."""
    content = events.PluginTagToContent(hparams_metadata.PLUGIN_NAME)[hparams_metadata.SESSION_START_INFO_TAG]
    info = hparams_metadata.parse_session_start_info_plugin_data(content)
    return {name: getattr(value, value.WhichOneof("kind")) for name, value in info.hparams.items()}


@pytest.fixture(scope="module")
def attack_run(tmp_path_factory) -> Path:
    """The run folder of one small attack logged to TensorBoard."""
    cfg = compose_config([*SMALL, "logger=tensorboard"], tmp_path_factory.mktemp("attack"))
    run_task(cfg)
    return Path(cfg.paths.output_dir)


def test_every_logger_preset_builds_one_run_per_phase(make_cfg, tmp_path):
    """logger=[tensorboard,csv] builds Lightning's loggers, each run named after the phase."""
    cfg = make_cfg("logger=[tensorboard,csv]")
    loggers = instantiate_loggers(cfg.logger, "victim")
    assert [type(logger).__name__ for logger in loggers] == ["TensorBoardLogger", "CSVLogger"]
    assert all(logger.version == "victim" for logger in loggers)
    assert instantiate_loggers(make_cfg("logger=none").logger, "attack") == []


def test_wandb_and_mlflow_log_offline_into_the_run_folder(make_cfg, capfd, caplog, recwarn):
    """logger=[wandb,mlflow] runs without a network and without a line on the console: wandb's offline
    runs (one per phase) and MLflow's SQLite store lie in the run folder, with the attack's final metrics."""
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    caplog.set_level(logging.INFO)
    cfg = make_cfg(*SMALL, "logger=[wandb,mlflow]")
    run_task(cfg)
    run_dir = Path(cfg.paths.output_dir)
    out, err = capfd.readouterr()
    assert "wandb:" not in out + err and "mlflow." not in out + err and "alembic" not in out + err, out + err
    library_lines = [
        r.getMessage() for r in caplog.records if r.name.startswith(("mlflow", "alembic", "lightning.pytorch.loggers"))
    ]
    assert not library_lines, library_lines
    assert not [str(w.message) for w in recwarn if "wandb" in str(w.message).lower()]
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2, "not one offline wandb run per phase"
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
    cfg = make_cfg(*SMALL, "logger=none", f"+{group}.evil._target_=pathlib.Path.touch", f"+{group}.evil.self={marker}")
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
    """Transfer's table reaches the run's loggers: in TensorBoard (and CSV, a run named after the task)
    one scalar per perturbation and victim, the random baseline's and the accuracies, as metrics.json has them."""
    cfg = make_cfg(*SMALL, "task=transfer", "task.victims=[cnn,lenet]", "logger=[tensorboard,csv]")
    results = run_task(cfg)
    run_dir = Path(cfg.paths.output_dir)
    assert "transfer/random_draws" in pd.read_csv(run_dir / "csv" / "transfer" / "metrics.csv").columns
    scalars = scalars_of(events_of(run_dir / "tensorboard" / "deepfool_uap-linf-eps64-cnn-digits" / "transfer"))
    for source in ("cnn", "lenet"):
        for victim in ("cnn", "lenet"):
            expected = results["fooling_rate"][f"perturbation from {source}"][victim]
            assert scalars[f"transfer/{source}/{victim}/fooling_rate"] == {0: pytest.approx(expected)}
        assert scalars[f"transfer/random_noise/{source}/fooling_rate"][0] == pytest.approx(
            results["random_fooling_rate"][source]
        )
        assert scalars[f"transfer/clean_accuracy/{source}"][0] == pytest.approx(results["clean_accuracy"][source])


def test_generalisation_reaches_tensorboard_by_the_size_of_x(make_cfg):
    """task=generalisation logs each size's fooling rate and baselines at step |X|."""
    cfg = make_cfg(*SMALL, "task=generalisation", "task.sizes=[20,40]", "logger=tensorboard")
    rows = run_task(cfg)["rows"]
    scalars = scalars_of(events_of(Path(cfg.paths.output_dir) / "tensorboard" / RUN_NAME / "generalisation"))
    for key in ("fooling_rate", "fooling_rate_attack_set", "random_fooling_rate", "random_same_l2_fooling_rate"):
        assert scalars[f"generalisation/{key}"] == {row["attack_images"]: pytest.approx(row[key]) for row in rows}


def test_tensorboard_runs_are_named_after_what_ran_inside_the_run_folder(attack_run):
    """Each phase's TensorBoard run lies in <run dir>/tensorboard/<engine-norm-ε-victim-data>/<phase>."""
    assert sorted(p.name for p in (attack_run / "tensorboard").iterdir()) == [RUN_NAME]
    for phase in ("victim", "attack"):
        events_of(attack_run / "tensorboard" / RUN_NAME / phase)
    assert not list(attack_run.rglob("version_*"))


def test_attack_hparams_are_the_key_settings_typed_without_nulls(attack_run):
    """A single run's HPARAMS: the attack's settings and options, victim, data and seed, flat, numbers
    as numbers (booleans as 0/1, as torch writes them) and text as text; null settings (target_class,
    the engine's inner_step) left out; no 'None'."""
    hparams = hparams_of(events_of(attack_run / "tensorboard" / RUN_NAME / "attack"))
    assert {
        "attack/method": "deepfool_uap",
        "attack/eps": 64.0,
        "attack/p": "inf",
        "attack/max_passes": 1.0,
        "attack/clip": 1.0,
        "attack/deepfool_norm": "2",
        "model": "cnn",
        "data": "digits",
        "data/attack_images": 60.0,
        "seed": 0.0,
    }.items() <= hparams.items()
    assert "None" not in hparams.values() and not any("None" in str(v) for v in hparams.values())
    assert "attack/target_class" not in hparams and "attack/inner_step" not in hparams
    assert not [name for name in hparams if name.startswith(("trainer", "paths", "logger", "extras"))]


@pytest.fixture
def sweep_job():
    """``sweep_job(overrides)``: the run config of a multirun job with ``overrides``, Hydra's job
    settings in place (as inside a sweep) until the test ends."""
    register_configs(task_schemas())

    def job(overrides):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=[*overrides, "hydra.mode=MULTIRUN"], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        return cfg

    yield job
    HydraConfig.instance().cfg = None


def test_sweep_hparams_are_the_keys_the_job_sets(sweep_job):
    """In a sweep, HPARAMS hold the swept settings only, typed as the config holds them; a group by its
    option; nulls and where-to-report keys (paths, logger) left out."""
    cfg = sweep_job(
        [
            "attack.eps=32",
            "attack.p=2",
            "model=lenet",
            "attack.target_class=null",
            "paths.cache_dir=/tmp/cache",
            "logger=csv",
            "data.attack_images=60",
        ]
    )
    assert run_hparams(cfg, attack_settings(cfg)) == {
        "attack/eps": 32.0,
        "attack/p": "2",
        "model": "lenet",
        "data/attack_images": 60,
    }


def test_make_tensorboard_serves_the_run_folders_on_localhost():
    """`make tensorboard` serves outputs/ and multirun/ (either may not exist yet) on localhost, not the
    whole working tree on every interface; TB_HOST opens it to the network on request."""
    from tensorboard import program

    if shutil.which("make") is None:
        pytest.skip("make is not installed")

    def flags(*variables):
        shown = subprocess.run(
            ["make", "-n", "tensorboard", *variables], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout
        line = next(line for line in shown.splitlines() if "/tensorboard " in line)
        server = program.TensorBoard()
        server.configure(argv=[None, *shlex.split(line)[1:]])  # TensorBoard's own parsing of the recipe's flags
        return server.flags

    default = flags()
    assert default.host == "localhost" and not default.bind_all and default.logdir == ""
    assert sorted(default.logdir_spec.split(",")) == ["multirun:multirun", "outputs:outputs"]
    assert flags("TB_HOST=0.0.0.0").host == "0.0.0.0"


def _hparams_api(logdir: Path, route: str, request: dict) -> dict:
    """TensorBoard's HParams plugin answering ``route`` for ``logdir``, as the TensorBoard page asks it."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import hparams_plugin
    from werkzeug.test import Client
    from werkzeug.wrappers import Response

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
    plugin = hparams_plugin.HParamsPlugin(
        base_plugin.TBContext(logdir=str(logdir), multiplexer=multiplexer, data_provider=provider)
    )
    client = Client(plugin.get_plugin_apps()[route], Response)
    answer = client.post(
        route,
        data=json.dumps(request),
        content_type="application/json",
        environ_overrides=context.set_in_environ({}, context.RequestContext()),
    )
    assert answer.status_code == 200, answer.get_data()
    return json.loads(answer.get_data())


def test_hparams_view_lists_every_tasks_metrics_under_one_logdir(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    from uap_lightning.loggers import log_outcome

    attack = TensorBoardLogger(str(tmp_path), name="attack_run")
    log_outcome(attack, {"attack/method": "sgd_uap", "attack/eps": 10.0}, {"final/fooling_rate": 0.75}, step=3)
    geometry = TensorBoardLogger(str(tmp_path), name="geometry_run")
    log_outcome(geometry, {"attack/method": "deepfool_uap"}, {"geometry/ratio": 2.0})
    experiment = _hparams_api(tmp_path, "/experiment", {"experimentName": ""})
    tags = {info["name"]["tag"] for info in experiment["metricInfos"]}
    assert {"final/fooling_rate", "geometry/ratio"} <= tags
    groups = _hparams_api(
        tmp_path,
        "/session_groups",
        {
            "experimentName": "",
            "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
            "colParams": [{"metric": {"tag": "final/fooling_rate"}}],
            "startIndex": 0,
            "sliceSize": 10,
        },
    )
    values = [
        value["value"]
        for group in groups["sessionGroups"]
        for value in group.get("metricValues", [])
        if value["name"]["tag"] == "final/fooling_rate"
    ]
    assert values == [pytest.approx(0.75)]


def test_run_names_tell_apart_what_changes_the_computation(make_cfg):
    names = {
        overrides: OmegaConf.to_container(make_cfg(*overrides).logger, resolve=True)["tensorboard"]["name"]
        for overrides in [
            ("attack=deepfool_uap",),
            ("attack=deepfool_uap", "attack.inner=fgsm"),
            ("attack=sgd_uap", "attack.loss=logit_margin"),
            ("attack=sgd_uap", "attack.ensemble=[cnn,lenet]"),
            ("attack=trm_uap",),  # its default prior, gauss, is not named
            ("attack=trm_uap", "attack.prior=jigsaw"),
            ("attack=gd_uap", "attack.prior=data"),
        ]
    }
    assert list(names.values()) == [
        "tensorboard/deepfool_uap-linf-eps64-cnn-digits",
        "tensorboard/deepfool_uap-inner_fgsm-linf-eps64-cnn-digits",
        "tensorboard/sgd_uap-loss_logit_margin-linf-eps64-cnn-digits",
        "tensorboard/sgd_uap-linf-eps64-cnn+lenet-digits",
        "tensorboard/trm_uap-linf-eps64-cnn-digits",
        "tensorboard/trm_uap-prior_jigsaw-linf-eps64-cnn-digits",
        "tensorboard/gd_uap-prior_data-linf-eps64-cnn-digits",
    ]


def test_tracking_loggers_keep_their_files_in_the_run_folder_with_telemetry_off(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from uap_lightning.loggers import LocalMLFlowLogger, PhaseWandbLogger

    for variable in (
        "WANDB_CACHE_DIR",
        "WANDB_CONFIG_DIR",
        "WANDB_DATA_DIR",
        "WANDB_ARTIFACT_DIR",
        "WANDB_ERROR_REPORTING",
        "MLFLOW_DISABLE_TELEMETRY",
    ):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", "/mine")  # the user's own setting wins
    PhaseWandbLogger(save_dir=str(tmp_path), offline=True)
    LocalMLFlowLogger(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    import os

    assert os.environ["WANDB_CACHE_DIR"] == str(tmp_path / "wandb" / "cache")
    assert os.environ["WANDB_CONFIG_DIR"] == "/mine"
    assert os.environ["WANDB_ERROR_REPORTING"] == "false" and os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"

"""The command line: one clean message and exit code 2 for bad input, and both console scripts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from cli_runner import run_in_process
from uap_lightning.validation import ConfigError, validate


def cli_in_process(monkeypatch, capfd, tmp_path: Path, *overrides: str):
    """:func:`cli` run in this process (the same entry, arguments, environment and folder)."""
    monkeypatch.delenv("UAP_DATA_DIR", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    arguments = (f"hydra.run.dir={tmp_path / 'run'}", "logger=none", *overrides)
    return run_in_process(monkeypatch, capfd, tmp_path, *arguments, env={"UAP_CACHE_DIR": str(tmp_path / "cache")})


def cli(tmp_path: Path, *overrides: str, module: str = "uap_lightning.run", env_extra=None):
    env = {**os.environ, "UAP_CACHE_DIR": str(tmp_path / "cache"), **(env_extra or {})}
    env.pop("UAP_DATA_DIR", None)
    if not env_extra:
        env.pop("HYDRA_FULL_ERROR", None)
    command = [sys.executable, "-m", module, f"hydra.run.dir={tmp_path / 'run'}", "logger=none", *overrides]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("attack.delta=1.5", "attack.delta"),  # found by the checks
        ("+attack.epss=3", "attack.epss"),  # a key Hydra lets through with +
        ("attack.beta=5", "beta"),  # a key of another engine, refused by Hydra
        ("attack.epz=3", "epz"),  # a typo, refused by Hydra
        ("data=nosuchdata", "nosuchdata"),
        ("model.checkpoint=/no/such/file.pt", "model.checkpoint"),
    ],
)
def test_bad_settings_end_with_one_message_and_exit_code_2(tmp_path, monkeypatch, capfd, override, fragment):
    done = cli_in_process(monkeypatch, capfd, tmp_path, override)
    assert done.returncode == 2, done.stderr[-2000:]
    output = done.stdout + done.stderr
    assert fragment in output
    assert "Traceback" not in output
    assert not (tmp_path / "run").exists() or not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize(
    "override, expected",
    [
        ("attack.eps=8/255", "attack.eps is in 0–255 pixel units: use attack.eps=8 (not 8/255)"),
        ("attack.epss=10", "did you mean attack.eps=10?"),
        ("atack.eps=10", "did you mean attack.eps=10?"),
    ],
)
def test_settings_hydra_cannot_compose_get_our_message(tmp_path, monkeypatch, capfd, override, expected):
    """A value or key Hydra refuses: one line saying what to type, never Hydra's `+key` advice."""
    done = cli_in_process(monkeypatch, capfd, tmp_path, override)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-2000:]
    assert expected in output
    assert done.stderr.startswith("ERROR: ") and done.stderr.count("\n") == 1  # one line, however logging is set up
    assert "To append" not in output and "+attack" not in output and "+atack" not in output
    assert "Traceback" not in output and not (tmp_path / "run").exists()


def test_an_option_of_other_engines_says_which_and_how_to_set_it(tmp_path, monkeypatch, capfd):
    """attack.prior belongs to gd_uap and trm_uap: the default engine, deepfool_uap, has none."""
    done = cli_in_process(monkeypatch, capfd, tmp_path, "attack.prior=jigsaw")
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-2000:]
    assert "prior is an option of gd_uap, trm_uap, not of attack=deepfool_uap" in output
    assert "attack=gd_uap attack.prior=jigsaw" in output and "write ++attack.prior=jigsaw" in output
    assert "Traceback" not in output and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_full_error_still_shows_the_traceback(tmp_path):
    done = cli(tmp_path, "attack.delta=1.5", env_extra={"HYDRA_FULL_ERROR": "1"})
    assert done.returncode != 0 and "Traceback" in done.stderr


def test_gpu_trainer_without_a_gpu_fails_before_any_work_and_leaves_nothing(tmp_path, monkeypatch, capfd):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    done = cli_in_process(monkeypatch, capfd, tmp_path, "trainer=gpu")
    assert done.returncode == 2
    assert "trainer=default" in done.stdout + done.stderr
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*.lock"))


def test_keys_added_with_plus_and_engine_mismatch_are_refused(make_cfg):
    with pytest.raises(ConfigError, match="did you mean attack.eps"):
        validate(make_cfg("+attack.epss=3"))
    with pytest.raises(ConfigError, match="data.foo"):
        validate(make_cfg("+data.foo=1"))
    with pytest.raises(ConfigError, match="attack=sgd_uap"):
        validate(make_cfg("attack.method=sgd_uap"))
    with pytest.raises(ConfigError, match="prior is an option of gd_uap, trm_uap, not of attack=sgd_uap"):
        validate(make_cfg("attack=sgd_uap", "++attack.prior=jigsaw"))
    with pytest.raises(ConfigCompositionException):
        make_cfg("attack.beta=5")
    validate(make_cfg("attack=sgd_uap", "attack.beta=5"))


def test_every_engine_schema_is_the_shared_settings_and_the_engines_options():
    """One schema per engine, derived from it: the shared keys plus exactly its options, with the
    engine's defaults."""
    import dataclasses

    from uap_lightning.attacks import ENGINES
    from uap_lightning.config import AttackConfig, attack_schemas

    shared = {f.name for f in dataclasses.fields(AttackConfig)}
    schemas = attack_schemas()
    assert set(schemas) == set(ENGINES)
    for method, schema in schemas.items():
        own = {f.name: f.default for f in dataclasses.fields(schema) if f.name not in shared}
        engine = ENGINES[method]
        assert own == {f.name: f.default for f in dataclasses.fields(engine.Options)}, method


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The package installed from a built wheel (not editable) into a folder of its own."""
    target = tmp_path_factory.mktemp("site")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(root)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return target


@pytest.mark.parametrize("script", ["uap-lightning", pytest.param("uap-bench", marks=pytest.mark.slow)])
def test_console_scripts_work_from_any_folder_after_a_wheel_install(installed, tmp_path, script):
    env = {**os.environ, "PYTHONPATH": str(installed)}
    where = subprocess.run(
        [sys.executable, "-c", "import uap_lightning; print(uap_lightning.__file__)"],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert str(installed) in where.stdout
    done = subprocess.run(
        [str(installed / "bin" / script), "--cfg", "job", "--resolve", "paths.data_dir=/data"],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "attack:" in done.stdout and "task:" in done.stdout

"""Interrupted attacks resume to the same result; a run folder never mixes two runs."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from uap_lightning.loop import AttackLoop, AttackState
from uap_lightning.tasks import run_task

# A digits run with enough passes to interrupt: a 3-epoch cnn, 100 attack images, never converging.
SETTINGS = (
    "trainer.max_epochs=3",
    "data.attack_images=100",
    "attack.max_passes=4",
    "attack.delta=0.01",
    "attack.eps=64",
    "logger=none",
)


def interrupt_after(monkeypatch, passes: int) -> None:
    """Make the loop raise KeyboardInterrupt (as Ctrl-C would) once the state of ``passes`` is saved."""
    save = AttackLoop._save

    def save_then_interrupt(self, state):
        save(self, state)
        if state.passes == passes and not state.finished:
            raise KeyboardInterrupt("test")

    monkeypatch.setattr(AttackLoop, "_save", save_then_interrupt)


def read(run_dir: Path):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return metrics, torch.load(run_dir / "perturbation.pt", weights_only=True)


@pytest.mark.parametrize("method", ["deepfool_uap", pytest.param("sgd_uap", marks=pytest.mark.slow), "gd_uap"])
def test_interrupted_attack_resumes_to_the_uninterrupted_perturbation(tmp_path, monkeypatch, method):
    """Interrupt after pass 2, rerun the same settings in the same folder: bit-identical v."""
    from conftest import compose_config

    def cfg_in(name: str):
        cfg = compose_config([f"attack={method}", *SETTINGS], tmp_path)
        cfg.paths.output_dir = str(tmp_path / name)
        return cfg

    run_task(cfg_in("straight"))
    reference, reference_v = read(tmp_path / "straight")

    with monkeypatch.context() as patch:
        interrupt_after(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            run_task(cfg_in("interrupted"))
    partial, _ = read(tmp_path / "interrupted")
    assert partial["interrupted"] is True and partial["passes"] == 2
    assert [h["pass"] for h in partial["history"]] == [1, 2]

    resumed, resumed_v = read_after(run_task(cfg_in("interrupted")), tmp_path / "interrupted")
    assert torch.equal(resumed_v, reference_v)
    assert resumed["interrupted"] is False and resumed["passes"] == reference["passes"] == 4
    for key in ("fooling_rate", "fooling_rate_attack_set", "best_pass", "norm_l2", "random_fooling_rate"):
        assert resumed[key] == reference[key], key
    assert [h["fooling_rate"] for h in resumed["history"]] == [h["fooling_rate"] for h in reference["history"]]


def read_after(returned, run_dir: Path):
    assert returned["interrupted"] is False
    return read(run_dir)


def test_other_settings_start_afresh_and_move_the_old_outputs_aside(tmp_path, monkeypatch, caplog):
    """A changed setting: the warning names it with its old and new values, the attack starts
    afresh, and the earlier run's outputs (its settings record included) are moved aside."""
    from conftest import compose_config

    cfg = compose_config(SETTINGS, tmp_path)
    with monkeypatch.context() as patch:
        interrupt_after(patch, 1)
        with pytest.raises(KeyboardInterrupt):
            run_task(cfg)
    run_dir = Path(cfg.paths.output_dir)
    assert json.loads((run_dir / "attack_settings.json").read_text())["settings"]["attack.eps"] == 64
    cfg.attack.eps = 48.0
    with caplog.at_level(logging.WARNING):
        metrics = run_task(cfg)
    assert "attack.eps changed 64 → 48 since the saved state" in caplog.text, caplog.text
    assert "starting afresh" in caplog.text
    assert metrics["passes"] == 4 and metrics["eps"] == 48
    stale = list((run_dir / "stale").iterdir())
    assert len(stale) == 1
    old = json.loads((stale[0] / "metrics.json").read_text())
    assert old["interrupted"] is True and old["eps"] == 64
    assert {"perturbation.pt", "attack_state.ckpt", "attack_settings.json"} <= {p.name for p in stale[0].iterdir()}
    assert json.loads((run_dir / "attack_settings.json").read_text())["settings"]["attack.eps"] == 48


def test_a_generator_checkpoint_of_other_settings_names_the_changed_keys(tmp_path, caplog):
    """attack=gap: a last.ckpt saved with other settings is not continued, and the warning names
    each changed key with its old and new values (max_passes is not one: more passes continue)."""
    from uap_lightning.models.gap_module import STATE_KEY
    from uap_lightning.tasks.attack import _resumable_generator, record_settings

    saved = {"attack.eps": 10.0, "attack.p": float("inf"), "attack.lr": 0.0002, "seed": 0}
    record_settings(tmp_path, "before", saved)
    torch.save({STATE_KEY: {"fingerprint": "before", "history": [{"pass": 1}]}}, tmp_path / "last.ckpt")
    now = {**saved, "attack.eps": 8.0, "attack.p": 2.0}
    with caplog.at_level(logging.WARNING):
        assert _resumable_generator(tmp_path / "last.ckpt", "after", True, 5, settings=now) is None
    assert "attack.eps changed 10 → 8, attack.p changed inf → 2 since the saved state" in caplog.text, caplog.text
    assert "starting afresh" in caplog.text


def test_a_state_without_a_settings_record_still_says_the_settings_changed(tmp_path, caplog):
    """A state saved before runs recorded their settings: the warning says the settings changed, naming none."""
    from uap_lightning.tasks.attack import _resumable

    saved_state(tmp_path / "attack_state.ckpt")
    with caplog.at_level(logging.WARNING):
        assert _resumable(tmp_path / "attack_state.ckpt", "other", True, settings={"attack.eps": 8.0}) is None
    assert "other settings; starting afresh" in caplog.text and "changed" not in caplog.text


@pytest.mark.slow
def test_resume_false_starts_afresh(tmp_path, monkeypatch):
    from conftest import compose_config

    cfg = compose_config(SETTINGS, tmp_path)
    with monkeypatch.context() as patch:
        interrupt_after(patch, 1)
        with pytest.raises(KeyboardInterrupt):
            run_task(cfg)
    cfg.attack.resume = False
    metrics = run_task(cfg)
    assert [h["pass"] for h in metrics["history"]] == [1, 2, 3, 4]
    assert len(list((Path(cfg.paths.output_dir) / "stale").iterdir())) == 1


@pytest.mark.slow
def test_sigterm_saves_the_last_pass_and_the_same_command_continues(tmp_path):
    """SIGTERM mid-attack: exit 130, metrics.json marked interrupted; the same command finishes it."""
    env = {**os.environ, "UAP_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("UAP_DATA_DIR", None)
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "uap_lightning.run",
        f"hydra.run.dir={run_dir}",
        "trainer.max_epochs=3",
        "data.attack_images=60",
        "attack.max_passes=10",
        "attack.delta=0.001",
        "attack.eps=64",
        "logger=none",
    ]
    process = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    state = run_dir / "attack_state.ckpt"
    deadline = time.monotonic() + 300
    while not state.exists():
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr[-2000:]
    assert "run the same command again" in stdout + stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["interrupted"] is True and 1 <= metrics["passes"] < 10
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    finished = json.loads((run_dir / "metrics.json").read_text())
    assert finished["interrupted"] is False
    assert [h["pass"] for h in finished["history"]][: metrics["passes"]] == list(range(1, metrics["passes"] + 1))
    assert finished["passes"] == 10 or finished["converged"]


def saved_state(path: Path) -> AttackState:
    """An attack state after pass 2 of v = 0.25 everywhere, saved by the loop at ``path``."""
    from lightning.fabric import Fabric

    from uap_lightning.attacks import AttackSettings, KeptPerturbation, ThreatModel

    v = torch.full((3, 4, 4), 0.25)
    state = AttackState(
        "settings",
        2,
        v,
        KeptPerturbation(v.clone(), 0.5, 2),
        torch.Generator().get_state(),
        [{"pass": 1, "fooling_rate": 0.25}, {"pass": 2, "fooling_rate": 0.5}],
        1.5,
    )
    loop = AttackLoop(
        Fabric(accelerator="cpu", devices=1), AttackSettings(ThreatModel.parse(64, "inf")), state_path=path
    )
    loop._save(state)
    return state


def test_a_saved_state_reads_back_whole(tmp_path):
    state = saved_state(tmp_path / "attack_state.ckpt")
    loaded = AttackState.load(tmp_path / "attack_state.ckpt")
    assert torch.equal(loaded.perturbation, state.perturbation) and loaded.history == state.history
    assert loaded.passes == 2 and loaded.kept.fooling_rate == 0.5
    assert [p.name for p in tmp_path.iterdir()] == ["attack_state.ckpt"]  # no temporary file left


def test_a_state_whose_bytes_changed_is_damaged_and_the_attack_starts_afresh(tmp_path, caplog):
    """One changed byte of v in attack_state.ckpt (the file still unpickles) fails its checksum: the
    state is reported damaged, never resumed from."""
    from uap_lightning.errors import DamagedFileError
    from uap_lightning.tasks.attack import _resumable

    path = tmp_path / "attack_state.ckpt"
    saved_state(path)
    data = bytearray(path.read_bytes())
    where = data.find(torch.full((16,), 0.25).numpy().tobytes())
    assert where >= 0
    data[where + 1] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(DamagedFileError, match=r"attack_state\.ckpt is damaged.*checksum"):
        AttackState.load(path)
    with caplog.at_level(logging.WARNING):
        assert _resumable(path, "settings", resume=True) is None
    assert "damaged" in caplog.text and "starting afresh" in caplog.text


def test_a_failed_save_leaves_no_temporary_file(tmp_path, monkeypatch):
    """A state save that fails midway (a full disk) leaves neither a temporary file nor a new state."""
    import errno

    def full(obj, f, *args, **kwargs):
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError):
        saved_state(tmp_path / "attack_state.ckpt")
    assert list(tmp_path.iterdir()) == []

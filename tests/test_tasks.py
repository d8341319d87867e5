"""The paper's experiments as tasks (transfer, |X| curve) and a sweep's summary, on digits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from matplotlib.image import imread

from uap_lightning.errors import ConfigError
from uap_lightning.tasks import run_task

SMALL = ("trainer.max_epochs=3", "data.attack_images=100", "attack.max_passes=2", "logger=none")


def png_shape(path: Path):
    image = imread(path)
    assert image.size > 0 and image.std() > 0  # an image with content
    return image.shape[:2]


def test_transfer_matrix_shape_diagonal_and_files(make_cfg, tmp_path):
    cfg = make_cfg(*SMALL, "task=transfer", "task.victims=[cnn,lenet]")
    m = run_task(cfg)
    run_dir = Path(cfg.paths.output_dir)
    table = pd.read_csv(run_dir / "transfer.csv", index_col=0)
    assert list(table.columns) == ["cnn", "lenet"]
    assert list(table.index) == ["perturbation from cnn", "perturbation from lenet", "random ℓ∞ noise"]
    assert table.shape == (3, 2) and ((table >= 0) & (table <= 1)).all().all()
    assert png_shape(run_dir / "transfer.png")[0] > 100
    for name in ("cnn", "lenet"):
        assert (run_dir / "perturbations" / f"{name}.pt").is_file()
        assert m["fooling_rate"][f"perturbation from {name}"][name] == pytest.approx(
            table.loc[f"perturbation from {name}", name]
        )

    # the diagonal is each victim's own attack run
    for name in ("cnn", "lenet"):
        own = make_cfg(*SMALL, f"model={name}")
        own.paths.output_dir = str(tmp_path / f"own-{name}")
        assert run_task(own)["fooling_rate"] == pytest.approx(table.loc[f"perturbation from {name}", name], abs=1e-7)

    # scoring perturbations read from run folders gives the same numbers
    again = make_cfg(
        *SMALL,
        "task=transfer",
        "task.victims=[cnn,lenet]",
        f"task.perturbations=[{tmp_path / 'own-cnn'},{tmp_path / 'own-lenet'}]",
    )
    again.paths.output_dir = str(tmp_path / "from-folders")
    read = run_task(again)
    assert read["sources"] == ["deepfool_uap on cnn", "deepfool_uap on lenet"]
    assert list(read["fooling_rate"].values()) == list(m["fooling_rate"].values())


def test_transfer_checks_its_settings(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="unknown model preset 'resnet9'"):
        run_task(make_cfg("task=transfer", "task.victims=[cnn,resnet9]"))
    with pytest.raises(ConfigError, match="holds no perturbation.pt"):
        run_task(make_cfg("task=transfer", f"task.perturbations=[{tmp_path}]"))


def test_generalisation_curve_over_the_size_of_x(make_cfg):
    cfg = make_cfg(*SMALL, "task=generalisation", "task.sizes=[20,50,100]")
    m = run_task(cfg)
    run_dir = Path(cfg.paths.output_dir)
    table = pd.read_csv(run_dir / "generalisation.csv")
    assert table["attack_images"].tolist() == [20, 50, 100]
    assert {"fooling_rate", "fooling_rate_attack_set", "random_fooling_rate", "random_same_l2_fooling_rate"} <= set(
        table
    )
    assert [row["attack_images"] for row in m["rows"]] == [20, 50, 100]
    assert png_shape(run_dir / "generalisation.png") == (920, 1280)  # 6.4×4.6 in at 200 dpi
    assert (run_dir / "generalisation.pdf").is_file()
    with pytest.raises(ConfigError, match="task.sizes"):
        run_task(make_cfg("task=generalisation", "task.sizes=[20,20]"))
    with pytest.raises(ConfigError, match="training split offers"):
        run_task(make_cfg(*SMALL, "task=generalisation", "task.sizes=[100000]"))


def test_attack_run_writes_its_figures(make_cfg):
    cfg = make_cfg(*SMALL)
    m = run_task(cfg)
    run_dir = Path(cfg.paths.output_dir)
    assert png_shape(run_dir / "curve.png") == (920, 1280)  # 6.4×4.6 in at 200 dpi
    assert png_shape(run_dir / "labels.png") == (800, 1280)
    assert png_shape(run_dir / "perturbation.png") == (600, 700)
    assert png_shape(run_dir / "examples.png") == (900, 3700)  # 10 examples: 15.5×4.5 in
    assert all((run_dir / f"{name}.pdf").is_file() for name in ("curve", "labels", "perturbation", "examples"))
    assert 0 <= m["dominant_label"] < 10 and 0 < m["dominant_label_share"] <= 1
    assert m["dominant_label_name"] == str(m["dominant_label"])


@pytest.mark.slow
def test_a_sweep_with_one_failing_job_leaves_a_complete_summary(tmp_path):
    """Four jobs, one with a bad ε and one whose ε is no number (it cannot even be composed): each
    failure is a row with its error, the others are complete, and the sweep exits with status 3."""
    env = {**os.environ, "UAP_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("UAP_DATA_DIR", None)
    sweep = tmp_path / "sweep"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "uap_lightning.run",
            "-m",
            "attack.eps=32,48,64,-1,abc",
            *SMALL,
            "attack.max_passes=1",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 3, done.stderr[-3000:]
    assert "2 job(s) of the sweep failed" in done.stdout + done.stderr
    summary = pd.read_csv(sweep / "summary.csv")
    assert len(summary) == 5
    assert summary["status"].tolist() == ["ok", "ok", "ok", "failed", "failed"]
    assert "could not be converted to Float" in summary.iloc[4]["error"] or "abc" in summary.iloc[4]["error"]
    failed = summary.iloc[3]
    assert str(failed["attack.eps"]) == "-1" and "attack.eps must be a positive" in failed["error"]
    ok = summary.iloc[:3]
    assert ok["fooling_rate"].notna().all() and ok["random_fooling_rate"].notna().all()
    assert ok["random_same_l2_fooling_rate"].notna().all()
    assert "attack.eps must be a positive" in (sweep / "summary.md").read_text()
    assert png_shape(sweep / "fooling_vs_attack_eps.png")[0] > 100
    assert json.loads((sweep / summary.iloc[3]["job"] / "failure.json").read_text())["status"] == "failed"
    assert all(name.split("-")[0].isdigit() and "attack.eps=" in name for name in summary["job"])


def test_generalisation_table_prints_counts_as_integers():
    """|X|, the kept pass and the passes are counts: the logged table prints 50, not 50.000."""
    from uap_lightning.tasks import generalisation

    table = pd.DataFrame(
        [
            {"attack_images": 50, "fooling_rate": 0.25, "best_pass": 3, "passes": 4, "norm_l2": 512.25},
            {"attack_images": 100, "fooling_rate": 0.5, "best_pass": 2, "passes": 4, "norm_l2": 640.0},
        ]
    )
    text = generalisation.printable(table).to_markdown(floatfmt=".3f", index=False)  # as Setup.finish prints
    last = [cell.strip() for cell in text.splitlines()[-1].strip("|").split("|")]
    assert last == ["100", "0.500", "2", "4", "640.000"]


def test_transfer_says_what_it_scores_while_it_takes_long(make_cfg, caplog, monkeypatch):
    """Scoring perturbations and noise on every victim is a phase: lines name the victim and the
    perturbation while it runs longer than the heartbeat (minutes on the ImageNet victims)."""
    import logging

    from uap_lightning import progress
    from uap_lightning.tasks import setup as task_setup

    monkeypatch.setattr(progress, "PHASE_HEARTBEAT_SECONDS", 0.05)
    predict = task_setup.Setup.predict

    def slow_predict(self, *args, **kwargs):
        time.sleep(0.06)
        return predict(self, *args, **kwargs)

    monkeypatch.setattr(task_setup.Setup, "predict", slow_predict)
    with caplog.at_level(logging.INFO, logger="uap_lightning"):
        run_task(make_cfg(*SMALL, "task=transfer", "task.victims=[cnn,lenet]", "attack.max_passes=1"))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("scoring 2 perturbation(s)")]
    assert any(": lenet: perturbation 2 of 2 (" in line for line in lines)
    assert lines[-1].startswith("scoring 2 perturbation(s) and random noise on") and " done in " in lines[-1]

"""The sweep report: run folders found and read, summary files written, CLI and Hydra callback."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import matplotlib.image as mpimg
import pandas as pd
import pytest
from omegaconf import OmegaConf

from uap_lightning.report import sweep as sweep_module
from uap_lightning.report.sweep import collect_runs, summarize, swept_keys, write_summary

ERROR = "RuntimeError: CUDA out of memory"


def make_run(
    folder: Path,
    overrides: Sequence[str] = (),
    metrics: Optional[Dict[str, Any]] = None,
    failure: Optional[str] = None,
) -> Path:
    """A fake run folder: ``.hydra/overrides.yaml``, and ``metrics.json`` or ``failure.json`` when given."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides) or "[]\n")
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics))
    if failure is not None:
        record = {"status": "failed", "error": failure, "traceback": "Traceback (most recent call last):\n  ..."}
        (folder / "failure.json").write_text(json.dumps(record))
    return folder


def metrics_for(eps: int, model: str) -> Dict[str, Any]:
    """Plausible metrics of one finished run, with a history list that must not become a column."""
    rate = eps / 64 + (0.1 if model == "lenet" else 0.0)
    return {
        "fooling_rate": rate,
        "fooling_rate_attack_set": rate + 0.05,
        "random_fooling_rate": rate / 10,
        "random_same_l2_fooling_rate": rate / 5,
        "clean_accuracy": 0.98,
        "perturbed_accuracy": 1 - rate,
        "norm_linf": float(eps),
        "norm_l2": 10.0 * eps,
        "p": "inf",
        "converged": True,
        "model": model,
        "history": [{"pass": 1, "fooling_rate": rate}],
    }


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """A 4-job sweep over attack.eps (16, 32) × model (cnn, lenet); job 3 failed."""
    root = tmp_path / "sweep"
    jobs = [(16, "cnn"), (16, "lenet"), (32, "cnn"), (32, "lenet")]
    for i, (eps, model) in enumerate(jobs):
        overrides = [f"attack.eps={eps}", f"model={model}", "attack.p=inf", "hydra.verbose=false"]
        if i == 3:
            make_run(root / str(i), overrides, failure=f"{ERROR}\nTried to allocate 2 GiB")
        else:
            make_run(root / str(i), overrides, metrics=metrics_for(eps, model))
    return root


def test_collect_runs_reads_statuses_overrides_and_metrics(sweep: Path) -> None:
    df = collect_runs(sweep)
    assert list(df["job"]) == ["0", "1", "2", "3"]
    assert list(df["status"]) == ["ok", "ok", "ok", "failed"]
    assert df.loc[3, "error"] == ERROR
    assert list(df["error"][:3]) == ["", "", ""]
    assert list(df["attack.eps"]) == [16, 16, 32, 32]
    assert list(df["model"]) == ["cnn", "lenet", "cnn", "lenet"]
    assert set(df["attack.p"]) == {"inf"}  # an override value "inf" stays text
    assert "hydra.verbose" not in df and "history" not in df
    assert df.loc[0, "overrides"] == "attack.eps=16 model=cnn attack.p=inf hydra.verbose=false"
    assert df.loc[0, "fooling_rate"] == pytest.approx(0.25)
    assert math.isnan(df.loc[3, "fooling_rate"])
    assert df.loc[1, "metrics.model"] == "lenet"  # a metric named like an override key is renamed
    assert df.loc[0, "p"] == math.inf  # "inf" in metrics.json is a number
    assert list(df["converged"][:3]) == [True, True, True]
    assert Path(df.loc[0, "run_dir"]) == (sweep / "0").resolve()
    assert swept_keys(df) == ["attack.eps", "model"]


def test_write_summary_writes_table_markdown_and_plot(sweep: Path) -> None:
    paths = write_summary(sweep)
    names = {"summary.csv", "summary.md", "fooling_vs_attack_eps.png"}
    assert set(paths) == names
    assert all(paths[name] == sweep / name and paths[name].is_file() for name in names)
    table = pd.read_csv(sweep / "summary.csv", keep_default_na=False)
    assert list(table["status"]) == ["ok", "ok", "ok", "failed"]
    assert table.loc[3, "error"] == ERROR
    markdown = (sweep / "summary.md").read_text()
    assert "4 runs: 3 ok, 1 failed." in markdown
    assert ERROR in markdown and "Tried to allocate" not in markdown
    header = next(line for line in markdown.splitlines() if line.startswith("| job"))
    assert [cell.strip() for cell in header.strip("|").split("|")][:5] == [
        "job",
        "attack.eps",
        "model",
        "status",
        "error",
    ]
    assert "random_same_l2_fooling_rate" in header and "overrides" not in header
    image = mpimg.imread(sweep / "fooling_vs_attack_eps.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0  # something is drawn


def test_write_summary_is_deterministic(sweep: Path) -> None:
    first = {name: path.read_bytes() for name, path in write_summary(sweep).items()}
    second = {name: path.read_bytes() for name, path in write_summary(sweep).items()}
    assert first == second


def test_no_plot_without_a_swept_number(tmp_path: Path) -> None:
    for i, model in enumerate(["cnn", "lenet"]):
        make_run(tmp_path / str(i), ["attack.eps=16", f"model={model}"], metrics=metrics_for(16, model))
    df = collect_runs(tmp_path)
    assert swept_keys(df) == ["model"]
    assert set(write_summary(tmp_path, df)) == {"summary.csv", "summary.md"}


def test_statuses_stale_folders_and_natural_order(tmp_path: Path) -> None:
    for job in (10, 2, 1):
        make_run(tmp_path / "multirun" / str(job), [f"+attack.eps={job}"], metrics={"fooling_rate": job / 20})
    make_run(tmp_path / "multirun" / "3", ["++attack.eps=3"])  # started, never finished
    make_run(tmp_path / "multirun" / "4", ["attack.eps=4"], metrics={"fooling_rate": "nan", "interrupted": True})
    make_run(tmp_path / "stale" / "0", ["attack.eps=99"], metrics={"fooling_rate": 1.0})
    make_run(tmp_path / "multirun" / "2" / "stale", ["attack.eps=98"], metrics={"fooling_rate": 1.0})
    df = collect_runs(tmp_path)
    assert list(df["job"]) == ["multirun/1", "multirun/2", "multirun/3", "multirun/4", "multirun/10"]
    assert list(df["status"]) == ["ok", "ok", "incomplete", "interrupted", "ok"]
    assert list(df["attack.eps"]) == [1, 2, 3, 4, 10]
    assert math.isnan(df.loc[3, "fooling_rate"])


def test_a_run_with_only_metrics_and_no_overrides(tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text(json.dumps({"fooling_rate": 0.5}))
    df = collect_runs(tmp_path)
    assert list(df["job"]) == ["."] and list(df["overrides"]) == [""] and list(df["status"]) == ["ok"]
    assert swept_keys(df) == []


def test_empty_folder_gives_an_empty_table_and_no_files(tmp_path: Path) -> None:
    df = collect_runs(tmp_path)
    assert df.empty and {"job", "status", "run_dir"} <= set(df.columns)
    assert summarize(tmp_path) == {}
    assert list(tmp_path.iterdir()) == []


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "uap_lightning.report", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_writes_the_summary(sweep: Path) -> None:
    result = run_cli(str(sweep))
    assert result.returncode == 0, result.stderr
    printed = {Path(line).name for line in result.stdout.splitlines()}
    assert printed == {"summary.csv", "summary.md", "fooling_vs_attack_eps.png"}
    assert all((sweep / name).is_file() for name in printed)


def test_cli_fails_on_an_empty_or_missing_folder(tmp_path: Path) -> None:
    for folder in (tmp_path, tmp_path / "missing"):
        result = run_cli(str(folder))
        assert result.returncode == 2
        assert len(result.stderr.strip().splitlines()) == 1 and str(folder) in result.stderr
    assert list(tmp_path.iterdir()) == []


TOY_APP = textwrap.dedent(
    """
    import json
    from pathlib import Path

    import hydra
    from hydra.core.config_store import ConfigStore
    from hydra.core.hydra_config import HydraConfig

    ConfigStore.instance().store(name="cfg", node={"x": 1})


    @hydra.main(version_base="1.3", config_path=None, config_name="cfg")
    def main(cfg):
        out = Path(HydraConfig.get().runtime.output_dir)
        (out / "metrics.json").write_text(json.dumps({"fooling_rate": cfg.x / 10}))


    if __name__ == "__main__":
        main()
    """
)


def test_callback_summarizes_a_real_hydra_multirun(tmp_path: Path) -> None:
    app = tmp_path / "toy_app.py"
    app.write_text(TOY_APP)
    sweep_dir = tmp_path / "sweep"
    command = [
        sys.executable,
        str(app),
        "-m",
        "x=1,2,3",
        f"hydra.sweep.dir={sweep_dir}",
        "+hydra.callbacks.summary._target_=uap_lightning.report.sweep.SweepSummaryCallback",
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(sweep_dir / "summary.csv")
    assert list(table["status"]) == ["ok", "ok", "ok"]
    assert list(table["x"]) == [1, 2, 3]
    assert list(table["fooling_rate"]) == pytest.approx([0.1, 0.2, 0.3])
    assert (sweep_dir / "summary.md").is_file() and (sweep_dir / "fooling_vs_x.png").is_file()


def test_callback_logs_a_failing_report_instead_of_raising(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    def broken(root: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(sweep_module, "summarize", broken)
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    sweep_module.SweepSummaryCallback().on_multirun_end(config)
    assert "disk full" in caplog.text and str(tmp_path) in caplog.text


def engine_sweep(root: Path, models: Sequence[str]) -> pd.DataFrame:
    """Runs over attack.eps (16, 32) × engine (deepfool_uap, sgd_uap) × ``models``, on digits: the
    random noise of norm ε depends on the victim and ε only; the random direction of v's ℓ2 norm
    also on the engine."""
    job = 0
    for eps in (16, 32):
        for model in models:
            for engine, l2 in (("deepfool_uap", 1.0), ("sgd_uap", 2.0)):
                metrics = {**metrics_for(eps, model), "data": "digits", "method": engine}
                metrics["random_same_l2_fooling_rate"] *= l2
                overrides = [f"attack.eps={eps}", f"attack={engine}"] + ([f"model={model}"] if len(models) > 1 else [])
                make_run(root / str(job), overrides, metrics=metrics)
                job += 1
    return collect_runs(root)


def dashed(ax, style: str) -> list:
    return [line for line in ax.lines if line.get_linestyle() == style]


def test_sweep_plot_draws_each_victims_random_baseline_once(tmp_path: Path) -> None:
    df = engine_sweep(tmp_path / "one", ["cnn"])
    ax = sweep_module.fooling_figure(df, "attack.eps", ["attack"], {}).axes[0]
    assert len(dashed(ax, "--")) == 1  # the noise of norm ε: the same for both engines
    assert len(dashed(ax, "-.")) == 2  # v's ℓ2 norm differs per engine
    assert "cnn" in ax.get_title() and "digits" in ax.get_title()
    listed = [text.get_text() for text in ax.get_legend().get_texts()]
    assert len(listed) == len(set(listed))

    df = engine_sweep(tmp_path / "two", ["cnn", "lenet"])
    ax = sweep_module.fooling_figure(df, "attack.eps", ["model", "attack"], {}).axes[0]
    assert len(dashed(ax, "--")) == 2  # one per victim
    noise = [text.get_text() for text in ax.get_legend().get_texts() if text.get_text().startswith("random noise")]
    assert len(noise) == 2 and any("cnn" in t for t in noise) and any("lenet" in t for t in noise)
    assert "cnn" in ax.get_title() and "lenet" in ax.get_title() and "digits" in ax.get_title()

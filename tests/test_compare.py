"""task=compare: engines × sources × seeds expanded into cells, resumed, checked, and assembled into one table."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from matplotlib.image import imread
from omegaconf import open_dict

from conftest import CONF_DIR
from uap_lightning.config import register_configs
from uap_lightning.errors import ConfigError
from uap_lightning.report import compare as report
from uap_lightning.report.__main__ import main as report_main
from uap_lightning.report.sweep import collect_runs
from uap_lightning.tasks import compare, task_schemas

LISTS = ("task=compare", "task.engines=[sgd_uap,deepfool_uap]", "task.sources=[cnn,[cnn,lenet]]", "task.seeds=[0,1]")


def sweep_config(tmp_path: Path, *overrides: str):
    """The multirun config of ``overrides`` (Hydra's node included), its sweep folder in ``tmp_path``."""
    register_configs(task_schemas())
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config", overrides=[*overrides, f"hydra.sweep.dir={tmp_path / 'sweep'}"], return_hydra_config=True
        )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")  # resolvable outside a Hydra job
    return cfg


def composer(tmp_path: Path):
    """A stand-in for the sweeper's composition of a job's overrides."""
    return lambda job: sweep_config(tmp_path, *job)


def test_the_lists_expand_into_cells_with_their_overrides(tmp_path):
    cfg = sweep_config(tmp_path, *LISTS)
    plan = compare.plan(cfg.task, cfg.data)
    assert [c.name for c in plan.cells] == [
        "sgd_uap-cnn-seed0",
        "sgd_uap-cnn-seed1",
        "sgd_uap-cnn+lenet-seed0",
        "sgd_uap-cnn+lenet-seed1",
        "deepfool_uap-cnn-seed0",
        "deepfool_uap-cnn-seed1",
    ]
    assert len(plan.skipped) == 1 and plan.skipped[0].startswith("deepfool_uap on cnn+lenet")
    assert plan.cells[0].overrides() == [
        "attack=sgd_uap",
        "model=cnn",
        "attack.seed=0",
        "hydra.sweep.subdir='sgd_uap-cnn-seed0'",
    ]
    assert plan.cells[2].overrides()[1] == "attack.ensemble=[cnn,lenet]"

    jobs = compare.pending_jobs(cfg, ["task=compare", "data.attack_images=50"], [], composer(tmp_path))
    assert len(jobs) == 6 and all(job[:2] == ["task=compare", "data.attack_images=50"] for job in jobs)
    written = json.loads((tmp_path / "sweep" / report.PLAN_FILE).read_text())
    assert [c["name"] for c in written["cells"]] == [c.name for c in plan.cells]
    assert written["skipped"] == plan.skipped

    job = sweep_config(tmp_path, *LISTS, *plan.cells[2].overrides())  # a job of the ensemble cell
    assert compare.cell_of(job) == plan.cells[2]
    assert job.hydra.sweep.subdir == "sgd_uap-cnn+lenet-seed0"


def test_a_rerun_skips_complete_cells_and_redoes_broken_ones(tmp_path):
    cfg = sweep_config(tmp_path, *LISTS, "task.sources=[cnn]", "task.seeds=[0]")  # 2 cells
    base = ["task=compare", "task.sources=[cnn]", "task.seeds=[0]"]
    first, second = compare.plan(cfg.task, cfg.data).cells
    sweep = tmp_path / "sweep"
    for cell in (first, second):
        (sweep / cell.name).mkdir(parents=True)
        (sweep / cell.name / "perturbation.pt").write_bytes(b"")  # killed before metrics.json
    assert len(compare.pending_jobs(cfg, base, [], composer(tmp_path))) == 2

    fingerprint = compare.cell_fingerprint(sweep_config(tmp_path, *LISTS, *base, *first.overrides()))
    (sweep / first.name / "metrics.json").write_text(json.dumps({"fingerprint": fingerprint}))
    (sweep / second.name / "metrics.json").write_text(json.dumps({"fingerprint": "other settings"}))
    pending = compare.pending_jobs(cfg, base, [], composer(tmp_path))
    assert [job[len(base) :] for job in pending] == [second.overrides()]

    # the same cell with another ε is another result: redone; a longer list of engines is not
    assert len(compare.pending_jobs(cfg, [*base, "attack.eps=32"], [], composer(tmp_path))) == 2
    longer = sweep_config(tmp_path, *LISTS, *base, "task.engines=[sgd_uap,deepfool_uap,gd_uap]")
    assert (
        len(compare.pending_jobs(longer, [*base, "task.engines=[sgd_uap,deepfool_uap,gd_uap]"], [], composer(tmp_path)))
        == 2
    )

    (sweep / second.name / "metrics.json").write_text(json.dumps({"fingerprint": fingerprint}))  # not its own
    assert len(compare.pending_jobs(cfg, base, [], composer(tmp_path))) == 1


def test_the_default_sweeper_launches_the_cells_in_batches(tmp_path):
    from types import SimpleNamespace

    from hydra.core.override_parser.overrides_parser import OverridesParser

    # Hydra's plugin scan loads its own sweepers anew: the sweeper subclasses the class loaded last
    sweeper_module = importlib.reload(
        importlib.import_module("hydra_plugins.uap_lightning_launcher.safe_basic_sweeper")
    )

    def batches(config, arguments, max_batch_size=None):
        sweeper = sweeper_module.SafeBasicSweeper(max_batch_size=max_batch_size)
        sweeper.config = config
        sweeper.hydra_context = SimpleNamespace(
            config_loader=SimpleNamespace(
                load_sweep_config=lambda master, overrides: sweep_config(tmp_path, *overrides)
            )
        )
        return sweeper.split_arguments(OverridesParser.create().parse_overrides(arguments), max_batch_size)

    arguments = [*LISTS, "attack.max_passes=1"]
    cells = batches(sweep_config(tmp_path, *arguments), arguments, max_batch_size=4)
    assert [len(batch) for batch in cells] == [4, 2]
    assert cells[1][1] == [
        *arguments,
        "attack=deepfool_uap",
        "model=cnn",
        "attack.seed=1",
        "hydra.sweep.subdir='deepfool_uap-cnn-seed1'",
    ]
    grid = batches(sweep_config(tmp_path, "attack.max_passes=1"), ["attack.eps=32,64", "model=cnn,lenet"])
    assert grid == [
        [
            ["attack.eps=32", "model=cnn"],
            ["attack.eps=32", "model=lenet"],
            ["attack.eps=64", "model=cnn"],
            ["attack.eps=64", "model=lenet"],
        ]
    ]


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("task.engines=[sgd_uap,fgsm]", "task.engines: unknown engine 'fgsm'; known: deepfool_uap"),
        ("task.engines=[]", "task.engines is empty"),
        ("task.engines=[sga,sga]", "task.engines lists 'sga' twice"),
        ("task.sources=[cnn,resnet9]", "task.sources: unknown model preset 'resnet9'"),
        ("task.sources=[]", "task.sources is empty"),
        ("task.sources=[[cnn]]", "task.sources: an ensemble lists two or more distinct presets"),
        ("task.victims=[cnn,lenet5]", "task.victims: unknown model preset 'lenet5'"),
        ("task.victims=[]", "task.victims is empty"),
        ("task.seeds=[0,one]", "task.seeds must list integer attack seeds"),
        ("task.seeds=[0.5]", "task.seeds must list integer attack seeds"),
        ("task.seeds=[]", "task.seeds is empty"),
    ],
)
def test_bad_lists_are_refused_naming_the_key(tmp_path, override, fragment):
    cfg = sweep_config(tmp_path, *LISTS, override)
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        compare.pending_jobs(cfg, ["task=compare", override], [], composer(tmp_path))
    assert not (tmp_path / "sweep").exists()  # refused before anything is written


def test_a_command_line_may_neither_sweep_nor_set_a_cells_keys(tmp_path, make_cfg):
    cfg = sweep_config(tmp_path, *LISTS)
    with pytest.raises(ConfigError, match="sweeps no other key.*attack.eps=32,64"):
        compare.pending_jobs(cfg, ["task=compare"], ["attack.eps=32,64"], composer(tmp_path))
    with pytest.raises(ConfigError, match="task=compare sets attack.seed= per cell"):
        compare.pending_jobs(cfg, ["task=compare", "attack.seed=3"], [], composer(tmp_path))
    with pytest.raises(ConfigError, match="no cell of task.engines × task.sources × task.seeds"):
        compare.check(make_cfg(*LISTS, "attack=sga", "attack.seed=0"), None)


def cell_metrics(
    engine: str, source: str, seed: int, rates: Dict[str, float], white_box: List[str], seconds: float = 2.0
) -> Dict[str, Any]:
    """A cell's metrics.json as the task writes it (the keys the table reads)."""
    return {
        "task": "compare",
        "cell": report.cell_name(engine, source.split("+"), seed),
        "engine": engine,
        "source": source,
        "attack_seed": seed,
        "p": "inf",
        "eps": 64.0,
        "data": "digits",
        "attack_images": 500,
        "eval_images": 360,
        "attack_seconds": seconds,
        "norm_l2": 400.0 + seed,
        "norm_linf": 64.0,
        "fooling_rate_attack_set": 0.5,
        "victims": {
            victim: {"fooling_rate": rate, "white_box": victim in white_box, "random_fooling_rate": 0.1 + 0.01 * seed}
            for victim, rate in rates.items()
        },
    }


def write_cell(sweep: Path, metrics: Optional[Dict[str, Any]], name: str) -> None:
    (sweep / name / ".hydra").mkdir(parents=True)
    (sweep / name / ".hydra" / "overrides.yaml").write_text("- task=compare\n")
    if metrics is not None:
        (sweep / name / "metrics.json").write_text(json.dumps(metrics))


def test_the_table_is_mean_and_sd_over_seeds_with_white_box_marked(tmp_path):
    sweep = tmp_path / "sweep"
    cnn = [0.2, 0.4, 0.6]  # mean 0.4, sample sd 0.2 (population sd 0.163)
    for seed, rate in enumerate(cnn):
        write_cell(
            sweep,
            cell_metrics("sgd_uap", "cnn", seed, {"cnn": rate, "lenet": 0.1 * (seed + 1)}, ["cnn"], seconds=1.0 + seed),
            f"sgd_uap-cnn-seed{seed}",
        )
    write_cell(
        sweep,
        cell_metrics("gd_uap", "cnn+lenet", 0, {"cnn": 0.3, "lenet": 0.5}, ["cnn", "lenet"]),
        "gd_uap-cnn+lenet-seed0",
    )
    write_cell(sweep, None, "gd_uap-cnn+lenet-seed1")  # killed midway
    write_cell(sweep, cell_metrics("sga", "cnn", 0, {"cnn": 0.9}, ["cnn"]), "sga-cnn-seed0")  # an earlier command's
    cells = [
        {"name": f"{e}-{s}-seed{i}", "engine": e, "source": s, "seed": i}
        for e, s in (("gd_uap", "cnn+lenet"), ("sgd_uap", "cnn"))
        for i in range(3)
    ]
    report.write_plan(sweep, cells, ["deepfool_uap on cnn+lenet (one network)"])

    assert report_main([str(sweep)]) == 0
    table = pd.read_csv(sweep / "compare.csv")
    assert table[["engine", "source"]].values.tolist() == [
        ["gd_uap", "cnn+lenet"],
        ["sgd_uap", "cnn"],
        ["random", "ℓ∞ noise"],
    ]
    sgd = table.iloc[1]
    assert sgd["cnn_mean"] == pytest.approx(0.4) and sgd["cnn_sd"] == pytest.approx(0.2)
    assert sgd["lenet_mean"] == pytest.approx(0.2) and sgd["lenet_sd"] == pytest.approx(0.1)
    assert sgd["attack_seconds_mean"] == pytest.approx(2.0) and sgd["attack_seconds_sd"] == pytest.approx(1.0)
    assert bool(sgd["cnn_white_box"]) and not bool(sgd["lenet_white_box"])
    assert sgd["n"] == 3 and sgd["seeds"] == "0 1 2"
    gd = table.iloc[0]
    assert gd["n"] == 1 and pd.isna(gd["cnn_sd"]) and bool(gd["cnn_white_box"]) and bool(gd["lenet_white_box"])
    noise = table.iloc[2]  # each seed's baseline once, however many cells share it
    assert noise["cnn_mean"] == pytest.approx(0.11) and noise["cnn_sd"] == pytest.approx(0.01)

    text = (sweep / "compare.md").read_text()
    assert "| sgd_uap | cnn | 0.400 ± 0.200 (white-box) | 0.200 ± 0.100 | 2.0 ± 1.0 |" in text
    assert "| gd_uap | cnn+lenet | 0.300 (white-box) | 0.500 (white-box) |" in text
    assert "4 of 6 cells" in text
    assert (
        "Missing cells (2; run the same command again to complete them): gd_uap-cnn+lenet-seed1, "
        "gd_uap-cnn+lenet-seed2." in text
    )
    assert "Not run: deepfool_uap on cnn+lenet (one network)." in text
    image = imread(sweep / "compare.png")
    assert image.shape[0] > 400 and image.std() > 0
    events = list((sweep / "tensorboard" / "compare").glob("events.out.tfevents.*"))
    assert len(events) == 1
    assert report.scalars(table)["compare/sgd_uap_on_cnn/cnn_sd"] == pytest.approx(0.2)

    assert report_main([str(sweep)]) == 0  # again: the logdir is replaced, not added to
    assert len(list((sweep / "tensorboard" / "compare").glob("events.out.tfevents.*"))) == 1
    assert len(collect_runs(sweep)) == 6  # the report's own folders are no runs


def test_the_rows_name_the_options_that_change_what_an_engine_computes(tmp_path):
    sweep = tmp_path / "sweep"
    margin = cell_metrics("sgd_uap", "cnn", 0, {"cnn": 0.4}, ["cnn"])
    margin["engine_label"] = "sgd_uap-loss_logit_margin"
    write_cell(sweep, margin, "sgd_uap-cnn-seed0")
    write_cell(
        sweep, cell_metrics("gd_uap", "cnn", 0, {"cnn": 0.3}, ["cnn"]), "gd_uap-cnn-seed0"
    )  # no label: the engine

    assert report_main([str(sweep)]) == 0
    table = pd.read_csv(sweep / "compare.csv")
    assert table["label"].tolist() == ["gd_uap", "sgd_uap-loss_logit_margin", "random"]  # no plan: as found
    assert "| sgd_uap-loss_logit_margin | cnn | 0.400 (white-box) |" in (sweep / "compare.md").read_text()
    assert "compare/sgd_uap-loss_logit_margin_on_cnn/cnn" in report.scalars(table)
    figure = report.heatmap(report.compare_table([margin]), [margin])
    assert figure.axes[0].get_yticklabels()[0].get_text().startswith("sgd_uap-loss_logit_margin on cnn\n")


@pytest.mark.parametrize(("seeds", "says"), [([0], "attack seed 0:"), ([0, 1], "mean ± sd over attack seeds 0, 1:")])
def test_the_heatmap_title_speaks_of_a_spread_only_over_several_seeds(seeds, says):
    cells = [cell_metrics("sgd_uap", "cnn", seed, {"cnn": 0.4 + 0.1 * seed}, ["cnn"]) for seed in seeds]
    figure = report.heatmap(report.compare_table(cells), cells)
    title = " ".join(figure.axes[0].get_title().split())
    assert title.startswith(f"Fooling rate, {says}") and ("± sd" in title) == (len(seeds) > 1)


def cli(tmp_path: Path, *arguments: str) -> subprocess.CompletedProcess:
    """``python -m uap_lightning.run`` in ``tmp_path`` with a victim cache shared by this module's tests."""
    env = {**os.environ, "UAP_CACHE_DIR": str(tmp_path.parent / "compare-cache")}
    env.pop("UAP_DATA_DIR", None)
    return subprocess.run(
        [sys.executable, "-m", "uap_lightning.run", *arguments],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_bad_input_ends_the_command_with_one_message(tmp_path):
    plain = cli(tmp_path, "task=compare", "trainer.max_epochs=3")
    assert plain.returncode == 2
    assert "task=compare runs one job per (engine, source, seed) cell: add -m" in plain.stderr + plain.stdout
    bad = cli(tmp_path, "-m", "task=compare", "task.engines=[sgd_uap,fgsm]", f"hydra.sweep.dir={tmp_path / 's'}")
    assert bad.returncode == 2
    output = bad.stderr + bad.stdout
    assert "task.engines: unknown engine 'fgsm'" in output and "Traceback" not in output


@pytest.mark.slow
def test_a_compare_from_the_command_line_and_its_resumption(tmp_path):
    sweep = tmp_path / "sweep"
    command = [
        "-m",
        "task=compare",
        "task.engines=[sgd_uap,gd_uap]",
        "task.sources=[cnn]",
        "task.seeds=[0]",
        "task.victims=[cnn,lenet]",
        "data.attack_images=60",
        "attack.max_passes=1",
        "trainer.max_epochs=3",
        f"hydra.sweep.dir={sweep}",
    ]
    done = cli(tmp_path, *command)
    assert done.returncode == 0, done.stderr[-3000:]
    table = pd.read_csv(sweep / "compare.csv")
    assert table["engine"].tolist() == ["sgd_uap", "gd_uap", "random"]
    assert table["cnn_white_box"].tolist() == [True, True, False] and not table["lenet_white_box"].any()
    assert table[["cnn_mean", "lenet_mean"]].notna().all().all() and (table["norm_linf_mean"][:2] <= 64 + 1e-3).all()
    for cell in ("sgd_uap-cnn-seed0", "gd_uap-cnn-seed0"):
        metrics = json.loads((sweep / cell / "metrics.json").read_text())
        assert metrics["cell"] == cell and set(metrics["victims"]) == {"cnn", "lenet"}
        assert metrics["engine_label"].split("-")[0] == metrics["engine"]  # the engine and its options
        assert (sweep / cell / "perturbation.pt").is_file()
    assert (sweep / "compare.png").is_file() and (sweep / "compare.md").is_file()
    assert list((sweep / "tensorboard" / "compare").glob("events.out.tfevents.*"))

    kept = (sweep / "sgd_uap-cnn-seed0" / "metrics.json").stat().st_mtime_ns
    (sweep / "gd_uap-cnn-seed0" / "metrics.json").unlink()  # as if killed while writing it
    again = cli(tmp_path, *command)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 cells in" in again.stderr + again.stdout
    assert "1 complete, running the other 1" in again.stderr + again.stdout
    assert (sweep / "sgd_uap-cnn-seed0" / "metrics.json").stat().st_mtime_ns == kept
    assert (sweep / "gd_uap-cnn-seed0" / "metrics.json").is_file()
    assert pd.read_csv(sweep / "compare.csv")["engine"].tolist() == ["sgd_uap", "gd_uap", "random"]

"""What a researcher meets in the first hour: progress off a terminal, threads as a setting, honest
labels in targeted mode, seeds aggregated, selection never on the evaluation set, unit guards, and
what made a result recorded."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from attack_helpers import random_conv_net
from test_report_sweep import make_run
from uap_lightning import compute_uap
from uap_lightning.console import quiet_sweep_plugins
from uap_lightning.errors import ConfigError
from uap_lightning.report import summary
from uap_lightning.report.sweep import aggregate_seeds, collect_runs, write_summary
from uap_lightning.tasks import run_task
from uap_lightning.threads import available_cores, set_threads
from uap_lightning.validation import resolve_threat

SMALL = ("trainer.max_epochs=3", "data.attack_images=100", "attack.max_passes=2", "logger=none")


def test_a_piped_attack_logs_one_line_per_pass(make_cfg, caplog):
    """Off a terminal the attack writes a line per pass with both rates and the time left."""
    with caplog.at_level(logging.INFO, logger="uap_lightning.loop"):
        run_task(make_cfg(*SMALL, "attack.delta=0.01"))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("pass ")]
    assert [line.split(":")[0] for line in lines] == ["pass 1/2", "pass 2/2"]
    assert "fooling on X" in lines[0] and "on the eval set" in lines[0] and "to go" in lines[0]


def test_attack_progress_false_silences_the_lines(make_cfg, caplog):
    """attack.progress=false writes no pass lines."""
    with caplog.at_level(logging.INFO, logger="uap_lightning.loop"):
        run_task(make_cfg(*SMALL, "attack.progress=false"))
    assert not [r for r in caplog.records if r.getMessage().startswith("pass ")]


def test_threads_are_set_and_recorded(make_cfg, monkeypatch):
    """set_threads applies the setting (default: this process's free cores, shared by parallel jobs);
    metrics.json records it and why."""
    before = torch.get_num_threads()
    monkeypatch.setattr("uap_lightning.threads.busy_cores", lambda: 0.0)  # a quiet machine
    monkeypatch.delenv("UAP_THREADS", raising=False)
    monkeypatch.setattr("uap_lightning.threads.cpu_quota", lambda: None)
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        assert set_threads(None, parallel_jobs=available_cores() * 4) == 1
        assert set_threads(None) == available_cores()
        with pytest.raises(ConfigError, match="threads must be at least 1"):
            set_threads(0)
        set_threads(1)
        recorded = run_task(make_cfg(*SMALL))
        assert recorded["threads"] == 1 and recorded["threads_reason"] == "threads=1"
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_the_attack_on_one_victim_holds_across_thread_counts(make_cfg, tmp_path):
    """The default config at 1 and 2 threads. Training the victim depends on the thread count
    (weight gradients are summed over the batch in another order), a little; the attack on the one
    cached victim does not: bit-identical perturbations at 1 and 2 threads for the batched engines,
    and for deepfool_uap, whose one-image DeepFool gradients may round differently with the thread
    count on some CPUs (1e-7 measured), equal to float32 rounding."""
    before = torch.get_num_threads()
    perturbations, weights = {}, {}
    try:
        for threads in (1, 2):
            set_threads(threads)
            trained = make_cfg(
                *SMALL,
                f"paths.cache_dir={tmp_path / f'cache-{threads}'}",
                f"paths.output_dir={tmp_path / f'trained-{threads}'}",
            )
            run_task(trained)
            (entry,) = [d for d in (tmp_path / f"cache-{threads}" / "victims").glob("cnn-*") if d.is_dir()]
            weights[threads] = torch.load(entry / "weights.pt", weights_only=True)
            for method in ("deepfool_uap", "deepfool_uap_batched", "sgd_uap"):
                cached = make_cfg(
                    *SMALL,
                    f"attack={method}",
                    f"paths.cache_dir={tmp_path / 'cache-1'}",
                    f"paths.output_dir={tmp_path / f'{method}-{threads}'}",
                )
                run_task(cached)
                perturbations[method, threads] = torch.load(
                    tmp_path / f"{method}-{threads}" / "perturbation.pt", weights_only=True
                )
    finally:
        torch.set_num_threads(before)
    assert weights[1].keys() == weights[2].keys()
    for name in weights[1]:
        assert torch.allclose(weights[1][name].float(), weights[2][name].float(), atol=1e-4), name
    for method in ("deepfool_uap_batched", "sgd_uap"):
        assert torch.equal(perturbations[method, 1], perturbations[method, 2]), method
    torch.testing.assert_close(perturbations["deepfool_uap", 1], perturbations["deepfool_uap", 2], rtol=0, atol=1e-6)


def test_targeted_rates_are_named_as_such(make_cfg):
    """In targeted mode the rate on X the attack steers by is targeted_success_rate_attack_set, and
    fooling_rate_attack_set keeps its untargeted meaning (measured on X)."""
    m = run_task(make_cfg(*SMALL, "attack.target_class=3", "attack.eps=64"))
    assert {"targeted_success_rate", "targeted_success_rate_attack_set", "fooling_rate_attack_set"} <= set(m)
    assert all("targeted_success_rate_attack_set" in h and "fooling_rate_attack_set" not in h for h in m["history"])
    assert 0.0 <= m["fooling_rate_attack_set"] <= 1.0


def test_a_seed_sweep_is_aggregated_and_no_seed_is_an_axis(tmp_path):
    """Runs that differ only in attack.seed give mean, sd and n per ε, error bars, and no
    fooling_vs_attack_seed plot."""
    rates = {(32, 0): 0.2, (32, 1): 0.3, (64, 0): 0.5, (64, 1): 0.7}
    for i, ((eps, seed), rate) in enumerate(rates.items()):
        make_run(
            tmp_path / str(i),
            [f"attack.eps={eps}", f"attack.seed={seed}"],
            {"fooling_rate": rate, "random_fooling_rate": 0.1, "p": "inf"},
        )
    df = collect_runs(tmp_path)
    seeds = aggregate_seeds(df)
    assert seeds["n"].tolist() == [2, 2]
    assert seeds["fooling_rate_mean"].tolist() == pytest.approx([0.25, 0.6])
    assert seeds["fooling_rate_sd"].tolist() == pytest.approx([0.0707107, 0.1414214])
    paths = write_summary(tmp_path, df)
    assert "summary_seeds.csv" in paths and "fooling_vs_attack_eps.png" in paths
    assert "fooling_vs_attack_seed.png" not in paths
    assert "0.25 ± 0.071" in (tmp_path / "summary.md").read_text()
    assert len(pd.read_csv(tmp_path / "summary_seeds.csv")) == 2


def test_the_sweepers_objective_never_looks_at_the_eval_set(make_cfg, monkeypatch):
    """The objective is the rate on X (or on a held-out part of X): an eval set that differs from X
    changes the fooling rate but not the objective."""
    results = {}
    for eval_images in (100, 360):
        results[eval_images] = run_task(make_cfg(*SMALL, f"data.eval_images={eval_images}"))
    assert results[100]["objective"] == results[100]["fooling_rate_attack_set"]
    assert results[100]["objective"] == results[360]["objective"]
    held = run_task(make_cfg(*SMALL, "task.selection=holdout", "task.holdout_fraction=0.25"))
    assert held["holdout_images"] == 25 and held["attack_images"] == 75
    assert held["objective"] == held["fooling_rate_holdout"]
    with pytest.raises(ConfigError, match="task.selection"):
        run_task(make_cfg(*SMALL, "task.selection=eval"))


def test_an_eps_below_one_level_warns_in_the_api_and_the_cli(make_cfg, caplog):
    """ε < 1 (0–255 units) warns, saying the units and the ε meant; eps_scale=1 takes [0,1] units."""
    model = random_conv_net(seed=2).float()
    images = torch.rand(6, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"eps=0.25098 is below one 8-bit level.*eps=64"):
        compute_uap(model, images, eps=64 / 255, max_passes=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scaled = compute_uap(model, images, eps=64 / 255, eps_scale=1, max_passes=1, method="sgd_uap", baselines=False)
    assert 1 < float(scaled.perturbation.abs().max()) * 255 <= 64 + 1e-3  # ε = 64 in 0–255 units, not 0.25
    with caplog.at_level(logging.WARNING):
        assert resolve_threat(make_cfg("attack.eps=0.5")).eps == 0.5
    assert "attack.eps=0.5 is below one 8-bit level" in caplog.text
    assert resolve_threat(make_cfg("attack.eps=0.25", "attack.eps_scale=1")).eps == pytest.approx(63.75)


def test_what_made_the_result_is_recorded(make_cfg):
    """metrics.json holds the victim's model settings (adversarial training included) and training settings."""
    cfg = make_cfg(*SMALL, "model.adversarial=uat")
    run_task(cfg)
    saved = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert saved["model_settings"]["model.adversarial"] == "uat"
    assert saved["model_settings"]["trainer.max_epochs"] == 3
    assert saved["eval_images"] == 360 and saved["threads"] == torch.get_num_threads()


def test_model_settings_are_named_by_the_paths_a_user_types(make_cfg):
    """Every key of metrics.json's model_settings is an override the command line accepts, and
    setting it to the recorded value gives that value back."""
    cfg = make_cfg(*SMALL, "model.adversarial=uat")
    run_task(cfg)
    settings = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())["model_settings"]
    assert "trainer.max_epochs" in settings and "model.name" in settings
    for path, value in settings.items():
        composed = make_cfg(f"{path}={json.dumps(value)}")
        assert OmegaConf.select(composed, path) == value, path


def synthetic_metrics(**changes):
    """metrics.json of a weak ImageNet run: one pass of deepfool_uap on 50 images, v far inside ε."""
    m = {
        "fooling_rate": 0.010,
        "fooling_rate_attack_set": 0.02,
        "clean_accuracy": 0.74,
        "perturbed_accuracy": 0.73,
        "random_fooling_rate": 0.184,
        "random_same_l2_fooling_rate": 0.004,
        "random_draws": 5,
        "beats_random": False,
        "norm_l2": 150.0,
        "norm_linf": 1.5,
        "eps": 10.0,
        "p": "inf",
        "delta": 0.2,
        "method": "deepfool_uap",
        "best_pass": 1,
        "passes": 1,
        "converged": False,
        "interrupted": False,
        "attack_seconds": 400.0,
        "victim_accuracy": 0.74,
        "victim_source": "pretrained",
        "attack_images": 50,
        "eval_images": 100,
        "num_classes": 1000,
        "data": "sample_folder",
        "model": "efficientnet_lite0",
        "model_settings": {"model.name": "efficientnet_lite0", "model.pretrained": True},
        "dominant_label_name": None,
    }
    return {**m, **changes}


def test_a_weak_result_names_its_baselines_the_budget_used_and_what_helps():
    """The warning calls each baseline what it is, says how much of ε v used, and suggests more
    passes, a larger X and a faster engine, in that order, never the slowest engine."""
    text = summary.weak_result_advice(synthetic_metrics())
    assert "random ℓ∞ noise of norm ε=10" in text and "a random direction with v's ℓ2 norm" in text
    assert "same norm" not in text
    assert "v used ℓ∞ 1.5 of ε=10 (15%)" in text
    fixes = [
        text.index(s)
        for s in ("attack.max_passes=", "data.attack_images=100", "attack=sgd_uap", "attack=gd_uap attack.prior=none")
    ]
    assert fixes == sorted(fixes)
    assert "attack=deepfool_uap" not in text
    for method in ("sgd_uap", "gd_uap", "deepfool_uap_batched"):
        assert "attack=deepfool_uap" not in summary.weak_result_advice(synthetic_metrics(method=method))
    l2 = summary.weak_result_advice(synthetic_metrics(p="2", eps=2000.0, norm_l2=600.0))
    assert "v used ℓ2 600 of ε=2000 (30%)" in l2 and "random ℓ2 noise of norm ε=2000" in l2
    assert "v used ℓ∞ 10 of ε=10 (100%)" in summary.weak_result_advice(synthetic_metrics(norm_linf=10.0))


def test_a_victim_near_chance_is_called_so():
    """A victim whose clean accuracy is near chance gets a warning that fooling rates mean little,
    and the ways to a trained victim; a trained victim gets none."""
    near = synthetic_metrics(clean_accuracy=0.09, num_classes=10, fooling_rate=0.41, beats_random=True)
    (text,) = summary.result_warnings(near)
    assert "near chance" in text and "0.09" in text and "model.checkpoint" in text and "model.pretrained=true" in text
    assert summary.result_warnings(synthetic_metrics(clean_accuracy=0.8, num_classes=10, beats_random=True)) == []
    assert len(summary.result_warnings(synthetic_metrics(clean_accuracy=0.0015))) == 2  # also weak


def test_the_victim_line_names_the_architecture(tmp_path):
    """model=torchvision model.arch=resnet18 is a resnet18 in the summary, not a 'torchvision'."""
    settings = {"model.name": "torchvision", "model.arch": "resnet18", "model.pretrained": True}
    lines = summary.attack_summary(synthetic_metrics(model="torchvision", model_settings=settings), tmp_path)
    assert lines[0].startswith("victim   resnet18 (model=torchvision) on sample_folder")
    assert summary.attack_summary(synthetic_metrics(), tmp_path)[0].startswith("victim   efficientnet_lite0 on")


def test_sweep_plugins_settings_lines_stay_out_of_the_console(caplog):
    """Optuna's study/storage/sampler lines and joblib's Parallel(...) line are dropped; the
    best trial and the job lines stay."""
    quiet_sweep_plugins()
    optuna_log = logging.getLogger("hydra_plugins.hydra_optuna_sweeper._impl")
    joblib_log = logging.getLogger("hydra_plugins.hydra_joblib_launcher._core")
    with caplog.at_level(logging.INFO):
        optuna_log.info("Study name: no-name-1234")
        optuna_log.info("Sampler: TPESampler")
        optuna_log.info("Best value: 12.0")
        joblib_log.info("Joblib.Parallel(n_jobs=2,backend=loky,prefer=processes) is launching 4 jobs")
        joblib_log.info("Launching jobs, sweep output dir : multirun/x")
    assert [r.getMessage() for r in caplog.records] == [
        "Best value: 12.0",
        "Launching jobs, sweep output dir : multirun/x",
    ]


def test_tasks_log_a_line_per_pass_of_each_perturbation(make_cfg, caplog):
    """generalisation (like transfer and finetune) logs the passes of every perturbation it computes."""
    with caplog.at_level(logging.INFO, logger="uap_lightning.tasks.setup"):
        run_task(make_cfg(*SMALL, "task=generalisation", "task.sizes=[20,40]", "attack.delta=0.01"))
    lines = [r.getMessage().strip() for r in caplog.records if r.getMessage().strip().startswith("pass ")]
    assert [line.split(":")[0] for line in lines] == ["pass 1/2", "pass 2/2"] * 2
    assert "fooling on X" in lines[0] and "s in all" in lines[0]

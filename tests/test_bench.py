"""The benchmark: its naive reference, its checks, and the smoke preset end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from attack_helpers import random_conv_net, single_thread
from conftest import compose_config
from uap_lightning import metrics
from uap_lightning.attacks import ENGINES, AttackSettings, ThreatModel, deepfool_single, frozen_eval, run_passes
from uap_lightning.bench_parts.naive import naive_deepfool, naive_uap
from uap_lightning.tasks import bench as bench_task
from uap_lightning.validation import ConfigError, validate

ROW_FIELDS = {"method", "seconds", "fooling_rate", "passes", "speedup_vs_art", "speedup_vs_naive"}


@pytest.mark.parametrize("p", [math.inf, 2.0])
def test_naive_deepfool_equals_the_engine_deepfool(p):
    model = random_conv_net(seed=3)
    x = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    options = dict(num_candidates=6, overshoot=0.02, max_iters=10, norm=p)
    with frozen_eval(model):
        naive_step, naive_iters, naive_changed = naive_deepfool(model, x, **options)
        reference = deepfool_single(model, x, **options)
    assert naive_changed == reference.converged and naive_iters == reference.iterations
    torch.testing.assert_close(naive_step, reference.perturbation)


@pytest.mark.parametrize("p, eps", [(math.inf, 24.0), (2.0, 200.0)])
def test_naive_reference_computes_the_same_v_as_deepfool_uap(p, eps):
    model = random_conv_net(seed=5)
    images = torch.rand(24, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    threat = ThreatModel(eps, p)
    with single_thread(), frozen_eval(model):
        naive_v, naive_rate, naive_passes = naive_uap(
            model, images, threat, delta=0.1, max_passes=2, generator=torch.Generator().manual_seed(0)
        )
        settings = AttackSettings(threat, method="deepfool_uap", delta=0.1, max_passes=2, seed=0)
        result = run_passes(model, settings, images, metrics.predict(model, images))
    assert float(naive_v.abs().sum()) > 0
    torch.testing.assert_close(naive_v, result.perturbation)
    assert naive_passes == result.passes and naive_rate == pytest.approx(result.fooling_rate)


@pytest.mark.parametrize(
    "override, message",
    [
        ("task.rows=[naive,pgd]", "task.rows"),
        ("task.rows=[naive,naive]", "task.rows"),
        ("+task.engines.pgd={}", "unknown engine"),
        ("+task.engines.sgd_uap.optimizer=lbfgs", "sgd_uap"),
        ("task.art_batch_size=1", "art_batch_size"),
        ("attack.target_class=3", "target_class"),
        ("attack.p=7", "attack.p"),
        ("+task.engines.sgd_uap.max_passes=0", "attack.max_passes"),
    ],
)
def test_bad_bench_settings_fail_with_the_setting_named(tmp_path, override, message):
    cfg = compose_config(["experiment=bench_smoke", override], tmp_path, config_name="bench")
    with pytest.raises(ConfigError, match=message):
        bench_task.check(cfg, validate(cfg))


def test_cifar_preset_shares_the_experiment_victim(tmp_path):
    from uap_lightning.training import victim_spec

    class Folder:  # what victim_spec reads from a datamodule
        num_classes = 10
        class_names = [str(i) for i in range(10)]

        def __init__(self, cfg):
            self.cfg = cfg.data

        def fingerprint(self):
            return "the same files"

    bench = compose_config([], tmp_path, config_name="bench")
    experiment = compose_config(["experiment=cifar10_resnet20"], tmp_path)
    assert victim_spec(bench.model, bench.trainer, Folder(bench), bench.seed) == victim_spec(
        experiment.model, experiment.trainer, Folder(experiment), experiment.seed
    )
    assert (bench.data.attack_images, bench.data.eval_images, bench.attack.eps) == (500, 2000, 8)
    assert (bench.attack.max_passes, bench.attack.delta, bench.attack.p) == (5, 0.2, "inf")


@pytest.mark.slow
def test_smoke_benchmark_writes_bench_json(tmp_path):
    env = {**os.environ, "UAP_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("UAP_DATA_DIR", None)
    run_dir = tmp_path / "bench"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "uap_lightning.bench",
            "experiment=bench_smoke",
            f"hydra.run.dir={run_dir}",
            "trainer.enable_progress_bar=false",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((run_dir / "bench.json").read_text())
    rows = report["rows"]
    assert [row["method"] for row in rows] == ["naive", "art", *ENGINES]  # every engine is a row
    by_method = {row["method"]: row for row in rows}
    for row in rows:
        assert ROW_FIELDS <= row.keys()
        assert row["seconds"] > 0 and 0.0 <= row["fooling_rate"] <= 1.0 and row["passes"] >= 1
        assert row["norm_linf"] <= 96 + 1e-3
        assert row["speedup_vs_art"] == pytest.approx(by_method["art"]["seconds"] / row["seconds"])
        assert row["speedup_vs_naive"] == pytest.approx(by_method["naive"]["seconds"] / row["seconds"])
    for method in ("deepfool_uap", "deepfool_uap_batched", "sgd_uap"):
        curve = by_method[method]["curve"]
        assert len(curve) == by_method[method]["passes"]
        assert all(0 < seconds <= by_method[method]["seconds"] + 1e-6 for seconds, _ in curve)
        assert curve[-1][1] == pytest.approx(by_method[method]["fooling_rate"])
    assert by_method["naive"]["curve"] == [] and by_method["naive"]["seconds_to_reference"] is None
    assert by_method["deepfool_uap"]["seconds_to_reference"] is not None
    # the naive reference and deepfool_uap run the same algorithm from the same order
    assert by_method["naive"]["fooling_rate"] == by_method["deepfool_uap"]["fooling_rate"]
    efficiency = report["efficiency"]
    assert efficiency["efficiency"] > 0 and efficiency["candidates"] == 10
    assert 0.0 <= report["random_fooling_rate"] <= 1.0
    assert "vs naive" in done.stdout and "efficiency" in done.stdout
    for method in ("deepfool_uap", "deepfool_uap_batched", "sgd_uap"):
        profile = report["profiles"][method]
        assert profile["images"] == 100 and profile["total_seconds"] > 0
        assert {"forward_seconds", "gradient_seconds", "other_seconds", "images_per_second"} <= profile.keys()
        assert by_method[method]["random_same_l2_fooling_rate"] is not None
    assert report["forward_backward_images_per_second_batch1"] > 0
    assert report["victim"]["model"] == "cnn" and report["settings"]["eval_images"] == 360
    assert report["settings"]["attack_images"] == 100 and report["settings"]["eps"] == 96
    assert "one pass from v = 0" in done.stdout and "forward+backward images/s" in done.stdout


def test_engine_rows_keep_their_defaults_where_the_run_leaves_a_key_null(tmp_path):
    # the ImageNet preset runs sgd_uap, whose step_size is null (ε/10); gd_uap's row keeps its own
    cfg = compose_config(["experiment=imagenet_lite0", "task=bench", "task.rows=[sgd_uap,gd_uap]"], tmp_path)
    assert cfg.attack.step_size is None
    settings = validate(cfg)
    bench_task.check(cfg, settings)
    gd = bench_task.row_settings(cfg, settings, "gd_uap")
    assert "step_size" not in gd.options
    assert ENGINES["gd_uap"].from_settings(gd).options.step_size == ENGINES["gd_uap"].Options().step_size
    assert "step_size" not in bench_task.row_settings(cfg, settings, "sgd_uap").options


def test_bench_rows_do_not_augment_unless_a_row_asks(tmp_path):
    # the peers cannot augment X, so the ImageNet preset's attack.augment=true stays out of the rows
    rows = ["task=bench", "task.rows=[naive,deepfool_uap,sgd_uap]", "+task.engines.sgd_uap.augment=true"]
    cfg = compose_config(["experiment=imagenet_lite0", *rows], tmp_path)
    settings = validate(cfg)
    assert settings.augment
    assert not bench_task.reference_settings(cfg, settings).augment
    assert not bench_task.row_settings(cfg, settings, "deepfool_uap").augment
    assert bench_task.row_settings(cfg, settings, "sgd_uap").augment

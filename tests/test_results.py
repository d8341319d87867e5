"""Results that show the phenomenon: the paper's ℓ2 step, the best pass kept, honest baselines,
a warning for weak results, attack seeds apart from the victim, and a default run that convinces."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from attack_helpers import registered
from uap_lightning import metrics
from uap_lightning.attacks import AttackSettings, PassStats, ThreatModel, UniversalAttack, build_engine, run_passes
from uap_lightning.data import build_datamodule
from uap_lightning.report.summary import attack_summary, weak_result_advice
from uap_lightning.tasks import run_task
from uap_lightning.training import victim_spec


def test_the_paper_l2_deepfool_step_is_the_default(make_cfg):
    threat = ThreatModel.parse(10, "inf")
    for method in ("deepfool_uap", "deepfool_uap_batched"):
        cfg = make_cfg(f"attack={method}")
        assert cfg.attack.deepfool_norm == "2"
        assert build_engine(method, threat).deepfool_norm == 2.0
        assert build_engine(method, threat, deepfool_norm="inf").deepfool_norm == math.inf


@dataclass(frozen=True)
class ScriptedOptions:
    values: tuple = ()  # v's value after each pass


class ScriptedEngine(UniversalAttack):
    """Sets v to a scripted value each pass, so the rate on X rises, then falls, then rises a little."""

    name = "scripted"
    Options = ScriptedOptions

    def run_pass(self, model, v, images, clean_labels, generator, pass_index=None):
        return torch.full_like(v, self.options.values[pass_index]), PassStats(updates=1, mean_iterations=1.0)


def threshold_model():
    """Class 1 when the mean pixel exceeds 0.5, class 0 otherwise."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[0.0] * 4, [0.25] * 4]))
        model[1].bias.copy_(torch.tensor([0.0, -0.5]))
    return model


@pytest.mark.parametrize("keep, expected_pass", [("best", 2), ("last", 4)])
def test_the_pass_with_the_highest_fooling_rate_on_x_is_kept(keep, expected_pass):
    model = threshold_model()
    images = (0.04 + 0.05 * torch.arange(10.0)).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    clean = metrics.predict(model, images)
    # pixel values 0.04 ... 0.49: v fools those above 0.5 − v
    values = [0.15, 0.3, 0.05, 0.2]  # rates 0.3, 0.6, 0.1, 0.4
    with registered(ScriptedEngine):
        settings = AttackSettings(
            ThreatModel.parse(255, "inf"),
            method="scripted",
            options={"values": tuple(values)},
            delta=0.01,
            max_passes=4,
            keep=keep,
        )
        result = run_passes(model, settings, images, clean)
    rates = [h["fooling_rate_attack_set"] for h in result.history]
    assert rates == pytest.approx([0.3, 0.6, 0.1, 0.4])
    assert result.passes == 4 and len(result.history) == 4
    assert result.best_pass == expected_pass
    assert result.fooling_rate == pytest.approx(rates[expected_pass - 1])
    assert torch.allclose(result.perturbation, torch.full((1, 2, 2), values[expected_pass - 1]))
    assert torch.allclose(result.last_perturbation, torch.full((1, 2, 2), values[-1]))


FAST = ("trainer.max_epochs=3", "data.attack_images=200", "attack.max_passes=3", "logger=none")


def test_the_run_reports_the_kept_pass_and_marks_weak_results(make_cfg):
    """A tiny ε cannot beat random noise: metrics say so and the summary prints a warning
    naming what to try; the kept pass is the one with the highest rate on X."""
    cfg = make_cfg(*FAST, "attack.eps=2")
    m = run_task(cfg)
    on_x = [h["fooling_rate_attack_set"] for h in m["history"]]
    assert m["best_pass"] == 1 + on_x.index(max(on_x))
    assert m["fooling_rate_attack_set"] == max(on_x)
    assert m["fooling_rate"] == m["history"][m["best_pass"] - 1]["fooling_rate"]
    assert m["beats_random"] is False
    warning = weak_result_advice(m)
    assert "does not beat random noise" in warning
    assert "attack.eps=" in warning and "attack.max_passes=" in warning and "attack=sgd_uap" in warning
    assert len(attack_summary(m, Path(cfg.paths.output_dir))) >= 7


def test_attack_seed_draws_another_x_on_the_same_victim(make_cfg):
    first = run_task(make_cfg(*FAST, "attack.eps=64"))
    second = run_task(make_cfg(*FAST, "attack.eps=64", "attack.seed=7"))
    assert first["victim_source"] == "trained" and second["victim_source"] == "cache"
    assert (first["attack_seed"], second["attack_seed"]) == (0, 7)
    assert first["victim_accuracy"] == second["victim_accuracy"]
    assert first["history"] != second["history"]

    base, other = make_cfg(*FAST), make_cfg(*FAST, "attack.seed=7")
    datamodule = build_datamodule(base.data)
    datamodule.setup()
    assert victim_spec(base.model, base.trainer, datamodule, base.seed) == victim_spec(
        other.model, other.trainer, datamodule, other.seed
    )
    x_first, _ = datamodule.attack_set(seed=0)
    x_second, _ = datamodule.attack_set(seed=7)
    assert not torch.equal(x_first, x_second)


def test_the_default_run_fools_far_more_than_random_noise(make_cfg):
    """What `make run` shows: the default digits run (ℓ∞ ε=64) beats the stronger random baseline
    well over twice. Measured: 0.369 against 0.119 for random ±64 noise and 0.096 for the same-ℓ2
    direction (3.1×; 0.436, 3.7×, on another 2-core machine: the float rounding of the CPU's kernels
    decides borderline DeepFool updates, so the exact rate differs between machines)."""
    m = run_task(make_cfg())
    strongest = max(m["random_fooling_rate"], m["random_same_l2_fooling_rate"])
    assert m["fooling_rate"] >= 2.5 * strongest, m
    assert m["fooling_rate"] >= 0.3 and m["beats_random"] is True
    assert m["fooling_rate"] >= max(h["fooling_rate"] for h in m["history"]) - 0.1  # no collapse in what is kept

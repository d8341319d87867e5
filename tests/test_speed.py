"""The faster paths give the same results: compiled predictions, and the benchmark's profile fields."""

from __future__ import annotations

import pytest
import torch

from attack_helpers import digits_victim, single_thread
from uap_lightning import metrics
from uap_lightning.attacks import (
    AttackSettings,
    CompiledPredictions,
    ThreatModel,
    build_engine,
    frozen_eval,
    run_passes,
)
from uap_lightning.bench_parts.profile import forward_backward_rate, profile_pass


@pytest.mark.slow
def test_compiled_predictions_equal_the_eager_ones_on_the_digits_cnn():
    """torch.compile (inductor) for predictions: same labels as eager, same v, eager gradients."""
    model, attack_images, eval_images = digits_victim()
    compiled = CompiledPredictions(model)
    with single_thread(), frozen_eval(model):
        assert torch.equal(metrics.predict(compiled, eval_images), metrics.predict(model, eval_images))
        assert torch.equal(metrics.predict(compiled, eval_images[:1]), metrics.predict(model, eval_images[:1]))
        with torch.enable_grad():
            x = eval_images[:3].clone().requires_grad_(True)
            torch.testing.assert_close(compiled(x), model(x))
        threat = ThreatModel.parse(64, "inf")
        results = [
            run_passes(
                model,
                AttackSettings(threat, delta=0.05, max_passes=1, compile=compile_),
                attack_images[:40],
                metrics.predict(model, attack_images[:40]),
            )
            for compile_ in (False, True)
        ]
    assert torch.equal(results[0].perturbation, results[1].perturbation)


def test_pass_profile_splits_the_time_of_a_pass():
    model, attack_images, _ = digits_victim()
    images = attack_images[:30]
    with single_thread():
        profile = profile_pass(
            build_engine("deepfool_uap", ThreatModel.parse(64, "inf")),
            model,
            images,
            metrics.predict(model, images),
            seed=0,
        )
        rate = forward_backward_rate(model, images, count=10)
    assert profile.images == 30 and profile.total_seconds > 0
    assert profile.forward_seconds > 0 and profile.gradient_seconds > 0
    parts = profile.forward_seconds + profile.gradient_seconds + profile.other_seconds
    assert abs(parts - profile.total_seconds) < 1e-6 or profile.other_seconds == 0
    assert profile.as_dict()["images_per_second"] > 0 and rate > 0


def test_pass_profile_times_the_backward_passes_of_every_engine():
    # gd_uap takes its gradients with loss.backward(), the others with torch.autograd.grad
    model, attack_images, _ = digits_victim()
    images = attack_images[:8]
    with single_thread():
        for method, options in (("sgd_uap", {}), ("gd_uap", {"steps": 3})):
            engine = build_engine(method, ThreatModel.parse(64, "inf"), **options)
            profile = profile_pass(engine, model, images, metrics.predict(model, images), seed=0)
            assert profile.gradient_seconds > 0, method
    assert torch.autograd.backward.__name__ == "backward" and torch.autograd.grad.__name__ == "grad"

"""Universal attack engines, the pass driver, the engine factory and frozen_eval."""

import math

import pytest
import torch
from torch import nn

from attack_helpers import digits_victim, one_thread, random_conv_net  # noqa: F401
from uap_lightning import metrics
from uap_lightning.attacks import (
    SGDUAP,
    BatchedDeepFoolUAP,
    DeepFoolUAP,
    PassStats,
    ThreatModel,
    UniversalAttack,
    build_engine,
    engine_options,
    folded_copy,
    frozen_eval,
    run_passes,
)

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = 64.0  # ℓ∞, 0–255 units: digits need a large ε


@pytest.fixture(scope="module")
def victim():
    """(model, attack set X of 150 images, held-out eval set), trained once per test module."""
    return digits_victim()


def random_sign(shape, eps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, shape, generator=generator).float() * 2 - 1) * eps / 255


def attack(model, images, engine, max_passes, seed=0):
    clean = metrics.predict(model, images)
    return run_passes(
        model,
        engine,
        images,
        clean,
        delta=0.05,
        max_passes=max_passes,
        generator=torch.Generator().manual_seed(seed),
        clip=engine.clip,
        target_class=engine.target_class,
    )


def held_out_rate(model, images, v, target=None):
    clean = metrics.predict(model, images)
    perturbed = metrics.predict(model, images, v)
    if target is None:
        return metrics.fooling_rate(clean, perturbed)
    return metrics.targeted_success_rate(clean, perturbed, target)


@pytest.mark.parametrize(
    "method, options, max_passes",
    [
        ("deepfool_uap", {}, 5),
        ("deepfool_uap_batched", {"aggregate": "mean"}, 5),
        ("deepfool_uap_batched", {"aggregate": "sum", "batch_size": 16}, 5),
        ("sgd_uap", {}, 10),
        ("sgd_uap", {"optimizer": "adam", "lr_schedule": "constant"}, 10),
    ],
    ids=["deepfool_uap", "batched-mean", "batched-sum", "sgd-sign", "sgd-adam"],
)
def test_engines_beat_random_noise_of_the_same_norm(victim, method, options, max_passes):
    model, X, held_out = victim
    threat = ThreatModel.parse(EPS, "inf")
    if method == "sgd_uap":
        options = {**options, "max_passes": max_passes}
    result = attack(model, X, build_engine(method, threat, **options), max_passes)
    v = result.perturbation
    assert v.shape == X.shape[1:] and v.device.type == "cpu"
    assert float(v.abs().max()) <= threat.radius + 1e-6
    baseline = max(held_out_rate(model, held_out, random_sign(v.shape, EPS, seed)) for seed in range(3))
    assert held_out_rate(model, held_out, v) > baseline + 0.15
    assert result.fooling_rate > baseline + 0.15
    assert len(result.history) == result.passes


@pytest.mark.parametrize("method", ["deepfool_uap", "deepfool_uap_batched", "sgd_uap"])
def test_targeted_engines_beat_random_noise(victim, method):
    model, X, held_out = victim
    target = 3
    threat = ThreatModel.parse(EPS, "inf")
    passes = 10 if method == "sgd_uap" else 3
    options = {"max_passes": passes} if method == "sgd_uap" else {}
    result = attack(model, X, build_engine(method, threat, target_class=target, **options), passes)
    baseline = max(held_out_rate(model, held_out, random_sign((1, 8, 8), EPS, seed), target) for seed in range(3))
    assert held_out_rate(model, held_out, result.perturbation, target) > baseline + 0.3


def test_l2_deepfool_uap_stays_in_the_ball_and_fools(victim):
    model, X, held_out = victim
    threat = ThreatModel.parse(EPS * 8, 2)  # the ℓ2 norm of a ±EPS pattern on 8×8 pixels
    v = attack(model, X, DeepFoolUAP(threat), 2).perturbation
    assert float(v.norm()) <= threat.radius * (1 + 1e-5)
    baseline = max(held_out_rate(model, held_out, random_sign(v.shape, EPS, seed)) for seed in range(3))
    assert held_out_rate(model, held_out, v) > baseline + 0.1


@pytest.mark.parametrize("p, eps, target", [(math.inf, 20.0, None), (2.0, 160.0, None), (math.inf, 20.0, 4)])
def test_batched_helper_gives_the_per_image_reference_v(p, eps, target):
    model = random_conv_net(seed=2)
    images = torch.rand(24, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    clean = metrics.predict(model, images)
    threat = ThreatModel.parse(eps, p)
    outputs = []
    for reference in (False, True):
        engine = DeepFoolUAP(threat, per_image_reference=reference, target_class=target)
        v = torch.zeros(3, 8, 8, dtype=torch.float64)
        generator = torch.Generator().manual_seed(11)
        stats = []
        for _ in range(2):
            v, s = engine.run_pass(model, v, images, clean, generator)
            stats.append(s)
        outputs.append((v, stats))
    (v_batched, stats_batched), (v_single, stats_single) = outputs
    assert stats_batched[0].updates > 0
    torch.testing.assert_close(v_batched, v_single, rtol=1e-7, atol=1e-10)
    assert [s.updates for s in stats_batched] == [s.updates for s in stats_single]
    assert [s.mean_iterations for s in stats_batched] == pytest.approx([s.mean_iterations for s in stats_single])


def test_pass_visits_images_in_randperm_order():
    """Same generator state → same v; a different seed → a different v."""
    model = random_conv_net(seed=2)
    images = torch.rand(16, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    clean = metrics.predict(model, images)
    engine = BatchedDeepFoolUAP(ThreatModel.parse(20, "inf"), batch_size=4)
    zero = torch.zeros(3, 8, 8, dtype=torch.float64)
    runs = [engine.run_pass(model, zero, images, clean, torch.Generator().manual_seed(s))[0] for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_sgd_schedule_and_step_counts():
    threat = ThreatModel.parse(50, "inf")
    engine = SGDUAP(threat, max_passes=4, batch_size=8)
    assert engine.step_size == pytest.approx(5.0)
    assert engine.step_at(0, 40) == pytest.approx(5.0 / 255)
    assert engine.step_at(20, 40) == pytest.approx(2.5 / 255)
    assert engine.step_at(40, 40) == pytest.approx(0.0, abs=1e-12)
    assert SGDUAP(threat, lr_schedule="constant", step_size=2).step_at(30, 40) == pytest.approx(2 / 255)
    model = random_conv_net(seed=2).float()
    images = torch.rand(20, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    v, stats = engine.run_pass(model, torch.zeros(3, 8, 8), images, metrics.predict(model, images), torch.Generator())
    assert stats == PassStats(updates=3, mean_iterations=0.0)
    assert engine.passes_run == 1
    assert float(v.abs().max()) <= threat.radius + 1e-7


@pytest.mark.parametrize("p", [2.0, 1.0])
def test_sgd_steps_have_the_step_size_in_the_norm(p):
    model = random_conv_net(seed=2).float()
    images = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    engine = SGDUAP(ThreatModel.parse(1000, p), batch_size=8, step_size=3.0, lr_schedule="constant")
    v, _ = engine.run_pass(model, torch.zeros(3, 8, 8), images, metrics.predict(model, images), torch.Generator())
    assert float(torch.linalg.vector_norm(v.flatten(), ord=p)) == pytest.approx(3.0 / 255, rel=1e-4)


class CountingEngine(UniversalAttack):
    """Adds a fixed pattern per pass; records the pass indices it was given."""

    name = "counting"

    def __init__(self, threat, step, **options):
        super().__init__(threat, **options)
        self.step = step
        self.indices = []

    def run_pass(self, model, v, images, clean_labels, generator, pass_index=None):
        self.indices.append(pass_index)
        return self.project(v + self.step), PassStats(updates=1, mean_iterations=2.0)


def step_model():
    """Class 1 when the mean pixel exceeds 0.5, class 0 otherwise."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[0.0] * 4, [0.25] * 4]))
        model[1].bias.copy_(torch.tensor([0.0, -0.5]))
    return model


def test_run_passes_history_callback_and_stopping():
    model = step_model()
    images = (0.04 + 0.05 * torch.arange(10.0)).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    clean = metrics.predict(model, images)
    assert not clean.any()
    engine = CountingEngine(ThreatModel.parse(255, "inf"), step=0.1)
    seen = []
    result = run_passes(
        model, engine, images, clean, delta=0.45, max_passes=10, generator=None,
        on_pass_end=lambda i, v, stats, rate: seen.append((i, rate, stats.updates)),
    )
    # pixel values 0.04, 0.09, ..., 0.49; after pass k those above 0.5 − 0.1k are fooled: 60% after pass 3
    assert result.passes == 3 and result.converged
    assert [entry["pass"] for entry in result.history] == [1, 2, 3]
    assert engine.indices == [0, 1, 2]
    assert [i for i, _, _ in seen] == [1, 2, 3]
    assert result.fooling_rate == pytest.approx(0.6) and seen[-1][1] == result.fooling_rate
    keys = {"pass", "fooling_rate_attack_set", "updates", "mean_deepfool_iterations", "seconds"}
    assert set(result.history[0]) == keys
    assert result.history[0]["mean_deepfool_iterations"] == 2.0
    torch.testing.assert_close(result.perturbation, torch.full((1, 2, 2), 0.3))


def test_run_passes_resumes_from_an_initial_perturbation():
    model = step_model()
    images = (0.04 + 0.05 * torch.arange(10.0)).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    clean = metrics.predict(model, images)
    engine = CountingEngine(ThreatModel.parse(255, "inf"), step=0.1)
    result = run_passes(
        model, engine, images, clean, delta=0.45, max_passes=10, generator=None,
        initial=torch.full((1, 2, 2), 0.2), start_pass=2,
    )
    assert engine.indices == [2] and result.passes == 3 and [h["pass"] for h in result.history] == [3]
    capped = run_passes(model, engine, images, clean, delta=0.01, max_passes=2, generator=None)
    assert capped.passes == 2 and not capped.converged


def test_run_passes_refuses_mismatched_engine_settings():
    model = step_model()
    images = torch.rand(4, 1, 2, 2)
    engine = CountingEngine(ThreatModel.parse(10, "inf"), step=0.1, target_class=1)
    with pytest.raises(ValueError, match="target_class"):
        run_passes(model, engine, images, metrics.predict(model, images), delta=0.2, max_passes=1, generator=None)


def test_frozen_eval_restores_modes_and_flags_even_on_error():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(), nn.BatchNorm1d(2))
    model.train()
    model[2].eval()
    model[0].bias.requires_grad_(False)
    with pytest.raises(RuntimeError):
        with frozen_eval(model):
            assert not any(m.training for m in model.modules())
            assert not any(p.requires_grad for p in model.parameters())
            raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == [True, True, True, False]
    assert [p.requires_grad for p in model.parameters()] == [True, False, True, True]


def test_folded_copy_is_the_same_function_without_batch_norm():
    from uap_lightning.models.cifar_resnet import CifarResNet

    torch.manual_seed(0)
    model = CifarResNet(3, 10, widths=[8, 16], blocks=[1, 1], option="A")
    for module in model.modules():  # non-trivial running statistics
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    model.train()
    folded = folded_copy(model)
    assert folded is not model and model.training  # the original is untouched
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert not any(p.requires_grad for p in folded.parameters())
    x = torch.rand(4, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    assert folded_copy(plain) is plain  # nothing to fold


def test_build_engine_registry_and_errors():
    threat = ThreatModel.parse(10, "inf")
    assert isinstance(build_engine("deepfool_uap", threat), DeepFoolUAP)
    assert isinstance(build_engine("deepfool_uap_batched", threat, aggregate="sum"), BatchedDeepFoolUAP)
    assert isinstance(build_engine("sgd_uap", threat, beta=5.0), SGDUAP)
    assert build_engine("deepfool_uap", threat, deepfool_norm="2").deepfool_norm == 2.0
    assert build_engine("deepfool_uap", threat).deepfool_norm == math.inf
    assert {"aggregate", "overshoot", "clip"} <= set(engine_options("deepfool_uap_batched"))
    with pytest.raises(ValueError, match="deepfool_uap, deepfool_uap_batched, sgd_uap"):
        build_engine("fgsm", threat)
    with pytest.raises(TypeError, match="aggregate"):
        build_engine("deepfool_uap", threat, aggregate="mean")
    with pytest.raises(ValueError, match="attack.aggregate"):
        build_engine("deepfool_uap_batched", threat, aggregate="median")
    with pytest.raises(ValueError, match="attack.optimizer"):
        build_engine("sgd_uap", threat, optimizer="lbfgs")
    with pytest.raises(ValueError, match="attack.target_class"):
        build_engine("sgd_uap", threat, target_class=-1)

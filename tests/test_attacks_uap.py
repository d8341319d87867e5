"""Universal attack engines, the pass driver, the engine factory and frozen_eval."""

import math
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from attack_helpers import digits_victim, one_thread, random_conv_net, registered  # noqa: F401
from uap_lightning import metrics
from uap_lightning.attacks import (
    SGDUAP,
    AttackSettings,
    BatchedDeepFoolUAP,
    DeepFoolUAP,
    PassStats,
    ThreatModel,
    UniversalAttack,
    build_engine,
    folded_copy,
    frozen_eval,
    run_passes,
)
from uap_lightning.attacks.engines import deepfool_uap as deepfool_uap_module
from uap_lightning.attacks.engines.deepfool_uap import MAX_WINDOW, next_window

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = 64.0  # ℓ∞, 0–255 units: digits need a large ε


@pytest.fixture(scope="module")
def victim():
    """(model, attack set X of 150 images, held-out eval set), trained once per test module."""
    return digits_victim()


def random_sign(shape, eps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, shape, generator=generator).float() * 2 - 1) * eps / 255


def attack(model, images, threat, method, max_passes, seed=0, target_class=None, **options):
    settings = AttackSettings(
        threat, method=method, options=options, delta=0.05, max_passes=max_passes, seed=seed, target_class=target_class
    )
    return run_passes(model, settings, images, metrics.predict(model, images))


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
    result = attack(model, X, threat, method, max_passes, **options)
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
    result = attack(model, X, threat, method, passes, target_class=target)
    baseline = max(held_out_rate(model, held_out, random_sign((1, 8, 8), EPS, seed), target) for seed in range(3))
    assert held_out_rate(model, held_out, result.perturbation, target) > baseline + 0.3


def test_l2_deepfool_uap_stays_in_the_ball_and_fools(victim):
    model, X, held_out = victim
    threat = ThreatModel.parse(EPS * 8, 2)  # the ℓ2 norm of a ±EPS pattern on 8×8 pixels
    v = attack(model, X, threat, "deepfool_uap", 2).perturbation
    assert float(v.norm()) <= threat.radius * (1 + 1e-5)
    baseline = max(held_out_rate(model, held_out, random_sign(v.shape, EPS, seed)) for seed in range(3))
    assert held_out_rate(model, held_out, v) > baseline + 0.1


class CountingModel(nn.Module):
    """Wraps a model and counts its forward calls."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.forwards = 0

    def forward(self, x):
        self.forwards += 1
        return self.model(x)


def one_image_at_a_time(engine, model, v, images, clean, generator):
    """The pass before windowing: a batch-1 prediction per image, then the engine's batched DeepFool
    on that image alone. Returns v and the iterations of each update."""
    iterations = []
    for i in torch.randperm(images.shape[0], generator=generator).tolist():
        x = metrics.perturb(images[i : i + 1], v, engine.clip)
        with torch.no_grad():
            todo = engine.still_to_fool(model(x).argmax(1), clean[i : i + 1])
        if bool(todo):
            result = engine.deepfool(model, x)
            if bool(result.converged[0]):
                v = engine.project(v + result.perturbation[0])
                iterations.append(int(result.iterations[0]))
    return v, iterations


def record_windows(monkeypatch):
    """Per call of ``next_window`` during the test: (size, update_at, next size)."""
    calls = []

    def recording(size, update_at, checked, updates):
        calls.append((size, update_at, next_window(size, update_at, checked, updates)))
        return calls[-1][2]

    monkeypatch.setattr(deepfool_uap_module, "next_window", recording)
    return calls


def predictions_made(windows, n):
    """Images predicted by a pass of ``n`` images with these ``record_windows`` entries (> n: some
    window straddled an update, and the images after the updated one were predicted again)."""
    position = predicted = 0
    for size, update_at, _ in windows:
        length = min(size, n - position)
        predicted += length
        position += length if update_at is None else update_at + 1
    assert position == n
    return predicted


@pytest.mark.parametrize(
    "p, eps, target, deepfool_norm, frequent",
    [
        (math.inf, 60.0, None, 2, False),  # large ε: many images fooled, windows grow and straddle updates
        (math.inf, 60.0, None, "inf", False),
        (math.inf, 5.0, None, 2, True),  # small ε: nearly every image takes a step, windows of one
        (math.inf, 5.0, None, "inf", True),
        (2.0, 600.0, None, 2, False),
        (2.0, 600.0, None, "inf", False),
        (2.0, 160.0, None, "inf", True),
        (math.inf, 60.0, 4, 2, False),
        (math.inf, 60.0, 4, "inf", False),
    ],
)
def test_windowed_pass_gives_the_one_image_at_a_time_v(monkeypatch, p, eps, target, deepfool_norm, frequent):
    """Windowed checks change nothing: the same v bit for bit, updates and iterations as a batch-1
    check per image, pass after pass, whether windows grow, shrink and straddle updates (large ε)
    or stay at one image handed on to DeepFool (frequent updates); and the v of the
    deepfool_single reference up to rounding (its margin gradients are formed differently)."""
    model = random_conv_net(seed=2)
    images = torch.rand(40, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    clean = metrics.predict(model, images)
    options = dict(target_class=target, deepfool_norm=deepfool_norm)
    windowed = DeepFoolUAP(ThreatModel.parse(eps, p), **options)
    reference = DeepFoolUAP(ThreatModel.parse(eps, p), per_image_reference=True, **options)
    windows = record_windows(monkeypatch)
    v_windowed = v_plain = v_reference = torch.zeros(3, 8, 8, dtype=torch.float64)
    generators = [torch.Generator().manual_seed(11) for _ in range(3)]
    predicted, resizes = [], set()
    for _ in range(3):
        windows.clear()
        v_windowed, stats = windowed.run_pass(model, v_windowed, images, clean, generators[0])
        predicted.append(predictions_made(windows, images.shape[0]))
        resizes |= {(after > size) - (after < size) for size, _, after in windows}
        v_plain, iterations = one_image_at_a_time(windowed, model, v_plain, images, clean, generators[1])
        v_reference, reference_stats = reference.run_pass(model, v_reference, images, clean, generators[2])
        assert torch.equal(v_windowed, v_plain)
        assert stats.updates == len(iterations) == reference_stats.updates > 0
        assert stats.mean_iterations == sum(iterations) / len(iterations) == reference_stats.mean_iterations
        torch.testing.assert_close(v_windowed, v_reference, rtol=0, atol=1e-14)
    if frequent:
        assert resizes == {0} and predicted == [images.shape[0]] * 3  # one image per window
    else:
        assert resizes == {-1, 0, 1}  # windows shrank, kept their size and grew
        assert max(predicted) > images.shape[0]  # a window straddled an update


def test_windowed_pass_forwards_fewer_times_than_images_when_updates_are_rare():
    """Every pass costs fewer forward calls than the one-image-at-a-time reference, and once v
    fools most of X fewer than X has images."""
    model = CountingModel(random_conv_net(seed=2))
    images = torch.rand(40, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    clean = metrics.predict(model, images)
    threat = ThreatModel.parse(60, "inf")
    windowed, reference = DeepFoolUAP(threat), DeepFoolUAP(threat, per_image_reference=True)
    v = torch.zeros(3, 8, 8, dtype=torch.float64)
    generators = [torch.Generator().manual_seed(11) for _ in range(2)]
    for _ in range(3):
        model.forwards = 0
        v_next, stats = windowed.run_pass(model, v, images, clean, generators[0])
        windowed_forwards, model.forwards = model.forwards, 0
        reference.run_pass(model, v, images, clean, generators[1])
        assert windowed_forwards < model.forwards
        v = v_next
    assert 0 < stats.updates and windowed_forwards < images.shape[0] <= model.forwards


def test_window_grows_without_updates_and_shrinks_after_an_early_one():
    """Doubles without an update, halves after an update in its first half, and never exceeds
    half the mean run of images per update so far nor MAX_WINDOW."""
    assert [next_window(size, None, 1000, 0) for size in (1, 2, 32, MAX_WINDOW)] == [2, 4, 64, MAX_WINDOW]
    assert [next_window(8, at, 1000, 0) for at in range(8)] == [4, 4, 4, 4, 8, 8, 8, 8]
    assert [next_window(1, 0, 1000, 0), next_window(2, 0, 1000, 0), next_window(3, 1, 1000, 0)] == [1, 1, 3]
    assert [next_window(16, None, 99, 9), next_window(16, None, 8, 9)] == [5, 1]
    assert [next_window(1, None, 1, 0), next_window(1, None, 2, 0), next_window(1, None, 3, 0)] == [1, 1, 2]


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
    assert engine.step_size == pytest.approx(5.0)  # ε / 10, in 0–255 units
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


@dataclass
class CountingOptions:
    step: float = 0.1
    indices: list = field(default_factory=list)  # the pass indices the engine was given


class CountingEngine(UniversalAttack):
    """Adds a fixed pattern per pass; records the pass indices it was given."""

    name = "counting"
    Options = CountingOptions

    def run_pass(self, model, v, images, clean_labels, generator, pass_index=None):
        self.options.indices.append(pass_index)
        return self.project(v + self.options.step), PassStats(updates=1, mean_iterations=2.0)


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
    indices, seen = [], []
    with registered(CountingEngine):
        settings = AttackSettings(
            ThreatModel.parse(255, "inf"), method="counting", options={"indices": indices}, delta=0.45
        )
        result = run_passes(
            model,
            settings,
            images,
            clean,
            on_pass_end=lambda report: seen.append((report.pass_index, report.fooling_rate, report.stats.updates)),
        )
    # pixel values 0.04, 0.09, ..., 0.49; after pass k those above 0.5 − 0.1k are fooled: 60% after pass 3
    assert result.passes == 3 and result.converged
    assert [entry["pass"] for entry in result.history] == [1, 2, 3]
    assert indices == [0, 1, 2]
    assert [i for i, _, _ in seen] == [1, 2, 3]
    assert result.fooling_rate == pytest.approx(0.6) and seen[-1][1] == result.fooling_rate
    keys = {"pass", "fooling_rate_attack_set", "updates", "mean_inner_iterations", "seconds"}
    assert set(result.history[0]) == keys
    assert result.history[0]["mean_inner_iterations"] == 2.0
    torch.testing.assert_close(result.perturbation, torch.full((1, 2, 2), 0.3))


def test_run_passes_resumes_from_an_initial_perturbation():
    model = step_model()
    images = (0.04 + 0.05 * torch.arange(10.0)).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    clean = metrics.predict(model, images)
    indices = []
    with registered(CountingEngine):
        settings = AttackSettings(
            ThreatModel.parse(255, "inf"), method="counting", options={"indices": indices}, delta=0.45
        )
        result = run_passes(model, settings, images, clean, initial=torch.full((1, 2, 2), 0.2), start_pass=2)
        assert indices == [2] and result.passes == 3 and [h["pass"] for h in result.history] == [3]
        capped = run_passes(model, settings.replace(delta=0.01, max_passes=2), images, clean)
    assert capped.passes == 2 and not capped.converged


@pytest.mark.parametrize(
    "change, key",
    [
        (dict(delta=1.0), "attack.delta"),
        (dict(max_passes=0), "attack.max_passes"),
        (dict(keep="first"), "attack.keep"),
        (dict(target_class=-1), "attack.target_class"),
        (dict(eval_batch_size=0), "attack.eval_batch_size"),
        (dict(method="fgsm"), "attack.method"),
    ],
)
def test_attack_settings_refuse_values_that_cannot_work(change, key):
    """AttackSettings checks every value once, naming its key."""
    with pytest.raises(ValueError, match=key):
        AttackSettings(ThreatModel.parse(10, "inf"), **change)
    with pytest.raises(TypeError, match="aggregate"):
        AttackSettings(ThreatModel.parse(10, "inf"), method="deepfool_uap", options={"aggregate": "sum"})


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
    assert build_engine("deepfool_uap", threat).deepfool_norm == 2.0  # the paper's step for every p
    assert {"aggregate", "overshoot"} <= set(BatchedDeepFoolUAP.option_names())
    assert build_engine("deepfool_uap_batched", threat, batch_size=8).options.batch_size == 8
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

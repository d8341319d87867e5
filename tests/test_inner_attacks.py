"""The inner attacks of Algorithm 1 (attack.inner) and the outer loop the DeepFool engines share."""

import math

import pytest
import torch
from torch import nn

from attack_helpers import LinearClassifier, digits_victim, one_thread, random_conv_net  # noqa: F401
from uap_lightning import attacks, metrics
from uap_lightning.attacks import (
    AttackSettings,
    BatchedDeepFoolUAP,
    DeepFoolUAP,
    ThreatModel,
    build_engine,
    deepfool_batched,
    lp_norm,
    run_passes,
)
from uap_lightning.attacks.inner import (
    INNER_ATTACKS,
    FGSMInner,
    InnerAttack,
    InnerOptions,
    InnerResult,
    PGDInner,
    register_inner,
)
from uap_lightning.validation import ConfigError, validate

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = 64.0  # ℓ∞, 0–255 units: digits need a large ε
ENGINES = ["deepfool_uap", "deepfool_uap_batched"]


@pytest.fixture(scope="module")
def victim():
    """(model, attack set X of 150 images, held-out eval set), trained once per test module."""
    return digits_victim()


def settings(method, inner, max_passes=3, seed=0, eps=EPS, p="inf", **options):
    return AttackSettings(
        ThreatModel.parse(eps, p),
        method=method,
        options={"inner": inner, **options},
        delta=0.01,
        max_passes=max_passes,
        seed=seed,
    )


def attack(model, images, attack_settings):
    return run_passes(model, attack_settings, images, metrics.predict(model, images))


def held_out_rate(model, images, v):
    return metrics.fooling_rate(metrics.predict(model, images), metrics.predict(model, images, v))


def sequential_algorithm_one(engine, model, v, images, clean, generator):
    """Algorithm 1 written plainly: per image in randperm order, DeepFool on clip(x + v) if v does
    not fool x, and v ← Proj(v + Δv) when DeepFool converged."""
    for i in torch.randperm(images.shape[0], generator=generator).tolist():
        x = metrics.perturb(images[i : i + 1], v, True)
        with torch.no_grad():
            unchanged = bool(model(x).argmax(1) == clean[i])
        if unchanged:
            result = deepfool_batched(model, x)
            if bool(result.converged[0]):
                v = engine.project(v + result.perturbation[0])
    return v


def batched_algorithm_one(engine, model, v, images, clean, generator, batch_size, aggregate):
    """The batched variant written plainly: per batch, DeepFool on the images v does not fool, and
    v ← Proj(v + the sum or mean of the converged steps)."""
    order = torch.randperm(images.shape[0], generator=generator)
    for batch in order.split(batch_size):
        x = metrics.perturb(images[batch], v, True)
        with torch.no_grad():
            todo = model(x).argmax(1) == clean[batch]
        if not bool(todo.any()):
            continue
        result = deepfool_batched(model, x[todo])
        steps = result.perturbation[result.converged]
        if steps.shape[0] > 0:
            v = engine.project(v + (steps.mean(0) if aggregate == "mean" else steps.sum(0)))
    return v


def test_deepfool_inner_gives_algorithm_one_bit_for_bit(victim):
    """With the DeepFool inner attack (the default) both engines give, pass after pass, the v of
    Algorithm 1 written plainly with DeepFool's defaults, bit for bit."""
    model, images, _ = victim
    images = images[:80]
    clean = metrics.predict(model, images)
    threat = ThreatModel.parse(EPS, "inf")
    sequential = DeepFoolUAP(threat)
    batched = BatchedDeepFoolUAP(threat, batch_size=16, aggregate="mean")
    assert sequential.options.inner == batched.options.inner == "deepfool"
    v_engine = v_plain = v_batched = v_batched_plain = torch.zeros(images.shape[1:])
    generators = [torch.Generator().manual_seed(3) for _ in range(4)]
    for _ in range(2):
        v_engine, stats = sequential.run_pass(model, v_engine, images, clean, generators[0])
        v_plain = sequential_algorithm_one(sequential, model, v_plain, images, clean, generators[1])
        v_batched, batched_stats = batched.run_pass(model, v_batched, images, clean, generators[2])
        v_batched_plain = batched_algorithm_one(
            batched, model, v_batched_plain, images, clean, generators[3], 16, "mean"
        )
        assert stats.updates > 0 and batched_stats.updates > 0
        assert torch.equal(v_engine, v_plain)
        assert torch.equal(v_batched, v_batched_plain)


@pytest.mark.parametrize("method", ENGINES)
@pytest.mark.parametrize("inner", ["fgsm", "pgd"])
def test_gradient_inner_attacks_beat_random_noise_of_the_same_norm(victim, method, inner):
    """On the digits victim, fgsm and pgd inside Algorithm 1 fool held-out images far more often
    than a random ±ε sign pattern does, and v stays in the ℓ∞ ball."""
    model, images, held_out = victim
    result = attack(model, images, settings(method, inner))
    v = result.perturbation
    assert float(v.abs().max()) <= EPS / 255 + 1e-6
    sign = torch.randint(0, 2, v.shape, generator=torch.Generator().manual_seed(0)).float() * 2 - 1
    baseline = held_out_rate(model, held_out, sign * EPS / 255)
    assert all(entry["updates"] > 0 for entry in result.history)
    assert held_out_rate(model, held_out, v) > baseline + 0.25


@pytest.mark.parametrize("inner", ["fgsm", "pgd"])
def test_l2_gradient_inner_attacks_stay_in_the_ball_and_fool(victim, inner):
    model, images, held_out = victim
    result = attack(model, images, settings("deepfool_uap", inner, eps=600.0, p="2"))
    v = result.perturbation
    assert float(v.norm()) <= 600.0 / 255 * (1 + 1e-5)
    direction = torch.randn(v.shape, generator=torch.Generator().manual_seed(0))
    baseline = held_out_rate(model, held_out, direction / direction.norm() * float(v.norm()))
    assert held_out_rate(model, held_out, v) > baseline + 0.2


@pytest.mark.parametrize("p", ["inf", "2", "1"])
def test_fgsm_step_is_the_steepest_ascent_of_the_cross_entropy(p):
    """On a linear model, whose cross-entropy gradient is Wᵀ(softmax − onehot), the fgsm step is
    inner_step/255 times its sign (ℓ∞) or the gradient scaled to ℓp length inner_step/255."""
    torch.manual_seed(0)
    model = LinearClassifier(12, 4).double().eval()
    x = torch.rand(6, 3, 2, 2, dtype=torch.float64)
    labels = model(x).argmax(1)
    threat = ThreatModel.parse(40, p)
    fgsm = FGSMInner(threat, InnerOptions(inner="fgsm", inner_step=20.0))
    result = fgsm(model, x, labels, clip=True, generator=None)
    probabilities = model(x).detach().softmax(1)
    gradient = ((probabilities - nn.functional.one_hot(labels, 4)) @ model.linear.weight.detach()).view_as(x)
    if p == "inf":
        expected = 20.0 / 255 * gradient.sign()
    else:
        expected = 20.0 / 255 * gradient / lp_norm(gradient, float(p)).view(-1, 1, 1, 1)
    torch.testing.assert_close(result.perturbation, expected)
    assert result.iterations.tolist() == [1] * 6
    fooled = model(metrics.perturb(x, expected, True)).argmax(1) != labels
    assert torch.equal(result.succeeded, fooled)


def test_pgd_stops_each_image_once_fooled_and_stays_in_the_ball():
    """pgd: Δv within the ε ball, each successful image fooled at clip(x + Δv) after its counted
    steps and not one step earlier, failed ones run every step; one pgd step is the fgsm step."""
    model = random_conv_net(seed=2)
    x = torch.rand(24, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    labels = metrics.predict(model, x)
    threat = ThreatModel.parse(10, "inf")  # the ball is reached in five steps of 2
    options = InnerOptions(inner="pgd", inner_step=2.0, inner_steps=6)
    result = PGDInner(threat, options)(model, x, labels, clip=True, generator=None)
    assert float(result.perturbation.abs().max()) <= 10 / 255 + 1e-12
    ok = result.succeeded
    assert 0 < int(ok.sum()) < 24  # some images fooled within six steps, others not
    assert bool((result.iterations[~ok] == 6).all())
    fooled = metrics.predict(model, metrics.perturb(x, result.perturbation, True)) != labels
    assert torch.equal(fooled, ok)
    for steps in range(1, 6):  # fooled after exactly its counted steps
        shorter = PGDInner(threat, InnerOptions(inner="pgd", inner_step=2.0, inner_steps=steps))
        early = shorter(model, x, labels, clip=True, generator=None)
        assert torch.equal(early.succeeded, ok & (result.iterations <= steps))
    one_step = PGDInner(threat, InnerOptions(inner="pgd", inner_step=2.0, inner_steps=1))(
        model, x, labels, clip=True, generator=None
    )
    fgsm = FGSMInner(threat, InnerOptions(inner="fgsm", inner_step=2.0))(model, x, labels, clip=True, generator=None)
    torch.testing.assert_close(one_step.perturbation, fgsm.perturbation, rtol=0, atol=0)
    assert torch.equal(one_step.succeeded, fgsm.succeeded)


def test_inner_step_defaults_to_a_quarter_of_eps():
    threat = ThreatModel.parse(64, "inf")
    for inner in ("fgsm", "pgd"):
        engine = build_engine("deepfool_uap", threat, inner=inner)
        assert engine.inner.step == pytest.approx(16 / 255)
        assert build_engine("deepfool_uap", threat, inner=inner, inner_step=5).inner.step == pytest.approx(5 / 255)


@pytest.mark.parametrize("inner", ["fgsm", "pgd"])
def test_targeted_gradient_inner_attacks_reach_the_target(victim, inner):
    model, images, held_out = victim
    target = 3
    attack_settings = settings("deepfool_uap", inner).replace(target_class=target)
    v = attack(model, images, attack_settings).perturbation
    clean = metrics.predict(model, held_out)
    sign = torch.randint(0, 2, v.shape, generator=torch.Generator().manual_seed(0)).float() * 2 - 1
    baseline = metrics.targeted_success_rate(clean, metrics.predict(model, held_out, sign * EPS / 255), target)
    assert metrics.targeted_success_rate(clean, metrics.predict(model, held_out, v), target) > baseline + 0.25


@pytest.mark.parametrize("inner", ["fgsm", "pgd"])
@pytest.mark.parametrize("p, eps", [(math.inf, 40.0), (2.0, 300.0)])
def test_windowed_pass_gives_the_one_image_at_a_time_v_for_gradient_inner_attacks(inner, p, eps):
    """The outer loop's windowed checks and the one-image check handed over as the first forward
    pass change nothing for fgsm and pgd either: the per-image reference's v, bit for bit."""
    model = random_conv_net(seed=2)
    images = torch.rand(40, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    clean = metrics.predict(model, images)
    threat = ThreatModel.parse(eps, p)
    windowed = DeepFoolUAP(threat, inner=inner)
    reference = DeepFoolUAP(threat, inner=inner, per_image_reference=True)
    v_windowed = v_reference = torch.zeros(3, 8, 8, dtype=torch.float64)
    generators = [torch.Generator().manual_seed(11) for _ in range(2)]
    updates = 0
    for _ in range(3):
        v_windowed, stats = windowed.run_pass(model, v_windowed, images, clean, generators[0])
        v_reference, reference_stats = reference.run_pass(model, v_reference, images, clean, generators[1])
        assert torch.equal(v_windowed, v_reference)
        assert stats == reference_stats
        updates += stats.updates
    assert updates > 0


@pytest.mark.parametrize("method", ENGINES)
def test_a_registered_inner_class_is_all_a_new_inner_attack_takes(victim, method):
    """A class registered with register_inner is selected by attack.inner; the outer loop hands it
    only images v does not fool (with their clean labels), adds its successful steps, projects v
    and counts its updates and iterations."""
    model, images, _ = victim
    calls = []

    @register_inner
    class BrightenFooled(InnerAttack):
        """Claims success on even labels with a step of +1/255 on every pixel in 3 iterations."""

        name = "brighten_even"

        def __call__(self, model, x, labels, *, clip, generator, start=None):
            calls.append((metrics.predict(model, x), labels.clone()))
            step = torch.full_like(x, 1 / 255)
            return InnerResult(step, labels % 2 == 0, torch.full_like(labels, 3))

    try:
        result = attack(model, images, settings(method, "brighten_even", max_passes=1))
    finally:
        del INNER_ATTACKS["brighten_even"]
    predicted, labels = (torch.cat(parts) for parts in zip(*calls))
    assert torch.equal(predicted, labels)  # only images v did not fool yet
    updates = result.history[0]["updates"]
    assert updates == int((labels % 2 == 0).sum()) > 0
    assert result.history[0]["mean_inner_iterations"] == 3.0
    expected = min(updates, EPS) / 255  # v grew by 1/255 per successful image, projected at ε
    torch.testing.assert_close(result.last_perturbation, torch.full_like(images[0], expected))
    with pytest.raises(ValueError, match="brighten_even"):
        settings(method, "brighten_even")  # unregistered: unknown again


@pytest.mark.parametrize("method", ENGINES)
@pytest.mark.parametrize("inner", ["fgsm", "pgd"])
def test_same_seed_same_perturbation(victim, method, inner):
    model, images, _ = victim
    runs = [attack(model, images, settings(method, inner, max_passes=1, seed=seed)) for seed in (4, 4, 5)]
    assert torch.equal(runs[0].perturbation, runs[1].perturbation)
    assert not torch.equal(runs[0].perturbation, runs[2].perturbation)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"inner": "cw"}, "attack.inner must be one of deepfool, fgsm, pgd; got 'cw'"),
        ({"inner": "fgsm", "inner_step": 0}, "attack.inner_step must be a positive number"),
        ({"inner": "pgd", "inner_step": -2.0}, "attack.inner_step"),
        ({"inner": "pgd", "inner_step": math.nan}, "attack.inner_step"),
        ({"inner": "pgd", "inner_step": "big"}, "attack.inner_step"),
        ({"inner": "pgd", "inner_steps": 0}, "attack.inner_steps must be an integer >= 1"),
        ({"inner": "pgd", "inner_steps": 2.5}, "attack.inner_steps"),
    ],
)
@pytest.mark.parametrize("method", ENGINES)
def test_bad_inner_options_name_the_key(method, options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        AttackSettings(ThreatModel.parse(EPS, "inf"), method=method, options=options)


def test_inner_keys_in_the_config(make_cfg):
    """attack.inner and its keys are part of both DeepFool engines' config; a bad value is a
    ConfigError naming the key before any work."""
    for engine in ENGINES:
        attack_settings = validate(make_cfg(f"attack={engine}", "attack.inner=pgd", "attack.inner_steps=4"))
        assert attack_settings.options["inner_step"] is None  # the default: a share of ε
        assert attack_settings.engine().inner.options.inner_steps == 4
        assert isinstance(attack_settings.engine().inner, PGDInner)
    with pytest.raises(ConfigError, match="attack.inner must be one of"):
        validate(make_cfg("attack=deepfool_uap", "attack.inner=cw"))
    with pytest.raises(ConfigError, match="attack.inner_step"):
        validate(make_cfg("attack=deepfool_uap_batched", "attack.inner_step=-1"))


def test_every_engine_class_is_exported():
    for engine in attacks.ENGINES.values():
        assert getattr(attacks, engine.__name__) is engine


@pytest.mark.parametrize(
    "options, message",
    [
        ({"inner": "fgsm", "inner_step": 1e9}, "a step beyond 255.0 moves past any image"),
        ({"inner": "deepfool", "inner_step": 2.0}, "DeepFool finds its own minimal step"),
        ({"inner": "fgsm", "inner_steps": 5}, "attack.inner_steps=5 is read by inner=pgd only"),
    ],
)
def test_inner_settings_the_inner_attack_would_ignore_or_cannot_use_are_refused(options, message):
    from uap_lightning.attacks.inner import InnerOptions

    with pytest.raises(ValueError, match=message):
        InnerOptions(**options)
    InnerOptions(inner="pgd", inner_steps=5, inner_step=2.0)  # pgd reads both

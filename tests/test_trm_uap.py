"""TRM-UAP, the data-free engine of truncated ratio maximization: its objective, truncation,
curriculum, projection, stop without X, errors, API and config."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from attack_helpers import digits_victim, one_thread, random_conv_net  # noqa: F401
from uap_lightning import compute_uap, fooling_rate
from uap_lightning.attacks import ThreatModel
from uap_lightning.attacks.data_free import uniform_start
from uap_lightning.attacks.engines import trm_uap
from uap_lightning.attacks.engines.trm_uap import (
    TRMUAP,
    Stage,
    conv_outputs,
    curriculum_end,
    curriculum_stage,
    pseudo_images,
    truncated_ratio,
)
from uap_lightning.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def first_pass(model: nn.Module, eps: float = 30.0, p: str = "inf", seed: int = 0, **options) -> torch.Tensor:
    """δ after one pass from zeros (pass 0) on a C×8×8 model, X never given."""
    engine = TRMUAP(ThreatModel.parse(eps, p), **options)
    v, _ = engine.run_pass(model, torch.zeros(3, 8, 8), None, None, torch.Generator().manual_seed(seed), pass_index=0)
    return v


def test_the_ratio_has_the_published_form():
    """R = Σ_{l≤L_p} log(½‖A_l⁺‖²) − λ Σ_{l≤L_n} log(½‖A_l⁻‖) with L_p = ⌊p_rate·L⌋ and
    L_n = ⌊n_rate·L⌋ (at least one layer for a rate above 0)."""
    first, second = torch.tensor([[3.0, -4.0, 0.0]]), torch.tensor([[1.0, -2.0, -2.0]])
    outputs = [first, second]

    def term(positive: float, negative: float, lam: float) -> float:
        return math.log(positive / 2 + 1e-9) - lam * math.log(negative / 2 + 1e-9)

    assert float(truncated_ratio(outputs, 0.5, 0.5, 1.0)) == pytest.approx(term(9.0, 4.0, 1.0))
    assert float(truncated_ratio(outputs, 0.3, 0.0, 2.0)) == pytest.approx(math.log(9.0 / 2 + 1e-9))
    both = term(9.0, 4.0, 0.5) + term(1.0, math.sqrt(8.0), 0.5)
    assert float(truncated_ratio(outputs, 1.0, 1.0, 0.5)) == pytest.approx(both)


def test_the_ratio_rises_over_the_passes():
    """Each pass raises R on a fixed batch of the first stage's pseudo-images, above the start's."""
    model = random_conv_net(seed=3).float()
    first_stage = curriculum_stage("gauss", 1, batch_size=16)
    fixed = pseudo_images("gauss", first_stage, (3, 8, 8), torch.Generator().manual_seed(9))

    def ratio(v: torch.Tensor) -> float:
        with conv_outputs(model) as outputs, torch.no_grad():
            model((fixed + v).clamp(0, 1))
            return float(truncated_ratio(outputs, 0.5, 0.5, 1.0))

    engine = TRMUAP(ThreatModel.parse(30, "inf"), p_rate=0.5, n_rate=0.5, steps=10, step_size=1.0)
    generator = torch.Generator().manual_seed(0)
    v, values = torch.zeros(3, 8, 8), []
    for index in range(3):
        v, stats = engine.run_pass(model, v, None, None, generator, pass_index=index)
        values.append(ratio(v))
        assert stats.updates == 10
    assert values[0] < values[1] < values[2]
    assert ratio(uniform_start(torch.zeros(3, 8, 8), engine.threat, torch.Generator().manual_seed(0))) < values[0]


def test_only_the_first_conv_layers_enter_the_loss():
    """With one of two conv layers kept, new weights in the deeper one leave δ as it was, in the
    shallow one they change it; keeping both layers, the deeper one changes δ too."""
    base = random_conv_net(seed=3).float()
    deep, shallow = copy.deepcopy(base), copy.deepcopy(base)
    torch.manual_seed(5)
    with torch.no_grad():
        deep[3].weight.normal_()
        shallow[0].weight.normal_()
    first = dict(p_rate=0.5, n_rate=0.5, steps=10, step_size=2.0)
    assert torch.equal(first_pass(base, **first), first_pass(deep, **first))
    assert not torch.equal(first_pass(base, **first), first_pass(shallow, **first))
    both = dict(p_rate=1.0, n_rate=1.0, steps=10, step_size=2.0)
    assert not torch.equal(first_pass(base, **both), first_pass(deep, **both))


def test_no_image_is_read():
    """An X of NaNs gives the same finite δ as a real X and as none."""
    model = random_conv_net(seed=3).float()
    engine = TRMUAP(ThreatModel.parse(30, "inf"), steps=5)
    real, nans = torch.rand(6, 3, 8, 8), torch.full((6, 3, 8, 8), math.nan)
    labels = torch.zeros(6, dtype=torch.long)
    runs = [
        engine.run_pass(model, torch.zeros(3, 8, 8), x, labels, torch.Generator().manual_seed(1), pass_index=0)[0]
        for x in (real, nans, None)
    ]
    assert torch.isfinite(runs[0]).all()
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    assert not engine.reads_images


@pytest.mark.parametrize("p, eps", [("inf", 20.0), ("2", 300.0)])
def test_the_projection_holds_and_the_seed_decides(p, eps):
    """δ stays in the ℓp ball (ℓ∞ and ℓ2); the same seed gives the same δ, another seed another."""
    model = random_conv_net(seed=3).float()
    threat = ThreatModel.parse(eps, p)
    v = first_pass(model, eps, p, steps=10)
    assert float(torch.linalg.vector_norm(v.flatten(), ord=threat.p)) <= threat.radius * (1 + 1e-5)
    assert float(torch.linalg.vector_norm(v.flatten(), ord=threat.p)) >= 0.5 * threat.radius
    assert torch.equal(v, first_pass(model, eps, p, steps=10))
    assert not torch.equal(v, first_pass(model, eps, p, seed=1, steps=10))


def test_the_curriculum_schedule():
    """Gauss: σ from 10 up by std_growth every 400 steps to 127, the batch doubled at 1600, 2400
    and 3200; jigsaw: one more cut per axis every 600 steps to 7, the batch doubled at 1600, 3200."""
    assert curriculum_stage("gauss", 1) == Stage(1, 10.0, 0)
    assert curriculum_stage("gauss", 399).std == 10.0 and curriculum_stage("gauss", 400).std == 20.0
    assert curriculum_stage("gauss", 800, std_growth=2.0).std == 14.0
    assert [curriculum_stage("gauss", t, batch_size=2).batch_size for t in (1599, 1600, 2400, 3200)] == [2, 4, 8, 16]
    assert curriculum_stage("gauss", 4799).std == 120.0 and curriculum_stage("gauss", 4800).std == 127.0
    assert curriculum_end("gauss") == 4800 and curriculum_stage("gauss", 4800) == curriculum_stage("gauss", 10**6)
    assert [curriculum_stage("jigsaw", t).cuts for t in (1, 599, 600, 3599, 3600, 10**6)] == [1, 1, 2, 6, 7, 7]
    assert [curriculum_stage("jigsaw", t).batch_size for t in (1599, 1600, 2400, 3200)] == [1, 2, 2, 4]
    assert curriculum_end("jigsaw") == 3600


def test_gaussian_pseudo_images_get_noisier():
    """Gauss images: mid-grey plus noise, σ in the last channel and 10 more in each one before it
    (0–255 units), clipped to [0,1]."""
    generator = torch.Generator().manual_seed(0)
    early = pseudo_images("gauss", Stage(64, 10.0, 0), (3, 16, 16), generator)
    late = pseudo_images("gauss", Stage(64, 100.0, 0), (3, 16, 16), generator)
    assert early.shape == (64, 3, 16, 16) and float(early.mean()) == pytest.approx(0.5, abs=0.01)
    channel_std = early.transpose(0, 1).flatten(1).std(dim=1) * 255
    assert channel_std.tolist() == pytest.approx([30.0, 20.0, 10.0], rel=0.05)
    assert float(late.min()) == 0.0 and float(late.max()) == 1.0
    assert float(late.std()) > 2 * float(early.std())


@pytest.mark.parametrize("cuts", [1, 3, 6])
def test_jigsaw_pseudo_images_are_pieces_of_uniform_colour(cuts):
    """Jigsaw images: k cuts per axis split each image into at most (k+1)² rectangles, each of one colour."""
    images = pseudo_images("jigsaw", Stage(16, 0.0, cuts), (3, 12, 12), torch.Generator().manual_seed(0))
    assert images.shape == (16, 3, 12, 12) and 0 <= float(images.min()) and float(images.max()) <= 1
    row_changes = (images[:, :, 1:, :] != images[:, :, :-1, :]).any(dim=(1, 3)).sum(dim=1)
    column_changes = (images[:, :, :, 1:] != images[:, :, :, :-1]).any(dim=(1, 2)).sum(dim=1)
    assert int(row_changes.max()) <= cuts and int(column_changes.max()) <= cuts
    assert int(row_changes.sum()) > 0 and int(column_changes.sum()) > 0
    colours = max(len(image[0].unique()) for image in images)
    assert 1 < colours <= (cuts + 1) ** 2


def test_each_step_draws_from_its_stage_of_the_curriculum(monkeypatch):
    """Pass i runs steps i·steps + 1 … (i + 1)·steps of the curriculum."""
    drawn = []

    def recording(prior, stage, shape, generator, dtype=torch.float32):
        drawn.append((prior, stage))
        return pseudo_images(prior, stage, shape, generator, dtype)

    monkeypatch.setattr(trm_uap, "pseudo_images", recording)
    engine = TRMUAP(ThreatModel.parse(30, "inf"), prior="jigsaw", steps=3)
    model = random_conv_net(seed=3).float()
    engine.run_pass(model, torch.zeros(3, 8, 8), None, None, torch.Generator(), pass_index=1066)
    assert drawn == [("jigsaw", curriculum_stage("jigsaw", t)) for t in (3199, 3200, 3201)]
    assert drawn[0][1] == Stage(2, 0.0, 6) and drawn[1][1] == Stage(4, 0.0, 6)


def test_without_x_the_attack_stops_once_the_curriculum_ends_and_delta_settles():
    """converged: a pass on the curriculum's last stage that left δ's saturation as it was; the
    same pass earlier in the curriculum goes on."""
    model = random_conv_net(seed=3).float()
    engine = TRMUAP(ThreatModel.parse(30, "inf"), steps=3, step_size=0.001, saturation=0.01)
    saturated = torch.full((3, 8, 8), 30 / 255)
    last_stage = curriculum_end("gauss") // 3 + 1
    assert engine.run_pass(model, saturated, None, None, torch.Generator(), pass_index=last_stage)[1].converged
    assert not engine.run_pass(model, saturated, None, None, torch.Generator(), pass_index=1)[1].converged


@pytest.mark.parametrize(
    "key, value",
    [
        ("p_rate", 0.0),
        ("p_rate", 1.5),
        ("n_rate", -0.1),
        ("lam", -1.0),
        ("lam", math.nan),
        ("prior", "uniform"),
        ("std_growth", -1.0),
        ("steps", 0),
        ("step_size", 0.0),
        ("batch_size", 0),
        ("saturation", 1.0),
    ],
)
def test_bad_options_name_their_key(key, value):
    with pytest.raises(ValueError, match=f"attack.{key}"):
        TRMUAP(ThreatModel.parse(10, "inf"), **{key: value})


def test_a_model_without_convolutions_names_the_truncation_keys():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(192, 10))
    with pytest.raises(ConfigError, match="attack.p_rate"):
        compute_uap(mlp, None, eps=10, method="trm_uap", image_shape=(3, 8, 8), max_passes=1, steps=2)


def test_the_api_on_the_digits_victim_against_random_noise():
    """compute_uap(model, None, method="trm_uap") works from the model alone and leaves it as it was.

    The digits CNN has two conv layers, so the published truncation (⌊0.8·2⌋ = 1) keeps only the
    first: after 2 passes that δ fools 0.03–0.07 of the held-out images over seeds 0–5, no better
    than random ±ε sign noise (0.11), and no claim is made for it. Keeping both layers, δ fools
    0.22–0.31 over seeds 0–5 after 2 passes (σ of the noise 10, then 20): that must beat noise.
    """
    model, _, held_out = digits_victim()
    flags = [param.requires_grad for param in model.parameters()]
    generator = torch.Generator().manual_seed(0)
    signs = [torch.randint(0, 2, (1, 8, 8), generator=generator) * 2.0 - 1 for _ in range(10)]
    noise = sum(fooling_rate(model, held_out, sign * 64 / 255) for sign in signs) / len(signs)
    published = compute_uap(model, None, eps=64, method="trm_uap", image_shape=(1, 8, 8), max_passes=2)
    v = published.perturbation
    assert v.shape == (1, 8, 8) and torch.isfinite(v).all() and published.passes == 2
    assert 32 / 255 < float(v.abs().max()) <= 64 / 255 + 1e-6
    assert 0 <= fooling_rate(model, held_out, v) <= 1
    both = compute_uap(
        model, None, eps=64, method="trm_uap", image_shape=(1, 8, 8), max_passes=2, p_rate=1.0, n_rate=1.0
    )
    assert fooling_rate(model, held_out, both.perturbation) > 1.5 * noise
    assert all(not m._forward_hooks for m in model.modules()) and not model.training
    assert [param.requires_grad for param in model.parameters()] == flags


def test_the_config_composes(make_cfg):
    """attack=trm_uap composes with the engine's own keys at their defaults (one module plus one yaml)."""
    cfg = make_cfg("attack=trm_uap")
    assert cfg.attack.method == "trm_uap"
    assert (cfg.attack.p_rate, cfg.attack.n_rate, cfg.attack.lam, cfg.attack.prior) == (0.8, 0.8, 1.0, "gauss")
    assert (cfg.attack.steps, cfg.attack.step_size, cfg.attack.batch_size) == (400, 25.5, 1)

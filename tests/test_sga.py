"""SGA: the inner/outer structure, its reduction to SGD-UAP's sign step, momentum, errors."""

from __future__ import annotations

import pytest
import torch

from attack_helpers import digits_victim, one_thread  # noqa: F401
from uap_lightning import compute_uap, fooling_rate
from uap_lightning.attacks import SGA, SGDUAP, ThreatModel
from uap_lightning.attacks.projections import lp_norm
from uap_lightning.metrics import predict
from uap_lightning.validation import ConfigError, validate

pytestmark = pytest.mark.usefixtures("one_thread")


def passes(engine, model, images, count: int, seed: int = 0) -> torch.Tensor:
    """v after ``count`` passes of ``engine`` from zero on ``images``."""
    clean = predict(model, images)
    generator = torch.Generator().manual_seed(seed)
    v = torch.zeros(images.shape[1:])
    for index in range(count):
        v, _ = engine.run_pass(model, v, images, clean, generator, pass_index=index)
    return v


@pytest.mark.parametrize("p, eps", [("inf", 64), ("2", 300)])
def test_k1_with_the_whole_batch_inside_is_sgd_uap_constant_sign_step(p, eps):
    """K = 1 and minibatch = batch: one inner step on the whole batch, so SGA is SGD-UAP's sign step."""
    model, attack_set, _ = digits_victim()
    threat = ThreatModel.parse(eps, p)
    sga = SGA(threat, batch_size=32, minibatch=32, inner_steps=1, step_size=eps / 10)
    sgd = SGDUAP(threat, batch_size=32, optimizer="sign", lr_schedule="constant", step_size=eps / 10)
    v_sga, v_sgd = passes(sga, model, attack_set, 3), passes(sgd, model, attack_set, 3)
    assert v_sga.abs().max() > 0
    assert torch.equal(v_sga, v_sgd)


def test_inner_steps_follow_k_batch_over_minibatch_and_change_the_result():
    """An outer batch of 50 with m = 10 and K = 4 takes 20 inner steps; it is not SGD-UAP's step."""
    model, attack_set, _ = digits_victim()
    threat = ThreatModel.parse(64, "inf")
    images = attack_set[:100]
    clean = predict(model, images)
    engine = SGA(threat, batch_size=50, minibatch=10, inner_steps=4)
    v, stats = engine.run_pass(model, torch.zeros(1, 8, 8), images, clean, torch.Generator().manual_seed(0))
    assert stats.updates == 2 and stats.mean_iterations == 20
    assert float(v.abs().max()) <= threat.radius + 1e-7
    reduced = SGA(threat, batch_size=50, minibatch=50, inner_steps=1)
    v_reduced, _ = reduced.run_pass(model, torch.zeros(1, 8, 8), images, clean, torch.Generator().manual_seed(0))
    assert not torch.equal(v, v_reduced)


def test_momentum_changes_the_steps_and_stays_in_the_ball():
    model, attack_set, _ = digits_victim()
    threat = ThreatModel.parse(300, "2")
    plain = passes(SGA(threat, batch_size=50, minibatch=10, inner_steps=2), model, attack_set, 2)
    moving = passes(SGA(threat, batch_size=50, minibatch=10, inner_steps=2, momentum=0.9), model, attack_set, 2)
    assert not torch.equal(plain, moving)
    assert float(lp_norm(moving.unsqueeze(0), 2.0)) <= threat.radius * (1 + 1e-5)


def test_the_same_seed_gives_the_same_perturbation():
    model, attack_set, _ = digits_victim()
    engine = SGA(ThreatModel.parse(64, "inf"), batch_size=50, minibatch=10, inner_steps=2)
    first, again = passes(engine, model, attack_set, 1, seed=3), passes(engine, model, attack_set, 1, seed=3)
    other = passes(engine, model, attack_set, 1, seed=4)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_sga_from_the_api_fools_held_out_digits_far_above_noise():
    """compute_uap(method="sga") on the digits victim: held-out fooling well above ±ε sign noise."""
    model, attack_set, held_out = digits_victim()
    result = compute_uap(model, attack_set, eps=64, p="inf", method="sga", max_passes=5, batch_size=50)
    noise = (torch.randint(0, 2, (1, 8, 8), generator=torch.Generator().manual_seed(0)).float() * 2 - 1) * 64 / 255
    assert fooling_rate(model, held_out, result.perturbation) > 2 * fooling_rate(model, held_out, noise) + 0.1


@pytest.mark.parametrize(
    "override, key",
    [
        ("attack.inner_steps=0", "attack.inner_steps"),
        ("attack.minibatch=300", "attack.minibatch"),
        ("attack.momentum=1.5", "attack.momentum"),
        ("attack.loss=hinge", "attack.loss"),
    ],
)
def test_bad_settings_name_the_key_before_any_work(make_cfg, override, key):
    with pytest.raises(ConfigError) as err:
        validate(make_cfg("attack=sga", override))
    assert key in str(err.value)


def test_the_preset_runs_the_papers_twenty_passes(make_cfg):
    cfg = make_cfg("attack=sga")
    assert (cfg.attack.method, cfg.attack.max_passes, cfg.attack.batch_size, cfg.attack.minibatch) == (
        "sga",
        20,
        250,
        10,
    )
    assert (cfg.attack.inner_steps, cfg.attack.beta, cfg.attack.loss) == (4, 9.0, "ce")

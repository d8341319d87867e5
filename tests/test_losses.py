"""attack.loss for the gradient engines: the values of each loss, where it stops pulling, targeted
forms, refusals, and each one driving sgd_uap and sga to fool held-out digits."""

from __future__ import annotations

import pytest
import torch

from attack_helpers import digits_victim, one_thread  # noqa: F401
from uap_lightning import compute_uap, fooling_rate
from uap_lightning.attacks import SGA, SGDUAP, ThreatModel
from uap_lightning.attacks.losses import loss_terms
from uap_lightning.metrics import predict, targeted_success_rate
from uap_lightning.validation import ConfigError, validate

pytestmark = pytest.mark.usefixtures("one_thread")

LOGITS = torch.tensor([[3.0, 1.0, 0.0], [0.0, 5.0, 1.0], [2.0, 2.5, -1.0]])
LABELS = torch.tensor([0, 0, 2])


def test_logit_margin_is_own_minus_best_other_bounded_by_kappa():
    untargeted = loss_terms("logit_margin", LOGITS, LABELS, kappa=1.0)
    assert torch.allclose(untargeted, torch.tensor([2.0, -1.0, -1.0]))  # 3-1; max(0-5, -1); max(-1-2.5, -1)
    targeted = loss_terms("logit_margin", LOGITS, LABELS, kappa=10.0, target_class=1)
    assert torch.allclose(targeted, torch.tensor([2.0, -4.0, -0.5]))  # best other minus z_1


def test_an_image_past_kappa_stops_pulling():
    logits = LOGITS.clone().requires_grad_(True)
    loss_terms("logit_margin", logits, LABELS, kappa=1.0).sum().backward()
    assert logits.grad[0].abs().sum() > 0
    assert logits.grad[1].abs().sum() == 0 and logits.grad[2].abs().sum() == 0


def test_cosine_is_one_for_the_clean_logits_and_minus_one_opposite():
    terms = loss_terms(
        "cosine", torch.cat([LOGITS, -LOGITS]), torch.cat([LABELS, LABELS]), clean_logits=torch.cat([LOGITS, LOGITS])
    )
    assert torch.allclose(terms, torch.tensor([1.0] * 3 + [-1.0] * 3))


def test_ce_is_the_clipped_cross_entropy():
    terms = loss_terms("ce", LOGITS, LABELS, beta=1.0)
    ce = torch.nn.functional.cross_entropy(LOGITS, LABELS, reduction="none")
    assert torch.allclose(terms, -ce.clamp(max=1.0)) and (terms >= -1.0).all()


@pytest.mark.parametrize("engine, batch_size", [(SGDUAP, 10), (SGA, 50)])
@pytest.mark.parametrize("loss", ["ce", "cosine", "logit_margin"])
def test_every_loss_fools_held_out_digits_far_above_noise(engine, batch_size, loss):
    model, attack_set, held_out = digits_victim()
    result = compute_uap(
        model, attack_set, eps=64, p="inf", method=engine.name, max_passes=4, batch_size=batch_size, loss=loss
    )
    noise = (torch.randint(0, 2, (1, 8, 8), generator=torch.Generator().manual_seed(0)).float() * 2 - 1) * 64 / 255
    assert fooling_rate(model, held_out, result.perturbation) > 2 * fooling_rate(model, held_out, noise) + 0.1


def test_targeted_logit_margin_sends_images_to_the_target():
    model, attack_set, held_out = digits_victim()
    result = compute_uap(
        model, attack_set, eps=64, p="inf", method="sgd_uap", max_passes=4, loss="logit_margin", target_class=3
    )
    clean, perturbed = predict(model, held_out), predict(model, held_out, result.perturbation)
    assert targeted_success_rate(clean, perturbed, 3) > 0.3


@pytest.mark.parametrize("engine", [SGDUAP, SGA])
def test_cosine_refuses_a_target_class(engine):
    with pytest.raises(ValueError, match="attack.loss=cosine is untargeted"):
        engine(ThreatModel.parse(64, "inf"), loss="cosine", target_class=3)


@pytest.mark.parametrize("override, key", [("attack.loss=hinge", "attack.loss"), ("attack.kappa=-1", "attack.kappa")])
def test_bad_losses_are_refused_by_the_cli_naming_the_key(make_cfg, override, key):
    with pytest.raises(ConfigError) as err:
        validate(make_cfg("attack=sgd_uap", override))
    assert key in str(err.value)


def test_cosine_with_a_target_is_refused_by_the_cli(make_cfg):
    with pytest.raises(ConfigError, match="untargeted"):
        validate(make_cfg("attack=sgd_uap", "attack.loss=cosine", "attack.target_class=3"))

"""Ensembles of victims, input diversity and low-resolution perturbations (the transfer options)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attack_helpers import digits_victim, one_thread, tiny_cnn  # noqa: F401  (one_thread is a fixture)
from uap_lightning import compute_uap
from uap_lightning.attacks import AttackSettings, Ensemble, ThreatModel, run_passes
from uap_lightning.attacks.input_diversity import DiverseInputs, diverse
from uap_lightning.attacks.losses import LossOptions, perturbed_loss
from uap_lightning.attacks.projections import block_average, check_resolution
from uap_lightning.validation import ConfigError, validate


class SizeRecorder(nn.Module):
    """Logits of a linear map of the mean pixel; records the side of every input it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(1, 10)
        self.sides: list = []

    def forward(self, x: Tensor) -> Tensor:
        self.sides.append(int(x.shape[-1]))
        return self.linear(x.mean(dim=(1, 2, 3)).unsqueeze(1))


def dead_net() -> nn.Module:
    """A net with all-zero weights: constant logits, no gradient."""
    net = tiny_cnn(1, 10)
    for param in net.parameters():
        param.data.zero_()
    return net.eval()


def test_each_member_sees_the_images_at_its_own_size():
    small, large = SizeRecorder(), SizeRecorder()
    Ensemble([small, large], sizes=[4, 16])(torch.rand(3, 1, 8, 8))
    assert small.sides == [4] and large.sides == [16]


def test_prediction_is_the_class_of_the_mean_log_probability():
    torch.manual_seed(0)
    a, b = tiny_cnn(), tiny_cnn()
    x = torch.rand(20, 1, 8, 8)
    expected = (F.log_softmax(a(x), 1) + F.log_softmax(b(x), 1)).argmax(1)
    assert torch.equal(Ensemble([a, b])(x).argmax(1), expected)


def test_the_loss_is_the_mean_of_the_members_losses():
    torch.manual_seed(1)
    a, b = tiny_cnn(), tiny_cnn()
    x, v = torch.rand(12, 1, 8, 8), 0.1 * torch.randn(1, 8, 8)
    labels = torch.randint(10, (12,))
    for loss in ("ce", "cosine", "logit_margin"):
        options = LossOptions(loss=loss)
        each = [perturbed_loss(m, x, v, labels, options, target_class=None, clip=True) for m in (a, b)]
        together = perturbed_loss(Ensemble([a, b]), x, v, labels, options, target_class=None, clip=True)
        assert together.item() == pytest.approx((each[0].item() + each[1].item()) / 2, rel=1e-5), loss


@pytest.mark.parametrize(
    "method, options",
    [
        ("sgd_uap", {"batch_size": 50}),
        ("sga", {"batch_size": 50, "minibatch": 10, "inner_steps": 1}),
        ("gd_uap", {"prior": "data", "steps": 5}),
    ],
)
def test_two_copies_of_a_victim_give_its_own_perturbation(one_thread, method, options):
    model, attack, _ = digits_victim()
    x = attack[:100]
    single = compute_uap(model, x, eps=48, method=method, max_passes=2, seed=3, **options)
    twins = compute_uap([model, copy.deepcopy(model)], x, eps=48, method=method, max_passes=2, seed=3, **options)
    assert torch.allclose(single.perturbation, twins.perturbation, atol=1e-5)
    assert twins.fooling_rate == pytest.approx(single.fooling_rate)


def test_a_member_without_gradient_leaves_the_sign_steps_of_the_other(one_thread):
    model, attack, _ = digits_victim()
    x = attack[:100]
    alone = compute_uap(model, x, eps=48, method="sgd_uap", max_passes=2, seed=1, batch_size=25)
    paired = compute_uap([model, dead_net()], x, eps=48, method="sgd_uap", max_passes=2, seed=1, batch_size=25)
    assert torch.equal(alone.perturbation, paired.perturbation)


@pytest.mark.parametrize("method", ["deepfool_uap", "deepfool_uap_batched", "sv_uap", "trm_uap", "gap"])
def test_engines_that_follow_one_network_refuse_an_ensemble(method):
    a, b = tiny_cnn(), tiny_cnn()
    with pytest.raises(ValueError, match=f"{method} cannot attack an ensemble"):
        compute_uap([a, b], torch.rand(8, 1, 8, 8), eps=32, method=method)


def test_ensemble_settings_are_checked_before_any_work(make_cfg):
    with pytest.raises(ConfigError, match="at least two"):
        validate(make_cfg("attack=sgd_uap", "attack.ensemble=[cnn]"))
    with pytest.raises(ConfigError, match="cannot attack an ensemble"):
        validate(make_cfg("attack=deepfool_uap", "attack.ensemble=[cnn,lenet]"))
    with pytest.raises(ConfigError, match="unknown model preset 'resnet-18'"):
        validate(make_cfg("attack=sgd_uap", "attack.ensemble=[cnn,resnet-18]"))
    with pytest.raises(ConfigError, match="task=attack"):
        validate(make_cfg("attack=sgd_uap", "task=transfer", "attack.ensemble=[cnn,lenet]"))
    validate(make_cfg("attack=sga", "attack.ensemble=[cnn,lenet]"))


def test_diverse_inputs_are_the_image_shrunk_into_a_zero_frame():
    images = torch.rand(4, 3, 40, 40) * 0.5 + 0.5  # no zero pixel of their own
    out = diverse(images, 1.0, torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    inside = out[0, 0] > 0
    rows, cols = inside.any(1).nonzero().flatten(), inside.any(0).nonzero().flatten()
    side = rows.numel()
    assert 36 <= side < 40 and cols.numel() == side  # a square of side in [0.9·40, 40)
    top, left = int(rows[0]), int(cols[0])
    shrunk = F.interpolate(images, size=(side, side), mode="nearest")
    assert torch.equal(out[:, :, top : top + side, left : left + side], shrunk)
    assert float(out.sum()) == pytest.approx(float(shrunk.sum()), rel=1e-6)  # zero outside the square
    assert torch.equal(diverse(images, 0.0, torch.Generator()), images)


def test_predictions_never_see_diverse_inputs():
    recorder = SizeRecorder()
    wrapped = DiverseInputs(recorder, 1.0, torch.Generator().manual_seed(0))
    x = torch.rand(2, 1, 20, 20) + 0.1
    with torch.no_grad():
        assert torch.equal(wrapped(x), recorder(x))


def test_input_diversity_is_seeded_and_changes_the_perturbation(one_thread):
    model, attack, _ = digits_victim()
    x = attack[:100]
    runs = [
        compute_uap(model, x, eps=48, method="sgd_uap", max_passes=2, seed=0, input_diversity=p)
        for p in (0.5, 0.5, 0.0)
    ]
    assert torch.equal(runs[0].perturbation, runs[1].perturbation)
    assert not torch.equal(runs[0].perturbation, runs[2].perturbation)


def test_block_average_is_the_orthogonal_projection_onto_block_images():
    torch.manual_seed(0)
    v, w = torch.randn(3, 12, 12), torch.randn(3, 12, 12)
    pv, pw = block_average(v, 4), block_average(w, 4)
    assert torch.allclose(block_average(pv, 4), pv)  # idempotent
    assert abs(float(((v - pv) * pw).sum())) < 1e-4  # the residual is orthogonal to the subspace
    assert torch.equal(pv, pv[:, ::3, ::3].repeat_interleave(3, 1).repeat_interleave(3, 2))
    assert block_average(v, None) is v


@pytest.mark.parametrize("p", ["inf", "2"])
def test_a_low_resolution_perturbation_is_made_of_blocks_inside_the_ball(one_thread, p):
    model, attack, _ = digits_victim()
    eps = 48 if p == "inf" else 400
    result = compute_uap(model, attack[:100], eps=eps, p=p, method="sgd_uap", max_passes=2, resolution=2)
    v = result.perturbation
    assert torch.equal(v, v[:, ::4, ::4].repeat_interleave(4, 1).repeat_interleave(4, 2))
    norm = torch.linalg.vector_norm(v.flatten(), ord=math.inf if p == "inf" else 2.0) * 255
    assert 0 < norm <= eps * (1 + 1e-5)


def test_resolution_must_divide_the_image():
    check_resolution(4, (1, 8, 8))
    with pytest.raises(ValueError, match="attack.resolution=3 must divide"):
        check_resolution(3, (1, 8, 8))
    with pytest.raises(ValueError, match="attack.resolution"):
        AttackSettings(ThreatModel.parse(10, "inf"), method="deepfool_uap", resolution=4).engine()
    with pytest.raises(ValueError, match="input_diversity must lie"):
        AttackSettings(ThreatModel.parse(10, "inf"), method="sgd_uap", input_diversity=1.5)


def test_run_passes_refuses_a_resolution_that_does_not_divide(one_thread):
    model, attack, _ = digits_victim()
    settings = AttackSettings(ThreatModel.parse(32, "inf"), method="sgd_uap", resolution=3)
    with pytest.raises(ValueError, match="must divide"):
        run_passes(model, settings, attack[:10], model(attack[:10]).argmax(1))

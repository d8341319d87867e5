"""GD-UAP, the data-free engine: its objective, hooks, priors, projection, stop without X, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from attack_helpers import digits_victim, one_thread, random_conv_net  # noqa: F401
from uap_lightning import compute_uap, fooling_rate
from uap_lightning.attacks import AttackSettings, ThreatModel, run_passes
from uap_lightning.attacks.activations import activations
from uap_lightning.attacks.data_free import uniform_start
from uap_lightning.attacks.engines.gd_uap import GDUAP
from uap_lightning.errors import ConfigError
from uap_lightning.tasks import run_task

pytestmark = pytest.mark.usefixtures("one_thread")


def objective(model: nn.Module, v: torch.Tensor) -> float:
    """Σ_l log ‖f_l(0.5 + v)‖₂ over the conv layers (what GD-UAP raises, prior none)."""
    with activations(model, "conv") as outputs, torch.no_grad():
        model((0.5 + v).clamp(0, 1).unsqueeze(0))
        return float(sum(torch.log(out.flatten(1).norm(dim=1)).mean() for out in outputs))


def test_the_objective_increases_over_the_passes():
    """Each pass raises the log-norms of the conv activations δ causes (prior none)."""
    model = random_conv_net(seed=3).float()
    engine = GDUAP(ThreatModel.parse(30, "inf"), steps=20, step_size=2.0)
    v = torch.zeros(3, 8, 8)
    generator = torch.Generator().manual_seed(0)
    values = []
    for index in range(3):
        v, stats = engine.run_pass(model, v, None, None, generator, pass_index=index)
        values.append(objective(model, v))
        assert stats.updates == 20
    assert values[0] < values[1] < values[2]
    start = uniform_start(torch.zeros(3, 8, 8), engine.threat, torch.Generator().manual_seed(0))
    assert objective(model, start) < values[0]


def test_hooks_are_removed_and_the_model_is_left_as_it_was():
    """After compute_uap the model has no hooks, its weights, train/eval modes and requires_grad flags are unchanged."""
    model = random_conv_net(seed=3).float()
    model.train()
    model[1].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    compute_uap(model, None, eps=30, method="gd_uap", image_shape=(3, 8, 8), max_passes=2, steps=5)
    assert all(not m._forward_hooks for m in model.modules())
    assert model.training and all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("prior", ["none", "range"])
def test_data_free_priors_read_no_image(prior):
    """With prior none or range an X of NaNs gives the same finite δ as a real X."""
    model = random_conv_net(seed=3).float()
    engine = GDUAP(ThreatModel.parse(30, "inf"), prior=prior, steps=5, batch_size=4)
    real, nans = torch.rand(6, 3, 8, 8), torch.full((6, 3, 8, 8), math.nan)
    labels = torch.zeros(6, dtype=torch.long)
    runs = [
        engine.run_pass(model, torch.zeros(3, 8, 8), x, labels, torch.Generator().manual_seed(1), pass_index=0)[0]
        for x in (real, nans, None)
    ]
    assert torch.isfinite(runs[0]).all()
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    assert not engine.reads_images


def test_the_data_prior_reads_x():
    """prior=data steps on images of X: another X gives another δ, and no X is refused."""
    model = random_conv_net(seed=3).float()
    engine = GDUAP(ThreatModel.parse(30, "inf"), prior="data", steps=5, batch_size=4)
    labels = torch.zeros(6, dtype=torch.long)
    runs = [
        engine.run_pass(
            model,
            torch.zeros(3, 8, 8),
            torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(s)),
            labels,
            torch.Generator().manual_seed(1),
            pass_index=0,
        )[0]
        for s in (0, 1)
    ]
    assert not torch.equal(runs[0], runs[1]) and engine.reads_images
    with pytest.raises(ValueError, match="prior=data"):
        engine.run_pass(model, torch.zeros(3, 8, 8), None, None, torch.Generator(), pass_index=0)


@pytest.mark.parametrize("p, eps", [("inf", 20.0), ("2", 300.0)])
def test_the_projection_holds(p, eps):
    """δ stays in the ℓp ball of radius ε after every pass (ℓ∞ and ℓ2)."""
    model = random_conv_net(seed=3).float()
    threat = ThreatModel.parse(eps, p)
    engine = GDUAP(threat, steps=10, step_size=20.0)
    v = torch.zeros(3, 8, 8)
    for index in range(2):
        v, _ = engine.run_pass(model, v, None, None, torch.Generator().manual_seed(0), pass_index=index)
        norm = float(torch.linalg.vector_norm(v.flatten(), ord=threat.p))
        assert norm <= threat.radius * (1 + 1e-5)
    assert norm >= 0.5 * threat.radius


def test_without_x_the_attack_stops_once_delta_settles():
    """Data-free, no X: no rate on X, the last pass kept, and a stop once δ's saturation settles."""
    model = random_conv_net(seed=3).float()
    settings = AttackSettings(
        ThreatModel.parse(30, "inf"),
        method="gd_uap",
        max_passes=30,
        options={"steps": 20, "step_size": 5.0, "saturation": 0.01},
    )
    result = run_passes(model, settings, None, None, image_shape=(3, 8, 8))
    assert result.converged and result.passes < 30
    assert all(math.isnan(entry["fooling_rate_attack_set"]) for entry in result.history)
    assert result.best_pass == result.passes and torch.equal(result.perturbation, result.last_perturbation)


def test_data_free_api_returns_a_perturbation_in_the_ball_from_the_model_alone():
    """compute_uap(model, None, method="gd_uap") works on the digits CNN without a single image."""
    model, _, held_out = digits_victim()
    result = compute_uap(
        model, None, eps=64, method="gd_uap", image_shape=(1, 8, 8), max_passes=3, steps=30, step_size=4.0
    )
    v = result.perturbation
    assert v.shape == (1, 8, 8) and torch.isfinite(v).all()
    assert float(v.abs().max()) <= 64 / 255 + 1e-6 and float(v.abs().max()) > 32 / 255
    assert 0 <= fooling_rate(model, held_out, v) <= 1


def test_bad_api_calls_and_a_model_without_convolutions_name_the_fix():
    """images=None needs image_shape and a data-free prior; attack.layers=conv on an MLP names attack.layers."""
    model = random_conv_net(seed=3).float()
    with pytest.raises(ValueError, match="image_shape"):
        compute_uap(model, None, eps=10, method="gd_uap")
    with pytest.raises(ValueError, match="reads images"):
        compute_uap(model, None, eps=10, method="gd_uap", image_shape=(3, 8, 8), prior="data")
    with pytest.raises(ValueError, match="attack.prior"):
        GDUAP(ThreatModel.parse(10, "inf"), prior="gaussian")
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(192, 10))
    with pytest.raises(ConfigError, match="attack.layers"):
        compute_uap(mlp, None, eps=10, method="gd_uap", image_shape=(3, 8, 8), max_passes=1)
    with pytest.raises(ConfigError, match="attack.layers names no module of the model: nope"):
        compute_uap(model, None, eps=10, method="gd_uap", image_shape=(3, 8, 8), layers=["nope"], max_passes=1)


def test_the_cli_runs_gd_uap(make_cfg):
    """attack=gd_uap runs through the attack task like any engine (one module plus one yaml)."""
    metrics = run_task(
        make_cfg(
            "attack=gd_uap",
            "attack.max_passes=2",
            "attack.steps=20",
            "trainer.max_epochs=2",
            "data.attack_images=100",
            "logger=none",
        )
    )
    assert metrics["method"] == "gd_uap" and metrics["passes"] >= 1 and metrics["norm_linf"] <= 64 + 1e-3

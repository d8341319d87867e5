"""The public Python API: compute_uap and fooling_rate."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import uap_lightning
from attack_helpers import one_thread, tiny_cnn  # noqa: F401
from uap_lightning import compute_uap, fooling_rate
from uap_lightning.attacks import UAPResult

pytestmark = pytest.mark.usefixtures("one_thread")


def victim(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(tiny_cnn(3, 10), nn.Dropout(0.1))


def images(n=24, seed=0):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_package_exports():
    assert uap_lightning.__version__ == "0.1.0"
    assert uap_lightning.compute_uap is compute_uap and uap_lightning.fooling_rate is fooling_rate


def test_compute_uap_restores_mode_and_flags():
    model = victim()
    model.train()
    frozen = model[0][0].bias
    frozen.requires_grad_(False)
    before = {name: p.clone() for name, p in model.named_parameters()}
    result = compute_uap(model, images(), eps=30, p="inf", max_passes=2)
    assert isinstance(result, UAPResult)
    assert all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == [p is not frozen for p in model.parameters()]
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())


def test_compute_uap_result_shape_norm_and_history():
    model = victim()
    result = compute_uap(model, images(), eps=30, p="inf", max_passes=2, delta=0.01)
    v = result.perturbation
    assert v.shape == (3, 8, 8) and v.device.type == "cpu" and v.dtype == torch.float32
    assert float(v.abs().max()) <= 30 / 255 + 1e-6
    assert 1 <= result.passes <= 2 and len(result.history) == result.passes
    assert result.history[-1]["fooling_rate_attack_set"] == result.fooling_rate
    assert result.fooling_rate == pytest.approx(fooling_rate(model, images(), v))


@pytest.mark.parametrize("method", ["deepfool_uap", "deepfool_uap_batched", "sgd_uap"])
def test_same_seed_same_perturbation(method):
    model = victim()
    options = {} if method == "deepfool_uap" else {"batch_size": 8}
    first, second = (
        compute_uap(model, images(), eps=20, p=2, method=method, max_passes=2, seed=3, **options) for _ in range(2)
    )
    assert torch.equal(first.perturbation, second.perturbation)
    assert first.fooling_rate == second.fooling_rate


def test_accepts_a_dataloader_of_pairs_or_of_images():
    model = victim()
    x = images()
    reference = compute_uap(model, x, eps=30, max_passes=1, seed=1)
    pairs = DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=10)
    alone = DataLoader(x, batch_size=7)
    for loader in (pairs, alone):
        result = compute_uap(model, loader, eps=30, max_passes=1, seed=1)
        assert torch.equal(result.perturbation, reference.perturbation)
    assert fooling_rate(model, pairs, reference.perturbation) == pytest.approx(reference.fooling_rate)


def test_targeted_reports_the_targeted_success_rate():
    model = victim()
    result = compute_uap(model, images(), eps=60, method="sgd_uap", target_class=2, max_passes=3)
    clean = model.eval()(images()).argmax(1)
    perturbed = model(torch.clamp(images() + result.perturbation, 0, 1)).argmax(1)
    expected = (perturbed[clean != 2] == 2).float().mean().item()
    assert result.fooling_rate == pytest.approx(expected)


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(images=torch.rand(3, 8, 8)), "N×C×H×W"),
        (dict(images=torch.rand(4, 3, 8, 8) * 255), r"\[0,1\]"),
        (dict(images=torch.randint(0, 255, (4, 3, 8, 8), dtype=torch.uint8)), "divide"),
        (dict(images=torch.rand(0, 3, 8, 8)), "empty"),
        (dict(images=DataLoader(torch.rand(0, 3, 8, 8), batch_size=2)), "no batches"),
        (dict(delta=0.0), "delta must lie in"),
        (dict(delta=1.5), "delta must lie in"),
        (dict(max_passes=0), "max_passes"),
        (dict(eps=-1), "^eps"),
        (dict(p=3), "^p must be one of 1, 2, inf"),
        (dict(method="fgsm"), "^method must be one of"),
        (dict(target_class=10), r"target_class=10 is not one of the 10 classes \(0 to 9\)"),
    ],
)
def test_rejects_bad_input_with_clear_messages(bad, message):
    arguments = dict(images=images(4), eps=10, max_passes=1)
    arguments.update(bad)
    with pytest.raises(ValueError, match=message) as err:
        compute_uap(victim(), **arguments)
    assert "attack." not in str(err.value)  # the API's keywords, not the command line's keys


def test_rejects_unknown_options():
    with pytest.raises(TypeError, match="aggregate"):
        compute_uap(victim(), images(4), eps=10, aggregate="sum")


def test_fooling_rate_function():
    model = victim()
    x = images()
    assert fooling_rate(model, x, torch.zeros(3, 8, 8)) == 0.0
    big = torch.ones(3, 8, 8)
    clean = model.eval()(x).argmax(1)
    expected = (model(torch.ones_like(x)).argmax(1) != clean).float().mean().item()
    assert fooling_rate(model, x, big) == pytest.approx(expected)
    assert fooling_rate(model, x, big, clip=False) == pytest.approx(
        (model(x + 1).argmax(1) != clean).float().mean().item()
    )
    with pytest.raises(ValueError, match="expected C×H×W"):
        fooling_rate(model, x, torch.zeros(1, 8, 8))

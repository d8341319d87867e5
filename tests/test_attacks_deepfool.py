"""DeepFool: closed forms on linear classifiers, and the batched version against the per-image one."""

import math

import pytest
import torch

from attack_helpers import LinearClassifier, one_thread, random_conv_net  # noqa: F401
from uap_lightning.attacks import deepfool_batched, deepfool_single, dual_norm

pytestmark = pytest.mark.usefixtures("one_thread")

OVERSHOOT = 0.02
PAD = 1e-4


def linear_model(classes, seed):
    torch.manual_seed(seed)
    model = LinearClassifier(16, classes).double().eval()
    model.requires_grad_(False)
    return model


def run_one(implementation, model, x, **options):
    """(perturbation C×H×W, iterations, converged) from either implementation on one image."""
    if implementation == "single":
        result = deepfool_single(model, x, **options)
        return result.perturbation, result.iterations, result.converged
    result = deepfool_batched(model, x.unsqueeze(0), **options)
    return result.perturbation[0], int(result.iterations[0]), bool(result.converged[0])


def closed_form(model, x, p):
    """Minimal ℓp step to the nearest boundary of a linear classifier, with DeepFool's overshoot and pad."""
    weight, bias = model.linear.weight, model.linear.bias
    logits = weight @ x.flatten() + bias
    label = int(logits.argmax())
    best = None
    for k in range(weight.shape[0]):
        if k == label:
            continue
        w = (weight[k] - weight[label]).unsqueeze(0)
        f = (logits[k] - logits[label]).abs()
        q_norm = float(dual_norm(w, p))
        if best is None or f / q_norm < best[0]:
            best = (float(f / q_norm), w[0])
    distance, w = best
    if p == 2.0:
        direction = w / w.norm()
    elif p == math.inf:
        direction = w.sign()
    else:
        j = int(w.abs().argmax())
        direction = torch.zeros_like(w)
        direction[j] = w[j].sign()
    return ((1 + OVERSHOOT) * (distance + PAD) * direction).view_as(x)


@pytest.mark.parametrize("implementation", ["single", "batched"])
@pytest.mark.parametrize("p", [2.0, math.inf, 1.0])
def test_binary_linear_is_closed_form_in_one_iteration(implementation, p):
    model = linear_model(2, seed=0)
    x = torch.rand(1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    r, iterations, converged = run_one(implementation, model, x, norm=p, overshoot=OVERSHOOT)
    torch.testing.assert_close(r, closed_form(model, x, p), rtol=1e-9, atol=1e-12)
    assert iterations == 1 and converged
    assert model((x + r).unsqueeze(0)).argmax() != model(x.unsqueeze(0)).argmax()


def test_binary_linear_l2_and_linf_match_the_textbook_formulas():
    """r = |f|/‖w‖₂² · w (ℓ2) and |f|/‖w‖₁ · sign w (ℓ∞), up to the overshoot and 1e-4 pad."""
    model = linear_model(2, seed=3)
    x = torch.rand(1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    logits = model(x.unsqueeze(0))[0]
    label = int(logits.argmax())
    w = (model.linear.weight[1 - label] - model.linear.weight[label]).view_as(x)
    f = (logits[1 - label] - logits[label]).abs()
    r2 = deepfool_single(model, x, norm=2.0).perturbation
    rinf = deepfool_single(model, x, norm=math.inf).perturbation
    torch.testing.assert_close(r2 / (1 + OVERSHOOT) - PAD * w / w.norm(), f / w.norm() ** 2 * w)
    torch.testing.assert_close(rinf / (1 + OVERSHOOT) - PAD * w.sign(), f / w.abs().sum() * w.sign())


@pytest.mark.parametrize("implementation", ["single", "batched"])
@pytest.mark.parametrize("p", [2.0, math.inf])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multiclass_linear_reaches_the_nearest_boundary(implementation, p, seed):
    model = linear_model(5, seed=seed)
    x = torch.rand(1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    r, iterations, converged = run_one(implementation, model, x, norm=p, num_candidates=5)
    torch.testing.assert_close(r, closed_form(model, x, p), rtol=1e-9, atol=1e-12)
    assert iterations == 1 and converged


@pytest.mark.parametrize("implementation", ["single", "batched"])
@pytest.mark.parametrize("p", [2.0, math.inf])
def test_targeted_linear_reaches_the_target(implementation, p):
    model = linear_model(5, seed=4)
    x = torch.rand(1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    label = int(model(x.unsqueeze(0)).argmax())
    target = (label + 2) % 5
    r, iterations, converged = run_one(implementation, model, x, norm=p, target=target, max_iters=20)
    assert converged and iterations >= 1
    assert int(model((x + r).unsqueeze(0)).argmax()) == target


def test_targeted_at_the_target_already_takes_no_step():
    model = linear_model(5, seed=4)
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    label = int(model(x[:1]).argmax())
    single = deepfool_single(model, x[0], target=label)
    assert single.converged and single.iterations == 0 and not single.perturbation.any()
    batched = deepfool_batched(model, x[:1], target=label)
    assert bool(batched.converged[0]) and int(batched.iterations[0]) == 0


def assert_same(batched, singles):
    for i, single in enumerate(singles):
        torch.testing.assert_close(batched.perturbation[i], single.perturbation, rtol=1e-7, atol=1e-10)
        assert int(batched.iterations[i]) == single.iterations
        assert bool(batched.converged[i]) == single.converged


@pytest.mark.parametrize(
    "options",
    [
        dict(norm=2.0),
        dict(norm=math.inf),
        dict(norm=1.0, max_iters=4),
        dict(norm=2.0, num_candidates=3, overshoot=0.0, max_iters=2),
        dict(norm=math.inf, target=7),
    ],
    ids=["l2", "linf", "l1", "few-candidates", "targeted"],
)
def test_batched_equals_single_on_a_conv_net(options):
    model = random_conv_net(seed=0)
    x = torch.rand(8, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    batched = deepfool_batched(model, x, **options)
    assert batched.perturbation.shape == x.shape
    assert batched.iterations.dtype == torch.long and batched.converged.dtype == torch.bool
    assert_same(batched, [deepfool_single(model, image, **options) for image in x])


@pytest.mark.parametrize("options", [dict(norm=2.0), dict(norm=math.inf, target=7)], ids=["untargeted", "targeted"])
def test_a_handed_over_forward_pass_gives_the_same_result_with_one_forward_fewer(options):
    model = random_conv_net(seed=0)
    forwards = []
    model.register_forward_hook(lambda module, inputs, output: forwards.append(inputs[0].shape[0]))
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    plain = deepfool_batched(model, x, **options)
    plain_forwards = len(forwards)
    xa = x.clone().requires_grad_(True)
    logits = model(xa)
    forwards.clear()
    handed = deepfool_batched(model, x, start=(xa, logits), **options)
    assert len(forwards) == plain_forwards - 1
    assert torch.equal(handed.perturbation, plain.perturbation)
    assert torch.equal(handed.iterations, plain.iterations) and torch.equal(handed.converged, plain.converged)


def test_rejects_a_start_that_is_not_the_forward_pass_of_x():
    model = linear_model(5, seed=0)
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    xa = x.clone().requires_grad_(True)
    other = (x + 0.1).requires_grad_(True)
    first = x[:1].clone().requires_grad_(True)
    with torch.no_grad():
        without_graph = model(xa)
    for start in [(x, model(x)), (other, model(other)), (first, model(first)), (xa, without_graph)]:
        with pytest.raises(ValueError, match="start"):
            deepfool_batched(model, x, start=start)


def test_batched_images_leave_at_different_iterations():
    model = random_conv_net(seed=0)
    x = torch.rand(8, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    result = deepfool_batched(model, x, norm=1.0, max_iters=4)
    assert len(set(result.iterations.tolist())) > 1


def test_runs_under_no_grad_and_leaves_the_input_alone():
    model = random_conv_net(seed=1)
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    copy = x.clone()
    reference = deepfool_batched(model, x)
    with torch.no_grad():
        inside = deepfool_batched(model, x)
        single = deepfool_single(model, x[0])
    torch.testing.assert_close(inside.perturbation, reference.perturbation)
    torch.testing.assert_close(single.perturbation, reference.perturbation[0])
    assert torch.equal(x, copy) and not x.requires_grad
    assert all(bool(c) for c in reference.converged)


def test_does_not_clip_to_the_image_range():
    model = linear_model(2, seed=0)
    x = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    r = deepfool_batched(model, x).perturbation
    assert float((x + r).min()) < 0.0


@pytest.mark.parametrize(
    "bad, message",
    [(dict(num_candidates=1), "num_candidates"), (dict(norm=3), "attack.p"), (dict(target=9), "target class")],
)
def test_rejects_bad_options(bad, message):
    model = linear_model(5, seed=0)
    with pytest.raises(ValueError, match=message):
        deepfool_batched(model, torch.rand(1, 1, 4, 4, dtype=torch.float64), **bad)

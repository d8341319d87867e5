"""ℓp norms, projections onto ℓp balls and the DeepFool dual step."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from uap_lightning.attacks import dual_norm, dual_step, lp_norm, project_lp

NORMS = [1.0, 2.0, math.inf]

vectors = st.lists(st.floats(-10, 10, allow_nan=False, allow_subnormal=False, width=64), min_size=1, max_size=40).map(
    lambda values: torch.tensor(values, dtype=torch.float64)
)
radii = st.floats(0.01, 5.0)
norms = st.sampled_from(NORMS)


def norm(v, p):
    return float(torch.linalg.vector_norm(v.flatten(), ord=p))


@settings(max_examples=150, deadline=None)
@given(v=vectors, radius=radii, p=norms)
def test_projection_lies_in_the_ball(v, radius, p):
    assert norm(project_lp(v, radius, p), p) <= radius * (1 + 1e-9) + 1e-12


@settings(max_examples=150, deadline=None)
@given(v=vectors, radius=radii, p=norms)
def test_projection_is_idempotent(v, radius, p):
    once = project_lp(v, radius, p)
    torch.testing.assert_close(project_lp(once, radius, p), once, rtol=1e-9, atol=1e-9)


@settings(max_examples=150, deadline=None)
@given(v=vectors, radius=radii, p=norms, shrink=st.floats(0.0, 1.0))
def test_projection_keeps_points_inside(v, radius, p, shrink):
    length = norm(v, p)
    inside = v if length == 0 else v / length * (shrink * radius)
    torch.testing.assert_close(project_lp(inside, radius, p), inside, rtol=0, atol=1e-12)


@settings(max_examples=150, deadline=None)
@given(v=vectors, radius=radii)
def test_l1_projection_is_soft_thresholding(v, radius):
    """ℓ1 projection optimality: w = sign(v)·max(|v| − θ, 0) for one θ ≥ 0; ‖w‖₁ = r for v outside."""
    w = project_lp(v, radius, 1.0)
    if norm(v, 1) <= radius:
        return
    assert norm(w, 1) == pytest.approx(radius, rel=1e-9)
    kept = w != 0
    theta = (v.abs() - w.abs())[kept]
    assert torch.allclose(theta, theta[0].expand_as(theta), atol=1e-9)
    assert bool((v.abs()[~kept] <= theta[0] + 1e-9).all())
    assert bool((w[kept].sign() == v[kept].sign()).all())


def test_projection_keeps_shape_dtype_and_float32_bounds():
    v = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(0))
    for p, radius in [(1.0, 2.0), (2.0, 0.5), (math.inf, 0.1)]:
        out = project_lp(v, radius, p)
        assert out.shape == v.shape and out.dtype == v.dtype
        assert norm(out, p) <= radius * (1 + 1e-5)
    assert torch.equal(project_lp(v, 0.1, math.inf), v.clamp(-0.1, 0.1))


def test_lp_norm_and_dual_norm_are_per_sample():
    x = torch.tensor([[[3.0, -4.0]], [[1.0, 0.0]]])
    torch.testing.assert_close(lp_norm(x, 2.0), torch.tensor([5.0, 1.0]))
    torch.testing.assert_close(lp_norm(x, math.inf), torch.tensor([4.0, 1.0]))
    torch.testing.assert_close(dual_norm(x, math.inf), torch.tensor([7.0, 1.0]))
    torch.testing.assert_close(dual_norm(x, 1.0), torch.tensor([4.0, 1.0]))
    torch.testing.assert_close(dual_norm(x, 2.0), torch.tensor([5.0, 1.0]))


@pytest.mark.parametrize("p", NORMS)
def test_dual_step_reaches_the_margin_with_the_smallest_norm(p):
    """⟨w, r⟩ = |f| and ‖r‖_p = |f| / ‖w‖_q (Hölder's bound is attained)."""
    generator = torch.Generator().manual_seed(1)
    w = torch.randn(5, 2, 3, 3, generator=generator, dtype=torch.float64)
    f = torch.rand(5, generator=generator, dtype=torch.float64) + 0.1
    r = dual_step(w, f, p)
    assert r.shape == w.shape
    torch.testing.assert_close((w * r).flatten(1).sum(1), f)
    torch.testing.assert_close(lp_norm(r, p), f / dual_norm(w, p))


def test_dual_step_closed_forms():
    w = torch.tensor([[1.0, -2.0, 0.5]])
    f = torch.tensor([3.0])
    torch.testing.assert_close(dual_step(w, f, 2.0), 3.0 / 5.25 * w)
    torch.testing.assert_close(dual_step(w, f, math.inf), 3.0 / 3.5 * w.sign())
    torch.testing.assert_close(dual_step(w, f, 1.0), torch.tensor([[0.0, -1.5, 0.0]]))


@pytest.mark.parametrize("p", NORMS)
def test_dual_step_of_a_zero_gradient_is_zero(p):
    r = dual_step(torch.zeros(2, 4), torch.ones(2), p)
    assert torch.equal(r, torch.zeros(2, 4))

"""SV-UAP, the singular-vector engine: the power method on known matrices, the ball, the sign,
one computation per attack, the layer choice, errors, processes, the API and the CLI."""

from __future__ import annotations

import contextlib
import copy
import itertools
import threading
from typing import Iterator, Tuple

import pytest
import torch
from torch import Tensor, nn
from torch.autograd import forward_ad

from attack_helpers import digits_victim, one_thread, random_conv_net  # noqa: F401
from uap_lightning import compute_uap, fooling_rate, metrics
from uap_lightning.attacks import SINGLE_PROCESS, ThreatModel, folded_copy
from uap_lightning.attacks.engines import sv_uap
from uap_lightning.attacks.engines.sv_uap import SVUAP, default_layer
from uap_lightning.attacks.random_noise import random_perturbation
from uap_lightning.errors import ConfigError
from uap_lightning.tasks import run_task
from uap_lightning.validation import attack_settings

pytestmark = pytest.mark.usefixtures("one_thread")


class LinearFeatures(nn.Module):
    """Images 1×1×n → ``layer`` (the map A, no bias: its Jacobian is A at every image) → a head."""

    def __init__(self, matrix: Tensor) -> None:
        super().__init__()
        self.layer = nn.Linear(matrix.shape[1], matrix.shape[0], bias=False)
        self.layer.weight.data = matrix
        self.head = nn.Linear(matrix.shape[0], 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer(x.flatten(1)))


def linear_case(matrix: Tensor, p: str, q: float, seed: int = 0, **options) -> Tuple[Tensor, SVUAP]:
    """SV-UAP on the map ``matrix`` (float64) at 3 images: (the unit vector v/‖v‖_p, the engine)."""
    model = LinearFeatures(matrix).double().eval().requires_grad_(False)
    images = torch.rand(3, 1, 1, matrix.shape[1], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    engine = SVUAP(ThreatModel.parse(10, p), layer="layer", q=q, jacobian_images=3, **options)
    v, stats = engine.run_pass(
        model,
        torch.zeros(1, 1, matrix.shape[1], dtype=torch.float64),
        images,
        metrics.predict(model, images),
        torch.Generator().manual_seed(seed),
    )
    assert stats.converged and stats.updates == engine.options.power_iterations
    return (v / engine.threat.radius).flatten(), engine


def q_norm(matrix: Tensor, v: Tensor, q: float) -> float:
    """‖A v‖_q."""
    return float(torch.linalg.vector_norm(matrix @ v, ord=q))


def test_l2_and_q2_give_the_top_singular_vector_of_a_linear_map():
    """(2, 2): the top right singular vector of A (up to sign), ‖J v‖₂ = √3·σ_max for three stacked A."""
    matrix = torch.randn(12, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    unit, engine = linear_case(matrix, "2", 2.0)
    _, sigma, right = torch.linalg.svd(matrix)
    assert abs(float(right[0] @ unit)) > 0.99
    assert engine.singular_value == pytest.approx(3**0.5 * float(sigma[0]), rel=1e-6)


def test_linf_finds_the_best_sign_vector_of_a_planted_map_by_brute_force():
    """(∞, 5) on A = a·sᵀ + noise: the power method matches the maximum of ‖A u‖₅ over all 2^10 sign
    vectors u (found by enumeration; the maximiser is ±s)."""
    generator = torch.Generator().manual_seed(1)
    signs = torch.randint(0, 2, (10,), generator=generator).double() * 2 - 1
    matrix = torch.outer(torch.randn(12, generator=generator, dtype=torch.float64), signs)
    matrix += 0.3 * torch.randn(12, 10, generator=generator, dtype=torch.float64)
    every = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=10)), dtype=torch.float64)
    values = torch.linalg.vector_norm(every @ matrix.T, ord=5, dim=1)
    assert abs(float(every[values.argmax()] @ signs)) == 10  # the instance: ±s is the best vertex
    for seed in range(3):
        unit, _ = linear_case(matrix, "inf", 5.0, seed=seed)
        assert set(unit.tolist()) <= {-1.0, 1.0}
        assert q_norm(matrix, unit, 5.0) == pytest.approx(float(values.max()), rel=1e-4)


def test_linf_power_method_climbs_to_a_fixed_point_of_boyds_iteration():
    """(∞, 5) on random maps, where the maximum over vertices is NP-hard and the method finds a local
    one: ‖A v_k‖₅ never decreases over the iterations, and the result is a fixed point of
    v ↦ sign(Aᵀ ψ₅(A v)), the optimality condition of the (∞, q) problem (a wrong ψ fails it)."""
    matrix = torch.randn(12, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    values = [q_norm(matrix, linear_case(matrix, "inf", 5.0, power_iterations=k)[0], 5.0) for k in range(1, 9)]
    assert all(b >= a - 1e-12 for a, b in zip(values, values[1:]))
    for matrix_seed, seed in itertools.product(range(6), range(3)):
        matrix = torch.randn(12, 10, generator=torch.Generator().manual_seed(matrix_seed), dtype=torch.float64)
        unit, engine = linear_case(matrix, "inf", 5.0, seed=seed)
        image = matrix @ unit
        assert torch.equal(torch.sign(matrix.T @ (image.sign() * image.abs() ** 4)), unit)
        assert engine.singular_value == pytest.approx(3 ** (1 / 5) * q_norm(matrix, unit, 5.0), rel=1e-9)


def test_l2_with_q5_is_a_fixed_point_of_boyds_iteration():
    """(2, 5): v ∝ Aᵀ ψ₅(A v) at the result (ψ_p' is the identity for p = 2)."""
    matrix = torch.randn(12, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    unit, _ = linear_case(matrix, "2", 5.0, power_iterations=200)
    image = matrix @ unit
    step = matrix.T @ (image.sign() * image.abs() ** 4)
    assert float(torch.linalg.vector_norm(unit)) == pytest.approx(1.0)
    assert float(step @ unit / torch.linalg.vector_norm(step)) > 1 - 1e-9


@pytest.mark.parametrize("p, eps", [("inf", 64.0), ("2", 400.0)])
def test_v_fills_the_ball_and_has_the_sign_that_fools_more_of_x(p, eps):
    """ℓ∞: every pixel at ±ε; ℓ2: ‖v‖₂ = ε; and v fools at least as many images of X as −v."""
    model, images, _ = digits_victim()
    clean = metrics.predict(model, images)
    engine = SVUAP(ThreatModel.parse(eps, p))
    v, _ = engine.run_pass(model, torch.zeros(1, 8, 8), images, clean, torch.Generator().manual_seed(0))
    radius = engine.threat.radius
    if p == "inf":
        assert torch.allclose(v.abs(), torch.full_like(v, radius))
    else:
        assert float(torch.linalg.vector_norm(v.flatten())) == pytest.approx(radius, rel=1e-5)
    rates = [metrics.fooling_rate(clean, metrics.predict(model, images, sign * v)) for sign in (1, -1)]
    assert rates[0] >= rates[1]


def test_one_pass_computes_v_and_later_passes_keep_it():
    """The same seed gives the same v, another seed another start; a pass from a nonzero v returns it
    unchanged without any work; the engine leaves no hook behind."""
    model = random_conv_net(seed=3)
    images = torch.rand(20, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    clean = metrics.predict(model, images)
    engine = SVUAP(ThreatModel.parse(16, "inf"), jacobian_images=8, batch_size=3, power_iterations=10)
    runs = [
        engine.run_pass(
            model, torch.zeros(3, 8, 8, dtype=torch.float64), images, clean, torch.Generator().manual_seed(seed)
        )[0]
        for seed in (0, 0, 1)
    ]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    again, stats = engine.run_pass(model, runs[0], images * float("nan"), clean, None, pass_index=1)
    assert again is runs[0] and stats.updates == 0 and stats.converged
    assert all(not module._forward_hooks for module in model.modules())


def test_batches_of_the_jacobian_products_do_not_change_v():
    """batch_size only splits the Jacobian products: 1, 3 or all 8 images at a time give one v."""
    model = random_conv_net(seed=4)
    images = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    clean = metrics.predict(model, images)
    runs = [
        SVUAP(ThreatModel.parse(16, "2"), jacobian_images=8, batch_size=size, power_iterations=10).run_pass(
            model, torch.zeros(3, 8, 8, dtype=torch.float64), images, clean, torch.Generator().manual_seed(0)
        )[0]
        for size in (1, 3, 8)
    ]
    assert torch.allclose(runs[0], runs[1], atol=1e-12) and torch.allclose(runs[0], runs[2], atol=1e-12)


class _ReluWithoutForwardMode(torch.autograd.Function):
    """ReLU with a backward formula only: forward-mode AD cannot go through it."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x > 0)


class _Relu(nn.Module):
    def __init__(self, forward_mode: bool) -> None:
        super().__init__()
        self.forward_mode = forward_mode

    def forward(self, x: Tensor) -> Tensor:
        return x.relu() if self.forward_mode else _ReluWithoutForwardMode.apply(x)


def test_layers_without_forward_mode_ad_use_the_double_backward_trick():
    """A network with an operation lacking a forward-mode formula gives the v of the same network
    with torch's ReLU: J v falls back to the double-backward trick."""
    runs = []
    for forward_mode in (True, False):
        torch.manual_seed(0)
        model = (
            nn.Sequential(nn.Conv2d(3, 4, 3), _Relu(forward_mode), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(64, 3))
            .double()
            .eval()
            .requires_grad_(False)
        )
        images = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        engine = SVUAP(ThreatModel.parse(16, "inf"), layer="2", jacobian_images=6)
        runs.append(
            engine.run_pass(
                model,
                torch.zeros(3, 8, 8, dtype=torch.float64),
                images,
                metrics.predict(model, images),
                torch.Generator().manual_seed(0),
            )[0]
        )
    with pytest.raises(NotImplementedError), forward_ad.dual_level():
        _ReluWithoutForwardMode.apply(forward_ad.make_dual(torch.ones(2), torch.ones(2)))
    assert torch.equal(runs[0], runs[1])


class _ThreadReducer:
    """The reducer of one of ``world_size`` threads: sums and broadcasts through shared slots."""

    def __init__(self, rank: int, slots: list, barrier: threading.Barrier) -> None:
        self.rank, self.world_size, self.slots, self.barrier = rank, len(slots), slots, barrier

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        self.slots[self.rank] = tensor.clone()
        self.barrier.wait()
        total = sum(self.slots[1:], self.slots[0].clone())
        self.barrier.wait()
        return total

    def broadcast(self, tensor: Tensor) -> Tensor:
        return self.all_reduce_sum(tensor if self.rank == 0 else torch.zeros_like(tensor))


class _TakingTurns:
    """``torch.autograd.forward_ad`` whose dual levels threads enter one at a time (a level is
    process-wide, so two threads cannot hold one each); no collective runs inside a level."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.make_dual, self.unpack_dual = forward_ad.make_dual, forward_ad.unpack_dual

    @contextlib.contextmanager
    def dual_level(self) -> Iterator[None]:
        with self.lock, forward_ad.dual_level():
            yield


def test_two_ranks_share_the_jacobian_products_and_agree_with_one_process(monkeypatch):
    """With a reducer of two ranks (threads here, each with its own copy of the model, as processes
    have) each stacks the Jacobians of its shard of the images; both get the v of one process (also
    when the images do not split evenly: 5 on 2)."""
    monkeypatch.setattr(sv_uap, "forward_ad", _TakingTurns())
    model = random_conv_net(seed=5)
    images = torch.rand(12, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    clean = metrics.predict(model, images)
    engine = SVUAP(ThreatModel.parse(16, "inf"), jacobian_images=5, batch_size=2, power_iterations=10)

    def run(reducer) -> Tensor:
        return engine.run_pass(
            copy.deepcopy(model),
            torch.zeros(3, 8, 8, dtype=torch.float64),
            images,
            clean,
            torch.Generator().manual_seed(0),
            reducer=reducer,
        )[0]

    alone = run(SINGLE_PROCESS)
    slots, barrier, found = [None, None], threading.Barrier(2, timeout=60), [None, None]
    threads = [
        threading.Thread(target=lambda r=r: found.__setitem__(r, run(_ThreadReducer(r, slots, barrier))))
        for r in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert torch.equal(found[0], alone) and torch.equal(found[1], alone)


def test_the_default_layer_follows_the_papers_early_choice():
    """null: block2_pool of VGG (the paper's), the second conv block's pool of the cnn, the first max-pool
    after the ⌊n/4⌋-th convolution otherwise, or that convolution (at least the second)."""
    from torchvision.models import resnet50, vgg16

    from uap_lightning.models.small import SmallCNN

    with torch.device("meta"):  # only the layout matters: no weights are allocated
        assert default_layer(vgg16()) == "features.9"
        assert default_layer(resnet50()) == "layer2.0.conv2"
    assert default_layer(SmallCNN(1, 10)) == "features.1.3"
    model, _, _ = digits_victim()
    assert default_layer(model) == "2"


def test_bad_settings_name_their_key_before_any_jacobian():
    """An unknown layer, a container the folded copy does not call, a model without convolutions, a
    bad q / jacobian_images / power_iterations and p = 1 are refused with the key named."""
    model = folded_copy(random_conv_net(seed=3))
    images = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    clean = metrics.predict(model, images)

    def run(net: nn.Module, **options) -> None:
        SVUAP(ThreatModel.parse(16, "inf"), **options).run_pass(
            net, torch.zeros(3, 8, 8, dtype=torch.float64), images, clean, torch.Generator()
        )

    with pytest.raises(ConfigError, match=r"attack.layer='nope' names no module.*close names: \d"):
        run(model, layer="nope")
    nested = folded_copy(
        nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), nn.Flatten(), nn.Linear(144, 3))
        .double()
        .eval()
    )
    with pytest.raises(ConfigError, match="attack.layer='0' was not called.*e.g. 0.0"):
        run(nested, layer="0")
    with pytest.raises(ConfigError, match="attack.layer=null .* no Conv2d"):
        run(nn.Sequential(nn.Flatten(), nn.Linear(192, 3)).double())
    for key, value in [
        ("q", 1.0),
        ("q", float("inf")),
        ("jacobian_images", 0),
        ("power_iterations", 0),
        ("batch_size", 0),
        ("layer", ""),
    ]:
        with pytest.raises(ValueError, match=f"attack.{key} must"):
            SVUAP(ThreatModel.parse(16, "inf"), **{key: value})
    with pytest.raises(ValueError, match="attack.p=inf .* or 2"):
        SVUAP(ThreatModel.parse(16, "1"))


def test_api_fools_held_out_digits_more_than_random_sign_noise():
    """compute_uap(method="sv_uap") on the digits CNN (ℓ∞ ε=64, default layer and q): the perturbations of
    three seeds fool held-out images, on average, more than twice as often as random ±ε sign noise."""
    model, attack_images, held_out = digits_victim()
    found = [compute_uap(model, attack_images, eps=64, p="inf", method="sv_uap", seed=seed) for seed in range(3)]
    assert all(result.passes == 1 and result.best_pass == 1 for result in found)  # one pass computes v
    sv = sum(fooling_rate(model, held_out, result.perturbation) for result in found) / 3
    noise = (
        sum(
            fooling_rate(
                model, held_out, random_perturbation((1, 8, 8), 64, float("inf"), torch.Generator().manual_seed(seed))
            )
            for seed in range(5)
        )
        / 5
    )
    assert sv > 2 * noise, (sv, noise)


def test_the_cli_config_composes_with_the_published_defaults(make_cfg):
    """attack=sv_uap: the paper's defaults, one pass; a bad q is a ConfigError naming attack.q."""
    cfg = make_cfg("attack=sv_uap")
    attack = cfg.attack
    assert attack.method == "sv_uap" and attack.layer is None
    assert (attack.q, attack.jacobian_images, attack.power_iterations, attack.batch_size) == (5.0, 64, 30, 32)
    assert attack_settings(cfg).engine().options.q == 5.0
    with pytest.raises(ConfigError, match="attack.q must be > 1"):
        attack_settings(make_cfg("attack=sv_uap", "attack.q=1"))


def test_the_cli_runs_sv_uap(make_cfg):
    """attack=sv_uap runs through the attack task like any engine (one module plus one yaml)."""
    metrics_ = run_task(make_cfg("attack=sv_uap", "trainer.max_epochs=2", "data.attack_images=100", "logger=none"))
    assert metrics_["method"] == "sv_uap" and metrics_["passes"] == 1
    assert metrics_["norm_linf"] == pytest.approx(64, rel=1e-4)

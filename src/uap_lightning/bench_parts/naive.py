"""A naive Algorithm 1, written the way the published reference code works.

Everything is per image: DeepFool takes one backward pass per candidate class, every
prediction (clean label, label under v, the end-of-pass fooling rate on X) is a forward
pass on a single image. It is the baseline the benchmark measures the engines against,
and an independent check that ``deepfool_uap`` computes the same v.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn

from uap_lightning.attacks.deepfool import STEP_PAD, DeepFoolOptions
from uap_lightning.attacks.projections import dual_norm, dual_step, project_lp
from uap_lightning.attacks.threat import ThreatModel, parse_p


def naive_deepfool(
    model: nn.Module, image: Tensor, *, num_candidates: int, overshoot: float, max_iters: int, norm: float
) -> Tuple[Tensor, int, bool]:
    """DeepFool on one image (C×H×W): returns the step (C×H×W), iterations, whether the label changed."""
    x0 = image.detach().unsqueeze(0)
    with torch.no_grad():
        order = model(x0)[0].argsort(descending=True)[:num_candidates].tolist()
    label = order[0]
    r_tot = torch.zeros_like(x0)
    x = x0.clone().requires_grad_(True)
    logits = model(x)[0]
    current, iterations = label, 0
    while current == label and iterations < max_iters:
        logits[order[0]].backward(retain_graph=True)
        assert x.grad is not None  # filled by the backward pass
        grad_label = x.grad.clone()
        best = float("inf")
        for k in order[1:]:
            x.grad.zero_()
            logits[k].backward(retain_graph=True)
            w_k = x.grad.clone() - grad_label
            f_k = (logits[k] - logits[label]).detach().view(1)
            distance = float(f_k.abs() / dual_norm(w_k, norm).clamp_min(1e-30))
            if distance < best:
                best, w, f = distance, w_k, f_k
        r_tot = r_tot + dual_step(w, f.abs() + STEP_PAD * dual_norm(w, norm), norm)
        iterations += 1
        x = (x0 + (1 + overshoot) * r_tot).requires_grad_(True)
        logits = model(x)[0]
        current = int(logits.detach().argmax())
    return ((1 + overshoot) * r_tot)[0].detach(), iterations, current != label


def _label(model: nn.Module, image: Tensor) -> int:
    with torch.no_grad():
        return int(model(image.unsqueeze(0)).argmax())


def naive_uap(
    model: nn.Module,
    images: Tensor,
    threat: ThreatModel,
    *,
    delta: float,
    max_passes: int,
    generator: Optional[torch.Generator],
    overshoot: float = DeepFoolOptions.overshoot,
    num_candidates: int = DeepFoolOptions.num_candidates,
    max_deepfool_iters: int = DeepFoolOptions.max_deepfool_iters,
    deepfool_norm: Union[str, float] = DeepFoolOptions.deepfool_norm,
    clip: bool = True,
) -> Tuple[Tensor, float, int]:
    """Algorithm 1 on X = ``images`` (N×C×H×W in [0,1]): returns (v C×H×W, fooling rate on X, passes).

    Visits X in ``torch.randperm(N, generator=generator)`` order each pass, like ``deepfool_uap``.
    """
    norm = parse_p(deepfool_norm)

    def shifted(x: Tensor, v: Tensor) -> Tensor:
        return (x + v).clamp(0.0, 1.0) if clip else x + v

    model.eval()
    v = torch.zeros_like(images[0])
    rate, passes = 0.0, 0
    while rate < 1.0 - delta and passes < max_passes:
        for i in torch.randperm(images.shape[0], generator=generator).tolist():
            x = images[i]
            if _label(model, x) == _label(model, shifted(x, v)):
                step, _, changed = naive_deepfool(
                    model,
                    shifted(x, v),
                    num_candidates=num_candidates,
                    overshoot=overshoot,
                    max_iters=max_deepfool_iters,
                    norm=norm,
                )
                if changed:
                    v = project_lp(v + step, threat.radius, threat.p)
        passes += 1
        fooled = sum(_label(model, x) != _label(model, shifted(x, v)) for x in images)
        rate = fooled / images.shape[0]
    return v, rate, passes

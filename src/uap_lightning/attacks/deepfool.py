"""DeepFool (Moosavi-Dezfooli, Fawzi, Frossard, CVPR 2016), per image and batched.

Both follow the authors' code: the candidate classes are the top ``num_candidates`` of the
prediction at the starting point; each iteration linearises the margins f_k − f_label at
x + (1+overshoot)·r_tot and steps to the nearest linearised boundary in the ``norm`` of the
step, lengthened by 1e-4 in that norm. The returned perturbation is (1+overshoot)·r_tot in
the scale of the input, not clipped to [0,1]. Gradients are taken even under ``no_grad``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn

from uap_lightning.attacks.projections import dual_norm, dual_step
from uap_lightning.attacks.threat import parse_p

STEP_PAD = 1e-4  # added to the ℓp length of every step, as in the authors' code


@dataclass
class DeepFoolResult:
    """DeepFool output: batched (N×C×H×W, LongTensor N, BoolTensor N) or single (C×H×W, int, bool).

    ``converged`` is True when the label changed (targeted: the target was reached).
    """

    perturbation: Tensor
    iterations: Union[Tensor, int]
    converged: Union[Tensor, bool]


@dataclass(frozen=True)
class DeepFoolOptions:
    """DeepFool's settings, the defaults of the authors' code (the ``attack`` keys of the DeepFool
    engines): ``overshoot`` (the step is (1 + overshoot) times the linearised one),
    ``num_candidates`` (classes considered: the top of the prediction at the start),
    ``max_deepfool_iters`` (iterations per image) and ``deepfool_norm`` (the norm of the step:
    "2", the paper's minimal ℓ2 step, for every p of the threat model; "inf" or "1" are variants).
    """

    overshoot: float = 0.02
    num_candidates: int = 10
    max_deepfool_iters: int = 10
    deepfool_norm: str = "2"

    def __post_init__(self) -> None:
        if not self.overshoot >= 0:
            raise ValueError(f"attack.overshoot must be >= 0; got {self.overshoot}")
        if self.num_candidates < 2:
            raise ValueError(f"attack.num_candidates must be at least 2; got {self.num_candidates}")
        if self.max_deepfool_iters < 1:
            raise ValueError(f"attack.max_deepfool_iters must be at least 1; got {self.max_deepfool_iters}")
        parse_p(self.deepfool_norm)


def _check(num_candidates: int, overshoot: float, max_iters: int, norm: Union[float, str]) -> float:
    """The step's norm as a number, after checking the options as :class:`DeepFoolOptions` does."""
    DeepFoolOptions(overshoot, num_candidates, max_iters, str(norm))
    return parse_p(norm)


def _check_classes(num_classes: int, target: Optional[int]) -> None:
    if num_classes < 2:
        raise ValueError(f"DeepFool needs a model with at least 2 output logits; got {num_classes}")
    if target is not None and not 0 <= target < num_classes:
        raise ValueError(f"target class must be in [0, {num_classes - 1}]; got {target}")


def _step(w: Tensor, f: Tensor, norm: float) -> Tensor:
    """The DeepFool step for margins ``f`` (N,) and directions ``w`` (N×...)."""
    return dual_step(w, f.abs() + STEP_PAD * dual_norm(w, norm), norm)


def deepfool_single(
    model: nn.Module,
    x: Tensor,
    *,
    num_candidates: int = DeepFoolOptions.num_candidates,
    overshoot: float = DeepFoolOptions.overshoot,
    max_iters: int = DeepFoolOptions.max_deepfool_iters,
    norm: Union[float, str] = DeepFoolOptions.deepfool_norm,
    target: Optional[int] = None,
) -> DeepFoolResult:
    """DeepFool on one image ``x`` (C×H×W), one backward pass per candidate class per iteration."""
    norm = _check(num_candidates, overshoot, max_iters, norm)
    x0 = x.detach().unsqueeze(0)
    r_tot = torch.zeros_like(x0)
    scale = 1.0 + overshoot
    iterations = 0
    with torch.enable_grad():
        xa = x0.clone().requires_grad_(True)
        logits = model(xa)[0]
        _check_classes(logits.numel(), target)
        if target is None:
            candidates = logits.detach().topk(min(num_candidates, logits.numel())).indices.tolist()
            label = candidates[0]
            current = label
            reached = False
        else:
            current = int(logits.detach().argmax())
            reached = current == target
        while not reached and iterations < max_iters:
            if target is None:
                grad_label = torch.autograd.grad(logits[label], xa, retain_graph=True)[0]
                best = math.inf
                for k in candidates[1:]:
                    grad_k = torch.autograd.grad(logits[k], xa, retain_graph=True)[0]
                    w_k = grad_k - grad_label
                    f_k = (logits[k] - logits[label]).detach().view(1)
                    distance = float(f_k.abs() / dual_norm(w_k, norm).clamp_min(torch.finfo(w_k.dtype).tiny))
                    if distance < best:
                        best, w, f = distance, w_k, f_k
            else:
                grad_target = torch.autograd.grad(logits[target], xa, retain_graph=True)[0]
                grad_current = torch.autograd.grad(logits[current], xa, retain_graph=True)[0]
                w = grad_target - grad_current
                f = (logits[target] - logits[current]).detach().view(1)
            r_tot = r_tot + _step(w, f, norm)
            iterations += 1
            xa = (x0 + scale * r_tot).requires_grad_(True)
            logits = model(xa)[0]
            current = int(logits.detach().argmax())
            reached = current != label if target is None else current == target
    return DeepFoolResult(perturbation=(scale * r_tot)[0].detach(), iterations=iterations, converged=reached)


def deepfool_batched(
    model: nn.Module,
    x: Tensor,
    *,
    num_candidates: int = DeepFoolOptions.num_candidates,
    overshoot: float = DeepFoolOptions.overshoot,
    max_iters: int = DeepFoolOptions.max_deepfool_iters,
    norm: Union[float, str] = DeepFoolOptions.deepfool_norm,
    target: Optional[int] = None,
    start: Optional[Tuple[Tensor, Tensor]] = None,
) -> DeepFoolResult:
    """DeepFool on a batch ``x`` (N×C×H×W): per iteration one forward and one batched backward pass.

    Images leave the batch as soon as they cross the boundary; per image the result equals
    :func:`deepfool_single` up to float rounding when the model treats samples independently
    (eval mode): each margin's gradient comes from one vector-Jacobian product here, from the
    difference of two gradients there.
    ``start=(xa, logits)`` hands over a forward pass already run: ``xa`` is x as a leaf tensor
    requiring grad and ``logits`` (N×classes) is ``model(xa)`` computed with grad enabled; the
    first iteration then uses them instead of forwarding x again (same result, one forward fewer).
    """
    norm = _check(num_candidates, overshoot, max_iters, norm)
    if start is not None:
        _check_start(start, x)
    x = x.detach()
    n = x.shape[0]
    r_tot = torch.zeros_like(x)
    iterations = torch.zeros(n, dtype=torch.long, device=x.device)
    converged = torch.zeros(n, dtype=torch.bool, device=x.device)
    scale = 1.0 + overshoot
    with torch.enable_grad():
        if start is None:
            xa = x.clone().requires_grad_(True)
            logits = model(xa)
        else:
            xa, logits = start
        _check_classes(logits.shape[1], target)
        if target is None:
            candidates = logits.detach().topk(min(num_candidates, logits.shape[1]), dim=1).indices
            labels = candidates[:, 0]
        else:
            converged = logits.detach().argmax(1) == target
        rows = (~converged).nonzero().squeeze(1)  # positions in the current forward batch
        active = rows.clone()  # positions in x
        step = 0
        while active.numel() > 0 and step < max_iters:
            if target is None:
                w, f = _nearest_boundary(logits, xa, rows, candidates[active], norm)
            else:
                w, f = _towards_target(logits, xa, rows, target)
            r_tot.index_add_(0, active, _step(w, f, norm))
            iterations[active] += 1
            step += 1
            xa = (x[active] + scale * r_tot[active]).requires_grad_(True)
            logits = model(xa)
            predicted = logits.detach().argmax(1)
            reached = predicted != labels[active] if target is None else predicted == target
            converged[active[reached]] = True
            rows = (~reached).nonzero().squeeze(1)
            active = active[rows]
    return DeepFoolResult(perturbation=(scale * r_tot).detach(), iterations=iterations, converged=converged)


def _check_start(start: Tuple[Tensor, Tensor], x: Tensor) -> None:
    """ValueError unless ``start`` is (x as a grad-requiring leaf, its N×classes logits with a graph)."""
    xa, logits = start
    if not (xa.is_leaf and xa.requires_grad and torch.equal(xa.detach(), x.detach())):
        raise ValueError("start[0] must be x itself as a leaf tensor with requires_grad=True")
    if not (logits.requires_grad and logits.dim() == 2 and logits.shape[0] == x.shape[0]):
        raise ValueError(f"start[1] must be model(start[0]), N×classes with a graph; got {tuple(logits.shape)}")


def _nearest_boundary(
    logits: Tensor, xa: Tensor, rows: Tensor, candidates: Tensor, norm: float
) -> Tuple[Tensor, Tensor]:
    """w (m×C×H×W) and f (m,) of the nearest linearised boundary among the candidate classes.

    The gradients of all K−1 margins f_k − f_label come from one batched backward pass
    (``is_grads_batched``): the K−1 vector-Jacobian products run as one batch of K−1 images.
    """
    selected = logits[rows].gather(1, candidates)  # m×K, column 0 is the label
    m, k = selected.shape
    f = (selected[:, 1:] - selected[:, :1]).detach()  # m×(K−1)
    # cotangent j selects margin j: +1 on candidate j+1, −1 on the label, for every row
    cotangents = torch.zeros(k - 1, m, k, dtype=selected.dtype, device=selected.device)
    margin = torch.arange(k - 1, device=selected.device)
    cotangents[margin, :, margin + 1] = 1.0
    cotangents[:, :, 0] = -1.0
    w = torch.autograd.grad(selected, xa, grad_outputs=cotangents, is_grads_batched=True)[0]
    w = w[:, rows].transpose(0, 1)  # m×(K−1)×C×H×W
    lengths = dual_norm(w.flatten(0, 1), norm).view(m, k - 1).clamp_min(torch.finfo(w.dtype).tiny)
    best = (f.abs() / lengths).argmin(dim=1)
    index = torch.arange(m, device=w.device)
    return w[index, best], f[index, best]


def _towards_target(logits: Tensor, xa: Tensor, rows: Tensor, target: int) -> Tuple[Tensor, Tensor]:
    """w (m×C×H×W) and f (m,) of the margin f_target − f_current, from one backward pass."""
    active_logits = logits[rows]
    current = active_logits.detach().argmax(1, keepdim=True)
    margin = active_logits[:, target] - active_logits.gather(1, current)[:, 0]
    w = torch.autograd.grad(margin.sum(), xa)[0][rows]
    return w, margin.detach()

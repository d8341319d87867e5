"""The geometry of decision boundaries near natural images (the paper's §4), pure torch.

For each image x, DeepFool's minimal ℓ2 perturbation r(x) points across the nearest decision
boundary; n(x) = r(x)/‖r(x)‖₂ is the normal to that boundary near x. The normals of many images
stacked as the columns of N (d×n, d = C·H·W) live near a low-dimensional subspace: the singular
values of N decay far faster than those of as many random unit vectors, and a random vector drawn
from the span of N's top-k left singular vectors (in image space) fools far more images than a
random vector of the same norm drawn from the whole space.

Here the normals are the n *rows* of an n×d tensor, so N's left singular vectors are the rows'
right singular vectors. Vectors are flat (d,) in [0,1] image scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from uap_lightning.attacks.deepfool import DeepFoolOptions, deepfool_batched
from uap_lightning.attacks.model_state import frozen_eval, model_device
from uap_lightning.attacks.projections import lp_norm


@dataclass(frozen=True)
class BoundaryNormals:
    """Unit ℓ2 normals ``normals`` (n×d, float64), one per image on which DeepFool converged;
    ``converged`` (BoolTensor (N,)) says which of the N images gave one, in their order."""

    normals: Tensor
    converged: Tensor

    @property
    def count(self) -> int:
        """n, the number of normals."""
        return int(self.normals.shape[0])

    @property
    def dropped(self) -> int:
        """Images on which DeepFool did not converge (no normal)."""
        return int((~self.converged).sum())


def boundary_normals(
    model: nn.Module,
    images: Tensor,
    *,
    batch_size: int = 32,
    num_candidates: int = DeepFoolOptions.num_candidates,
    overshoot: float = DeepFoolOptions.overshoot,
    max_iters: int = DeepFoolOptions.max_deepfool_iters,
    on_batch: Optional[Callable[[int, int], None]] = None,
) -> BoundaryNormals:
    """The normal r(x)/‖r(x)‖₂ to the decision boundary near each image of ``images`` (N×C×H×W),
    r(x) the minimal ℓ2 DeepFool perturbation (untargeted, from x itself, not clipped), in batches
    of ``batch_size`` images with the model in eval mode. Images where DeepFool did not change the
    label within ``max_iters`` iterations give no normal. ``on_batch(done, total)`` is called after
    each batch with the images done so far and N (a progress display)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}")
    device = model_device(model)
    normals, converged = [], []
    with frozen_eval(model):
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size].to(device)
            result = deepfool_batched(
                model, batch, num_candidates=num_candidates, overshoot=overshoot, max_iters=max_iters, norm=2.0
            )
            r = result.perturbation.flatten(1).double()
            kept = result.converged & (lp_norm(r, 2.0) > 0)
            normals.append(r[kept] / lp_norm(r[kept], 2.0).unsqueeze(1))
            converged.append(kept)
            if on_batch is not None:
                on_batch(start + batch.shape[0], images.shape[0])
    dim = int(images[0].numel()) if images.shape[0] else 0
    if not normals:
        return BoundaryNormals(torch.empty(0, dim, dtype=torch.float64), torch.empty(0, dtype=torch.bool))
    return BoundaryNormals(torch.cat(normals).cpu(), torch.cat(converged).cpu())


def singular_values(vectors: Tensor) -> Tensor:
    """The min(n, d) singular values, descending, of the matrix whose rows (or, the same values,
    columns) are ``vectors`` (n×d), computed in float64."""
    values: Tensor = torch.linalg.svdvals(vectors.double())
    return values


def random_unit_vectors(count: int, dim: int, generator: torch.Generator) -> Tensor:
    """``count`` independent vectors uniform on the unit ℓ2 sphere of R^``dim`` (count×dim, float64)."""
    gaussian = torch.randn(count, dim, generator=generator, dtype=torch.float64)
    return gaussian / lp_norm(gaussian, 2.0).unsqueeze(1)


def principal_subspace(normals: Tensor, k: int) -> Tensor:
    """An orthonormal basis (k×d, float64 rows) of the span of the top-``k`` left singular vectors of
    N, the d×n matrix whose columns are ``normals`` (given as n×d rows); 1 ≤ k ≤ min(n, d)."""
    n, d = normals.shape
    if not 1 <= k <= min(n, d):
        raise ValueError(f"k must lie in [1, min(n, d)] = [1, {min(n, d)}]; got {k}")
    vh: Tensor
    _, _, vh = torch.linalg.svd(normals.double(), full_matrices=False)
    return vh[:k]


def random_direction(dim: int, generator: torch.Generator, basis: Optional[Tensor] = None) -> Tensor:
    """A unit ℓ2 vector (dim,), float64: uniform on the sphere of the span of ``basis`` (k×dim,
    orthonormal rows), or of the whole of R^``dim`` when ``basis`` is None."""
    if basis is None:
        return random_unit_vectors(1, dim, generator)[0]
    if basis.shape[1] != dim:
        raise ValueError(f"basis must be k×{dim}; got {tuple(basis.shape)}")
    coefficients = random_unit_vectors(1, basis.shape[0], generator)[0]
    return coefficients @ basis.double()  # orthonormal rows keep the unit length


def scaled_to_norm(direction: Tensor, radius: float, p: float) -> Tensor:
    """``direction`` (any shape, nonzero) rescaled to ℓp norm ``radius`` (p = 1, 2 or inf): the same
    direction, so for p ≠ 2 a vector drawn on an ℓ2 sphere is then scaled to ‖·‖p = radius."""
    norm: Tensor = torch.linalg.vector_norm(direction.flatten(), ord=p)
    if not norm > 0:
        raise ValueError("cannot scale a zero vector to a norm")
    return direction * (radius / norm)

"""Several victims attacked as one (``attack.ensemble``, ``compute_uap([model_a, model_b], ...)``).

An :class:`Ensemble` is a classifier built from M members that share their K classes. Images
(B×C×H×W in [0,1], at the size v is kept at) reach each member resized to the member's own
input size (bilinear, antialiased when shrinking: the rule by which ``task=transfer`` fits a
perturbation to a victim). Its prediction is the class of the mean of the members'
log-probabilities; the gradient engines that take an ensemble (``averages_loss``) average their
loss over the members instead (:func:`member_outputs`), each member pulled away from the
ensemble's clean prediction. Under ℓ∞ a member sees x + v resized, which stays within ε of its
own resized image; under ℓ2 and ℓ1 the norm of the resized v grows with the pixel count, so a
perturbation is projected again at each size it is scored at (``fit_to_size``).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def resized(images: Tensor, size: Optional[int]) -> Tensor:
    """``images`` (B×C×H×W) at ``size``×``size`` pixels, bilinear (antialiased when shrinking);
    unchanged when ``size`` is None or already theirs."""
    if size is None or tuple(images.shape[-2:]) == (size, size):
        return images
    return F.interpolate(
        images, size=(size, size), mode="bilinear", align_corners=False, antialias=size < images.shape[-1]
    )


class Resized(nn.Module):
    """``model`` fed its images at ``size``×``size`` pixels (:func:`resized`; None: as given)."""

    def __init__(self, model: nn.Module, size: Optional[int]) -> None:
        super().__init__()
        self.model = model
        self.size = size

    def forward(self, images: Tensor) -> Tensor:
        logits: Tensor = self.model(resized(images, self.size))
        return logits


class Ensemble(nn.Module):
    """M victims as one classifier: ``forward`` maps B×C×H×W images in [0,1] to B×K, the mean of
    the members' log-softmax, each member seeing the images at its ``sizes`` entry (None: as given).

    Arguments:
        members: the victims (images in [0,1] → B×K logits), at least two, with the same K.
        sizes: each member's input side in pixels, or None for the images' own size; default all None.
        names: a label per member for reports; default ``member0``, ``member1``, ...
    """

    def __init__(
        self,
        members: Sequence[nn.Module],
        sizes: Optional[Sequence[Optional[int]]] = None,
        names: Optional[Sequence[str]] = None,
    ) -> None:
        super().__init__()
        members = list(members)
        if len(members) < 2 or not all(isinstance(m, nn.Module) for m in members):
            raise ValueError(f"an ensemble needs at least two victims (nn.Module each); got {len(members)}")
        sizes = [None] * len(members) if sizes is None else list(sizes)
        names = [f"member{i}" for i in range(len(members))] if names is None else [str(n) for n in names]
        if len(sizes) != len(members) or len(names) != len(members):
            raise ValueError(
                f"an ensemble of {len(members)} victims needs as many sizes and names; "
                f"got {len(sizes)} sizes and {len(names)} names"
            )
        for size in sizes:
            if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
                raise ValueError(f"ensemble input sizes must be positive integers or None; got {size!r}")
        self.members = nn.ModuleList(members)
        self.sizes: List[Optional[int]] = sizes
        self.names: List[str] = names

    def member_logits(self, images: Tensor) -> List[Tensor]:
        """Each member's B×K logits on ``images`` (B×C×H×W) resized to its input size."""
        return [member(resized(images, size)) for member, size in zip(self.members, self.sizes)]

    def forward(self, images: Tensor) -> Tensor:
        logits = self.member_logits(images)
        classes = {int(z.shape[-1]) for z in logits}
        if len(classes) != 1:
            raise ValueError(
                f"the victims of an ensemble must share their classes; their outputs have {sorted(classes)} classes"
            )
        return torch.stack([F.log_softmax(z.float(), dim=-1) for z in logits]).mean(dim=0).to(logits[0].dtype)

    def member(self, index: int) -> Resized:
        """Member ``index`` as a classifier of the ensemble's images (resized to its input size)."""
        return Resized(self.members[index], self.sizes[index])

    def map_members(self, transform: Callable[[nn.Module], nn.Module]) -> "Ensemble":
        """A new ensemble of ``transform(member)`` for each member, same sizes and names."""
        return Ensemble([transform(m) for m in self.members], self.sizes, self.names)


def member_outputs(model: nn.Module, images: Tensor) -> List[Tensor]:
    """The B×K logits a loss is averaged over: each member's for an :class:`Ensemble`, else the model's."""
    if isinstance(model, Ensemble):
        return model.member_logits(images)
    return [model(images)]

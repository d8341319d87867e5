"""One attack on several processes: what the engines and the pass loop need of them.

The engines stay pure torch: they take a :class:`Reducer` (world size, rank, a sum over the
processes and a broadcast from rank 0), never Fabric. :data:`SINGLE_PROCESS` does nothing;
:class:`TorchDistributed` works over an initialised ``torch.distributed`` process group (gloo on
CPUs, NCCL on GPUs).

Shards are strided: of a sequence of images (a global batch of an engine, or a whole set to
predict) rank r takes positions r, r + W, r + 2W, ... (W: the world size), so every rank gets a
share within one image of the others' even when the last batch is short.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from uap_lightning import metrics


class Reducer(Protocol):
    """The collective operations of ``world_size`` processes; this one has rank ``rank`` (0-based).

    Every process must call each operation, in the same order, with tensors of the same shape."""

    world_size: int
    rank: int

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """The element-wise sum of ``tensor`` over all processes, on ``tensor``'s device."""

    def broadcast(self, tensor: Tensor) -> Tensor:
        """Rank 0's ``tensor`` on every process, on ``tensor``'s device."""


class SingleProcess:
    """The reducer of one process: every operation returns its argument."""

    world_size = 1
    rank = 0

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        return tensor

    def broadcast(self, tensor: Tensor) -> Tensor:
        return tensor


SINGLE_PROCESS = SingleProcess()


class TorchDistributed:
    """The reducer of the default ``torch.distributed`` process group; collectives run on ``device``
    (a GPU for NCCL; the CPU for gloo), tensors elsewhere are copied there and back."""

    def __init__(self, device: Union[str, torch.device] = "cpu") -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("TorchDistributed needs an initialised torch.distributed process group")
        self.device = torch.device(device)
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        summed = tensor.to(self.device, copy=True).contiguous()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        return summed.to(tensor.device)

    def broadcast(self, tensor: Tensor) -> Tensor:
        shared = tensor.to(self.device, copy=True).contiguous()
        dist.broadcast(shared, src=0)
        return shared.to(tensor.device)


def shard(reducer: Reducer, items: Tensor) -> Tensor:
    """This rank's strided share of ``items`` (along the first dimension): ``items[rank::world_size]``."""
    if reducer.world_size == 1:
        return items
    return items[reducer.rank :: reducer.world_size]


def gather(reducer: Reducer, local: Tensor, total: int) -> Tensor:
    """The ``total`` rows of which each rank holds its :func:`shard` in ``local``, on every rank
    (a sum over ranks of zero-filled copies: exact for integers and for floats)."""
    if reducer.world_size == 1:
        return local
    rows = local.new_zeros((total, *local.shape[1:]))
    rows[reducer.rank :: reducer.world_size] = local
    return reducer.all_reduce_sum(rows)


def predict(
    model: nn.Module,
    images: Tensor,
    perturbation: Optional[Tensor] = None,
    *,
    reducer: Optional[Reducer] = None,
    **options: Any,
) -> Tensor:
    """Labels (N,) of ``model`` on ``images`` (N×C×H×W in [0,1], + ``perturbation``), each rank
    predicting its shard; ``options`` as for :func:`uap_lightning.metrics.predict`."""
    reducer = reducer or SINGLE_PROCESS
    local = metrics.predict(model, shard(reducer, images), perturbation, **options)
    return gather(reducer, local, images.shape[0])

"""Data-parallel students: one process per device, started by torchrun.

    torchrun --nproc-per-node N --no-python sage-opd train --config ...

Each rank plays its share of a step's episodes against the shared services,
computes its share of the loss, and DistributedDataParallel sums the gradients, so
every rank takes the same optimizer step. SAGE-OPD's weights w_tj = s_t / sum s
divide by a sum over the whole step's tokens: that denominator (and N_tok, for the
losses without normalization) is summed over the ranks too, so the update equals
the one a single process makes from all the episodes. Rank 0 logs, checkpoints and
evaluates. Backends: NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

# How long a rank waits for the others at a collective (rank 0 evaluates meanwhile).
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class DataParallel:
    """This process's place among the ranks (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this rank logs, checkpoints and evaluates."""
        return self.rank == 0

    def share(self, items: list[T]) -> list[T]:
        """This rank's part of a step's items (every world-th, from its rank)."""
        return items[self.rank :: self.world]

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks (itself in one process)."""
        if self.world == 1:
            return tensor
        summed = tensor.detach().clone().to(self._device())
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        return summed.to(tensor.device)

    def gather(self, items: list[T]) -> list[T]:
        """Every rank's items, in rank order, on rank 0 (the others get none)."""
        if self.world == 1:
            return list(items)
        parts: list[Any] | None = [None] * self.world if self.main else None
        dist.gather_object(items, parts, dst=0)
        return [item for part in parts or [] for item in part]

    def _device(self) -> torch.device:
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


SINGLE = DataParallel()


def data_parallel() -> DataParallel:
    """Join the process group that torchrun set up (WORLD_SIZE > 1), or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return SINGLE
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    return DataParallel(rank=rank, world=world, local_rank=local_rank)


def wrap(model: torch.nn.Module, data: DataParallel) -> torch.nn.Module:
    """The model the update runs through: DistributedDataParallel over several ranks
    (it starts every rank from rank 0's weights), the model itself alone."""
    if data.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def leave(data: DataParallel) -> None:
    """Leave the process group at the end of a run."""
    if data.world > 1 and dist.is_initialized():
        dist.destroy_process_group()

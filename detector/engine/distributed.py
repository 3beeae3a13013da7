"""Distributed set-up and the collectives the engine runs (``torch.distributed``, DDP).

One process, or one process per GPU/CPU-worker under ``torchrun`` (NCCL on CUDA, gloo on CPU),
multi-node included (``torchrun --nnodes ...``). Every helper is a no-op (or the identity) in a
single process, and a collective under DDP: every rank must call it, in the same order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistContext",
    "init_distributed",
    "wrap_ddp",
    "barrier",
    "mean_over_ranks",
    "any_rank",
    "gather_objects",
    "broadcast_from_main",
]


@dataclass
class DistContext:
    """Where this process stands: ``rank``/``world_size`` (global), ``local_rank``, ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistContext:
    """Initialise ``torch.distributed`` from torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``) if present, else run single-process.

    ``device``: ``'cpu'``, ``'cuda'`` or None (CUDA when available). Under torchrun with CUDA each
    process takes ``cuda:LOCAL_RANK``; the backend is NCCL on CUDA and gloo on CPU.
    """
    want_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if want_cuda and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device} requested but CUDA is not available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if want_cuda:
            torch.cuda.set_device(local_rank)
            dev = torch.device("cuda", local_rank)
        else:
            dev = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group(
                backend="nccl" if want_cuda else "gloo", device_id=dev if want_cuda else None
            )
        return DistContext(rank, world, local_rank, dev)
    if want_cuda:
        dev = torch.device(device if device and ":" in device else "cuda")
    else:
        dev = torch.device("cpu")
    return DistContext(device=dev)


def wrap_ddp(model: nn.Module, ctx: DistContext) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` under DDP; ``model`` itself otherwise."""
    if not ctx.distributed:
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None
    )


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (nothing in a single process, or once the process group is gone)."""
    if ctx.distributed and dist.is_initialized():
        dist.barrier()


def mean_over_ranks(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The mean of ``values`` over ranks, in place (``values`` itself in a single process)."""
    if ctx.distributed:
        dist.all_reduce(values)
        values /= ctx.world_size
    return values


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True when ``flag`` is true on at least one rank (so that every rank decides alike)."""
    if not ctx.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank (``[obj]`` alone)."""
    if not ctx.distributed:
        return [obj]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_from_main(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's ``obj`` (picklable) on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]

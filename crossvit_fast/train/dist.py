"""Distributed setup for training: torchrun's environment -> process group, device, DDP / FSDP2.

`torchrun --nproc_per_node=N -m crossvit_fast train ...` sets RANK / LOCAL_RANK / WORLD_SIZE (and
MASTER_ADDR / MASTER_PORT); `setup` joins the group (NCCL on GPUs, gloo on CPU) and picks this
process's device (cuda:LOCAL_RANK). A plain `python -m crossvit_fast train` is world size 1 and
uses no process group, except with `--fsdp`, which needs a device mesh: it then forms a group of
one in memory (HashStore; nothing is listened on).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["DistInfo", "all_reduce_sum", "broadcast_object", "setup", "teardown", "wrap_model"]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    owns_group: bool = False  # formed by `setup` (and so destroyed by `teardown`)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    try:
        return default if v in (None, "") else int(v)
    except ValueError:
        raise ValueError(f"environment variable {name}={v!r}: expected an integer") from None


def setup(device: str = "auto", need_group: bool = False) -> DistInfo:
    """Join torchrun's process group (when WORLD_SIZE > 1) and choose the device.

    device: "auto" (cuda:LOCAL_RANK when a GPU is visible, else cpu), "cpu" or "cuda".
    need_group: form a process group even for a single process (FSDP2 needs one).
    """
    world, rank, local = (
        _env_int("WORLD_SIZE", 1),
        _env_int("RANK", 0),
        _env_int("LOCAL_RANK", 0),
    )
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device: expected auto, cpu or cuda, got {device!r}")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA GPU is visible to torch")
        n = torch.cuda.device_count()
        if local >= n:
            raise ValueError(
                f"LOCAL_RANK={local} but this node has {n} GPU(s): use --nproc_per_node <= {n}"
            )
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)  # NCCL collectives and all_gather_object use the current device
    else:
        dev = torch.device("cpu")
    owns = False
    if (world > 1 or need_group) and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if world > 1:
            dist.init_process_group(backend, device_id=dev if use_cuda else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        owns = True
    elif dist.is_available() and dist.is_initialized():  # a caller's group: use its layout
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, local, world, dev, owns)


def teardown(info: DistInfo) -> None:
    """Leave the process group if `setup` formed it (a caller's group stays)."""
    if info.owns_group and info.initialized:
        dist.destroy_process_group()


def wrap_model(model: nn.Module, info: DistInfo, fsdp: bool = False) -> nn.Module:
    """The module to train: FSDP2 (`fully_shard` per stage, then the root: each stage's
    parameters are gathered just before it runs and freed after), DDP for world size > 1, else
    the model itself. Call after moving the model to `info.device` and before building the
    optimizer (FSDP2 replaces the parameters with sharded DTensors)."""
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for stage in model.blocks:
            fully_shard(stage)
        fully_shard(model)
        return model
    if info.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    return model


def all_reduce_sum(t: Tensor, info: DistInfo) -> Tensor:
    """Sum `t` over the ranks, in place (no-op without a group)."""
    if info.initialized and info.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, info: DistInfo):
    """Rank 0's `obj` on every rank."""
    if not (info.initialized and info.world_size > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj, info: DistInfo) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not (info.initialized and info.world_size > 1):
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out

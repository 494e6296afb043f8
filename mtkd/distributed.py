"""More than one process: torchrun + DistributedDataParallel (NCCL on GPUs, gloo on CPU).

``torchrun --nproc_per_node=K train.py ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; without them everything here is a no-op for one process.
Only rank 0 writes files and prints; metrics are summed over ranks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.utils.data import Subset


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> tuple[DistInfo, str]:
    """Join the process group torchrun describes; returns the info and the device name for this rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), device_name
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available() or device_name.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
        device_name = f"cuda:{info.local_rank}"
    elif device_name == "auto":
        device_name = "cpu"
    if not dist.is_initialized():
        # gloo (CPU) has no watchdog: its default group also serves the long waits.
        dist.init_process_group("nccl" if use_cuda else "gloo",
                                timeout=timedelta(minutes=30) if use_cuda else timedelta(hours=8))
    global _WAIT_GROUP
    # The other ranks may wait hours while rank 0 trains missing teachers or builds the cache. NCCL's
    # watchdog would abort a collective pending that long, so such waits go through a gloo group.
    _WAIT_GROUP = dist.new_group(backend="gloo", timeout=timedelta(hours=8)) if use_cuda else None
    return info, device_name


_WAIT_GROUP = None  # the gloo group for long waits on NCCL runs (None: the default group is gloo already)


def barrier(info: DistInfo, long_wait: bool = False) -> None:
    """All ranks meet here; ``long_wait`` (one rank working alone for a long time) uses the gloo group."""
    if info.enabled:
        dist.barrier(group=_WAIT_GROUP if long_wait else None)


def main_first(info: DistInfo, fn, then=None):
    """``fn()`` on rank 0, then ``then()`` (default ``fn()``) on the other ranks: what rank 0 writes (teachers,
    a cache) they then read. ``then`` must not write what ``fn`` wrote (e.g. retrain the teachers again)."""
    if info.is_main:
        out = fn()
    barrier(info, long_wait=True)
    if not info.is_main:
        out = (then or fn)()
    return out


def broadcast(info: DistInfo, obj):
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(info: DistInfo, obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` for one process)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sums(info: DistInfo, sums: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum each value over the ranks (float64 on ``device``)."""
    if not info.enabled:
        return sums
    keys = sorted(sums)
    t = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def all_reduce_max(info: DistInfo, t: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum of ``t`` over the ranks (a copy)."""
    t = t.clone()
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def sync_buffers(info: DistInfo, module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) everywhere, so every rank evaluates the same model."""
    if info.enabled:
        for b in module.buffers():
            dist.broadcast(b, src=0)


def shard(dataset, info: DistInfo):
    """This rank's share of ``dataset`` for evaluation: every sample on exactly one rank, no padding."""
    if not info.enabled:
        return dataset
    return Subset(dataset, list(range(info.rank, len(dataset), info.world_size)))


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()

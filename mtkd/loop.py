"""The generic training loop around ``engine``: device, seeding, random state, epochs."""
from __future__ import annotations

import random
import signal
import threading
import time
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import nn
from torch.utils.data import DistributedSampler

from .data import BatchTransform, TaskData, create_loader
from .distributed import DistInfo, all_reduce_max, all_reduce_sums, gather_objects, shard, sync_buffers
from .engine import evaluate, train_one_epoch
from .errors import UserError
from .precision import FP32, Precision
from .report import console, create_progress


def resolve_device(name: str) -> torch.device:
    """The device ``--device`` names (``auto``: cuda if available, else cpu).

    It also turns on flushing of denormal floats to zero on the CPU, for the whole process: weights that
    Adam with L2 weight decay shrank below 1.2e-38 (most of a long-trained network's dead filters) are
    otherwise computed on x86 cores' slow path, 30x slower in fp32 (``benchmarks/denormals.py``); as zeros
    they change no result measurably.
    """
    torch.set_flush_denormal(True)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device. Fix: use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA, but no CUDA device is available. Fix: use --device cpu.")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

class RunRng:
    """Every source of randomness of a run, so that a resumed run continues exactly.

    ``loader`` decides the order of the training batches, ``augment`` the
    crops and flips (its own stream on every rank: ranks must not draw the
    same crops); the global python, numpy, torch and this process's CUDA
    device generators drive initialisation and dropout. Under DDP rank 0 saves
    every rank's state (``gather``) and each rank restores its own.
    """

    def __init__(self, seed: int, rank: int = 0):
        self.rank = rank
        self.loader = torch.Generator().manual_seed(seed)
        self.augment = torch.Generator().manual_seed(seed + 1 + AUGMENT_RANK_STRIDE * rank)

    def local_state(self) -> dict:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        return {"python": random.getstate(),
                "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
                "torch": torch.get_rng_state(),
                # This process's device only: a resume may see fewer (or other) GPUs.
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.empty(0, dtype=torch.uint8),
                "loader": self.loader.get_state(), "augment": self.augment.get_state()}

    def state_dict(self, dist: DistInfo = DistInfo()) -> dict:
        """``{'ranks': [state of rank 0, rank 1, ...]}``; every rank must call it under DDP."""
        return {"ranks": gather_objects(dist, self.local_state())}

    def load_state_dict(self, state: dict) -> None:
        """Restore this rank's state (a run resumed on more ranks than it had reseeds the extra ones' streams
        from their seeds; on fewer, the other ranks' states are unused)."""
        if "ranks" in state:
            if self.rank >= len(state["ranks"]):
                return
            state = state["ranks"][self.rank]
        random.setstate(state["python"])
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
        torch.set_rng_state(state["torch"])
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):  # checkpoints before per-rank states: one state per visible GPU
            cuda = cuda[torch.cuda.current_device()] if torch.cuda.is_available() and \
                torch.cuda.current_device() < len(cuda) else None
        if cuda is not None and len(cuda) and torch.cuda.is_available():
            torch.cuda.set_rng_state(cuda)
        self.loader.set_state(state["loader"])
        self.augment.set_state(state["augment"])


AUGMENT_RANK_STRIDE = 7919  # rank r's augmentation seed: seed + 1 + r * this (a prime; rank 0 as before)


class GracefulStop:
    """SIGINT / SIGTERM set a flag that the training loop reads before every step.

    The step in flight finishes, the epoch is abandoned, and the run exits
    cleanly with its last complete epoch saved. A second signal interrupts at once.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        console.print(f"[yellow]{signal.Signals(signum).name}: stopping after the current step[/]")

    def __call__(self) -> int:
        """The signal received (0: none)."""
        return self.signum or 0


@dataclass(frozen=True)
class LoopConfig:
    """What the epoch loop takes from a training recipe."""

    batch_size: int
    seed: int
    num_workers: int = 0
    grad_accum: int = 1
    clip_grad: float = 0.0
    eval_every: int = 1  # validate after every N-th epoch (and the last)

    @classmethod
    def from_args(cls, args) -> "LoopConfig":
        return cls(args.batch_size, args.seed, args.num_workers, args.grad_accum, args.clip_grad,
                   getattr(args, "eval_every", 1))

    def validates(self, epoch: int, epochs: int) -> bool:
        """Whether ``fit`` validates after ``epoch`` of ``epochs``: every ``eval_every``-th, and the last."""
        return epoch % self.eval_every == 0 or epoch == epochs


def fit(step: nn.Module, data: TaskData, *, epochs: int, optimizer, scheduler, loop: LoopConfig,
        device: torch.device, transform: BatchTransform, on_epoch, val_model: nn.Module,
        title: str, rng: RunRng, start_epoch: int = 1, stop=None, dist: DistInfo = DistInfo(),
        precision: Precision = FP32, scaler: torch.amp.GradScaler | None = None) -> None:
    """Train ``step`` for epochs ``start_epoch..epochs``; after each, evaluate ``val_model`` (every
    ``loop.eval_every``-th epoch and the last: ``val`` is None after the others) and call ``on_epoch``.

    ``precision`` is the student's (``val_model`` is evaluated in it too);
    ``scaler`` a ``GradScaler`` for fp16, owned by the caller so that its state
    goes into the checkpoints.

    ``on_epoch`` returning True stops the run (early stopping). Under DDP the
    training set is split by a ``DistributedSampler`` and validation by
    ``shard``, and metrics are summed over the ranks.
    """
    pin = device.type == "cuda"
    # A dataset with per-epoch state (the teacher cache's views) must stay in this process.
    workers = 0 if hasattr(data.train, "set_epoch") else loop.num_workers
    sampler = DistributedSampler(data.train, dist.world_size, dist.rank, shuffle=True, seed=loop.seed) \
        if dist.enabled else None
    train_loader = create_loader(data.train, loop.batch_size, train=True, generator=rng.loader,
                                 num_workers=workers, pin_memory=pin, sampler=sampler)
    val_loader = create_loader(shard(data.val, dist), 512, train=False, num_workers=loop.num_workers,
                               pin_memory=pin)
    reduce = partial(all_reduce_sums, dist, device=device)
    with create_progress(disable=not dist.is_main) as progress:
        for epoch in range(start_epoch, epochs + 1):
            start = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            for stateful in (data.train, step, sampler, getattr(step, "module", None)):
                if hasattr(stateful, "set_epoch"):
                    stateful.set_epoch(epoch)
            train = train_one_epoch(step, train_loader, optimizer, transform, device, epoch=epoch,
                                    generator=rng.augment, progress=progress, precision=precision, scaler=scaler,
                                    grad_accum=loop.grad_accum, clip_grad=loop.clip_grad,
                                    stop=stop, reduce=reduce,
                                    agree=partial(all_reduce_max, dist) if dist.enabled else None)
            sync_buffers(dist, val_model)
            val = None
            if loop.validates(epoch, epochs):
                val = evaluate(val_model, val_loader, transform, device, reduce=reduce, precision=precision)
            scheduler.step(val["acc"] if val else None)  # a plateau schedule steps on validated epochs only
            seconds = time.perf_counter() - start
            if dist.is_main:
                shown = f"{val['acc']:.4f}" if val else "   -  "
                console.print(f"{title} {epoch:>3}/{epochs}  loss {train['loss']:.4f}  acc {train['acc']:.4f}  "
                              f"val {shown}  lr {lr:.1e}  {seconds:.1f}s", soft_wrap=True)
            if on_epoch(epoch, train, val, lr, seconds):
                break

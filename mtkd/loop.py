"""The generic training loop around ``engine``: device, seeding, random state, epochs."""
from __future__ import annotations

import random
import time
from argparse import Namespace

import numpy as np
import torch
from torch import nn

from .data import BatchTransform, TaskData, create_loader
from .engine import evaluate, train_one_epoch
from .errors import UserError
from .report import console, create_progress


def resolve_device(name: str) -> torch.device:
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
    crops and flips; the global python, numpy, torch (and CUDA) generators
    drive initialisation and dropout.
    """

    def __init__(self, seed: int):
        self.loader = torch.Generator().manual_seed(seed)
        self.augment = torch.Generator().manual_seed(seed + 1)

    def state_dict(self) -> dict:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        return {"python": random.getstate(),
                "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "loader": self.loader.get_state(), "augment": self.augment.get_state()}

    def load_state_dict(self, state: dict) -> None:
        random.setstate(state["python"])
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        self.loader.set_state(state["loader"])
        self.augment.set_state(state["augment"])


def fit(step: nn.Module, data: TaskData, *, epochs: int, optimizer, scheduler, args: Namespace,
        device: torch.device, transform: BatchTransform, on_epoch, val_model: nn.Module,
        title: str, rng: RunRng, start_epoch: int = 1) -> None:
    """Train ``step`` for epochs ``start_epoch..epochs``; after each, evaluate ``val_model``, call ``on_epoch``."""
    pin = device.type == "cuda"
    # A dataset with per-epoch state (the teacher cache's views) must stay in this process.
    workers = 0 if hasattr(data.train, "set_epoch") else args.num_workers
    train_loader = create_loader(data.train, args.batch_size, train=True, generator=rng.loader,
                                 num_workers=workers, pin_memory=pin)
    val_loader = create_loader(data.val, 512, train=False, num_workers=args.num_workers, pin_memory=pin)
    with create_progress() as progress:
        for epoch in range(start_epoch, epochs + 1):
            start = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            for stateful in (data.train, step):
                if hasattr(stateful, "set_epoch"):
                    stateful.set_epoch(epoch)
            train = train_one_epoch(step, train_loader, optimizer, transform, device, epoch=epoch,
                                    generator=rng.augment, progress=progress)
            val = evaluate(val_model, val_loader, transform, device)
            scheduler.step()
            seconds = time.perf_counter() - start
            console.print(f"{title} {epoch:>3}/{epochs}  loss {train['loss']:.4f}  acc {train['acc']:.4f}  "
                          f"val {val['acc']:.4f}  lr {lr:.1e}  {seconds:.1f}s", soft_wrap=True)
            on_epoch(epoch, train, val, lr, seconds)


def create_optimizer(model: nn.Module, args: Namespace) -> torch.optim.Optimizer:
    """Adam with the run's ``--lr`` and ``--weight_decay``, over the trainable parameters of ``model``."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)

"""Optimisers and learning-rate schedules of the command line (``--optimizer``, ``--scheduler``)."""
from __future__ import annotations

import torch
from torch import nn

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("step", "cosine", "plateau")


def optimizer_kwargs(args) -> dict:
    """``create_optimizer``'s keywords from parsed arguments (``--optimizer``, ``--lr``, ``--weight_decay``)."""
    return {"kind": args.optimizer, "lr": args.lr, "weight_decay": args.weight_decay}


def create_optimizer(model: nn.Module, kind: str = "adam", lr: float = 1e-3,
                     weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD over the trainable parameters. SGD uses Nesterov momentum 0.9, the usual choice."""
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {kind!r}")


class EpochScheduler:
    """A per-epoch schedule: linear warm-up, then torch's StepLR, CosineAnnealingLR or ReduceLROnPlateau.

    torch's ``SequentialLR`` cannot chain ``ReduceLROnPlateau`` (it needs the
    metric), so the warm-up is run here and the main scheduler after it.
    ``step(metric)`` is called once per epoch with the validation accuracy.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, kind: str, epochs: int, step_size: int = 30,
                 gamma: float = 0.5, warmup_epochs: int = 0):
        self.kind, self.warmup_epochs, self.epoch = kind, warmup_epochs, 0
        self.warmup = (torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / (warmup_epochs + 1),
                                                         total_iters=warmup_epochs) if warmup_epochs else None)
        if kind == "step":
            self.main = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)
        elif kind == "cosine":
            self.main = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs - warmup_epochs, 1))
        elif kind == "plateau":
            # Patience --scheduler_step epochs without a better validation accuracy, then lr *= gamma.
            self.main = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=gamma,
                                                                   patience=step_size)
        else:
            raise ValueError(f"unknown scheduler {kind!r}")

    def step(self, metric: float | None = None) -> None:
        self.epoch += 1
        if self.warmup is not None and self.epoch <= self.warmup_epochs:
            self.warmup.step()
        elif self.kind == "plateau":
            self.main.step(metric)
        else:
            self.main.step()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "main": self.main.state_dict(),
                "warmup": self.warmup.state_dict() if self.warmup is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if "main" not in state:  # a checkpoint written before warm-up existed: a bare StepLR's state
            self.main.load_state_dict(state)
            self.epoch = state["last_epoch"]
            return
        self.epoch = state["epoch"]
        self.main.load_state_dict(state["main"])
        if self.warmup is not None and state["warmup"] is not None:
            self.warmup.load_state_dict(state["warmup"])


def scheduler_kwargs(args) -> dict:
    """``EpochScheduler``'s keywords from parsed arguments (``--scheduler`` and its options)."""
    return {"kind": args.scheduler, "step_size": args.scheduler_step, "gamma": args.scheduler_gamma,
            "warmup_epochs": args.warmup_epochs}

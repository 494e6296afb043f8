"""Optimisers and learning-rate schedules of the command line (``--optimizer``, ``--scheduler``)."""
from __future__ import annotations

import torch
from torch import nn

from .registry import Registry

# --optimizer: a name -> a function of (parameters, lr, weight_decay).
OPTIMIZERS: Registry = Registry("optimizer")
OPTIMIZERS.register("adam", lambda params, lr, wd: torch.optim.Adam(params, lr=lr, weight_decay=wd))
OPTIMIZERS.register("adamw", lambda params, lr, wd: torch.optim.AdamW(params, lr=lr, weight_decay=wd))
# SGD with Nesterov momentum 0.9, the usual choice.
OPTIMIZERS.register("sgd", lambda params, lr, wd: torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True,
                                                                   weight_decay=wd))

# --scheduler: a name -> a function of (optimizer, epochs after the warm-up, step_size, gamma).
SCHEDULERS: Registry = Registry("scheduler")
SCHEDULERS.register("step", lambda opt, epochs, step_size, gamma: torch.optim.lr_scheduler.StepLR(
    opt, step_size=step_size, gamma=gamma))
SCHEDULERS.register("cosine", lambda opt, epochs, step_size, gamma: torch.optim.lr_scheduler.CosineAnnealingLR(
    opt, T_max=max(epochs, 1)))
# Patience --scheduler_step epochs without a better validation accuracy, then lr *= gamma.
SCHEDULERS.register("plateau", lambda opt, epochs, step_size, gamma: torch.optim.lr_scheduler.ReduceLROnPlateau(
    opt, mode="max", factor=gamma, patience=step_size))


def optimizer_kwargs(args) -> dict:
    """``create_optimizer``'s keywords from parsed arguments (``--optimizer``, ``--lr``, ``--weight_decay``)."""
    return {"kind": args.optimizer, "lr": args.lr, "weight_decay": args.weight_decay}


def create_optimizer(model: nn.Module, kind: str = "adam", lr: float = 1e-3,
                     weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """``OPTIMIZERS[kind]`` over the trainable parameters."""
    return OPTIMIZERS.get(kind)([p for p in model.parameters() if p.requires_grad], lr, weight_decay)


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
        self.main = SCHEDULERS.get(kind)(optimizer, epochs - warmup_epochs, step_size, gamma)

    def step(self, metric: float | None = None) -> None:
        self.epoch += 1
        if self.warmup is not None and self.epoch <= self.warmup_epochs:
            self.warmup.step()
        elif isinstance(self.main, torch.optim.lr_scheduler.ReduceLROnPlateau):  # it needs the metric
            if metric is not None:  # (--eval_every: its patience counts validations)
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

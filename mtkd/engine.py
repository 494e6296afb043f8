"""The training loop and evaluation. They know nothing about distillation.

``train_one_epoch`` calls a step module ``step(x, y) -> {'loss', 'logits', ...}``
and averages every scalar part it returns, so new loss terms show up in the
logs without touching this file.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .data import BatchTransform
from .errors import UserError
from .metrics import topk_accuracy


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite."""


def train_one_epoch(step: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    transform: BatchTransform, device: torch.device, *, epoch: int = 0,
                    generator: torch.Generator | None = None, progress=None) -> dict[str, float]:
    """One pass over ``loader``; returns the sample-weighted mean of each part and ``acc``.

    ``progress`` is an optional ``rich.progress.Progress``; a bar per epoch
    shows the running loss and accuracy.
    """
    step.train()
    sums: dict[str, float] = defaultdict(float)
    seen = correct = 0
    bar = progress.add_task(f"epoch {epoch}", total=len(loader), metrics="") if progress else None
    for i, (images, labels) in enumerate(loader):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        x = transform(images, augment=True, generator=generator)
        out = step(x, labels)
        loss = out["loss"]
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"the loss became {loss.item()} at epoch {epoch}, step {i}. "
                "Fix: lower --lr, or check the data; the last saved checkpoint is intact.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        n = labels.numel()
        seen += n
        correct += (out["logits"].argmax(1) == labels).sum().item()
        for name, value in out.items():
            if name.startswith("loss"):
                sums[name] += float(value.detach()) * n
        if progress is not None:
            progress.update(bar, advance=1,
                            metrics=f"loss {sums['loss'] / seen:.4f}  acc {correct / seen:.4f}")
    if progress is not None:
        progress.remove_task(bar)
    metrics = {name: total / max(seen, 1) for name, total in sums.items()}
    metrics["acc"] = correct / max(seen, 1)
    return metrics


@torch.inference_mode()
def predict(model: nn.Module, loader: DataLoader, transform: BatchTransform,
            device: torch.device) -> tuple[Tensor, Tensor]:
    """All logits and labels of ``loader``, on the CPU, in loader order."""
    model.eval()
    logits, labels = [], []
    for images, y in loader:
        logits.append(model(transform(images.to(device))).float().cpu())
        labels.append(y)
    return torch.cat(logits), torch.cat(labels)


def evaluate(model: nn.Module, loader: DataLoader, transform: BatchTransform,
             device: torch.device) -> dict[str, float]:
    """Top-1 and top-3 accuracy and mean cross-entropy over ``loader``."""
    logits, labels = predict(model, loader, transform, device)
    if len(labels) == 0:
        return {"acc": math.nan, "top3": math.nan, "loss": math.nan}
    return {
        "acc": topk_accuracy(logits, labels, 1),
        "top3": topk_accuracy(logits, labels, 3),
        "loss": torch.nn.functional.cross_entropy(logits, labels).item(),
    }

"""The training loop and evaluation. They know nothing about distillation.

``train_one_epoch`` calls a step module ``step(x, y, **extras) -> {'loss',
'logits', ...}`` and averages every scalar part it returns, so new loss terms
show up in the logs without touching this file. A loader may yield
``(images, labels, extras)``: ``extras['aug']`` (augmentation parameters) goes
to the transform, the rest to the step.
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


AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str = "off"):
    """``torch.autocast`` for ``--amp bf16|fp16``, or a no-op context for ``off``."""
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp], enabled=amp != "off")


def train_one_epoch(step: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    transform: BatchTransform, device: torch.device, *, epoch: int = 0,
                    generator: torch.Generator | None = None, progress=None, amp: str = "off",
                    channels_last: bool = False, scaler: torch.amp.GradScaler | None = None) -> dict[str, float]:
    """One pass over ``loader``; returns the sample-weighted mean of each part and ``acc``.

    ``amp`` runs the step under autocast (``scaler``, a ``GradScaler``, is
    needed for fp16); ``channels_last`` hands the step NHWC-strided batches.
    ``progress`` is an optional ``rich.progress.Progress``; a bar per epoch
    shows the running loss and accuracy.
    """
    step.train()
    sums: dict[str, float] = defaultdict(float)
    seen = correct = 0
    bar = progress.add_task(f"epoch {epoch}", total=len(loader), metrics="") if progress else None
    for i, batch in enumerate(loader):
        images, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        extras = _to_device(batch[2], device) if len(batch) > 2 else {}
        x = transform(images, augment=True, generator=generator, params=extras.pop("aug", None))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            out = step(x, labels, **extras)
        loss = out["loss"]
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"the loss became {loss.item()} at epoch {epoch}, step {i}. "
                "Fix: lower --lr, or check the data; the last saved checkpoint is intact.")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()

        n = labels.numel()
        seen += n
        correct += (out["logits"].argmax(1) == labels).sum().item()
        for name, value in out.items():
            if name != "logits" and (not torch.is_tensor(value) or value.ndim == 0):
                sums[name] += float(value.detach() if torch.is_tensor(value) else value) * n
        if progress is not None:
            progress.update(bar, advance=1,
                            metrics=f"loss {sums['loss'] / seen:.4f}  acc {correct / seen:.4f}")
    if progress is not None:
        progress.remove_task(bar)
    metrics = {name: total / max(seen, 1) for name, total in sums.items()}
    metrics["acc"] = correct / max(seen, 1)
    return metrics


def _to_device(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return type(obj)(_to_device(v, device) for v in obj)


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

"""The training loop and evaluation. They know nothing about distillation.

``train_one_epoch`` calls a step module ``step(x, y, **extras) -> {'loss',
'logits', ...}`` and averages every scalar part it returns, so new loss terms
show up in the logs without touching this file. A loader may yield
``(images, labels, extras)``: ``extras['aug']`` (augmentation parameters) goes
to the transform, the rest to the step. ``reduce`` (sums over processes under
DDP) is applied to the sums before they are averaged.
"""
from __future__ import annotations

import math
from collections import defaultdict
from contextlib import nullcontext
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .data import BatchTransform
from .errors import UserError
from .metrics import topk_correct
from .precision import FP32, Precision


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite."""


class TrainingInterrupted(Exception):
    """A stop was requested (signal ``signum``: SIGINT / SIGTERM) before step ``step`` of epoch ``epoch``."""

    def __init__(self, epoch: int, step: int, signum: int = 0):
        super().__init__(f"interrupted at epoch {epoch}, step {step}")
        self.epoch, self.step, self.signum = epoch, step, signum


def _non_finite(value: str, epoch: int, step: int) -> NonFiniteLossError:
    return NonFiniteLossError(
        f"the loss became {value} at epoch {epoch}, step {step}. "
        "Fix: lower --lr (or use --clip_grad, --amp bf16), or check the data; "
        "the last saved checkpoint is intact.")


def _identity(sums):
    return sums


def _to_device(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return type(obj)(_to_device(v, device) for v in obj)


COUNT = "count:"  # prefix of the running sums of each part's image counts
PROGRESS_EVERY = 25  # steps between refreshes of the progress bar's loss and accuracy (a host sync each)


def _check(loss: Tensor, signum: int, agree, epoch: int, step: int) -> None:
    """Raise for a stop request or a non-finite loss; with ``agree``, as decided by all processes together."""
    if agree is None:
        if not torch.isfinite(loss):
            raise _non_finite(str(loss.item()), epoch, step)
        return
    value = loss.detach().float()
    flags = agree(torch.stack([value.new_tensor(float(signum)), value.isnan().float(),
                               (value == math.inf).float(), (value == -math.inf).float()]))
    signum, nan, pos_inf, neg_inf = (int(f) for f in flags.tolist())
    if signum:
        raise TrainingInterrupted(epoch, step, signum)
    if nan or pos_inf or neg_inf:
        raise _non_finite("nan" if nan else "inf" if pos_inf else "-inf", epoch, step)


def train_one_epoch(step: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    transform: BatchTransform, device: torch.device, *, epoch: int = 0,
                    generator: torch.Generator | None = None, progress=None, precision: Precision = FP32,
                    scaler: torch.amp.GradScaler | None = None,
                    grad_accum: int = 1, clip_grad: float = 0.0, stop=None, reduce=_identity,
                    agree=None) -> dict[str, float]:
    """One pass over ``loader``; returns the mean of each scalar part the step returns and ``acc``
    (over the images with a label; an unlabelled image has label -1). A part is weighted by the batch
    size, or by ``out['counts'][name]`` where the step says over how many images that part is a mean
    (the cross-entropy over the labelled ones only).

    * ``precision`` (``mtkd.precision``): the step runs under its autocast
      (``scaler``, a ``GradScaler``, for fp16) on batches in its memory layout.
    * ``grad_accum`` N: gradients of N batches (each loss divided by N) make
      one optimiser step; the last, shorter group of an epoch steps too.
    * ``clip_grad`` > 0 clips the gradients' global L2 norm (after unscaling).
    * ``stop()`` is asked before every batch; when it returns a signal number
      (or True), ``TrainingInterrupted``.
    * ``agree`` (under DDP: the maximum over the processes of a small tensor)
      makes every process take the stop and non-finite-loss decisions together,
      at the same step, after the forward pass: one process's signal or NaN
      stops them all the same way.
    * ``step.after_optimizer_step()``, if the step (or the module DDP wraps) has
      one, is called after every optimiser step.
    * ``progress``: an optional ``rich.progress.Progress`` for a bar per epoch.
    """
    step.train()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    # State that follows the weights (an EMA) updates once per optimiser step, after it.
    after_step = getattr(getattr(step, "module", step), "after_optimizer_step", None)
    # Running sums stay on the device: no host sync per step for logging (the bar refreshes now and then).
    sums: dict[str, Tensor] = defaultdict(lambda: torch.zeros((), dtype=torch.float64, device=device))
    seen = 0
    bar = progress.add_task(f"epoch {epoch}", total=len(loader), metrics="") if progress else None
    optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(loader):
        signum = int(stop() or 0) if stop is not None else 0
        if signum and agree is None:
            raise TrainingInterrupted(epoch, i, signum)
        images, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        extras = _to_device(batch[2], device) if len(batch) > 2 else {}
        x = transform(images, augment=True, generator=generator, params=extras.pop("aug", None))
        x = precision.prepare_input(x)
        steps_now = (i + 1) % grad_accum == 0 or i + 1 == len(loader)
        # DDP: micro-batches that do not step accumulate locally; only the last one all-reduces.
        accumulate = step.no_sync() if not steps_now and hasattr(step, "no_sync") else nullcontext()
        with accumulate:
            with precision.autocast(device):
                out = step(x, labels, **extras)
            loss = out["loss"]
            _check(loss, signum, agree, epoch, i)
            scaled = loss / grad_accum
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if steps_now:
            if scaler is not None:
                scaler.unscale_(optimizer)
            if clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(params, clip_grad)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if after_step is not None:
                after_step()

        n = labels.numel()
        seen += n
        # Accuracy over the labelled images (an unlabelled one has label -1).
        sums["correct"] += (out["logits"].detach().argmax(1) == labels).sum()
        sums["labelled"] += (labels >= 0).sum()
        counts = out.get("counts", {})
        for name, value in out.items():
            if name not in ("logits", "counts") and (not torch.is_tensor(value) or value.ndim == 0):
                weight = counts.get(name, n)  # the images this part is a mean over (default: the batch)
                sums[name] += (value.detach().double() if torch.is_tensor(value) else float(value)) * weight
                sums[COUNT + name] += weight
        if progress is not None:
            refresh = (i + 1) % PROGRESS_EVERY == 0 or i + 1 == len(loader)
            progress.update(bar, advance=1, **({"metrics": f"loss {sums['loss'].item() / seen:.4f}  acc "
                                                           f"{sums['correct'].item() / max(sums['labelled'].item(), 1):.4f}"}
                                               if refresh else {}))
    if progress is not None:
        progress.remove_task(bar)
    sums = {name: total.item() for name, total in sums.items()}
    sums["seen"] = seen
    sums = reduce(dict(sums))
    sums.pop("seen", 0)
    labelled = sums.pop("labelled", 0)
    metrics = {name: total / sums[COUNT + name] if sums[COUNT + name] else math.nan
               for name, total in sums.items() if name != "correct" and not name.startswith(COUNT)}
    metrics["acc"] = sums.get("correct", 0) / labelled if labelled else math.nan
    return metrics


@torch.inference_mode()
def predict(model: nn.Module, loader: DataLoader, transform: BatchTransform,
            device: torch.device, precision: Precision = FP32, advance=None) -> tuple[Tensor, Tensor]:
    """All logits (float32) and labels of ``loader``, on the CPU, in loader order.

    ``precision``: the autocast and input layout ``model`` runs in. An empty
    loader (an empty validation shard) gives empty tensors. ``advance(n)``, if
    given, is called after each batch of ``n`` images (a progress bar).
    """
    model.eval()
    logits, labels = [], []
    for images, y in loader:
        with precision.autocast(device):
            logits.append(model(precision.prepare_input(transform(images.to(device)))).float().cpu())
        labels.append(y)
        if advance is not None:
            advance(len(y))
    if not logits:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(logits), torch.cat(labels)


def evaluate(model: nn.Module, loader: DataLoader, transform: BatchTransform,
             device: torch.device, reduce=_identity, precision: Precision = FP32, advance=None) -> dict[str, float]:
    """Top-1 and top-3 accuracy and mean cross-entropy over ``loader`` (and, with ``reduce``, other ranks')."""
    logits, labels = predict(model, loader, transform, device, precision, advance)
    if len(labels):
        local = {"n": len(labels), "top1": topk_correct(logits, labels, 1), "top3": topk_correct(logits, labels, 3),
                 "loss": F.cross_entropy(logits, labels, reduction="sum").item()}
    else:  # an empty shard (more ranks than samples) still takes part in the reduction
        local = {"n": 0, "top1": 0, "top3": 0, "loss": 0.0}
    sums = reduce(local)
    if sums["n"] == 0:
        return {"acc": math.nan, "top3": math.nan, "loss": math.nan}
    return {"acc": sums["top1"] / sums["n"], "top3": sums["top3"] / sums["n"], "loss": sums["loss"] / sums["n"]}

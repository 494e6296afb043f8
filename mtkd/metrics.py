"""Classification metrics over logits: scikit-learn's, plus top-k and calibration."""
from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.metrics import classification_report, confusion_matrix, precision_recall_fscore_support, roc_auc_score
from torch import Tensor


def topk_correct(logits: Tensor, labels: Tensor, k: int) -> int:
    """How many samples have their label among the ``k`` highest logits. Ties go to the lower class index, as
    ``argmax`` breaks them (a stable sort, not ``topk``, whose order among equal values is unspecified): logits
    run in bf16 tie often enough that the training summary and the evaluation would otherwise disagree."""
    k = min(k, logits.shape[1])
    top = logits.sort(dim=1, descending=True, stable=True).indices[:, :k]
    return int((top == labels[:, None]).any(1).sum())


def restricted_accuracy(logits: torch.Tensor, labels: torch.Tensor, class_ids: torch.Tensor) -> float:
    """Accuracy on the samples whose label is in ``class_ids``, choosing among those classes only.

    A specialist's task: how well a model over all classes does what the
    specialist over ``class_ids`` does. NaN when no sample has such a label.
    """
    keep = (labels[:, None] == class_ids[None, :]).any(1)
    if not keep.any():
        return float("nan")
    pred = class_ids[logits[keep][:, class_ids].argmax(1)]
    return (pred == labels[keep]).float().mean().item()


def topk_accuracy(logits: Tensor, labels: Tensor, k: int) -> float:
    """Fraction of samples whose label is among the ``k`` highest logits."""
    return topk_correct(logits, labels, k) / len(labels)


def expected_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    """ECE (Guo et al., 2017): ``sum_b |B_b| / n * |acc(B_b) - conf(B_b)|``.

    Samples are binned by confidence (max probability) into ``n_bins``
    equal-width bins ``(i/n, (i+1)/n]``. scikit-learn has no ECE, hence this.
    """
    conf, pred = probs.max(1)
    correct = (pred == labels).float()
    bins = torch.clamp(torch.ceil(conf * n_bins).long() - 1, 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            ece += in_bin.float().mean().item() * abs(correct[in_bin].mean().item() - conf[in_bin].mean().item())
    return ece


def _roc_auc(probs: np.ndarray, labels: np.ndarray, average: str) -> float:
    present = np.unique(labels)
    if len(present) < 2:
        return math.nan
    if len(present) < probs.shape[1]:
        # One-vs-rest AUC needs positives and negatives for every class scored.
        probs = probs[:, present] / probs[:, present].sum(1, keepdims=True)
        labels = np.searchsorted(present, labels)
    if probs.shape[1] == 2:
        return float(roc_auc_score(labels, probs[:, 1]))
    return float(roc_auc_score(labels, probs, multi_class="ovr", average=average))


def classification_metrics(logits: Tensor, labels: Tensor, class_names: list[str]) -> dict:
    """Accuracy (overall, per class, top-3), precision / recall / F1, ROC-AUC and ECE."""
    probs = torch.softmax(logits.float(), 1)
    pred = logits.argmax(1)  # on the logits: softmax can round two close logits to one probability
    y, p = labels.numpy(), pred.numpy()
    ids = list(range(len(class_names)))
    out = {
        "num_samples": len(y),
        "overall_accuracy": float((p == y).mean()),
        "top3_accuracy": topk_accuracy(logits, labels, 3),
        "per_class_accuracy": {
            name: (float((p[y == i] == i).mean()) if (y == i).any() else None) for i, name in enumerate(class_names)
        },
    }
    for avg in ("micro", "macro", "weighted"):
        prec, rec, f1, _ = precision_recall_fscore_support(y, p, labels=ids, average=avg, zero_division=0)
        out[f"precision_{avg}"], out[f"recall_{avg}"], out[f"f1_{avg}"] = float(prec), float(rec), float(f1)
    for avg in ("macro", "weighted"):
        out[f"roc_auc_ovr_{avg}"] = _roc_auc(probs.numpy(), y, avg)
    out["ece"] = expected_calibration_error(probs, labels)
    return out


def report_text(logits: Tensor, labels: Tensor, class_names: list[str]) -> str:
    return classification_report(labels.numpy(), logits.argmax(1).numpy(), labels=list(range(len(class_names))),
                                 target_names=class_names, digits=4, zero_division=0)


def confusion(logits: Tensor, labels: Tensor, num_classes: int) -> np.ndarray:
    return confusion_matrix(labels.numpy(), logits.argmax(1).numpy(), labels=list(range(num_classes)))

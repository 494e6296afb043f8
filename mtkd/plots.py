"""Figures (matplotlib, headless): confusion matrix, sample predictions, training curves."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402


def save(fig, path: str | Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return Path(path)


def confusion_matrix_figure(cm: np.ndarray, class_names: list[str], title: str):
    size = max(5.0, 0.45 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(cm, display_labels=class_names).plot(ax=ax, colorbar=False, xticks_rotation=60,
                                                                cmap="Blues")
    ax.set_title(title)
    return fig


def sample_predictions_figure(images: np.ndarray, preds: list[int], labels: list[int], class_names: list[str],
                              title: str, columns: int = 8):
    """A grid of images titled 'pred (true)'; mistakes in red with a red frame."""
    n = len(images)
    rows = (n + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(1.8 * columns, 2.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, p, y in zip(axes.flat, images, preds, labels):
        img = img.transpose(1, 2, 0)
        ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray" if img.shape[2] == 1 else None,
                  interpolation="nearest")
        wrong = p != y
        ax.set_title(f"{class_names[p]}\n(true {class_names[y]})", fontsize=8,
                     color="red" if wrong else "green", fontweight="bold" if wrong else "normal")
        if wrong:
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_color("red")
                spine.set_linewidth(3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _column(rows: list[dict], key: str) -> np.ndarray:
    return np.array([float(r[key]) for r in rows])


def _series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(epochs, values)`` of the rows where ``key`` was measured (validation: every ``--eval_every`` epochs)."""
    kept = [r for r in rows if r.get(key, "") != ""]
    return _column(kept, "epoch"), _column(kept, key)


def run_curves_figure(rows: list[dict], title: str):
    """Loss (train total / hard / soft, val) and accuracy (train, val) per epoch."""
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("train_loss", "train_loss_hard", "train_loss_soft", "val_loss"):
        if key in rows[0]:
            loss_ax.plot(*_series(rows, key), label=key)
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss")
    loss_ax.legend()
    for key in ("train_acc", "val_acc"):
        acc_ax.plot(*_series(rows, key), label=key)
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    acc_ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def topk_curves_figure(rows: list[dict], title: str):
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*_series(rows, "val_acc"), label="val top-1")
    ax.plot(*_series(rows, "val_top3"), label="val top-3")
    ax.set(xlabel="epoch", ylabel="accuracy", title=title)
    ax.legend()
    fig.tight_layout()
    return fig


def comparison_figure(runs: dict[str, list[dict]], title: str):
    """Validation accuracy and loss per epoch of several runs, side by side."""
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in runs.items():
        acc_ax.plot(*_series(rows, "val_acc"), label=name)
        loss_ax.plot(*_series(rows, "val_loss"), label=name)
    acc_ax.set(xlabel="epoch", ylabel="validation accuracy", title="validation accuracy")
    loss_ax.set(xlabel="epoch", ylabel="validation loss", title="validation loss")
    acc_ax.legend()
    loss_ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def close(fig) -> None:
    plt.close(fig)

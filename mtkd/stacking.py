"""The specialists calibrated into one classifier by a few labels (``--aggregation stacked``).

Disjoint specialists cannot say which group an image belongs to: each is as
confident on the other groups' images as on its own, so their label-free
combination reads little better than chance among the groups (Task A: 34.7%
over 15 classes). A handful of labels can teach that. ``Stacker`` is a
multinomial logistic regression over every teacher output side by side
(stacked generalisation, Wolpert 1992; as matrix scaling, Guo et al. 2017,
but across teachers): ``softmax(W [z_1; ...; z_K] + b)`` over the task's
classes, fitted once, before the student trains, on the teachers' logits of
the labelled training images (un-augmented), with an L2 penalty on ``W``
chosen by 5-fold cross-validation on those images alone. It is then the
student's teacher on every image, labelled or not, and its top class is the
pseudo-label of an unlabelled one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)  # the penalties the cross-validation chooses among
FOLDS = 5
MAX_ITER = 200  # L-BFGS iterations per fit


class Stacker(nn.Module):
    """``forward([z_1, ..., z_K]) -> (B, num_classes)`` logits from every teacher's raw outputs (a dustbin's
    'other' output included). ``l2`` records the penalty it was fitted with (nan: not fitted)."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.register_buffer("l2", torch.tensor(float("nan"), dtype=torch.float64))
        self.requires_grad_(False)  # fitted by ``fit``, never by the student's optimiser

    @property
    def fitted(self) -> bool:
        return not bool(torch.isnan(self.l2))

    def forward(self, teacher_logits: list[Tensor]) -> Tensor:
        x = torch.cat([z.float() for z in teacher_logits], 1)
        return self.linear(x)

    def fit(self, teacher_logits: list[Tensor], labels: Tensor, l2: float | None = None) -> dict:
        """Fit on the labelled images' teacher logits (``labels`` >= 0); ``l2`` None: chosen among
        ``L2_GRID`` by ``FOLDS``-fold cross-validated accuracy (ties: the larger penalty). Returns what was
        measured: the penalty, the cross-validated accuracy of each, the accuracy on the images fitted."""
        x = torch.cat([z.detach().float().cpu() for z in teacher_logits], 1)
        y = labels.cpu()
        keep = y >= 0
        x, y = x[keep], y[keep]
        if not len(y):
            raise ValueError("no labelled image to fit the stacker on")
        n = self.linear.out_features
        cv = {}
        if l2 is None:
            l2, cv = choose_l2(x, y, n)
        weight, bias = fit_logistic(x, y, n, l2)
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias)
            self.l2.fill_(l2)
        fit_acc = ((x @ weight.T + bias).argmax(1) == y).float().mean().item()
        return {"l2": l2, "cv_acc": cv, "fit_acc": fit_acc, "images": len(y)}


def fit_logistic(x: Tensor, y: Tensor, num_classes: int, l2: float) -> tuple[Tensor, Tensor]:
    """``argmin_{W, b} mean CE(x W^T + b, y) + l2 * ||W||^2`` by L-BFGS from zero (convex: one optimum).
    Classes absent from ``y`` keep a zero row and a bias that the fit pushes down."""
    weight = torch.zeros(num_classes, x.shape[1], requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=MAX_ITER, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return weight.detach(), bias.detach()


def choose_l2(x: Tensor, y: Tensor, num_classes: int, grid: tuple[float, ...] = L2_GRID) -> tuple[float, dict]:
    """The penalty of ``grid`` with the best ``cross_validated_accuracy`` (ties: the larger), and each one's."""
    cv = {p: cross_validated_accuracy(x, y, num_classes, p) for p in grid}
    return max(grid, key=lambda p: (round(cv[p], 6), p)), cv


def cross_validated_accuracy(x: Tensor, y: Tensor, num_classes: int, l2: float, folds: int = FOLDS) -> float:
    """Accuracy of ``fit_logistic`` on held-out folds (a fixed interleaved split; fewer folds than images are
    clipped), over all images."""
    folds = max(2, min(folds, len(y)))
    fold = torch.arange(len(y)) % folds
    right = 0
    for f in range(folds):
        test = fold == f
        if not test.any() or test.all():
            continue
        w, b = fit_logistic(x[~test], y[~test], num_classes, l2)
        right += ((x[test] @ w.T + b).argmax(1) == y[test]).sum().item()
    return right / len(y)

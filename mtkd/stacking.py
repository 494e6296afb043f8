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

With a handful of labels per class the free regression overfits them, and
can read worse than the label-free specialist combination it could have
learnt. ``--stacker_prior combination`` shrinks it toward that combination
instead of toward zero: the penalty is ``l2 * ||W - W_comb||^2``, where
``W_comb, b_comb`` (``combination_prior``) make the stacker the specialist
combination at T = 1 exactly for disjoint teachers (its logits are each
teacher's own logits centred over its classes, plus the log of its weight
and, for a teacher with a dustbin, the log of its home probability, which
the stacker then reads as one more input per such teacher). The
cross-validation chooses among penalties up to 100, where the stacker is the
combination with class biases fitted to the labels; with more labels it
moves away as far as they carry it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .teachers import home_probabilities

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)  # the penalties the cross-validation chooses among
L2_GRID_TOWARD = L2_GRID + (1.0, 10.0, 100.0)  # toward a prior: up to (almost) the prior itself
FOLDS = 5
MAX_ITER = 200  # L-BFGS iterations per fit
PRIORS = ("zero", "combination")  # --stacker_prior: what the penalty shrinks the weights toward


class Stacker(nn.Module):
    """``forward([z_1, ..., z_K]) -> (B, num_classes)`` logits from every teacher's raw outputs (a dustbin's
    'other' output included). ``l2`` records the penalty it was fitted with (nan: not fitted)."""

    def __init__(self, in_features: int, num_classes: int, home: list[bool] | None = None,
                 prior: tuple[Tensor, Tensor] | None = None):
        """``home``: per teacher, whether its log home probability (``1 - p(other)``, a dustbin's) is one more
        input; ``prior``: the weight and bias the penalty shrinks toward (None: zero)."""
        super().__init__()
        self.home = list(home or [])
        self.linear = nn.Linear(in_features + sum(self.home), num_classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.register_buffer("l2", torch.tensor(float("nan"), dtype=torch.float64))
        # Not saved: rebuilt from the teachers (``for_ensemble``), so that a checkpoint holds the fit alone.
        self.register_buffer("prior_weight", None if prior is None else prior[0].float(), persistent=False)
        self.register_buffer("prior_bias", None if prior is None else prior[1].float(), persistent=False)
        self.requires_grad_(False)  # fitted by ``fit``, never by the student's optimiser

    @classmethod
    def for_ensemble(cls, ensemble, prior: str = "zero", weights: Tensor | None = None) -> "Stacker":
        """The stacker of a ``TeacherEnsemble``'s outputs; ``prior`` ``combination``: shrunk toward its
        specialist combination with ``weights`` (default: the ensemble's)."""
        if prior not in PRIORS:
            raise ValueError(f"unknown stacker prior {prior!r}; one of {PRIORS}")
        if prior == "zero":
            return cls(sum(ensemble.output_sizes), ensemble.num_classes)
        w = ensemble.weights if weights is None else weights
        return cls(sum(ensemble.output_sizes), ensemble.num_classes, home=ensemble.dustbin,
                   prior=combination_prior([i.cpu() for i in ensemble.class_ids], ensemble.dustbin,
                                           w.detach().float().cpu(), ensemble.num_classes))

    def features(self, teacher_logits: list[Tensor]) -> Tensor:
        """The regression's inputs: every teacher's outputs side by side, then the log home probability of
        each teacher marked in ``home``."""
        zs = [z.float() for z in teacher_logits]
        if not any(self.home):
            return torch.cat(zs, 1)
        # The combination's own home probabilities (floored as it floors them), of the teachers marked.
        home = home_probabilities(zs, self.home)[:, torch.tensor(self.home)]
        return torch.cat(zs + [home.log()], 1)

    @property
    def fitted(self) -> bool:
        return not bool(torch.isnan(self.l2))

    def forward(self, teacher_logits: list[Tensor]) -> Tensor:
        return self.linear(self.features(teacher_logits))

    def fit(self, teacher_logits: list[Tensor], labels: Tensor, l2: float | None = None) -> dict:
        """Fit on the labelled images' teacher logits (``labels`` >= 0); ``l2`` None: chosen among
        ``L2_GRID`` by ``FOLDS``-fold cross-validated accuracy (ties: the larger penalty). Returns what was
        measured: the penalty, the cross-validated accuracy of each, the accuracy on the images fitted."""
        x = self.features([z.detach().cpu() for z in teacher_logits])
        y = labels.cpu()
        keep = y >= 0
        x, y = x[keep], y[keep]
        if not len(y):
            raise ValueError("no labelled image to fit the stacker on")
        n = self.linear.out_features
        prior = None if self.prior_weight is None else (self.prior_weight.cpu(), self.prior_bias.cpu())
        cv = {}
        if l2 is None:
            l2, cv = choose_l2(x, y, n, L2_GRID if prior is None else L2_GRID_TOWARD, prior)
        weight, bias = fit_logistic(x, y, n, l2, prior)
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias)
            self.l2.fill_(l2)
        fit_acc = ((x @ weight.T + bias).argmax(1) == y).float().mean().item()
        return {"l2": l2, "cv_acc": cv, "fit_acc": fit_acc, "images": len(y)}


def fit_logistic(x: Tensor, y: Tensor, num_classes: int, l2: float,
                 prior: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """``argmin_{W, b} mean CE(x W^T + b, y) + l2 * ||W - W_0||^2`` by L-BFGS from ``prior`` ``(W_0, b_0)``
    (default zero; convex: one optimum). Without a prior, classes absent from ``y`` keep a zero row and a
    bias that the fit pushes down."""
    w0 = torch.zeros(num_classes, x.shape[1]) if prior is None else prior[0].float()
    weight = w0.clone().requires_grad_(True)
    bias = (torch.zeros(num_classes) if prior is None else prior[1].float()).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=MAX_ITER, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + l2 * (weight - w0).pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return weight.detach(), bias.detach()


def choose_l2(x: Tensor, y: Tensor, num_classes: int, grid: tuple[float, ...] = L2_GRID,
              prior: tuple[Tensor, Tensor] | None = None) -> tuple[float, dict]:
    """The penalty of ``grid`` with the best ``cross_validated_accuracy`` (ties: the larger), and each one's."""
    cv = {p: cross_validated_accuracy(x, y, num_classes, p, prior=prior) for p in grid}
    return max(grid, key=lambda p: (round(cv[p], 6), p)), cv


def cross_validated_accuracy(x: Tensor, y: Tensor, num_classes: int, l2: float, folds: int = FOLDS,
                             prior: tuple[Tensor, Tensor] | None = None) -> float:
    """Accuracy of ``fit_logistic`` (toward ``prior``) on held-out folds (a fixed interleaved split; fewer
    folds than images are clipped), over all images."""
    folds = max(2, min(folds, len(y)))
    fold = torch.arange(len(y)) % folds
    right = 0
    for f in range(folds):
        test = fold == f
        if not test.any() or test.all():
            continue
        w, b = fit_logistic(x[~test], y[~test], num_classes, l2, prior)
        right += ((x[test] @ w.T + b).argmax(1) == y[test]).sum().item()
    return right / len(y)


def combination_prior(class_ids: list[Tensor], dustbin: list[bool], weights: Tensor,
                      num_classes: int) -> tuple[Tensor, Tensor]:
    """``(W, b)`` over ``Stacker.features`` (every teacher's outputs, then a log home probability per teacher
    with a dustbin) that give the specialist combination's logits at T = 1 (``losses.specialist_combination``
    with the teachers' ``weights`` times their home probabilities): exactly for teachers with disjoint
    classes, where it is class ``c``'s teacher's logit centred over its own classes plus the log of that
    teacher's weight and home probability; for shared classes, the same averaged over the teachers that cover
    ``c`` (the combination's starting point). A class no teacher covers gets bias -30."""
    sizes = [len(ids) + int(d) for ids, d in zip(class_ids, dustbin)]
    offsets = torch.tensor([0] + sizes).cumsum(0).tolist()
    home_col = {}
    for k, d in enumerate(dustbin):
        if d:
            home_col[k] = offsets[-1] + len(home_col)
    weight = torch.zeros(num_classes, offsets[-1] + len(home_col), dtype=torch.float64)
    bias = torch.zeros(num_classes, dtype=torch.float64)
    w = weights.double() / weights.sum()
    cover = torch.zeros(num_classes, dtype=torch.float64)
    for k, ids in enumerate(class_ids):
        if w[k] > 0:
            cover[ids] += w[k]
    for k, ids in enumerate(class_ids):
        if w[k] <= 0:
            continue
        own = slice(offsets[k], offsets[k] + len(ids))
        for j, c in enumerate(ids.tolist()):
            share = w[k] / cover[c]
            weight[c, own] -= share / len(ids)
            weight[c, offsets[k] + j] += share
            if k in home_col:
                weight[c, home_col[k]] += share
            bias[c] += share * w[k].log()
    bias[cover == 0] = -30.0
    return weight.float(), bias.float()

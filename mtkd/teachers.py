"""The frozen teacher ensemble: runs the specialists and maps them to global classes."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .losses import mixture_targets, specialist_combination
from .models import capturing_embedding, embedding_size, forward_with_features
from .precision import FP32, Precision
from .registry import Registry


class TeacherInput(nn.Module):
    """A teacher's own input from the student's batch: undo the task's normalisation, resize to the teacher's
    ``size`` (bilinear; antialiased when shrinking), apply the teacher's ``mean`` / ``std``.

    Crops and flips happen before, on the student's batch, so every teacher sees the same augmented view.
    """

    def __init__(self, task_mean, task_std, mean, std, size: int):
        super().__init__()
        for name, value in (("task_mean", task_mean), ("task_std", task_std), ("mean", mean), ("std", std)):
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.size = size

    def forward(self, x: Tensor) -> Tensor:
        x = x * self.task_std + self.task_mean
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                              antialias=self.size < min(x.shape[-2:]))
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:  # also the teacher cache's record of it
        return (f"size={self.size}, mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}, "
                f"task_mean={self.task_mean.flatten().tolist()}, task_std={self.task_std.flatten().tolist()}")


class OwnClasses(nn.Module):
    """A dustbin teacher's logits over its own classes: the last ("other") output dropped."""

    def forward(self, z: Tensor) -> Tensor:
        return z[:, :-1]


def home_probabilities(logits: list[Tensor], dustbin: list[bool]) -> Tensor | None:
    """``(B, K)``: each teacher's probability (T = 1) that the image is one of its own classes, ``1 - p(other)``
    for a teacher with a dustbin (floored at 1e-6), 1 for one without; None when no teacher has one."""
    if not any(dustbin):
        return None
    home = [1 - F.softmax(z.float(), dim=1)[:, -1] if d else z.new_ones(z.shape[0], dtype=torch.float32)
            for z, d in zip(logits, dustbin)]
    return torch.stack(home, 1).clamp_min(1e-6)


class TeacherEnsemble(nn.Module):
    """Specialist teachers, each over its own subset of the task's classes.

    Frozen for good: ``eval()`` mode that ``train()`` cannot undo, no
    gradients, and forward passes under ``torch.inference_mode``. Each
    teacher runs once per batch, in its own ``Precision`` (autocast dtype and
    memory layout; fp32 / NCHW until ``set_precisions``), on its own input
    (``inputs[k]``, a ``TeacherInput``; None: the student's batch as it is).

    A teacher with a ``dustbin`` (Hinton et al. 2015, section 5) has one more
    output, last: "none of my classes". ``forward`` returns every output (the
    teacher cache stores them); ``split`` turns them into the logits over the
    teachers' own classes and the per-sample probability that an image is at
    home, which multiplies the teacher's weight wherever teachers are combined.
    """

    def __init__(self, teachers: list[nn.Module], class_ids: list[list[int]],
                 weights: list[float], num_classes: int, names: list[str] | None = None,
                 inputs: list[nn.Module | None] | None = None, dustbin: list[bool] | None = None):
        super().__init__()
        if not (len(teachers) == len(class_ids) == len(weights)):
            raise ValueError("one class list and one weight per teacher")
        self.teachers = nn.ModuleList(teachers)
        self.inputs = nn.ModuleList(m if m is not None else nn.Identity() for m in (inputs or [None] * len(teachers)))
        for k, ids in enumerate(class_ids):
            self.register_buffer(f"class_ids_{k}", torch.tensor(ids, dtype=torch.long))
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32))
        self.num_classes = num_classes
        self.names = list(names) if names else [f"teacher{k}" for k in range(len(teachers))]
        self.dustbin = list(dustbin) if dustbin else [False] * len(teachers)
        self.precisions = [FP32] * len(teachers)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "TeacherEnsemble":
        # Teachers stay in eval mode (BatchNorm statistics, dropout) whatever the caller does.
        return super().train(False)

    def set_precisions(self, precisions: list[Precision]) -> "TeacherEnsemble":
        """Run teacher ``k`` in ``precisions[k]`` (its weights are put in that memory layout)."""
        if len(precisions) != len(self.teachers):
            raise ValueError("one precision per teacher")
        for teacher, precision in zip(self.teachers, precisions):
            precision.prepare_model(teacher)
        self.precisions = list(precisions)
        return self

    def teacher_model(self, k: int) -> nn.Module:
        """Teacher ``k`` as a classifier of the student's batches over its own classes (its own input
        preparation first; a dustbin's output dropped)."""
        return nn.Sequential(self.inputs[k], self.teachers[k], *([OwnClasses()] if self.dustbin[k] else []))

    @property
    def output_sizes(self) -> list[int]:
        """How many logits each teacher gives: one per class, and one more with a dustbin."""
        return [len(ids) + int(d) for ids, d in zip(self.class_ids, self.dustbin)]

    @property
    def embedding_sizes(self) -> list[int]:
        """How many pooled features each teacher's classifier reads (``outputs(..., embeddings=True)``)."""
        return [embedding_size(t, f"teacher {n}") for t, n in zip(self.teachers, self.names)]

    def split(self, logits: list[Tensor]) -> tuple[list[Tensor], Tensor | None]:
        """``forward``'s logits as the logits over each teacher's own classes and ``home_probabilities``
        (None without dustbins: the logits are returned as they are)."""
        home = home_probabilities(logits, self.dustbin)
        if home is None:
            return logits, None
        return [z[:, :-1] if d else z for z, d in zip(logits, self.dustbin)], home

    def weighted(self, logits: list[Tensor], weights: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
        """The logits over the teachers' own classes and their weights (default: the task's), ``(K,)``, or per
        sample ``(B, K)`` where a dustbin's home probability scales them."""
        own, home = self.split(logits)
        weights = self.weights if weights is None else weights
        return own, weights if home is None else weights.to(home.device) * home

    @property
    def class_ids(self) -> list[Tensor]:
        return [getattr(self, f"class_ids_{k}") for k in range(len(self.teachers))]

    def forward(self, x: Tensor, stages: list[list[int]] | None = None):
        """Each teacher's logits over its own classes (float32).

        With ``stages`` (a list of stage indices per teacher) returns
        ``(logits, features)``, features being a list per teacher.
        """
        logits, features, _ = self.outputs(x, stages)
        return logits if stages is None else (logits, features)

    def outputs(self, x: Tensor, stages: list[list[int]] | None = None, embeddings: bool = False):
        """``(logits, features, embeddings)`` (float32) in one pass of each teacher: ``features``, with
        ``stages``, a list of maps per teacher (else None); ``embeddings``, if asked, each teacher's pooled
        features, what its classifier reads (``models.capturing_embedding``; else None)."""

        def run(k: int, teacher: nn.Module, xk: Tensor):
            with capturing_embedding(teacher) if embeddings else nullcontext([]) as seen:
                z, f = (teacher(xk), None) if stages is None else forward_with_features(teacher, xk, stages[k])
            return z, f, seen[-1] if seen else None

        out = self._run(run, x)
        # Inference tensors cannot be saved for backward; clone them out of it.
        return ([z.float().clone() for z, _, _ in out],
                None if stages is None else [[f.float().clone() for f in fs] for _, fs, _ in out],
                [h.float().clone() for _, _, h in out] if embeddings else None)

    def pre_logits(self, x: Tensor) -> list[Tensor]:
        """Each teacher's pooled features, the input of its classifier (``outputs``' embeddings), float32."""
        return self.outputs(x, embeddings=True)[2]

    def _run(self, fn: Callable, x: Tensor) -> list:
        """``fn(k, teacher, input)`` for every teacher, on its own input, in its own precision."""
        out = []
        with torch.inference_mode():
            for k, (teacher, precision) in enumerate(zip(self.teachers, self.precisions)):
                xk = precision.prepare_input(self.inputs[k](x))
                with precision.autocast(x.device):
                    out.append(fn(k, teacher, xk))
        return out

    def soft_targets(self, x: Tensor, temperature: float) -> Tensor:
        """Weighted mixture of the teachers' tempered distributions (see ``mixture_targets``)."""
        own, weights = self.weighted(self(x))
        return mixture_targets(own, self.class_ids, weights, self.num_classes, temperature)

    def global_logprobs(self, x: Tensor, method: str = "combination") -> Tensor:
        """The ensemble's prediction at T = 1, as log-probabilities over global classes (see ``combine``)."""
        return self.combine(self(x), method)

    def combine(self, logits: list[Tensor], method: str = "combination", weights: Tensor | None = None) -> Tensor:
        """The teachers' ``logits`` as one prediction at T = 1, log-probabilities over global classes.

        ``combination``: ``losses.specialist_combination`` (Hinton et al. 2015,
        section 5); ``mixture``: the label-blind weighted mixture. ``weights``:
        the teachers' (default: the task's), scaled per sample by a dustbin's home probability.
        """
        own, weights = self.weighted(logits, weights)
        return ENSEMBLE_METHODS.get(method)(own, self.class_ids, weights, self.num_classes)


# The ways of reading the ensemble as one classifier: (logits, class_ids, weights, num_classes) -> log q.
ENSEMBLE_METHODS: Registry = Registry("ensemble method")
ENSEMBLE_METHODS.register("combination", specialist_combination)
ENSEMBLE_METHODS.register("mixture", lambda logits, ids, w, n: mixture_targets(logits, ids, w, n, 1.0)
                          .clamp_min(1e-12).log())


class EnsembleClassifier(nn.Module):
    """The teacher ensemble as a classifier over the task's classes (``method``: see ``global_logprobs``)."""

    def __init__(self, ensemble: TeacherEnsemble, method: str = "combination"):
        super().__init__()
        self.ensemble, self.method = ensemble, method

    def forward(self, x: Tensor) -> Tensor:
        return self.ensemble.global_logprobs(x, self.method)

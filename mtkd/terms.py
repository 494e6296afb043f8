"""The loss terms a training step is made of, and what they share.

A term (``Term``) is a small ``nn.Module`` registered in ``TERMS``: it owns
its settings and state, says what it needs (student features, teacher
logits, teacher features), may run student-side models in ``prepare`` (under
the student's precision) and returns its value in fp32 from a
``StepContext``. ``create_terms`` turns a ``KDConfig`` into the terms a
``distill.Distiller`` sums:

* ``ce``: the cross-entropy over the labelled images, weight ``1 - alpha``;
* ``kd``: the logit KD term, weight ``alpha``: an aggregation
  (``AGGREGATIONS``) of the teachers weighted per sample
  (``losses.WEIGHTINGS``), matched by a KD loss (``KD_LOSSES``: KL, or DKD
  with its warm-up);
* ``features``: feature matching through learned 1x1 adapters (FitNets);
* ``embedding``: the pooled features (what each classifier reads) matched in
  direction through learned linear adapters; cacheable with the logits;
* ``attention``: attention transfer (Zagoruyko & Komodakis);
* ``ema``: no loss of its own; an exponential moving average of the student
  joins the teachers (self-distillation), updated after every optimiser step.

Wherever a method needs a label (``consensus``'s choice of teachers,
``confidence`` weighting, DKD's target class) an unlabelled image uses its
*pseudo-label*: the class the task's teachers' specialist combination
(``losses.specialist_combination`` at T = 1, without the EMA) predicts
(``StepContext.teacher_labels``).
"""
from __future__ import annotations

from argparse import Namespace
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from torch import Tensor, nn

from . import losses
from .models import embedding_size, feature_stages, resolve_stages
from .registry import Registry
from .teachers import TeacherEnsemble

if TYPE_CHECKING:
    from .distill import Distiller


@dataclass
class KDConfig:
    """How the teachers teach; the fields mirror ``train.py``'s flags."""

    alpha: float = 0.0
    temperature: float = 1.0
    temperature_final: float | None = None  # linear schedule over the epochs when set
    epochs: int = 1
    aggregation: str = "consensus"
    stacker_prior: str = "zero"  # --aggregation stacked: what its penalty shrinks toward (stacking.PRIORS)
    weighting: str = "fixed"
    teacher_weights: list[float] | None = None  # overrides the task's weights
    kd_loss: str = "kl"
    dkd_alpha: float = 1.0
    dkd_beta: float = 8.0
    dkd_warmup: int = 0  # epochs over which the soft term ramps up linearly (DKD)
    feature_weight: float = 0.0
    feature_layers: list[str] = field(default_factory=lambda: ["-1"])
    embedding_weight: float = 0.0
    attention_weight: float = 0.0
    ema_decay: float = 0.0  # > 0: the student's EMA joins the teachers
    unlabelled: bool = False  # the training set holds unlabelled images (label -1): pseudo-labels are needed

    @classmethod
    def from_args(cls, args: Namespace) -> "KDConfig":
        """From ``train.py``'s parsed arguments (the parser holds every default)."""
        weights = args.teacher_weights
        if isinstance(weights, str):
            weights = [float(w) for w in weights.split(",")]
        return cls(alpha=args.alpha, temperature=args.temperature, temperature_final=args.temperature_final,
                   epochs=args.num_epochs, aggregation=args.aggregation, weighting=args.teacher_weighting,
                   stacker_prior=getattr(args, "stacker_prior", "zero"),
                   teacher_weights=weights, kd_loss=args.kd_loss, dkd_alpha=args.dkd_alpha, dkd_beta=args.dkd_beta,
                   dkd_warmup=args.dkd_warmup, feature_weight=args.feature_weight,
                   feature_layers=[s.strip() for s in str(args.feature_layers).split(",") if s.strip()],
                   embedding_weight=getattr(args, "embedding_weight", 0.0),
                   attention_weight=args.attention_weight, ema_decay=args.ema_teacher)

    @property
    def uses_teachers(self) -> bool:
        """Whether the teachers teach at all (alpha 0 without feature terms is training on labels only)."""
        return self.alpha > 0 or self.feature_weight > 0 or self.attention_weight > 0 or self.embedding_weight > 0


class StepContext:
    """What one step's terms read: the batch, the student's outputs, the teachers' outputs, and values computed
    on demand once and shared between terms (``teacher_labels``, ``teacher_weights``)."""

    def __init__(self, distiller: "Distiller", x: Tensor, labels: Tensor, logits: Tensor,
                 student_features: list[Tensor] | None, teacher_logits: list[Tensor] | None,
                 teacher_features: list[list[Tensor]] | None, student_embedding: Tensor | None = None,
                 teacher_embeddings: list[Tensor] | None = None):
        self.distiller, self.x, self.labels, self.logits = distiller, x, labels, logits
        self.student_features, self.teacher_features = student_features, teacher_features
        self.student_embedding, self.teacher_embeddings = student_embedding, teacher_embeddings
        ensemble = distiller.ensemble
        self.raw_teacher_logits = teacher_logits  # every output of the task's teachers, fp32 (None: none run)
        # Over each teacher's own classes, and (teachers with a dustbin) the probability that an image is theirs.
        self.teacher_logits, self.home = (ensemble.split(teacher_logits) if teacher_logits is not None
                                          else (None, None))
        self.names = list(ensemble.names) if ensemble is not None else []
        self.class_ids = list(ensemble.class_ids) if ensemble is not None else []
        self.fixed = distiller.fixed_weights
        self.extra: list[tuple[str, Tensor, Tensor]] = []  # teachers that terms add (name, logits, class ids)
        self._labels = self._weights = None

    @property
    def epoch(self) -> int:
        return self.distiller.epoch

    def add_teacher(self, name: str, logits: Tensor, class_ids: Tensor) -> None:
        """One more teacher for the soft losses (the EMA of the student); its fixed weight is the mean of the
        task's teachers'."""
        self.extra.append((name, logits, class_ids))

    def all_teachers(self) -> tuple[list[str], list[Tensor], list[Tensor], Tensor]:
        """Names, logits, class ids and normalised fixed weights of the task's teachers and those terms added."""
        fixed = self.fixed
        for _ in self.extra:
            fixed = torch.cat([fixed, fixed.mean().view(1)])
            fixed = fixed / fixed.sum()
        return (self.names + [e[0] for e in self.extra], self.teacher_logits + [e[1] for e in self.extra],
                self.class_ids + [e[2] for e in self.extra], fixed)

    def teacher_labels(self) -> Tensor:
        """The labels where a method needs one: an unlabelled image's is its pseudo-label (the task's teachers'
        specialist combination at T = 1)."""
        if self._labels is None:
            y = self.labels
            if self.distiller.config.unlabelled:
                pseudo = self.distiller.pseudo_labels(self.raw_teacher_logits)
                y = torch.where(y >= 0, y, pseudo)
            self._labels = y
        return self._labels

    def teacher_weights(self) -> Tensor:
        """``(B, K)`` per-sample weights of every teacher (``losses.teacher_weights``), each row over the teachers
        eligible for the sample (for a label-aware aggregation, those that cover its label); a teacher with a
        dustbin's weight scaled by its probability that the image is one of its own, the row renormalised."""
        if self._weights is None:
            c = self.distiller.config
            _, logits, class_ids, fixed = self.all_teachers()
            label_aware = AGGREGATIONS.get(c.aggregation).label_aware
            needs = label_aware or c.weighting == "confidence"
            y = self.teacher_labels() if needs else self.labels
            if label_aware:
                eligible = losses.coverage(class_ids, y)
            else:
                eligible = torch.ones(len(y), len(class_ids), dtype=torch.bool, device=y.device)
            w = losses.teacher_weights(c.weighting, logits, class_ids, y, fixed.to(y.device), eligible)
            if self.home is not None:
                home = torch.cat([self.home, self.home.new_ones(len(y), len(self.extra))], 1)
                w = w * home
                w = w / w.sum(1, keepdim=True).clamp_min(1e-12)
            self._weights = w
        return self._weights

    def task_teacher_weights(self) -> Tensor:
        """``teacher_weights`` of the task's teachers only (not those terms added), each row renormalised over
        them: the weights of the terms that match the task's teachers' features."""
        w = self.teacher_weights()[:, :len(self.names)]
        return w / w.sum(1, keepdim=True).clamp_min(1e-12)


# ---- KD losses (--kd_loss): how a student is matched to a soft target ----

@dataclass(frozen=True)
class KDLoss:
    """``loss(logits, q, labels, T, config) -> scalar``; ``per_sample(logits_k, p_k, t_k, T, config) -> (B,)``,
    the loss per sample against one teacher over its own classes (``amalgamate``; ``t_k``: the label's position
    among them, -1 where it is not one; None: ``T^2 * KL``); ``uses_label``: needs each sample's class;
    ``warmup``: its term ramps up linearly over ``config.dkd_warmup`` epochs."""

    loss: Callable
    per_sample: Callable | None = None
    uses_label: bool = False
    warmup: bool = False


KD_LOSSES: Registry[KDLoss] = Registry("KD loss")
KD_LOSSES.register("kl", KDLoss(lambda logits, q, labels, T, c: losses.kd_kl_loss(logits, q, T)))
KD_LOSSES.register("shift", KDLoss(
    lambda logits, q, labels, T, c: losses.kd_kl_loss(logits, losses.shift_to_label(q, labels), T),
    per_sample=lambda logits, q, local, T, c: losses.kl_per_sample(logits, losses.shift_to_label(q, local), T),
    uses_label=True))
KD_LOSSES.register("dkd", KDLoss(
    lambda logits, q, labels, T, c: losses.dkd_per_sample(logits, q, labels, c.dkd_alpha, c.dkd_beta, T).mean(),
    per_sample=lambda logits, q, local, T, c: losses.dkd_per_sample(logits, q, local, c.dkd_alpha, c.dkd_beta, T),
    uses_label=True, warmup=True))


# ---- aggregations (--aggregation): how teachers with different class sets make one soft loss ----

@dataclass(frozen=True)
class Aggregation:
    """``soft(ctx, w, T) -> scalar``: the soft loss of the step's teachers under per-sample weights ``w``;
    ``label_aware``: only the teachers whose classes contain the label take part; ``weighted``: False where
    the aggregation weighs the teachers itself (``w`` is None, ``--teacher_weighting`` plays no part)."""

    soft: Callable
    label_aware: bool = False
    weighted: bool = True


def _through_targets(targets: Callable, uses_label: bool = False) -> Callable:
    """An aggregation that builds one soft target over all classes, matched by the run's KD loss.
    ``targets(teacher_logits, class_ids, w, labels, num_classes, T)``."""

    def soft(ctx: StepContext, w: Tensor, T: float) -> Tensor:
        c = ctx.distiller.config
        kd = KD_LOSSES.get(c.kd_loss)
        _, logits, class_ids, _ = ctx.all_teachers()
        labels = ctx.teacher_labels() if uses_label or kd.uses_label else ctx.labels
        q = targets(logits, class_ids, w, labels, ctx.logits.shape[1], T)
        return kd.loss(ctx.logits, q, labels, T, c)

    return soft


def _amalgamate(ctx: StepContext, w: Tensor, T: float) -> Tensor:
    c = ctx.distiller.config
    kd = KD_LOSSES.get(c.kd_loss)
    _, logits, class_ids, _ = ctx.all_teachers()
    per_sample = None if kd.per_sample is None else (lambda s, p, t: kd.per_sample(s, p, t, T, c))
    labels = ctx.teacher_labels() if kd.uses_label else ctx.labels
    return losses.amalgamation_loss(ctx.logits, logits, class_ids, w, T, labels, per_sample)


AGGREGATIONS: Registry[Aggregation] = Registry("aggregation")
AGGREGATIONS.register("mixture", Aggregation(_through_targets(
    lambda z, ids, w, labels, n, T: losses.mixture_targets(z, ids, w, n, T))))
AGGREGATIONS.register("consensus", Aggregation(_through_targets(losses.consensus_targets, uses_label=True),
                                               label_aware=True))
AGGREGATIONS.register("amalgamate", Aggregation(_amalgamate))
# Hinton et al. 2015, section 5: the one distribution that agrees best with every specialist; label-free.
AGGREGATIONS.register("combination", Aggregation(_through_targets(
    lambda z, ids, w, labels, n, T: losses.specialist_combination(z, ids, w, n, T).exp())))


def _stacked(ctx: StepContext, w: None, T: float) -> Tensor:
    """The task's teachers through the stacker the few labels fitted (``stacking``): its own weighting of
    the teachers replaces ``w``; label-free (an unlabelled image's pseudo-label is the stacker's class)."""
    c = ctx.distiller.config
    kd = KD_LOSSES.get(c.kd_loss)
    q = F.softmax(ctx.distiller.stacker(ctx.raw_teacher_logits) / T, dim=1)
    labels = ctx.teacher_labels() if kd.uses_label else ctx.labels
    return kd.loss(ctx.logits, q, labels, T, c)


# A few labels calibrate the teachers into one classifier (``stacking.Stacker``), fitted before training.
AGGREGATIONS.register("stacked", Aggregation(_stacked, weighted=False))


# ---- loss terms ----

class Term(nn.Module):
    """One part of the step. ``prepare(ctx)`` runs under the caller's precision (models that belong to the
    student side: adapters, the EMA copy); ``forward(ctx) -> {name: value}`` runs in fp32 and returns the term's
    scalar ``value`` under ``name`` (the logged part), any other parts to log, and optionally ``counts``
    (over how many images a part is a mean, where not the batch). ``weight`` multiplies ``value`` in the
    loss; ``None``: the term adds no loss of its own. ``student_stages`` / ``teacher_stages``: the feature
    maps it needs; ``embeddings``: it needs the pooled features of the student and of every teacher."""

    name: str = ""
    student_stages: list[int] | None = None  # student features this term needs (None: none)
    teacher_stages: list[list[int]] | None = None  # each teacher's features it needs
    embeddings: bool = False

    def weight(self, epoch: int) -> float | None:
        return None

    def prepare(self, ctx: StepContext) -> None:
        pass

    def after_optimizer_step(self, student: nn.Module) -> None:
        pass


TERMS: Registry[Callable[..., Term]] = Registry("loss term")


@TERMS.register("ce")
class LabelledCE(Term):
    """``losses.labelled_cross_entropy``: the mean over the batch's labelled images (logged as a mean over
    the epoch's labelled images)."""

    name = "loss_hard"

    def __init__(self, weight: float):
        super().__init__()
        self.w = weight

    def weight(self, epoch: int) -> float:
        return self.w

    def forward(self, ctx: StepContext) -> dict[str, Tensor]:
        return {"loss_hard": losses.labelled_cross_entropy(ctx.logits, ctx.labels),
                "counts": {"loss_hard": (ctx.labels >= 0).sum()}}


@TERMS.register("kd")
class LogitKD(Term):
    """The soft loss: ``AGGREGATIONS[aggregation]`` of the teachers under their per-sample weights, at the
    temperature of the epoch (``--temperature`` to ``--temperature_final``), matched by ``KD_LOSSES[kd_loss]``
    (whose warm-up, for DKD, ramps the weight ``alpha`` up over ``dkd_warmup`` epochs)."""

    name = "loss_soft"
    def __init__(self, config: KDConfig):
        super().__init__()
        self.config = config
        self.aggregation = AGGREGATIONS.get(config.aggregation)
        self.kd = KD_LOSSES.get(config.kd_loss)

    def temperature(self, epoch: int) -> float:
        c = self.config
        if c.temperature_final is None or c.epochs <= 1:
            return c.temperature
        frac = min(max((epoch - 1) / (c.epochs - 1), 0.0), 1.0)
        return c.temperature + frac * (c.temperature_final - c.temperature)

    def weight(self, epoch: int) -> float:
        c = self.config
        ramp = min(epoch / c.dkd_warmup, 1.0) if self.kd.warmup and c.dkd_warmup > 0 else 1.0
        return c.alpha * ramp

    def forward(self, ctx: StepContext) -> dict[str, Tensor]:
        T = self.temperature(ctx.epoch)
        w = ctx.teacher_weights() if self.aggregation.weighted else None
        out = {"loss_soft": self.aggregation.soft(ctx, w, T), "temperature": torch.tensor(T)}
        if w is not None:  # the weights used, per teacher
            names, *_ = ctx.all_teachers()
            for name, mean in zip(names, w.detach().mean(0)):
                out[f"weight_{name}"] = mean
        return out


class StageTerm(Term):
    """A term on the feature maps of the student and of each teacher at ``--feature_layers``, with a fixed
    weight."""

    def __init__(self, student: nn.Module, ensemble: TeacherEnsemble, layers: list[str], weight: float):
        super().__init__()
        self.w = weight
        self.student_stages = resolve_stages(student, layers, "student")
        self.teacher_stages = [resolve_stages(t, layers, f"teacher {n}")
                               for t, n in zip(ensemble.teachers, ensemble.names)]

    def weight(self, epoch: int) -> float:
        return self.w


@TERMS.register("features")
class FeatureMatch(StageTerm):
    """FitNets (Romero et al., 2015): each chosen student stage through a 1x1 conv adapter per (teacher,
    stage) against the teacher's map (resized to the student's), weighted by the task's teachers' per-sample
    weights (``losses.feature_loss``)."""

    name = "loss_feat"

    def __init__(self, student: nn.Module, ensemble: TeacherEnsemble, layers: list[str], weight: float):
        super().__init__(student, ensemble, layers, weight)
        s_chs = [feature_stages(student)[i]["num_chs"] for i in self.student_stages]
        adapters = []
        for teacher, stages in zip(ensemble.teachers, self.teacher_stages):
            t_chs = [feature_stages(teacher)[i]["num_chs"] for i in stages]
            adapters.append(nn.ModuleList(nn.Conv2d(c_in, c_out, 1, bias=False) for c_in, c_out in zip(s_chs, t_chs)))
        self.adapters = nn.ModuleList(adapters)
        self.adapted = None

    def prepare(self, ctx: StepContext) -> None:
        # The adapters are the student's: they run in its precision.
        self.adapted = [[a(f) for a, f in zip(adapters, ctx.student_features)] for adapters in self.adapters]

    def forward(self, ctx: StepContext) -> dict[str, Tensor]:
        wf = ctx.task_teacher_weights()
        adapted, self.adapted = self.adapted, None
        # The teacher's map is resized to the student's: it has no gradient, so no resampling kernel
        # (non-deterministic backward on CUDA) enters the backward pass.
        resized = [[_match_size(ft, fs) for ft, fs in zip(tf, fa)] for tf, fa in zip(ctx.teacher_features, adapted)]
        return {"loss_feat": losses.feature_loss([[f.float() for f in fa] for fa in adapted], resized, wf)}


@TERMS.register("embedding")
class EmbeddingMatch(Term):
    """The student's pooled features (what its classifier reads) through a linear adapter per teacher, matched
    in direction to that teacher's own (``losses.embedding_loss``: ``2 - 2 cos``), weighted by the task's
    teachers' per-sample weights. The specialists' features describe every image, their classes or not: on an
    image without a label (a transfer set) this term carries far more than their few logits."""

    name = "loss_embed"
    embeddings = True

    def __init__(self, student: nn.Module, ensemble: TeacherEnsemble, weight: float):
        super().__init__()
        self.w = weight
        d_student = embedding_size(student, "student")
        self.adapters = nn.ModuleList(nn.Linear(d_student, d, bias=False) for d in ensemble.embedding_sizes)
        self.adapted = None

    def weight(self, epoch: int) -> float:
        return self.w

    def prepare(self, ctx: StepContext) -> None:
        # The adapters are the student's: they run in its precision.
        self.adapted = [a(ctx.student_embedding) for a in self.adapters]

    def forward(self, ctx: StepContext) -> dict[str, Tensor]:
        adapted, self.adapted = self.adapted, None
        return {"loss_embed": losses.embedding_loss(adapted, ctx.teacher_embeddings, ctx.task_teacher_weights())}


@TERMS.register("attention")
class AttentionTransfer(StageTerm):
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017): the student's spatial attention at each chosen
    stage against each teacher's (``losses.attention_loss``; the teacher's map resized to the student's),
    weighted by the task's teachers' per-sample weights. No adapter: channel counts need not match."""

    name = "loss_attention"

    def forward(self, ctx: StepContext) -> dict[str, Tensor]:
        student = [losses.attention_map(f) for f in ctx.student_features]
        teachers = [[_match_size(losses.attention_map(ft), a_s) for ft, a_s in zip(tf, student)]
                    for tf in ctx.teacher_features]
        return {"loss_attention": losses.attention_loss(student, teachers, ctx.task_teacher_weights())}


@TERMS.register("ema")
class EMATeacher(Term):
    """Self-distillation: a frozen exponential moving average of the student (timm's ``ModelEmaV3``) joins the
    teachers over all classes, updated after every optimiser step. No loss of its own."""

    name = "ema"
    def __init__(self, student: nn.Module, decay: float):
        super().__init__()
        self.ema = ModelEmaV3(student, decay=decay)
        self.ema.requires_grad_(False)

    def train(self, mode: bool = True) -> "EMATeacher":
        super().train(mode)
        self.ema.eval()
        return self

    def prepare(self, ctx: StepContext) -> None:
        with torch.inference_mode():
            logits = self.ema.module(ctx.x).float().clone()
        ctx.add_teacher("ema", logits, torch.arange(logits.shape[1], device=logits.device))

    def forward(self, ctx: StepContext) -> dict[str, Tensor]:
        return {}

    def after_optimizer_step(self, student: nn.Module) -> None:
        self.ema.update(student)


def create_terms(config: KDConfig, student: nn.Module, ensemble: TeacherEnsemble | None) -> dict[str, Term]:
    """The terms a configuration names (``TERMS`` names: instances), in the order they are computed and summed
    (the order the step had before it was made of terms, so that its gradients are the same to the last bit)."""
    if ensemble is None or not config.uses_teachers:
        return {"ce": TERMS.get("ce")(1.0)}
    terms = {}
    if config.ema_decay > 0:
        terms["ema"] = TERMS.get("ema")(student, config.ema_decay)
    terms["kd"] = TERMS.get("kd")(config)
    terms["ce"] = TERMS.get("ce")(1.0 - config.alpha)
    if config.feature_weight > 0:
        terms["features"] = TERMS.get("features")(student, ensemble, config.feature_layers, config.feature_weight)
    if config.attention_weight > 0:
        terms["attention"] = TERMS.get("attention")(student, ensemble, config.feature_layers, config.attention_weight)
    if config.embedding_weight > 0:
        terms["embedding"] = TERMS.get("embedding")(student, ensemble, config.embedding_weight)
    return terms



def _match_size(f: Tensor, target: Tensor) -> Tensor:
    """Resize a (teacher's) feature map to ``target``'s spatial size (average-pool down, bilinear up)."""
    if f.shape[-2:] == target.shape[-2:]:
        return f
    if f.shape[-2] >= target.shape[-2] and f.shape[-1] >= target.shape[-1]:
        return F.adaptive_avg_pool2d(f, target.shape[-2:])
    return F.interpolate(f, size=target.shape[-2:], mode="bilinear", align_corners=False)

"""The training step as it was before it was made of loss terms: ``mtkd/distill.py`` at the commit that added
this file, kept unchanged (imports made absolute) as the reference of ``test_distill_terms.py``. The step
built of terms must give the same loss and gradients, to the last bit, for every method combination."""
from __future__ import annotations

from argparse import Namespace
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from torch import Tensor, nn

from mtkd import losses
from mtkd.models import feature_stages, forward_with_features, resolve_stages
from mtkd.precision import FP32
from mtkd.teachers import TeacherEnsemble


def _kl_term(logits: Tensor, q: Tensor, labels: Tensor, T: float, config: "KDConfig") -> Tensor:
    return losses.kd_kl_loss(logits, q, T)


def _dkd_term(logits: Tensor, q: Tensor, labels: Tensor, T: float, config: "KDConfig") -> Tensor:
    return losses.dkd_per_sample(logits, q, labels, config.dkd_alpha, config.dkd_beta, T).mean()


@dataclass(frozen=True)
class KDTerm:
    """How a student is matched to one soft target: ``loss(logits, q, labels, T, config) -> scalar``."""

    loss: Callable
    warmup: bool = False  # the soft term ramps up over config.dkd_warmup epochs
    per_teacher_dkd: bool = False  # amalgamate applies DKD per teacher over its classes
    uses_label: bool = False  # needs each sample's class (a pseudo-label for an unlabelled one)


# --kd_loss: adding a term is adding an entry.
KD_TERMS = {"kl": KDTerm(_kl_term),
            "dkd": KDTerm(_dkd_term, warmup=True, per_teacher_dkd=True, uses_label=True)}
KD_LOSSES = tuple(KD_TERMS)


def _through_targets(targets: Callable) -> Callable:
    """An aggregation that builds one soft target over all classes, matched by the run's KD term."""

    def soft(logits, teacher_logits, class_ids, w, T, labels, config):
        q = targets(teacher_logits, class_ids, w, labels, logits.shape[1], T)
        return KD_TERMS[config.kd_loss].loss(logits, q, labels, T, config)

    return soft


def _amalgamate(logits, teacher_logits, class_ids, w, T, labels, config):
    dkd = (config.dkd_alpha, config.dkd_beta) if KD_TERMS[config.kd_loss].per_teacher_dkd else None
    # (amalgamation_loss now takes the per-sample loss itself; the same DKD call as before.)
    per_sample = None if dkd is None else (lambda s, p, t: losses.dkd_per_sample(s, p, t, *dkd, T))
    return losses.amalgamation_loss(logits, teacher_logits, class_ids, w, T, labels, per_sample)


@dataclass(frozen=True)
class Aggregation:
    """How teachers with different class sets combine into one soft loss (see ``losses``).

    ``soft(logits, teacher_logits, class_ids, weights, T, labels, config) -> scalar``;
    ``label_aware``: only the teachers whose classes contain the label take part.
    """

    soft: Callable
    label_aware: bool = False


# --aggregation: adding a method is adding an entry.
AGGREGATION_METHODS = {
    "mixture": Aggregation(_through_targets(
        lambda z, ids, w, labels, n, T: losses.mixture_targets(z, ids, w, n, T))),
    "consensus": Aggregation(_through_targets(losses.consensus_targets), label_aware=True),
    "amalgamate": Aggregation(_amalgamate),
    # Hinton et al. 2015, section 5: the one distribution that agrees best with every specialist; label-free.
    "combination": Aggregation(_through_targets(
        lambda z, ids, w, labels, n, T: losses.specialist_combination(z, ids, w, n, T).exp())),
}
AGGREGATIONS = tuple(AGGREGATION_METHODS)


@dataclass
class KDConfig:
    """How the teachers teach; the fields mirror ``train.py``'s flags."""

    alpha: float = 0.0
    temperature: float = 1.0
    temperature_final: float | None = None  # linear schedule over the epochs when set
    epochs: int = 1
    aggregation: str = "consensus"
    weighting: str = "fixed"
    teacher_weights: list[float] | None = None  # overrides the task's weights
    kd_loss: str = "kl"
    dkd_alpha: float = 1.0
    dkd_beta: float = 8.0
    dkd_warmup: int = 0  # epochs over which the soft term ramps up linearly (DKD)
    feature_weight: float = 0.0
    feature_layers: list[str] = field(default_factory=lambda: ["-1"])
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
                   teacher_weights=weights, kd_loss=args.kd_loss, dkd_alpha=args.dkd_alpha, dkd_beta=args.dkd_beta,
                   dkd_warmup=args.dkd_warmup, feature_weight=args.feature_weight,
                   feature_layers=[s.strip() for s in str(args.feature_layers).split(",") if s.strip()],
                   ema_decay=args.ema_teacher)


class Distiller(nn.Module):
    """A student trained on labels and, with weight ``alpha``, on the teachers.

    With no ensemble (or ``alpha = 0`` and no feature matching) this is plain
    supervised training, and the teachers are never run. ``forward`` accepts
    precomputed ``teacher_logits`` (the teacher-output cache); otherwise it
    runs the ensemble on the batch.
    """

    def __init__(self, student: nn.Module, ensemble: TeacherEnsemble | None = None,
                 config: KDConfig | None = None, compile: bool = False):
        super().__init__()
        self.student = student
        # torch.compile'd forward of the same student (same parameters); kept out of the module tree so
        # that state_dict keys stay the student's own.
        self.__dict__["student_forward"] = torch.compile(student) if compile else student
        self.config = config = config or KDConfig()
        uses_teachers = ensemble is not None and (config.alpha > 0 or config.feature_weight > 0)
        self.ensemble = ensemble if uses_teachers else None
        self.epoch = 1
        if self.ensemble is None:
            return
        if config.aggregation not in AGGREGATION_METHODS:
            raise ValueError(f"unknown aggregation {config.aggregation!r}")
        if config.kd_loss not in KD_TERMS:
            raise ValueError(f"unknown KD loss {config.kd_loss!r}")
        fixed = config.teacher_weights or self.ensemble.weights.tolist()
        if len(fixed) != len(self.ensemble.teachers):
            raise ValueError(f"{len(fixed)} teacher weights for {len(self.ensemble.teachers)} teachers")
        self.register_buffer("fixed_weights", torch.tensor(fixed, dtype=torch.float32) / sum(fixed),
                             persistent=False)
        self.adapters = None
        if config.feature_weight > 0:
            self._build_adapters()
        self.ema = None
        if config.ema_decay > 0:
            # A frozen copy of the student, updated after every optimiser step (after_optimizer_step).
            self.ema = ModelEmaV3(student, decay=config.ema_decay)
            self.ema.requires_grad_(False)

    def _build_adapters(self) -> None:
        """One 1x1 conv per (teacher, stage) from the student's channels to the teacher's."""
        layers = self.config.feature_layers
        self.student_stages = resolve_stages(self.student, layers, "student")
        self.teacher_stages = [resolve_stages(t, layers, f"teacher {n}")
                               for t, n in zip(self.ensemble.teachers, self.ensemble.names)]
        s_chs = [feature_stages(self.student)[i]["num_chs"] for i in self.student_stages]
        adapters = []
        for teacher, stages in zip(self.ensemble.teachers, self.teacher_stages):
            t_chs = [feature_stages(teacher)[i]["num_chs"] for i in stages]
            adapters.append(nn.ModuleList(nn.Conv2d(c_in, c_out, 1, bias=False) for c_in, c_out in zip(s_chs, t_chs)))
        self.adapters = nn.ModuleList(adapters)

    def after_optimizer_step(self) -> None:
        """Called by the training loop after every optimiser step (not every micro-batch): the EMA follows
        the weights that step produced, as in timm's training script."""
        if getattr(self, "ema", None) is not None:
            self.ema.update(self.student)

    def pseudo_labels(self, teacher_logits: list[Tensor]) -> Tensor:
        """The class the task's teachers' specialist combination predicts (T = 1), per sample."""
        k = len(self.ensemble.teachers)  # the EMA teacher, appended later, takes no part
        return self.ensemble.combine(teacher_logits[:k], "combination", self.fixed_weights).argmax(1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def temperature(self) -> float:
        """``--temperature`` at epoch 1, linearly to ``--temperature_final`` at the last epoch."""
        c = self.config
        if c.temperature_final is None or c.epochs <= 1:
            return c.temperature
        frac = min(max((self.epoch - 1) / (c.epochs - 1), 0.0), 1.0)
        return c.temperature + frac * (c.temperature_final - c.temperature)

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        if getattr(self, "ema", None) is not None:
            self.ema.eval()
        return self

    def forward(self, x: Tensor, y: Tensor, teacher_logits: list[Tensor] | None = None) -> dict[str, Tensor]:
        """The student (and its feature adapters, and the EMA copy) run in the caller's precision, each teacher
        in its own; soft targets and every loss are computed in fp32 from the logits, whatever the student's
        precision (as timm and torchdistill do)."""
        if self.ensemble is None:
            logits = self.student_forward(x)
            with FP32.autocast(x.device):
                hard = losses.labelled_cross_entropy(logits.float(), y)
            return {"loss": hard, "loss_hard": hard.detach(), "loss_soft": hard.new_zeros(()), "logits": logits,
                    "counts": {"loss_hard": (y >= 0).sum()}}

        adapted = t_feats = None
        if self.adapters is not None:
            logits, s_feats = forward_with_features(self.student, x, self.student_stages)
            adapted = [[a(f) for a, f in zip(adapters, s_feats)] for adapters in self.adapters]
        else:
            logits = self.student_forward(x)
        if teacher_logits is None and adapted is not None:
            teacher_logits, t_feats = self.ensemble(x, self.teacher_stages)
        elif teacher_logits is None:
            teacher_logits = self.ensemble(x)
        elif adapted is not None:
            _, t_feats = self.ensemble(x, self.teacher_stages)
        ema_logits = None
        if self.ema is not None:
            with torch.inference_mode():
                ema_logits = self.ema.module(x).float().clone()
        with FP32.autocast(x.device):
            return self._losses(logits.float(), y, [z.float() for z in teacher_logits], ema_logits, adapted, t_feats)

    def _losses(self, logits: Tensor, y: Tensor, teacher_logits: list[Tensor], ema_logits: Tensor | None,
                adapted, t_feats) -> dict[str, Tensor]:
        c = self.config
        class_ids = list(self.ensemble.class_ids)
        fixed = self.fixed_weights
        method = AGGREGATION_METHODS[c.aggregation]
        y_teach = y
        if c.unlabelled and (method.label_aware or c.weighting == "confidence" or KD_TERMS[c.kd_loss].uses_label):
            y_teach = torch.where(y >= 0, y, self.pseudo_labels(teacher_logits))
        if ema_logits is not None:
            teacher_logits = teacher_logits + [ema_logits]
            class_ids.append(torch.arange(logits.shape[1], device=logits.device))
            fixed = torch.cat([fixed, fixed.mean().view(1)])
            fixed = fixed / fixed.sum()

        T = self.temperature()
        if method.label_aware:
            eligible = losses.coverage(class_ids, y_teach)
        else:
            eligible = torch.ones(len(y), len(class_ids), dtype=torch.bool, device=y.device)
        w = losses.teacher_weights(c.weighting, teacher_logits, class_ids, y_teach, fixed.to(y.device), eligible)
        soft = method.soft(logits, teacher_logits, class_ids, w, T, y_teach, c)
        warmup = KD_TERMS[c.kd_loss].warmup and c.dkd_warmup > 0
        ramp = min(self.epoch / c.dkd_warmup, 1.0) if warmup else 1.0
        hard = losses.labelled_cross_entropy(logits, y)
        loss = (1.0 - c.alpha) * hard + c.alpha * ramp * soft
        out = {"loss_hard": hard.detach(), "loss_soft": soft.detach(), "logits": logits,
               "temperature": torch.tensor(T), "counts": {"loss_hard": (y >= 0).sum()}}  # a mean over the labelled
        if adapted is not None:
            k = len(self.ensemble.teachers)
            wf = w[:, :k] / w[:, :k].sum(1, keepdim=True).clamp_min(1e-12)
            # The teacher's map is resized to the student's: it has no gradient, so no resampling kernel
            # (non-deterministic backward on CUDA) enters the backward pass.
            resized = [[_match_size(ft, fs) for ft, fs in zip(tf, fa)] for tf, fa in zip(t_feats, adapted)]
            feat = losses.feature_loss([[f.float() for f in fa] for fa in adapted], resized, wf)
            loss = loss + c.feature_weight * feat
            out["loss_feat"] = feat.detach()
        out["loss"] = loss
        names = self.ensemble.names + (["ema"] if ema_logits is not None else [])
        for name, mean in zip(names, w.detach().mean(0)):
            out[f"weight_{name}"] = mean
        return out


def _match_size(f: Tensor, target: Tensor) -> Tensor:
    """Resize a (teacher's) feature map to ``target``'s spatial size (average-pool down, bilinear up)."""
    if f.shape[-2:] == target.shape[-2:]:
        return f
    if f.shape[-2] >= target.shape[-2] and f.shape[-1] >= target.shape[-1]:
        return F.adaptive_avg_pool2d(f, target.shape[-2:])
    return F.interpolate(f, size=target.shape[-2:], mode="bilinear", align_corners=False)

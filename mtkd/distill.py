"""The training step as a module: ``forward(x, y) -> {'loss', 'logits', parts}``, a weighted sum of loss terms.

``Distiller`` runs the student once (with the features some term needs), the
teachers once (or reads their cached logits), and sums the terms its
``KDConfig`` names (``terms.create_terms``: the labelled cross-entropy, the
logit KD term, feature matching, attention transfer, the EMA teacher), each
``weight * value``. The student and the terms' student-side models run in the
caller's precision, each teacher in its own; the losses in fp32. Adding a
term is one class and one ``terms.TERMS`` entry: this module does not change.

Images without a label (``y = -1``, ``--label_fraction`` / a task's
unlabelled folder) get the soft losses only; the cross-entropy never sees
them, and a method that needs their label uses a pseudo-label (see ``terms``).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor, nn

from .models import capturing_embedding, forward_with_features
from .precision import FP32
from .stacking import Stacker
from .teachers import TeacherEnsemble
from .terms import KDConfig, StepContext, Term, create_terms

# Where the state of the terms lived in checkpoints written before the step was made of terms.
_OLD_PREFIXES = {"adapters.": "terms.features.adapters.", "ema.": "terms.ema.ema."}


class Distiller(nn.Module):
    """A student trained on the sum of its loss terms (``create_terms``).

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
        self.ensemble = ensemble if ensemble is not None and config.uses_teachers else None
        self.epoch = 1
        fixed = torch.empty(0)  # the teachers' fixed weights, normalised (none without teachers)
        if self.ensemble is not None:
            weights = config.teacher_weights or self.ensemble.weights.tolist()
            if len(weights) != len(self.ensemble.teachers):
                raise ValueError(f"{len(weights)} teacher weights for {len(self.ensemble.teachers)} teachers")
            fixed = torch.tensor(weights, dtype=torch.float32) / sum(weights)
        self.register_buffer("fixed_weights", fixed, persistent=False)
        self.terms = nn.ModuleDict(create_terms(config, student, self.ensemble))
        # --aggregation stacked: the teachers calibrated by the labels (fitted by the trainer before training).
        self.stacker = (Stacker.for_ensemble(self.ensemble, config.stacker_prior, fixed)
                        if self.ensemble is not None and config.aggregation == "stacked" else None)

    def term(self, name: str) -> Term | None:
        """This step's term registered as ``name`` (``TERMS``), or None."""
        return self.terms[name] if name in self.terms else None

    def extra_state(self) -> dict:
        """What the step trains or tracks besides the student (feature adapters, the EMA, the stacker): for
        checkpoints."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(("terms.", "stacker."))}

    def load_extra_state(self, state: dict) -> None:
        """Restore ``extra_state`` (also from checkpoints written before the step was made of terms)."""
        state = {next((new + k[len(old):] for old, new in _OLD_PREFIXES.items() if k.startswith(old)), k): v
                 for k, v in state.items()}
        self.load_state_dict(state, strict=False)

    def after_optimizer_step(self) -> None:
        """Called by the training loop after every optimiser step (not every micro-batch): state that follows
        the weights (the EMA) follows the weights that step produced, as in timm's training script."""
        for term in self.terms.values():
            term.after_optimizer_step(self.student)

    def pseudo_labels(self, teacher_logits: list[Tensor]) -> Tensor:
        """The class the task's teachers predict, per sample: through the stacker when the run fitted one
        (``--aggregation stacked``), else their specialist combination (T = 1)."""
        if self.stacker is not None:
            return self.stacker(teacher_logits).argmax(1)
        return self.ensemble.combine(teacher_logits, "combination", self.fixed_weights).argmax(1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def forward(self, x: Tensor, y: Tensor, teacher_logits: list[Tensor] | None = None,
                teacher_embeddings: list[Tensor] | None = None) -> dict[str, Tensor]:
        """The student (and the terms' student-side models) run in the caller's precision, each teacher in its
        own; soft targets and every loss are computed in fp32 from the logits, whatever the student's precision
        (as timm and torchdistill do). ``teacher_logits`` / ``teacher_embeddings``: the cache's, where it keeps
        them; whatever a term needs and is not given comes from one pass of the teachers."""
        terms = list(self.terms.values())
        s_stages = next((t.student_stages for t in terms if t.student_stages is not None), None)
        t_stages = next((t.teacher_stages for t in terms if t.teacher_stages is not None), None)
        embed = any(t.embeddings for t in terms)
        with capturing_embedding(self.student) if embed else nullcontext([]) as seen:
            if s_stages is not None:
                logits, s_feats = forward_with_features(self.student, x, s_stages)
            else:  # a hook on the classifier needs the module itself, not its compiled forward
                logits, s_feats = (self.student if embed else self.student_forward)(x), None
        t_feats = None
        if self.ensemble is not None:
            need_logits = teacher_logits is None
            need_embed = embed and teacher_embeddings is None
            if need_logits or t_stages is not None or need_embed:
                z, t_feats, h = self.ensemble.outputs(x, t_stages, need_embed)
                teacher_logits = z if need_logits else teacher_logits
                teacher_embeddings = h if need_embed else teacher_embeddings
            teacher_logits = [z.float() for z in teacher_logits]
        else:
            teacher_logits = teacher_embeddings = None
        ctx = StepContext(self, x, y, logits, s_feats, teacher_logits, t_feats, seen[-1] if seen else None,
                          teacher_embeddings if embed else None)
        for term in terms:
            term.prepare(ctx)
        with FP32.autocast(x.device):
            ctx.logits = logits.float()
            return self._sum(ctx, logits)

    def _sum(self, ctx: StepContext, logits: Tensor) -> dict[str, Tensor]:
        out, counts, loss = {}, {}, None
        for term in self.terms.values():
            parts = term(ctx)
            counts.update(parts.pop("counts", {}))
            out.update({k: (v.detach() if k == term.name else v) for k, v in parts.items()})
            weight = term.weight(self.epoch)
            if weight is not None:
                part = weight * parts[term.name]
                loss = part if loss is None else loss + part
        out["loss"] = loss
        if self.ensemble is None:  # labels only: the same parts as a distilled step logs
            out["loss_soft"] = loss.new_zeros(())
            out["logits"] = logits
        else:
            out["logits"] = ctx.logits
        out["counts"] = counts  # over how many images a part is a mean, where not the batch (engine)
        return out

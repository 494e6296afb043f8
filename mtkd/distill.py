"""The training step as a module: ``forward(x, y) -> {'loss', 'logits', parts}``."""
from __future__ import annotations

from torch import Tensor, nn

from .losses import distillation_loss
from .teachers import TeacherEnsemble


class Distiller(nn.Module):
    """A student trained on labels and, with weight ``alpha``, on the teachers.

    With no ensemble (or ``alpha = 0``) this is plain supervised training, and
    the teachers are never run.
    """

    def __init__(self, student: nn.Module, ensemble: TeacherEnsemble | None = None,
                 alpha: float = 0.0, temperature: float = 1.0):
        super().__init__()
        self.student = student
        self.ensemble = ensemble if alpha > 0 else None
        self.alpha = alpha
        self.temperature = temperature

    def forward(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        logits = self.student(x)
        targets = self.ensemble.soft_targets(x, self.temperature) if self.ensemble is not None else None
        out = distillation_loss(logits, y, targets, self.alpha, self.temperature)
        out["logits"] = logits
        return out

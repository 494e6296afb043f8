"""What a specialist ensemble can and cannot tell a student: each teacher's calibration on its own classes,
and which teacher is on home ground for an image (out-of-distribution scores), measured against the labels.

Pure functions of logits and labels; ``benchmarks/teacher_diagnostics.py`` runs them on a task's teachers.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from .losses import normalised_entropy
from .metrics import expected_calibration_error
from .registry import Registry


def calibration(logits: Tensor, labels: Tensor, temperature: float = 1.0, bins: int = 15) -> dict[str, float]:
    """A classifier's accuracy and calibration on ``labels`` (indices into its own outputs), at ``temperature``.

    ``nll``: mean ``-log p_y``; ``ece``: ``metrics.expected_calibration_error`` over ``bins`` bins;
    ``confidence``: mean ``max_c p_c``; ``label_prob``: mean ``p_y``; ``entropy``: mean
    ``losses.normalised_entropy``, i.e. how much a soft target says beyond its argmax.
    """
    logp = F.log_softmax(logits.float() / temperature, dim=1)
    p = logp.exp()
    conf, pred = p.max(1)
    correct = (pred == labels).float()
    return {"acc": correct.mean().item(), "nll": -logp.gather(1, labels[:, None]).mean().item(),
            "ece": expected_calibration_error(p, labels, bins), "confidence": conf.mean().item(),
            "label_prob": p.gather(1, labels[:, None]).mean().item(),
            "entropy": normalised_entropy(logits, temperature).mean().item()}


# Home-ground scores: (logits over a teacher's own classes) -> (B,) higher = more likely one of its classes.
HOME_SCORES: Registry = Registry("home-ground score")
HOME_SCORES.register("max_prob", lambda z: F.softmax(z.float(), 1).max(1).values)  # Hendrycks & Gimpel, 2017
HOME_SCORES.register("max_logit", lambda z: z.float().max(1).values)  # Hendrycks et al., ICML 2022
HOME_SCORES.register("energy", lambda z: torch.logsumexp(z.float(), 1))  # Liu et al., NeurIPS 2020 (-energy)
HOME_SCORES.register("neg_entropy", lambda z: -normalised_entropy(z))


def home_scores(teacher_logits: list[Tensor], score: str) -> Tensor:
    """``(B, K)``: teacher ``k``'s ``HOME_SCORES[score]`` for each image."""
    fn = HOME_SCORES.get(score)
    return torch.stack([fn(z) for z in teacher_logits], 1)


def routed_predictions(teacher_logits: list[Tensor], class_ids: list[Tensor], score: str | Tensor
                       ) -> tuple[Tensor, Tensor]:
    """Each image's chosen teacher (the highest ``score``: a ``HOME_SCORES`` name, or ``(B, K)`` scores such as
    a dustbin's home probabilities) and that teacher's top class, as a global class id."""
    k = (home_scores(teacher_logits, score) if isinstance(score, str) else score).argmax(1)
    pred = torch.empty_like(k)
    for j, (z, ids) in enumerate(zip(teacher_logits, class_ids)):
        mine = k == j
        pred[mine] = ids.to(k.device)[z[mine].argmax(1)]
    return k, pred

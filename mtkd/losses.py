"""Distillation losses and teacher aggregation: pure functions of tensors.

Conventions (pinned by golden-value tests in ``tests/test_losses.py``):

* Soft targets are probabilities over the task's global classes, produced at
  temperature ``T`` from the teachers' logits.
* The KD term is ``T^2 * KL(q || softmax(s / T))`` with ``batchmean``
  reduction: summed over classes, averaged over the batch. The ``T^2`` keeps
  its gradient on the scale of the cross-entropy's (Hinton et al., 2015).
* The total is ``(1 - alpha) * CE(s, y) + alpha * KD``: alpha weights the
  teachers; 0 trains on labels only, 1 on teachers only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def kd_kl_loss(student_logits: Tensor, target_probs: Tensor, temperature: float) -> Tensor:
    """``T^2 * (1/B) * sum_b sum_c q_bc * (log q_bc - log softmax(s_b / T)_c)``.

    Classes where ``q_bc = 0`` contribute nothing (``0 log 0 = 0``).
    """
    log_p = F.log_softmax(student_logits / temperature, dim=1)
    return F.kl_div(log_p, target_probs, reduction="batchmean") * temperature**2


def distillation_loss(student_logits: Tensor, labels: Tensor, target_probs: Tensor | None,
                      alpha: float, temperature: float) -> dict[str, Tensor]:
    """``(1 - alpha) * CE(s, y) + alpha * kd_kl_loss(s, q, T)``.

    Returns the total as ``loss`` and its unweighted parts ``loss_hard`` (CE)
    and ``loss_soft`` (KD). With ``alpha = 0`` or no targets, ``loss_soft`` is 0.
    """
    hard = F.cross_entropy(student_logits, labels)
    if target_probs is None or alpha == 0:
        soft = hard.new_zeros(())
        return {"loss": hard, "loss_hard": hard.detach(), "loss_soft": soft}
    soft = kd_kl_loss(student_logits, target_probs, temperature)
    loss = (1.0 - alpha) * hard + alpha * soft
    return {"loss": loss, "loss_hard": hard.detach(), "loss_soft": soft.detach()}


def mixture_targets(teacher_logits: list[Tensor], class_ids: list[Tensor], weights: Tensor,
                    num_classes: int, temperature: float) -> Tensor:
    """Weighted mixture of the teachers' tempered distributions, in global classes.

    Teacher ``k`` covers the global classes ``class_ids[k]`` (its output unit
    ``i`` is global class ``class_ids[k][i]``). With
    ``p_k = softmax(z_k / T)`` placed at those classes (zero elsewhere) and
    ``w_k`` the teacher weights::

        q = sum_k w_k p_k / sum_k w_k

    so ``q`` sums to one. A class covered by several teachers receives mass
    from each of them; a class outside a teacher's subset receives none from
    it. The result does not depend on the label.
    """
    batch = teacher_logits[0].shape[0]
    q = teacher_logits[0].new_zeros(batch, num_classes, dtype=torch.float32)
    for logits, ids, w in zip(teacher_logits, class_ids, weights):
        p = F.softmax(logits.float() / temperature, dim=1)
        q.index_add_(1, ids, p * w)
    return q / weights.sum()

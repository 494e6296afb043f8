"""Distillation losses and teacher aggregation: pure functions of tensors.

Conventions (pinned by golden-value tests in ``tests/test_losses.py``):

* Teacher ``k`` covers the global classes ``class_ids[k]``: its output unit
  ``i`` is global class ``class_ids[k][i]``. Teachers may overlap.
* Teacher weights are a ``(B, K)`` tensor, one row per sample (a ``(K,)``
  vector is broadcast); rows are normalised over the teachers that contribute.
* A KD term is ``T^2 * KL(q || softmax(s / T))`` with ``batchmean`` reduction:
  summed over classes, averaged over the batch. The ``T^2`` keeps its gradient
  on the scale of the cross-entropy's (Hinton et al., 2015).
* The total is ``(1 - alpha) * CE(s, y) + alpha * KD``: alpha weights the
  teachers; 0 trains on labels only, 1 on teachers only.
* A label of -1 (``data.UNLABELLED``) marks an image used without its label: the
  cross-entropy is the mean over the labelled images of the batch only
  (``labelled_cross_entropy``); the KD term is the mean over all images.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import Registry


def labelled_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """``(1/|L|) sum_{b in L} CE(s_b, y_b)`` over the labelled samples ``L = {b: y_b >= 0}``; 0 when none.

    Unlabelled rows are masked out before the mean (no gradient reaches
    their logits), without a host synchronisation.
    """
    has = labels >= 0
    ce = F.cross_entropy(logits, labels.clamp_min(0), reduction="none")
    return torch.where(has, ce, 0.0).sum() / has.sum().clamp_min(1)


def kl_per_sample(student_logits: Tensor, target_probs: Tensor, temperature: float) -> Tensor:
    """``T^2 * sum_c q_c (log q_c - log softmax(s / T)_c)`` per sample; ``0 log 0 = 0``."""
    log_p = F.log_softmax(student_logits / temperature, dim=1)
    return (torch.special.xlogy(target_probs, target_probs) - target_probs * log_p).sum(1) * temperature**2


def kd_kl_loss(student_logits: Tensor, target_probs: Tensor, temperature: float) -> Tensor:
    """``T^2 * (1/B) * sum_b sum_c q_bc * (log q_bc - log softmax(s_b / T)_c)``.

    Classes where ``q_bc = 0`` contribute nothing (``0 log 0 = 0``).
    """
    return kl_per_sample(student_logits, target_probs, temperature).mean()


def shift_to_label(target_probs: Tensor, labels: Tensor) -> Tensor:
    """Probability shift (Wen et al., "Preparing lessons", 2019): where a target's top class ``m`` is not the
    label ``y``, swap ``q_m`` and ``q_y``, so that the label is the top class and every other probability is
    kept. Rows whose label is ``-1`` (not among these classes, or no label) and rows of zeros stay as they are.

    A teacher that is wrong on an image then still passes on how the other classes resemble it, instead of
    teaching the wrong class (``--kd_loss shift``).
    """
    y = labels.clamp_min(0)[:, None]
    top = target_probs.argmax(1, keepdim=True)
    q_top, q_y = target_probs.gather(1, top), target_probs.gather(1, y)
    swap = (labels[:, None] >= 0) & (q_top > q_y)
    out = target_probs.scatter(1, top, torch.where(swap, q_y, q_top))
    return out.scatter(1, y, torch.where(swap, q_top, q_y))


def dkd_per_sample(student_logits: Tensor, target_probs: Tensor, target: Tensor, alpha: float, beta: float,
                   temperature: float) -> Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022), per sample, on a target distribution ``q``.

    With ``p = softmax(s / T)`` and ``t`` the sample's target class::

        TCKD = KL([q_t, 1 - q_t] || [p_t, 1 - p_t])
        NCKD = KL(q_{c != t} / (1 - q_t) || p_{c != t} / (1 - p_t))
        DKD  = T^2 * (alpha * TCKD + beta * NCKD)

    ``target = -1`` means the sample's class is not among these classes
    (a specialist that does not cover it): every class is then a non-target
    class, TCKD is 0 and NCKD is the plain KL over all of them.
    """
    has = target >= 0
    t = target.clamp_min(0)[:, None]
    mask = F.one_hot(t.squeeze(1), student_logits.shape[1]).bool() & has[:, None]
    p = F.softmax(student_logits / temperature, dim=1)
    q_t, p_t = target_probs.gather(1, t).squeeze(1), p.gather(1, t).squeeze(1)
    b_q = torch.stack([q_t, 1 - q_t], 1)
    b_p = torch.stack([p_t, 1 - p_t], 1).clamp_min(1e-12)
    tckd = torch.where(has, (torch.special.xlogy(b_q, b_q) - b_q * b_p.log()).sum(1), 0.0)
    # Non-target distributions: drop the target class and renormalise.
    log_p_nt = F.log_softmax(student_logits / temperature - 1e4 * mask, dim=1)
    q_nt = target_probs.masked_fill(mask, 0.0)
    q_nt = q_nt / q_nt.sum(1, keepdim=True).clamp_min(1e-12)
    nckd = (torch.special.xlogy(q_nt, q_nt) - q_nt * log_p_nt.masked_fill(mask, 0.0)).sum(1)
    return (alpha * tckd + beta * nckd) * temperature**2


def coverage(class_ids: list[Tensor], labels: Tensor) -> Tensor:
    """``(B, K)`` bool: does teacher ``k`` cover sample ``b``'s label?"""
    return torch.stack([(labels[:, None] == ids[None, :]).any(1) for ids in class_ids], 1)


def local_labels(ids: Tensor, labels: Tensor) -> Tensor:
    """Each label's output unit in a teacher over ``ids``, or -1 where the teacher lacks the class."""
    match = labels[:, None] == ids[None, :]
    return torch.where(match.any(1), match.long().argmax(1), -1)


def _normalise_rows(w: Tensor) -> Tensor:
    return w / w.sum(1, keepdim=True).clamp_min(1e-12)


def fixed_weights(teacher_logits, class_ids, labels, fixed: Tensor, eligible: Tensor) -> Tensor:
    """``w_k`` proportional to the fixed weight ``fixed[k]`` over the eligible teachers."""
    return _normalise_rows(fixed.float()[None, :] * eligible)


def confidence_weights(teacher_logits, class_ids, labels, fixed, eligible: Tensor) -> Tensor:
    """CA-MKD (Zhang et al., ICASSP 2022): with ``CE_k`` teacher ``k``'s cross-entropy on the true label,
    ``w_k = (1 - softmax_k(CE)_k) / (n - 1)`` over the ``n`` eligible teachers that cover the label (a lone
    such teacher gets 1). Teachers that cannot express the label get 0."""
    cover = eligible & coverage(class_ids, labels)
    ce = torch.stack([
        -F.log_softmax(z.float(), 1).gather(1, local_labels(ids, labels).clamp_min(0)[:, None]).squeeze(1)
        for z, ids in zip(teacher_logits, class_ids)], 1)
    s = F.softmax(ce.masked_fill(~cover, float("-inf")), dim=1).nan_to_num(0.0)
    lone = cover.sum(1, keepdim=True) == 1
    return _normalise_rows(torch.where(lone, cover.float(), (1 - s) * cover))


def normalised_entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``(B,)``: the entropy of ``softmax(z / T)`` divided by ``log C`` (0: one-hot, 1: uniform), so that
    distributions over different numbers of classes compare."""
    logp = F.log_softmax(logits.float() / temperature, 1)
    scale = math.log(logits.shape[1]) if logits.shape[1] > 1 else 1.0
    return -(logp.exp() * logp).sum(1) / scale


def entropy_weights(teacher_logits, class_ids, labels, fixed, eligible: Tensor) -> Tensor:
    """EBKD (Kwon et al., ICASSP 2020): ``w_k = softmax_k(-H_k)`` with ``H_k`` the entropy of teacher
    ``k``'s prediction divided by ``log |C_k|`` so that specialists of different sizes compare."""
    h = torch.stack([normalised_entropy(z) for z in teacher_logits], 1)
    logits = (-h).masked_fill(~eligible, float("-inf"))
    return F.softmax(logits, dim=1).nan_to_num(0.0)


# --teacher_weighting: adding a weighting is registering a function of this signature.
WEIGHTINGS: Registry = Registry("teacher weighting")
WEIGHTINGS.register("fixed", fixed_weights)
WEIGHTINGS.register("confidence", confidence_weights)
WEIGHTINGS.register("entropy", entropy_weights)


def teacher_weights(mode: str, teacher_logits: list[Tensor], class_ids: list[Tensor], labels: Tensor,
                    fixed: Tensor, eligible: Tensor) -> Tensor:
    """Per-sample teacher weights ``(B, K)``, each row summing to 1 over its eligible teachers
    (``WEIGHTINGS.get(mode)``; see each function).

    ``eligible`` ``(B, K)`` bool marks the teachers that may contribute;
    a sample with none gets a row of zeros.
    """
    return WEIGHTINGS.get(mode)(teacher_logits, class_ids, labels, fixed, eligible)


def _placed(teacher_logits: list[Tensor], class_ids: list[Tensor], num_classes: int, temperature: float):
    """Each teacher's tempered distribution at its global classes: ``(B, K, num_classes)``, and coverage."""
    batch = teacher_logits[0].shape[0]
    p = teacher_logits[0].new_zeros(batch, len(class_ids), num_classes, dtype=torch.float32)
    covers = torch.zeros(len(class_ids), num_classes, dtype=torch.bool, device=p.device)
    for k, (z, ids) in enumerate(zip(teacher_logits, class_ids)):
        p[:, k, ids] = F.softmax(z.float() / temperature, dim=1)
        covers[k, ids] = True
    return p, covers


def mixture_targets(teacher_logits: list[Tensor], class_ids: list[Tensor], weights: Tensor,
                    num_classes: int, temperature: float) -> Tensor:
    """Weighted mixture of the teachers' tempered distributions, in global classes.

    With ``p_k = softmax(z_k / T)`` placed at teacher ``k``'s classes (zero
    elsewhere) and ``w_k`` the teacher weights::

        q = sum_k w_k p_k / sum_k w_k

    so ``q`` sums to one. A class covered by several teachers receives mass
    from each of them; a class outside a teacher's subset receives none from
    it. The result does not depend on the label.
    """
    p, _ = _placed(teacher_logits, class_ids, num_classes, temperature)
    w = _normalise_rows(weights.float().expand(p.shape[0], -1))
    return torch.einsum("bk,bkc->bc", w, p)


def consensus_targets(teacher_logits: list[Tensor], class_ids: list[Tensor], weights: Tensor, labels: Tensor,
                      num_classes: int, temperature: float) -> Tensor:
    """Soft targets from the teachers that know the sample's label.

    Only teachers ``k`` with ``y in C_k`` contribute (``m_k = 1``). Each
    one's ``p_k = softmax(z_k / T)`` is placed at its classes; a class ``c``
    gets the weighted average of the contributing teachers that cover it::

        r_c = sum_k m_k w_k p_kc / sum_{k: c in C_k} m_k w_k ,   q = r / sum_c r_c

    Classes that no contributing teacher covers get 0. A sample whose label
    no teacher covers gets a row of zeros (no soft loss).
    """
    p, covers = _placed(teacher_logits, class_ids, num_classes, temperature)
    w = weights.float().expand(p.shape[0], -1) * coverage(class_ids, labels)
    num = torch.einsum("bk,bkc->bc", w, p)
    den = w @ covers.float()
    r = torch.where(den > 0, num / den.clamp_min(1e-12), 0.0)
    return r / r.sum(1, keepdim=True).clamp_min(1e-12)


def amalgamation_loss(student_logits: Tensor, teacher_logits: list[Tensor], class_ids: list[Tensor],
                      weights: Tensor, temperature: float, labels: Tensor | None = None,
                      per_sample: Callable | None = None) -> Tensor:
    """Every teacher against the student renormalised over that teacher's classes.

    (Hinton et al. 2015, section 5; Vongkulbhisal et al., CVPR 2019.) With
    ``p_k = softmax(z_k / T)`` over teacher ``k``'s classes ``C_k`` and the
    student's logits restricted to them, ``s[C_k]``::

        L = (1/B) sum_b sum_k w_bk * T^2 * KL(p_k || softmax(s[C_k] / T))

    ``per_sample(s[C_k], p_k, t_k) -> (B,)`` replaces each ``T^2 * KL`` (e.g. ``dkd_per_sample``), with
    ``t_k`` the label's position in ``C_k`` (-1 where ``C_k`` lacks it; ``labels`` needed).
    """
    w = weights.float().expand(student_logits.shape[0], -1)
    total = student_logits.new_zeros(student_logits.shape[0])
    for k, (z, ids) in enumerate(zip(teacher_logits, class_ids)):
        s_k = student_logits[:, ids]
        p_k = F.softmax(z.float() / temperature, dim=1)
        if per_sample is None:
            term = kl_per_sample(s_k, p_k, temperature)
        else:
            term = per_sample(s_k, p_k, local_labels(ids, labels))
        total = total + w[:, k] * term
    return total.mean()


def feature_loss(student_features: list[Tensor], teacher_features: list[list[Tensor]], weights: Tensor) -> Tensor:
    """``(1/B) sum_b sum_k w_bk * sum_l MSE(f^s_l(b), f^k_l(b))`` (FitNets, Romero et al., 2015).

    ``student_features[k][l]`` is the student's stage ``l`` after its adapter
    to teacher ``k`` (same shape as ``teacher_features[k][l]``). Each MSE is
    the mean over channels and positions of one sample.
    """
    total = weights.new_zeros(weights.shape[0])
    for k, (fs_k, ft_k) in enumerate(zip(student_features, teacher_features)):
        for fs, ft in zip(fs_k, ft_k):
            total = total + weights[:, k] * (fs - ft.float()).pow(2).flatten(1).mean(1)
    return total.mean()


def embedding_loss(student: list[Tensor], teachers: list[Tensor], weights: Tensor) -> Tensor:
    """``(1/B) sum_b sum_k w_bk * ||s_k(b)/|s_k(b)| - t_k(b)/|t_k(b)| ||^2`` (= ``2 - 2 cos``).

    ``student[k]``: the student's pooled features (the input of its classifier)
    after its linear adapter to teacher ``k``, ``(B, D_k)``; ``teachers[k]``:
    teacher ``k``'s own, ``(B, D_k)``. Matching directions, not lengths, keeps
    the term on one scale (0 to 4) whatever the teachers' feature norms.
    """
    total = weights.new_zeros(weights.shape[0])
    for k, (s, t) in enumerate(zip(student, teachers)):
        total = total + weights[:, k] * (F.normalize(s.float(), dim=1) - F.normalize(t.float(), dim=1)).pow(2).sum(1)
    return total.mean()


def attention_map(f: Tensor) -> Tensor:
    """Spatial attention of a feature map ``(B, C, H, W)``: ``mean_c f^2``, ``(B, 1, H, W)`` (Zagoruyko &
    Komodakis, ICLR 2017, with p = 2)."""
    return f.float().pow(2).mean(1, keepdim=True)


def attention_loss(student_maps: list[Tensor], teacher_maps: list[list[Tensor]], weights: Tensor) -> Tensor:
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017)::

        L = (1/B) sum_b sum_k w_bk sum_l mean_i (a^s_l(b)_i - a^k_l(b)_i)^2,   a = normalise(vec(attention_map))

    ``student_maps[l]`` and ``teacher_maps[k][l]`` are ``attention_map`` s of the same spatial size;
    ``normalise`` is the L2 norm over positions. Channel counts need not match: no adapter."""
    total = weights.new_zeros(weights.shape[0])
    for k, t_k in enumerate(teacher_maps):
        for a_s, a_t in zip(student_maps, t_k):
            s_vec, t_vec = F.normalize(a_s.flatten(1), dim=1), F.normalize(a_t.float().flatten(1), dim=1)
            total = total + weights[:, k] * (s_vec - t_vec).pow(2).mean(1)
    return total.mean()


def specialist_combination(teacher_logits: list[Tensor], class_ids: list[Tensor], weights: Tensor,
                           num_classes: int, temperature: float = 1.0, steps: int = 50) -> Tensor:
    """The distribution over all classes that best agrees with every specialist on its own classes.

    Hinton et al. 2015, section 5 ("the full distribution q that minimises
    sum_m KL(p^m || q^m)"), for specialists without a dustbin class: with
    ``p_k = softmax(z_k / T)`` over teacher ``k``'s classes ``C_k`` and
    ``q[C_k]`` the candidate renormalised over them::

        q = argmin_q  sum_k w_k KL(p_k || q[C_k] / sum_{c in C_k} q_c)

    ``weights`` is ``(K,)`` or one row per sample ``(B, K)``. Returns
    ``log q`` ``(B, num_classes)``. The objective is convex in ``log q``; it
    is minimised per sample by Newton's method (``_newton_combination``) from
    the start below, which is already the minimiser when no two teachers
    share a class.

    The objective pins only each specialist's classes relative to each other:
    between groups of teachers that share no class the split of mass is left
    where the start puts it (no step ever moves a group's common shift). The
    start gives class ``c`` the ``w``-weighted average, over the teachers that
    cover it, of ``log p_kc - mean_{C_k} log p_k + log w_k``: the geometric
    means of disjoint specialists' distributions are made proportional to their
    weights (equal for equal weights), so a confident specialist outweighs a
    hesitant one and, as in the mixture, a heavier teacher's group gets more
    mass. Overlapping classes tie the specialists together and replace that
    choice by what the teachers say.

    **Weight 0** means *takes no part*: the teacher adds nothing to the
    objective or the start, a class covered only by teachers of weight 0 gets
    probability 0 (as one that no teacher covers), and a sample whose teachers
    all have weight 0 gets ``q = 0`` (``log q = -inf``): a row of zeros, no
    soft loss. The result is continuous as a weight goes to 0.
    """
    batch = teacher_logits[0].shape[0]
    device = teacher_logits[0].device
    with torch.inference_mode(False), torch.no_grad():  # also when called from evaluation
        w = weights.detach().clone().double().to(device).expand(batch, -1)
        start = torch.zeros(batch, num_classes, dtype=torch.float64, device=device)
        cover_w = start.clone()
        parts = []
        for k, (z, ids) in enumerate(zip(teacher_logits, class_ids)):
            ids = ids.clone().to(device)
            lp = F.log_softmax(z.detach().clone().double() / temperature, dim=1)
            wk = w[:, k:k + 1]
            log_w = torch.where(wk > 0, wk.clamp_min(1e-300).log(), 0.0)
            parts.append((w[:, k], lp, ids))
            start[:, ids] += wk * (lp - lp.mean(1, keepdim=True) + log_w)
            cover_w[:, ids] += wk
        covered = cover_w > 0  # per sample: classes some teacher of positive weight covers
        z = torch.where(covered, start / cover_w.clamp_min(1e-300), 0.0)
        if len(class_ids) > 1:
            z = _newton_combination(z, parts, steps)
        log_q = F.log_softmax(z.masked_fill(~covered, float("-inf")), dim=1)
        log_q = log_q.masked_fill(~covered.any(1, keepdim=True), float("-inf"))  # no teacher: q = 0, not NaN
    return log_q.float()


def _combination_objective(z: Tensor, parts) -> Tensor:
    """Per sample: ``sum_k w_k (logsumexp(z[C_k]) - sum_{c in C_k} p_kc z_c)`` (the KL up to a constant), and
    the magnitude of the terms that cancel in it (the scale of its rounding error)."""
    f = mag = 0.0
    for wk, lp, ids in parts:
        lse, linear = torch.logsumexp(z[:, ids], 1), (lp.exp() * z[:, ids]).sum(1)
        f = f + wk * (lse - linear)
        mag = mag + wk * (lse.abs() + linear.abs())
    return f, mag


NEWTON_GRAD_TOL = 1e-8  # a row has converged when its gradient's largest entry is below this (float64)
NEWTON_WARN_TOL = 1e-6  # rows still above this after the last step are counted in a warning
LINE_SEARCH = 2.0 ** -torch.arange(0, 31, dtype=torch.float64)  # step sizes tried at once: 1, 1/2, ..., 2^-30
CUDA_CHECK_EVERY = 4  # on CUDA, ask whether every row has converged (a host sync) every this many steps


def _newton_combination(z: Tensor, parts, steps: int) -> Tensor:
    """Minimise ``_combination_objective`` per sample by damped Newton steps.

    Gradient ``sum_k w_k (s_k - p_k)`` and Hessian ``sum_k w_k (diag(s_k) - s_k s_k^T)`` on ``C_k``
    (``s_k`` the softmax of ``z[C_k]``). The Hessian is singular along each group's common shift, where
    the gradient has no component; a tiny ridge keeps the solve defined without moving those directions.

    Each row stops on its own once its gradient is below ``NEWTON_GRAD_TOL`` (or no step size lowers its
    objective). The line search tries every size of ``LINE_SEARCH`` in one batched evaluation and takes the
    largest that does not raise the objective beyond its rounding error (a tolerance relative to the
    magnitude of the objective's terms, which does not vanish as the objective does). No host sync per step
    on CUDA (``solve_ex``, masks). Rows still above ``NEWTON_WARN_TOL`` after ``steps`` steps are counted in
    a warning.
    """
    batch, n = z.shape
    eye = torch.eye(n, dtype=z.dtype, device=z.device)
    sizes = LINE_SEARCH.to(z.device)[:, None, None]
    tried = len(LINE_SEARCH)
    wide = [(wk.repeat(tried), lp.repeat(tried, 1), ids) for wk, lp, ids in parts]  # the parts for every size
    active = torch.ones(batch, dtype=torch.bool, device=z.device)
    f, _ = _combination_objective(z, parts)
    grad_max = None
    for i in range(steps):
        grad = torch.zeros_like(z)
        hess = torch.zeros(batch, n, n, dtype=z.dtype, device=z.device)
        for wk, lp, ids in parts:
            s = F.softmax(z[:, ids], 1)
            grad[:, ids] += wk[:, None] * (s - lp.exp())
            block = torch.diag_embed(s) - s[:, :, None] * s[:, None, :]
            hess[:, ids[:, None], ids[None, :]] += wk[:, None, None] * block
        grad_max = grad.abs().amax(1)
        active = active & (grad_max >= NEWTON_GRAD_TOL)
        if (z.device.type != "cuda" or i % CUDA_CHECK_EVERY == 0) and not bool(active.any()):
            break
        step = torch.linalg.solve_ex(hess + 1e-9 * eye, grad.unsqueeze(-1))[0].squeeze(-1)
        candidates = (z[None] - sizes * step[None]).reshape(tried * batch, n)
        f_new, mag = _combination_objective(candidates, wide)
        f_new, mag = f_new.view(tried, batch), mag.view(tried, batch)
        ok = f_new <= f[None] + 64 * torch.finfo(z.dtype).eps * mag
        first = ok.to(torch.uint8).argmax(0)  # the largest step size that is ok (0 if none is)
        improved = ok.any(0) & active
        pick = candidates.view(tried, batch, n)[first, torch.arange(batch, device=z.device)]
        z = torch.where(improved[:, None], pick, z)
        f = torch.where(improved, f_new[first, torch.arange(batch, device=z.device)], f)
        active = improved  # a row that no step size improves has stopped
    else:
        if grad_max is not None:  # the last step's gradient was not measured after it
            grad = torch.zeros_like(z)
            for wk, lp, ids in parts:
                grad[:, ids] += wk[:, None] * (F.softmax(z[:, ids], 1) - lp.exp())
            grad_max = grad.abs().amax(1)
    if grad_max is not None:
        failed = int((grad_max > NEWTON_WARN_TOL).sum())
        if failed:
            warnings.warn(f"specialist combination: {failed} of {batch} samples did not converge in {steps} "
                          f"Newton steps (largest gradient {grad_max.max().item():.2e})", RuntimeWarning)
    return z

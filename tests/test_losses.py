"""Golden values computed by hand with Python's math module (no torch), see each test."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtkd.losses import (amalgamation_loss, consensus_targets, dkd_per_sample, embedding_loss, feature_loss, kd_kl_loss, kl_per_sample,
                         labelled_cross_entropy, mixture_targets, specialist_combination, teacher_weights)

S = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
Q = torch.tensor([[0.2, 0.5, 0.3], [0.0, 1.0, 0.0]])
Y = torch.tensor([1, 2])
# Sample 1 at T=2: log softmax([0.5, 1, 0]) = [-1.18027, -0.68027, -1.68027];
#   KL = 0.2(ln .2 + 1.18027) + 0.5(ln .5 + 0.68027) + 0.3(ln .3 + 1.68027) = 0.0506167
# Sample 2 at T=2: log softmax([0, 0, 1.5]) = [-1.86898, -1.86898, -0.36898]; KL = 1.86898 (0 log 0 = 0)
# KD = T^2 * (0.0506167 + 1.8689811) / 2
KD_GOLDEN = 3.8391955839569527
# CE: sample 1: logsumexp([1,2,0]) - 2 = 0.40761; sample 2: logsumexp([0,0,3]) - 3 = 0.09492; mean:
CE_GOLDEN = 0.2512644604326706


def test_kd_single_sample_golden():
    assert kd_kl_loss(S[:1], Q[:1], 2.0).item() == pytest.approx(0.20246662630864426, rel=1e-6)


def test_kd_batchmean_and_zero_targets_golden():
    assert kd_kl_loss(S, Q, 2.0).item() == pytest.approx(KD_GOLDEN, rel=1e-6)


def test_kd_matches_long_hand_kl():
    torch.manual_seed(0)
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    T = 3.0
    q = F.softmax(t / T, 1)
    long_hand = (q * (q.log() - F.log_softmax(s / T, 1))).sum(1).mean() * T**2
    assert kd_kl_loss(s, q, T).item() == pytest.approx(long_hand.item(), rel=1e-5)


def test_labelled_cross_entropy_golden_and_unlabelled_rows_get_no_gradient():
    assert labelled_cross_entropy(S, Y).item() == pytest.approx(CE_GOLDEN, rel=1e-6)
    s = S.clone().requires_grad_()
    loss = labelled_cross_entropy(s, torch.tensor([1, -1]))  # sample 2 has no label
    assert loss.item() == pytest.approx(0.40760596444, rel=1e-6)  # sample 1's CE alone (see CE_GOLDEN)
    loss.backward()
    assert s.grad[1].abs().sum() == 0 and s.grad[0].abs().sum() > 0
    none = labelled_cross_entropy(S.clone().requires_grad_(), torch.tensor([-1, -1]))
    assert none.item() == 0.0 and none.requires_grad


def test_mixture_targets_golden():
    # Teacher 1 over classes {0, 1}: softmax([0, ln 3]) = [1/4, 3/4], weight 1.
    # Teacher 2 over classes {1, 2}: softmax([0, ln 4]) = [1/5, 4/5], weight 3.
    # q = (1 * [1/4, 3/4, 0] + 3 * [0, 1/5, 4/5]) / 4 = [0.0625, 0.3375, 0.6]
    logits = [torch.tensor([[0.0, math.log(3)]]), torch.tensor([[0.0, math.log(4)]])]
    q = mixture_targets(logits, [torch.tensor([0, 1]), torch.tensor([1, 2])], torch.tensor([1.0, 3.0]), 3, 1.0)
    assert q.squeeze().tolist() == pytest.approx([0.0625, 0.3375, 0.6], abs=1e-7)


def test_mixture_temperature_softens_each_teacher():
    # One teacher over classes {2, 0} with logits [2 ln 3, 0] at T=2: softmax([ln 3, 0]) = [3/4, 1/4].
    q = mixture_targets([torch.tensor([[2 * math.log(3), 0.0]])], [torch.tensor([2, 0])], torch.tensor([1.0]), 3, 2.0)
    assert q.squeeze().tolist() == pytest.approx([0.25, 0.0, 0.75], abs=1e-7)


# --- aggregation of teachers with different class sets ------------------------------------------
# Teacher A over classes {0, 1}: logits [0, ln 3] -> p_A = [1/4, 3/4]; weight 1.
# Teacher B over classes {1, 2}: logits [0, ln 4] -> p_B = [1/5, 4/5]; weight 3.
TA, TB = torch.tensor([[0.0, math.log(3)]]), torch.tensor([[0.0, math.log(4)]])
IDS = [torch.tensor([0, 1]), torch.tensor([1, 2])]


def test_consensus_targets_golden():
    logits = [TA.repeat(3, 1), TB.repeat(3, 1)]
    q = consensus_targets(logits, IDS, torch.tensor([1.0, 3.0]), torch.tensor([0, 1, 2]), 3, 1.0)
    # label 0: only A knows it -> [1/4, 3/4, 0]. label 2: only B -> [0, 1/5, 4/5].
    # label 1: both. Class 0 from A alone (1/4), class 2 from B alone (4/5), class 1 averaged by weight:
    #   (1 * 3/4 + 3 * 1/5) / 4 = 0.3375; r = [0.25, 0.3375, 0.8], sum 1.3875.
    assert q[0].tolist() == pytest.approx([0.25, 0.75, 0.0], abs=1e-7)
    assert q[1].tolist() == pytest.approx([0.25 / 1.3875, 0.3375 / 1.3875, 0.8 / 1.3875], abs=1e-7)
    assert q[2].tolist() == pytest.approx([0.0, 0.2, 0.8], abs=1e-7)


def test_consensus_gives_no_target_when_no_teacher_knows_the_label():
    q = consensus_targets([TA], IDS[:1], torch.tensor([1.0]), torch.tensor([2]), 3, 1.0)
    assert q.tolist() == [[0.0, 0.0, 0.0]]


def test_amalgamation_loss_golden():
    s = torch.tensor([[0.0, math.log(2), math.log(3)]])  # student softmax [1/6, 2/6, 3/6]
    # Over A's classes {0, 1} the student renormalised is [1/3, 2/3]; over B's {1, 2} it is [2/5, 3/5].
    kl_a = 0.25 * math.log(0.25 / (1 / 3)) + 0.75 * math.log(0.75 / (2 / 3))
    kl_b = 0.2 * math.log(0.2 / 0.4) + 0.8 * math.log(0.8 / 0.6)
    loss = amalgamation_loss(s, [TA, TB], IDS, torch.tensor([[0.25, 0.75]]), 1.0)
    assert loss.item() == pytest.approx(0.25 * kl_a + 0.75 * kl_b, rel=1e-6)
    # At T = 2 every logit is halved and the loss scaled by T^2 = 4.
    halved = [torch.tensor([[0.0, math.log(3)]]) * 2, torch.tensor([[0.0, math.log(4)]]) * 2]
    assert amalgamation_loss(s * 2, halved, IDS, torch.tensor([0.25, 0.75]), 2.0).item() == pytest.approx(
        4 * (0.25 * kl_a + 0.75 * kl_b), rel=1e-6)


def test_full_coverage_teachers_reduce_to_weighted_ensemble_kd():
    torch.manual_seed(0)
    B, C, T = 6, 5, 3.0
    teachers = [torch.randn(B, C) for _ in range(3)]
    ids = [torch.arange(C)] * 3
    w = torch.tensor([0.2, 0.3, 0.5])
    y = torch.randint(0, C, (B,))
    ensemble_q = sum(wk * F.softmax(z / T, 1) for wk, z in zip(w, teachers))
    assert torch.allclose(consensus_targets(teachers, ids, w, y, C, T), ensemble_q, atol=1e-6)
    assert torch.allclose(mixture_targets(teachers, ids, w, C, T), ensemble_q, atol=1e-6)
    # amalgamate: sum_k w_k KL(p_k || p_s) = KL(q || p_s) + const, so the gradients are equal.
    s1 = torch.randn(B, C, requires_grad=True)
    s2 = s1.detach().clone().requires_grad_()
    amalgamation_loss(s1, teachers, ids, w, T).backward()
    kd_kl_loss(s2, ensemble_q, T).backward()
    assert torch.allclose(s1.grad, s2.grad, atol=1e-6)


def test_mixture_accepts_per_sample_weights():
    logits = [TA.repeat(2, 1), TB.repeat(2, 1)]
    q = mixture_targets(logits, IDS, torch.tensor([[1.0, 0.0], [1.0, 3.0]]), 3, 1.0)
    assert q[0].tolist() == pytest.approx([0.25, 0.75, 0.0], abs=1e-7)
    assert q[1].tolist() == pytest.approx([0.0625, 0.3375, 0.6], abs=1e-7)


# --- per-sample teacher weights -------------------------------------------------------------------
def test_confidence_weights_golden():
    # Teacher C over {0, 2}: logits [0, 0] -> [1/2, 1/2].
    logits = [TA.repeat(3, 1), TB.repeat(3, 1), torch.zeros(3, 2)]
    ids = IDS + [torch.tensor([0, 2])]
    y = torch.tensor([1, 0, 2])
    w = teacher_weights("confidence", logits, ids, y, torch.ones(3), torch.ones(3, 3, dtype=torch.bool))
    # label 1: CE_A = ln(4/3), CE_B = ln 5, C cannot express 1. softmax = [4/3, 5] / (19/3) = [4/19, 15/19];
    #   w = 1 - that = [15/19, 4/19] (n - 1 = 1).
    # label 0: CE_A = ln 4, CE_C = ln 2: softmax = [4/6, 2/6]; w = [1/3, 0, 2/3].
    # label 2: CE_B = ln(5/4), CE_C = ln 2: softmax = [5/13, 8/13]; w = [0, 8/13, 5/13].
    assert w[0].tolist() == pytest.approx([15 / 19, 4 / 19, 0.0], abs=1e-6)
    assert w[1].tolist() == pytest.approx([1 / 3, 0.0, 2 / 3], abs=1e-6)
    assert w[2].tolist() == pytest.approx([0.0, 8 / 13, 5 / 13], abs=1e-6)


def test_confidence_weight_of_a_lone_teacher_is_one():
    w = teacher_weights("confidence", [TA, TB], IDS, torch.tensor([0]), torch.ones(2), torch.ones(1, 2, dtype=torch.bool))
    assert w.tolist() == [[1.0, 0.0]]


def test_entropy_weights_golden():
    # A over 2 classes at [1/2, 1/2]: entropy ln 2 / ln 2 = 1. B over 4 classes, one-hot: entropy 0.
    logits = [torch.zeros(1, 2), torch.tensor([[100.0, 0.0, 0.0, 0.0]])]
    ids = [torch.tensor([0, 1]), torch.tensor([0, 1, 2, 3])]
    w = teacher_weights("entropy", logits, ids, torch.tensor([0]), torch.ones(2), torch.ones(1, 2, dtype=torch.bool))
    e = math.exp(-1)
    assert w.squeeze().tolist() == pytest.approx([e / (e + 1), 1 / (e + 1)], abs=1e-6)


def test_fixed_weights_are_normalised_over_eligible_teachers():
    eligible = torch.tensor([[True, True, True], [False, True, True]])
    w = teacher_weights("fixed", [TA] * 3, IDS * 2, torch.tensor([0, 0]), torch.tensor([1.0, 1.0, 2.0]), eligible)
    assert w[0].tolist() == pytest.approx([0.25, 0.25, 0.5])
    assert w[1].tolist() == pytest.approx([0.0, 1 / 3, 2 / 3])


# --- Decoupled KD ---------------------------------------------------------------------------------
def test_dkd_golden():
    s = torch.tensor([[0.0, math.log(2), math.log(3)]])  # p = [1/6, 2/6, 3/6]
    q = torch.tensor([[0.5, 0.3, 0.2]])
    tckd = 0.5 * math.log(0.5 / (1 / 6)) + 0.5 * math.log(0.5 / (5 / 6))
    nckd = 0.6 * math.log(0.6 / 0.4) + 0.4 * math.log(0.4 / 0.6)  # non-target: [0.6, 0.4] vs [2/5, 3/5]
    out = dkd_per_sample(s, q, torch.tensor([0]), 1.0, 8.0, 1.0)
    assert out.item() == pytest.approx(tckd + 8 * nckd, rel=1e-6)
    # No target among these classes: TCKD is 0 and NCKD is the KL over all classes.
    kl = sum(qc * math.log(qc / pc) for qc, pc in zip([0.5, 0.3, 0.2], [1 / 6, 2 / 6, 3 / 6]))
    assert dkd_per_sample(s, q, torch.tensor([-1]), 1.0, 8.0, 1.0).item() == pytest.approx(8 * kl, rel=1e-6)


def test_dkd_matches_the_logit_masking_formulation():
    # DKD as written in its paper's code: binary target/non-target probabilities, and non-target
    # distributions by masking the target logit with -1000 before the softmax.
    torch.manual_seed(1)
    s, t, y, T = torch.randn(4, 6), torch.randn(4, 6), torch.tensor([0, 3, 5, 2]), 4.0
    gt = F.one_hot(y, 6).bool()
    ps, pt = F.softmax(s / T, 1), F.softmax(t / T, 1)
    bs = torch.stack([ps[gt], 1 - ps[gt]], 1)
    bt = torch.stack([pt[gt], 1 - pt[gt]], 1)
    tckd = (bt * (bt.log() - bs.log())).sum(1)
    pt2 = F.softmax(t / T - 1000.0 * gt, 1)
    log_ps2 = F.log_softmax(s / T - 1000.0 * gt, 1)
    nckd = (pt2 * (pt2.clamp_min(1e-30).log() - log_ps2)).sum(1)
    expected = (2.0 * tckd + 5.0 * nckd) * T**2
    assert torch.allclose(dkd_per_sample(s, pt, y, 2.0, 5.0, T), expected, atol=1e-5)


def test_embedding_loss_golden():
    # Two teachers, two samples. Teacher 0: sample 0 at a right angle to its target (|u - v|^2 = 2), sample 1
    # opposite (4). Teacher 1: sample 0 the same direction at another length (0), sample 1 at 60 degrees
    # (2 - 2 cos 60 = 1). Weights (0.25, 0.75) and (1, 0): (0.25 * 2 + 0.75 * 0 + 1 * 4 + 0 * 1) / 2.
    s = [torch.tensor([[2.0, 0.0], [0.0, 3.0]]), torch.tensor([[3.0, 4.0, 0.0], [1.0, 0.0, 0.0]])]
    t = [torch.tensor([[0.0, 5.0], [0.0, -1.0]]), torch.tensor([[6.0, 8.0, 0.0], [0.5, 3 ** 0.5 / 2, 0.0]])]
    w = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    assert embedding_loss(s, t, w).item() == pytest.approx(2.25, abs=1e-6)
    w = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert embedding_loss(s, t, w).item() == pytest.approx(0.5, abs=1e-6)


def test_feature_loss_golden():
    fs = [[torch.tensor([[[[1.0, 2.0]]], [[[0.0, 0.0]]]])]]  # one teacher, one stage, (2, 1, 1, 2)
    ft = [[torch.tensor([[[[0.0, 0.0]]], [[[1.0, 1.0]]]])]]
    # per-sample MSE: (1 + 4) / 2 = 2.5 and 1; weights 1 and 0.5 -> (2.5 + 0.5) / 2
    assert feature_loss(fs, ft, torch.tensor([[1.0], [0.5]])).item() == pytest.approx(1.5)


def test_specialist_combination_recovers_the_distribution_consistent_specialists_come_from():
    q_true = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]])
    ids = [torch.tensor([0, 1, 2]), torch.tensor([2, 3])]
    logits = [q_true[:, i].log() for i in ids]  # each specialist: q_true renormalised over its classes
    log_q = specialist_combination(logits, ids, torch.tensor([1.0, 1.0]), 4, steps=500)
    assert torch.allclose(log_q.exp(), q_true, atol=1e-5)


def test_specialist_combination_minimises_hintons_objective():
    """Golden values from scipy's L-BFGS on sum_k w_k KL(p_k || renormalised q[C_k]), written independently."""
    from scipy.optimize import minimize

    g = torch.Generator().manual_seed(3)
    ids = [torch.tensor([0, 1, 2, 3]), torch.tensor([3, 4, 5, 6]), torch.tensor([6, 7, 8, 9, 0])]  # Task B's
    logits = [torch.randn(2, len(i), generator=g) * 2 for i in ids]
    w = np.array([0.5, 0.3, 0.2])
    T = 2.0
    p = [torch.softmax(z.double() / T, 1).numpy() for z in logits]

    def objective(z):
        total = 0.0
        for k, i in enumerate(ids):
            zi = z[i.numpy()]
            log_r = zi - np.log(np.exp(zi - zi.max()).sum()) - zi.max()
            total += w[k] * np.sum(p[k][b] * (np.log(p[k][b]) - log_r))
        return total

    log_q = specialist_combination(logits, ids, torch.tensor(w, dtype=torch.float32), 10, T, steps=2000)
    for b in range(2):
        best = minimize(objective, np.zeros(10), method="L-BFGS-B", options={"ftol": 1e-14, "gtol": 1e-10})
        golden = best.x - np.log(np.exp(best.x).sum())
        assert objective(log_q[b].double().numpy()) == pytest.approx(best.fun, abs=1e-6)
        assert np.allclose(log_q[b].numpy(), golden, atol=2e-3)


def test_specialist_combination_of_disjoint_specialists():
    """Each specialist's classes keep its ratios; the groups' geometric means are equal."""
    ids = [torch.tensor([0, 1]), torch.tensor([2, 3, 4])]
    logits = [torch.tensor([[3.0, 0.0]]), torch.tensor([[0.5, 0.0, -0.5]])]
    log_q = specialist_combination(logits, ids, torch.tensor([1.0, 1.0]), 5)[0]
    assert torch.allclose(log_q[0] - log_q[1], torch.tensor(3.0), atol=1e-5)
    assert torch.allclose(log_q[2] - log_q[4], torch.tensor(1.0), atol=1e-5)
    assert torch.allclose(log_q[:2].mean(), log_q[2:].mean(), atol=1e-5)
    assert torch.allclose(log_q.exp().sum(), torch.tensor(1.0))
    assert log_q.argmax() == 0  # the confident specialist wins


def _disjoint_golden(logits, weights):
    """Independent numpy closed form for disjoint specialists: q_c proportional to w_k * p_kc / geomean(p_k)."""
    parts = []
    for z, w in zip(logits, weights):
        lp = z - np.log(np.exp(z - z.max()).sum()) - z.max()
        parts.append(w * np.exp(lp - lp.mean()) if w > 0 else np.zeros_like(z))
    q = np.concatenate(parts)
    return q / q.sum() if q.sum() > 0 else q


@pytest.mark.parametrize("w", [[1.0, 0.0], [1.0, 1e-6], [1.0, 1.0], [2.0, 0.5], [0.0, 3.0]])
def test_specialist_combination_weights_scale_each_groups_share_and_zero_means_no_part(w):
    a, b = np.array([5.0, 0, 0, 0, 0]), np.array([9.0, 0, 0, 0, 0])
    ids = [torch.arange(0, 5), torch.arange(5, 10)]
    logits = [torch.tensor(a, dtype=torch.float32)[None], torch.tensor(b, dtype=torch.float32)[None]]
    q = specialist_combination(logits, ids, torch.tensor([w]), 10).exp()[0]
    golden = _disjoint_golden([a, b], w)
    assert np.allclose(q.numpy(), golden, atol=1e-6)
    if w[1] == 0:
        assert torch.all(q[5:] == 0) and q[:5].sum().item() == pytest.approx(1.0)


def test_specialist_combination_is_continuous_as_a_weight_goes_to_zero():
    g = torch.Generator().manual_seed(0)
    ids = [torch.tensor([0, 1, 2]), torch.tensor([2, 3, 4]), torch.tensor([5, 6])]
    logits = [torch.randn(4, len(i), generator=g) * 3 for i in ids]
    zero = specialist_combination(logits, ids, torch.tensor([1.0, 0.5, 0.0]), 7).exp()
    tiny = specialist_combination(logits, ids, torch.tensor([1.0, 0.5, 1e-9]), 7).exp()
    assert torch.all(zero[:, 5:] == 0)  # covered only by the teacher of weight 0
    assert torch.allclose(zero, tiny, atol=1e-6)


def test_specialist_combination_with_every_weight_zero_gives_no_soft_target():
    ids = [torch.arange(0, 3), torch.arange(3, 6)]
    logits = [torch.randn(3, 3), torch.randn(3, 3)]
    w = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, 0.5]])  # per sample, as confidence weighting gives
    log_q = specialist_combination(logits, ids, w, 6)
    q = log_q.exp()
    assert torch.all(q[0] == 0) and not torch.isnan(log_q).any()
    assert q[1, :3].sum().item() == pytest.approx(1.0) and torch.all(q[1, 3:] == 0)
    # A row of zeros is no soft loss: the KL term of that sample is 0, and no gradient reaches it.
    s = torch.randn(3, 6, requires_grad=True)
    kl = kl_per_sample(s, q, 2.0)
    kl.sum().backward()
    assert kl[0].item() == 0 and torch.all(s.grad[0] == 0)


def _newton_case():
    """B = 64, 100 classes, three overlapping teachers, confident (logits x 20)."""
    g = torch.Generator().manual_seed(0)
    ids = [torch.arange(0, 45), torch.arange(30, 75), torch.cat([torch.arange(60, 100), torch.tensor([1, 2])])]
    return ids, [20 * torch.randn(64, len(i), generator=g) for i in ids]


def test_specialist_combination_converges_per_row_with_one_objective_evaluation_per_step(monkeypatch):
    import warnings

    import mtkd.losses as losses

    ids, logits = _newton_case()
    calls = []
    original = losses._combination_objective
    monkeypatch.setattr(losses, "_combination_objective", lambda *a: calls.append(1) or original(*a))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converged: no warning
        log_q = specialist_combination(logits, ids, torch.ones(3), 100)
    # Optimality: sum_k w_k (softmax(log q[C_k]) - p_k) = 0 (float32 output: within its rounding).
    z, grad = log_q.double(), torch.zeros(64, 100, dtype=torch.float64)
    for zk, i in zip(logits, ids):
        grad[:, i] += torch.softmax(z[:, i], 1) - torch.softmax(zk.double(), 1)
    assert grad.abs().max() < 1e-5
    # The line search tries every step size in one batched evaluation: one per Newton step (+ the start).
    assert len(calls) <= 51


def test_specialist_combination_warns_with_the_count_of_rows_that_did_not_converge():
    import re

    ids, logits = _newton_case()
    with pytest.warns(RuntimeWarning, match=r"\d+ of 64 samples did not converge in 2 Newton steps") as caught:
        log_q = specialist_combination(logits, ids, torch.ones(3), 100, steps=2)
    count = int(re.search(r"(\d+) of 64", str(caught[0].message)).group(1))
    z, grad = log_q.double(), torch.zeros(64, 100, dtype=torch.float64)
    for zk, i in zip(logits, ids):
        grad[:, i] += torch.softmax(z[:, i], 1) - torch.softmax(zk.double(), 1)
    far = int((grad.abs().amax(1) > 1e-3).sum())  # clearly not converged, whatever the float32 rounding
    assert 0 < far <= count <= 64


def test_attention_transfer_golden():
    from mtkd.losses import attention_loss, attention_map

    # One sample, 2 channels, 1x2 positions: the student attends to position 0, the teacher to position 1.
    fs = torch.tensor([[[[2.0, 0.0]], [[2.0, 0.0]]]])  # mean_c f^2 = [4, 0] -> normalised [1, 0]
    ft = torch.tensor([[[[0.0, 3.0]], [[0.0, 1.0]], [[0.0, 1.0]]]])  # 3 channels: [0, 11/3] -> [0, 1]
    a_s, a_t = attention_map(fs), attention_map(ft)
    assert a_s.shape == (1, 1, 1, 2) and torch.allclose(a_t.flatten(), torch.tensor([0.0, 11 / 3]))
    # mean over positions of ([1, 0] - [0, 1])^2 = 1, teacher weight 0.5
    assert attention_loss([a_s], [[a_t]], torch.tensor([[0.5]])).item() == pytest.approx(0.5)
    assert attention_loss([a_s], [[a_s]], torch.tensor([[1.0]])).item() == 0.0


def test_probability_shift_swaps_the_top_class_and_the_label_only_where_the_target_is_wrong():
    from mtkd.losses import shift_to_label

    q = torch.tensor([[0.5, 0.3, 0.2],   # top 0, label 1: swap 0 and 1
                      [0.5, 0.3, 0.2],   # top is the label: unchanged
                      [0.5, 0.3, 0.2],   # no label (-1): unchanged
                      [0.0, 0.0, 0.0],   # no target (consensus without a covering teacher): unchanged
                      [0.4, 0.4, 0.2]])  # tie between top and label: unchanged
    out = shift_to_label(q, torch.tensor([1, 0, -1, 2, 1]))
    assert torch.equal(out, torch.tensor([[0.3, 0.5, 0.2], [0.5, 0.3, 0.2], [0.5, 0.3, 0.2], [0.0, 0.0, 0.0],
                                          [0.4, 0.4, 0.2]]))
    assert torch.equal(q[0], torch.tensor([0.5, 0.3, 0.2]))  # the input is left alone

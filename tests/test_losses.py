"""Golden values computed by hand with Python's math module (no torch), see each test."""
import math

import pytest
import torch
import torch.nn.functional as F

from mtkd.losses import distillation_loss, kd_kl_loss, mixture_targets

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


@pytest.mark.parametrize("alpha, golden", [(0.0, CE_GOLDEN), (0.3, 0.7 * CE_GOLDEN + 0.3 * KD_GOLDEN), (1.0, KD_GOLDEN)])
def test_distillation_loss_mixes_hard_and_soft(alpha, golden):
    out = distillation_loss(S, Y, Q, alpha, 2.0)
    assert out["loss"].item() == pytest.approx(golden, rel=1e-6)
    assert out["loss_hard"].item() == pytest.approx(CE_GOLDEN, rel=1e-6)
    assert out["loss_soft"].item() == pytest.approx(0.0 if alpha == 0 else KD_GOLDEN, rel=1e-6)


def test_alpha_one_ignores_labels_and_alpha_zero_ignores_teachers():
    s = S.clone().requires_grad_()
    distillation_loss(s, Y, Q, 1.0, 2.0)["loss"].backward()
    g1 = s.grad.clone()
    s.grad = None
    distillation_loss(s, torch.tensor([0, 0]), Q, 1.0, 2.0)["loss"].backward()
    assert torch.equal(g1, s.grad)
    assert distillation_loss(S, Y, None, 0.5, 2.0)["loss"].item() == pytest.approx(CE_GOLDEN, rel=1e-6)


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

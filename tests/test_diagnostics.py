"""Calibration and home-ground scores, pinned by values worked out by hand."""
import math

import pytest
import torch

from mtkd.diagnostics import HOME_SCORES, calibration, home_scores, routed_predictions


def test_calibration_of_two_images_worked_by_hand():
    # p = (0.75, 0.25), label 0: right at confidence 0.75; p = (0.1, 0.9), label 0: wrong at confidence 0.9.
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, math.log(9.0)]])
    m = calibration(logits, torch.tensor([0, 0]))
    assert m["acc"] == 0.5
    assert m["nll"] == pytest.approx((-math.log(0.75) - math.log(0.1)) / 2)
    assert m["confidence"] == pytest.approx((0.75 + 0.9) / 2)
    assert m["label_prob"] == pytest.approx((0.75 + 0.1) / 2)
    # Different bins (0.733-0.8 and 0.867-0.933): |1 - 0.75| / 2 + |0 - 0.9| / 2.
    assert m["ece"] == pytest.approx(0.125 + 0.45)
    h = lambda p: -(p * math.log(p) + (1 - p) * math.log(1 - p)) / math.log(2)  # noqa: E731
    assert m["entropy"] == pytest.approx((h(0.75) + h(0.9)) / 2)


def test_calibration_bins_pool_images_of_like_confidence():
    # Both at confidence 0.75, one right and one wrong: one bin, |0.5 - 0.75|.
    logits = torch.tensor([[math.log(3.0), 0.0], [math.log(3.0), 0.0]])
    assert calibration(logits, torch.tensor([0, 1]))["ece"] == pytest.approx(0.25)


def test_temperature_softens_the_targets():
    logits = torch.tensor([[4.0, 0.0, 0.0]])
    cold, warm = (calibration(logits, torch.tensor([0]), t) for t in (1.0, 4.0))
    assert cold["acc"] == warm["acc"] == 1.0
    assert warm["confidence"] == pytest.approx(math.e / (math.e + 2))
    assert warm["entropy"] > cold["entropy"]


def test_home_scores_by_hand():
    z = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    assert HOME_SCORES.get("max_logit")(z).tolist() == [0.0, 2.0]
    assert HOME_SCORES.get("energy")(z).tolist() == pytest.approx([math.log(2), math.log(math.exp(2) + 1)])
    assert HOME_SCORES.get("max_prob")(z).tolist() == pytest.approx([0.5, math.exp(2) / (math.exp(2) + 1)])
    assert HOME_SCORES.get("neg_entropy")(z)[0].item() == pytest.approx(-1.0)  # uniform: entropy log 2 / log 2


def test_routing_picks_the_teacher_on_home_ground_and_its_class():
    # Teacher 0 over global classes (0, 1), teacher 1 over (2, 3, 4).
    ids = [torch.tensor([0, 1]), torch.tensor([2, 3, 4])]
    z0 = torch.tensor([[5.0, 0.0], [0.0, 1.0]])
    z1 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    k, pred = routed_predictions([z0, z1], ids, "max_logit")
    assert k.tolist() == [0, 1] and pred.tolist() == [0, 4]
    assert home_scores([z0, z1], "max_logit").shape == (2, 2)

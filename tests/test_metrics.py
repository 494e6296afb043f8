import math

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, precision_recall_fscore_support, roc_auc_score, top_k_accuracy_score

from mtkd.metrics import classification_metrics, expected_calibration_error, restricted_accuracy, topk_accuracy

NAMES = ["cat", "dog", "eel", "fox"]


@pytest.fixture
def example():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 4, generator=g) * 2
    labels = torch.randint(0, 4, (40,), generator=g)
    return logits, labels


def test_metrics_agree_with_scikit_learn(example):
    logits, labels = example
    m = classification_metrics(logits, labels, NAMES)
    y, p, probs = labels.numpy(), logits.argmax(1).numpy(), torch.softmax(logits, 1).numpy()
    assert m["overall_accuracy"] == pytest.approx(accuracy_score(y, p))
    assert m["top3_accuracy"] == pytest.approx(top_k_accuracy_score(y, probs, k=3, labels=range(4)))
    for avg in ("micro", "macro", "weighted"):
        prec, rec, f1, _ = precision_recall_fscore_support(y, p, average=avg, zero_division=0)
        assert (m[f"precision_{avg}"], m[f"recall_{avg}"], m[f"f1_{avg}"]) == pytest.approx((prec, rec, f1))
    assert m["roc_auc_ovr_macro"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert m["roc_auc_ovr_weighted"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="weighted"))
    for i, name in enumerate(NAMES):
        assert m["per_class_accuracy"][name] == pytest.approx(np.mean(p[y == i] == i))


def test_topk_by_hand():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    labels = torch.tensor([2, 0])
    assert topk_accuracy(logits, labels, 1) == 0.0
    assert topk_accuracy(logits, labels, 3) == 0.5
    assert topk_accuracy(logits, labels, 4) == 1.0



def test_ties_are_broken_alike_by_every_accuracy():
    """Logits run in bf16 tie: top-1 (training summary), argmax (evaluation report) and top-k all give a tie to
    the lower class index, so the two reports of one model cannot disagree."""
    torch.manual_seed(0)
    logits = torch.randn(300, 10).to(torch.bfloat16).float().round()  # many exact ties
    logits[:, 3] = logits.max(1).values  # class 3 ties for the top in every row, behind lower indices at times
    labels = torch.full((300,), 3)
    first = logits.argmax(1)
    assert (first != 3).any() and (first == 3).any()
    expected = (first == labels).float().mean().item()
    assert topk_accuracy(logits, labels, 1) == pytest.approx(expected)
    assert classification_metrics(logits, labels, [str(i) for i in range(10)])["overall_accuracy"] == \
        pytest.approx(expected)
    # Among equal logits the lower index ranks first: [5, 5, 5] -> 0, 1, 2.
    assert topk_accuracy(torch.tensor([[5.0, 5.0, 5.0]]), torch.tensor([2]), 2) == 0.0
    assert topk_accuracy(torch.tensor([[5.0, 5.0, 5.0]]), torch.tensor([1]), 2) == 1.0

def test_ece_by_hand():
    # Two samples at confidence 0.85 (bin (0.8, 0.9]), one right: |0.5 - 0.85| * 2/4 = 0.175.
    # Two samples at confidence 0.55 (bin (0.5, 0.6]), both right: |1.0 - 0.55| * 2/4 = 0.225.
    probs = torch.tensor([[0.85, 0.15], [0.85, 0.15], [0.45, 0.55], [0.45, 0.55]])
    labels = torch.tensor([0, 1, 1, 1])
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(0.4)


def test_perfect_confident_predictions_have_zero_ece():
    probs = torch.eye(3)
    assert expected_calibration_error(probs, torch.arange(3)) == pytest.approx(0.0)


def test_class_absent_from_labels_gets_no_accuracy(example):
    logits, _ = example
    labels = torch.zeros(40, dtype=torch.long)
    labels[::2] = 1
    m = classification_metrics(logits, labels, NAMES)
    assert m["per_class_accuracy"]["eel"] is None
    assert 0.0 <= m["roc_auc_ovr_macro"] <= 1.0


def test_restricted_accuracy_is_the_specialists_task():
    logits = torch.tensor([[0.0, 5.0, 1.0, 0.0],   # label 2: overall argmax 1, but among {2, 3} it picks 2
                           [0.0, 0.0, 1.0, 2.0],   # label 2: picks 3, wrong
                           [9.0, 0.0, 0.0, 1.0],   # label 3: picks 3
                           [0.0, 9.0, 0.0, 0.0]])  # label 1: not the specialist's class, ignored
    labels = torch.tensor([2, 2, 3, 1])
    assert restricted_accuracy(logits, labels, torch.tensor([2, 3])) == pytest.approx(2 / 3)
    assert math.isnan(restricted_accuracy(logits, labels, torch.tensor([0])))

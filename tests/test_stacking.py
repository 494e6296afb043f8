"""``--aggregation stacked``: the teachers calibrated into one classifier by the labelled images."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import train
from mtkd.checkpoint import load_checkpoint
from mtkd.distill import Distiller
from mtkd.stacking import L2_GRID, Stacker, cross_validated_accuracy
from mtkd.teachers import TeacherEnsemble
from mtkd.terms import KDConfig
from test_amalgamation import amalgamation_task  # noqa: F401  (a fixture)


def _data(n=240, d=6, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * 2
    truth = torch.randn(classes, d, generator=g)
    y = torch.multinomial(F.softmax(x @ truth.T, 1), 1, generator=g).squeeze(1)
    return x, y


def test_the_fit_is_the_penalised_optimum_and_ignores_images_without_a_label():
    x, y = _data()
    stacker = Stacker(6, 4)
    info = stacker.fit([x[:, :2], x[:, 2:]], y, l2=0.01)  # two teachers' outputs side by side
    w, b = stacker.linear.weight.double().numpy(), stacker.linear.bias.double().numpy()
    # The gradient of mean CE + l2 ||W||^2, written out in numpy (float64), vanishes at the optimum.
    xs, onehot = x.double().numpy(), np.eye(4)[y.numpy()]
    z = xs @ w.T + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    grad_w = (p - onehot).T @ xs / len(y) + 2 * 0.01 * w
    grad_b = (p - onehot).mean(0)
    assert np.abs(grad_w).max() < 1e-4 and np.abs(grad_b).max() < 1e-4
    assert info["fit_acc"] == pytest.approx((z.argmax(1) == y.numpy()).mean())
    assert info["images"] == 240 and stacker.fitted and stacker.l2.item() == 0.01
    # Images without a label (-1) take no part.
    more = torch.cat([x, torch.randn(50, 6) * 5])
    again = Stacker(6, 4)
    again.fit([more[:, :2], more[:, 2:]], torch.cat([y, torch.full((50,), -1)]), l2=0.01)
    assert torch.allclose(again.linear.weight, stacker.linear.weight, atol=1e-5)


def test_the_penalty_is_chosen_by_cross_validation_on_the_labelled_images():
    x, y = _data(n=120)
    info = Stacker(6, 4).fit([x], y)
    assert set(info["cv_acc"]) == set(L2_GRID)
    assert info["cv_acc"][0.01] == cross_validated_accuracy(x, y, 4, 0.01)
    best = max(info["cv_acc"].values())
    assert info["l2"] == max(p for p in L2_GRID if round(info["cv_acc"][p], 6) == round(best, 6))
    # Classes far apart: every penalty is right on every held-out image; the tie goes to the largest penalty.
    x = torch.cat([torch.randn(20, 2) * 0.1 + torch.tensor([5.0, 0.0]), torch.randn(20, 2) * 0.1 - 5.0])
    info = Stacker(2, 2).fit([x], torch.tensor([0] * 20 + [1] * 20))
    assert all(acc == 1.0 for acc in info["cv_acc"].values()) and info["l2"] == max(L2_GRID)
    with pytest.raises(ValueError, match="no labelled image"):
        Stacker(2, 2).fit([x], torch.full((40,), -1))


RAW = [torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]]), torch.tensor([[0.0, 1.0], [1.0, 2.0], [4.0, 0.5]])]
W = [[1.0, 0.0, 0.5, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, -1.0], [0.2, 0.0, 0.0, 2.0]]
BIAS = [0.5, 0.5, -0.5, 0.0]


def _stacked_step(alpha, T):
    ensemble = TeacherEnsemble([nn.Identity(), nn.Identity()], [[0, 1], [2, 3]], [1.0, 1.0], 4, ["a", "b"])
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(4, 4))
    step = Distiller(student, ensemble, KDConfig(alpha=alpha, temperature=T, aggregation="stacked",
                                                 unlabelled=True))
    with torch.no_grad():
        step.stacker.linear.weight.copy_(torch.tensor(W))
        step.stacker.linear.bias.copy_(torch.tensor(BIAS))
    return step, student


def test_the_stacked_step_against_a_hand_computation():
    T, alpha = 2.0, 0.6
    step, student = _stacked_step(alpha, T)
    x, y = torch.randn(3, 1, 2, 2), torch.tensor([1, -1, 3])
    out = step(x, y, teacher_logits=RAW)
    s = student(x).tolist()
    kl, ce = 0.0, []
    for i in range(3):
        feats = RAW[0][i].tolist() + RAW[1][i].tolist()
        t = [(sum(wj * f for wj, f in zip(W[c], feats)) + BIAS[c]) / T for c in range(4)]
        q = [math.exp(v) / sum(math.exp(u) for u in t) for v in t]
        ls = [v / T - math.log(sum(math.exp(u / T) for u in s[i])) for v in s[i]]
        kl += sum(qc * (math.log(qc) - lc) for qc, lc in zip(q, ls)) / 3
        if y[i] >= 0:
            ce.append(-(s[i][y[i]] - math.log(sum(math.exp(u) for u in s[i]))))
    expected = (1 - alpha) * sum(ce) / len(ce) + alpha * T * T * kl
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
    assert out["loss_soft"].item() == pytest.approx(T * T * kl, rel=1e-5)
    assert not [k for k in out if k.startswith("weight_")]  # the stacker weighs the teachers, not --teacher_weighting


def test_an_unlabelled_images_pseudo_label_is_the_stackers_class():
    step, _ = _stacked_step(0.5, 1.0)
    stacked = step.pseudo_labels(RAW)
    # W [z_a; z_b] + b by hand: (2.5, 0.5, -1.5, 2.4), (1.0, 3.5, -1.5, 4.0), (3.5, 1.5, 3.0, 1.2).
    assert stacked.tolist() == step.stacker(RAW).argmax(1).tolist() == [0, 3, 0]
    # The specialist combination reads the third image otherwise: the stacker's calibration decides.
    assert step.ensemble.combine(RAW, "combination").argmax(1)[2].item() == 2
    # The stacker is saved with the run's checkpoints (extra state) and never trained by the student's optimiser.
    assert {"stacker.linear.weight", "stacker.linear.bias", "stacker.l2"} <= set(step.extra_state())
    assert not any(p.requires_grad for p in step.stacker.parameters())


def test_train_py_fits_the_stacker_on_the_labelled_images_and_reports_it(amalgamation_task, tmp_path,  # noqa: F811
                                                                         capsys):
    out, cache = tmp_path / "runs", tmp_path / "cache"
    flags = ["--task", str(amalgamation_task), "--num_epochs", "1", "--student_model", "ResNet18",
             "--aggregation", "stacked", "--alpha", "0.5", "--label_fraction", "0.5", "--batch_size", "8",
             "--output_dir", str(out)]
    assert train.main(flags + ["--teacher_cache", str(cache), "--run", "stacked"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "Stacker fitted on 9 labelled images" in printed and "teacher ensemble, stacked (all classes)" in printed
    run_dir = next((out / "Taskanimals").glob("*_stacked"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stacker_l2"] in L2_GRID
    assert summary["pseudo_label_acc"] == summary["ensemble"]["stacked"]["unlabelled_acc"]
    state = load_checkpoint(run_dir / "last.pt")["distiller"]
    assert state["stacker.l2"].item() == summary["stacker_l2"] and state["stacker.linear.weight"].shape == (3, 4)
    # Without the cache the fit reads the same teachers on the same labelled images: the same stacker.
    assert train.main(flags + ["--run", "plain"]) == 0
    plain = load_checkpoint(next((out / "Taskanimals").glob("*_plain")) / "last.pt")["distiller"]
    # (The cache computes those logits in other batches, so they agree to float rounding and the fit to its
    # tolerance: within 5% of the largest weight, where a fit on other images or with another L2 is far off.)
    w_plain, w_cached = plain["stacker.linear.weight"], state["stacker.linear.weight"]
    assert (w_plain - w_cached).abs().max() <= 0.05 * w_cached.abs().max()
    # Shrunk toward the teachers' combination: the penalty is chosen among the longer grid, the method named so.
    from mtkd.stacking import L2_GRID_TOWARD

    assert train.main(flags + ["--teacher_cache", str(cache), "--stacker_prior", "combination", "--run", "toward"]) == 0
    toward = json.loads(next((out / "Taskanimals").glob("*_toward/summary.json")).read_text())
    assert toward["stacker_l2"] in L2_GRID_TOWARD
    args = json.loads(next((out / "Taskanimals").glob("*_toward/args.json")).read_text())
    from mtkd.results import record

    assert record(toward, args)["method"] == "stacked(combination)/kl"
    # A teacher that changes as the student trains cannot join a stacker fitted before: one message, exit 2.
    capsys.readouterr()
    assert train.main(flags + ["--ema_teacher", "0.99"]) == 2
    assert "--aggregation stacked" in capsys.readouterr().err


def _ensemble(dustbin, class_ids=([0, 1, 2], [3, 4], [5, 6, 7, 8]), weights=(1.0, 2.0, 1.0)):
    """An ensemble of stand-in teachers (only its class sets, weights and dustbins are read)."""
    return TeacherEnsemble([nn.Identity() for _ in class_ids], [list(c) for c in class_ids], list(weights), 9,
                           dustbin=list(dustbin))


@pytest.mark.parametrize("dustbin", [(False, False, False), (True, True, True), (True, False, True)])
def test_the_combination_prior_is_the_specialist_combination(dustbin):
    from mtkd.stacking import combination_prior

    ensemble = _ensemble(dustbin)
    g = torch.Generator().manual_seed(1)
    logits = [torch.randn(64, n, generator=g) * 3 for n in ensemble.output_sizes]
    logits[0][:5, -1] = 40.0  # an image far outside a dustbin teacher's home: its home probability floors at 1e-6
    stacker = Stacker.for_ensemble(ensemble, "combination")
    assert stacker.linear.in_features == sum(ensemble.output_sizes) + sum(dustbin)
    w, b = combination_prior(ensemble.class_ids, list(dustbin), ensemble.weights, 9)
    with torch.no_grad():
        stacker.linear.weight.copy_(w)
        stacker.linear.bias.copy_(b)
    expected = ensemble.combine(logits, "combination")  # Newton's method over the teachers, weights x home
    assert torch.allclose(F.log_softmax(stacker(logits), 1), expected, atol=1e-4)


def test_toward_the_combination_the_penalty_pulls_to_it_and_the_labels_away_from_it():
    from mtkd.stacking import L2_GRID_TOWARD

    ensemble = _ensemble((True, True, True))
    g = torch.Generator().manual_seed(2)
    logits = [torch.randn(90, n, generator=g) * 2 for n in ensemble.output_sizes]
    y = torch.arange(90) % 9
    stacker = Stacker.for_ensemble(ensemble, "combination")
    w0, b0 = stacker.prior_weight.clone(), stacker.prior_bias.clone()
    stacker.fit(logits, y, l2=0.05)
    # The optimum of mean CE + l2 ||W - W_0||^2: its gradient (written out in numpy, float64) vanishes.
    x = stacker.features(logits).double().numpy()
    w, b = stacker.linear.weight.double().numpy(), stacker.linear.bias.double().numpy()
    z = x @ w.T + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    onehot = np.eye(9)[y.numpy()]
    grad_w = (p - onehot).T @ x / len(y) + 2 * 0.05 * (w - w0.double().numpy())
    assert np.abs(grad_w).max() < 5e-4 and np.abs((p - onehot).mean(0)).max() < 5e-4  # float32 L-BFGS
    # A large penalty keeps the weights at the combination's (the biases still fit the labels); a small one
    # lets the labels move them: the labels here are noise, so the fit strays far.
    far = Stacker.for_ensemble(ensemble, "combination")
    far.fit(logits, y, l2=1e-4)
    near = Stacker.for_ensemble(ensemble, "combination")
    near.fit(logits, y, l2=100.0)
    assert (near.linear.weight - w0).abs().max() < 0.02 < (far.linear.weight - w0).abs().max()
    # The cross-validation chooses among penalties up to (almost) the combination itself; the prior is rebuilt
    # from the teachers, never saved.
    info = Stacker.for_ensemble(ensemble, "combination").fit(logits, y)
    assert set(info["cv_acc"]) == set(L2_GRID_TOWARD)
    assert set(near.state_dict()) == {"linear.weight", "linear.bias", "l2"}
    assert torch.equal(b0, Stacker.for_ensemble(ensemble, "combination").prior_bias)

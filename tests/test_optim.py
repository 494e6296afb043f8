from argparse import Namespace

import pytest
import torch

from mtkd.optim import EpochScheduler, create_optimizer, optimizer_kwargs, scheduler_kwargs


def lrs(kind, epochs=6, warmup=2, metrics=None):
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    sched = EpochScheduler(opt, kind, epochs, step_size=2, gamma=0.5, warmup_epochs=warmup)
    out = []
    for e in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step(metrics[e] if metrics else 0.5)
    return out


def test_warmup_then_step():
    # Warm-up: 1/3, 2/3, then full lr; StepLR counts its 2-epoch steps after the warm-up.
    assert lrs("step") == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 0.5, 0.5])


def test_warmup_then_cosine_to_zero():
    # Cosine over the 4 epochs after warm-up: 1, cos^2 steps (1 + cos(pi k / 4)) / 2.
    assert lrs("cosine") == pytest.approx([1 / 3, 2 / 3, 1.0, 0.853553, 0.5, 0.146447], abs=1e-6)


def test_plateau_halves_after_patience_without_improvement():
    # No warm-up; patience 2: the accuracy stops improving after epoch 1, so after 3 flat epochs lr halves.
    assert lrs("plateau", warmup=0, metrics=[0.5, 0.6, 0.6, 0.6, 0.6, 0.6]) == pytest.approx(
        [1.0, 1.0, 1.0, 1.0, 1.0, 0.5])


def test_scheduler_state_round_trip():
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    a = EpochScheduler(opt, "cosine", 6, warmup_epochs=2)
    for _ in range(3):
        opt.step()
        a.step()
    b = EpochScheduler(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0), "cosine", 6, warmup_epochs=2)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()


@pytest.mark.parametrize("kind, cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW),
                                       ("sgd", torch.optim.SGD)])
def test_optimizers_take_only_trainable_parameters(kind, cls):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[1].requires_grad_(False)
    args = Namespace(optimizer=kind, lr=0.1, weight_decay=1e-4, scheduler="step", scheduler_step=3,
                     scheduler_gamma=0.1, warmup_epochs=0)  # what train.py parses
    opt = create_optimizer(model, **optimizer_kwargs(args))
    assert isinstance(opt, cls) and len(opt.param_groups[0]["params"]) == 2
    assert opt.param_groups[0]["weight_decay"] == 1e-4 and opt.param_groups[0]["lr"] == 0.1
    scheduler = EpochScheduler(opt, epochs=10, **scheduler_kwargs(args))
    assert scheduler.kind == "step" and scheduler.main.step_size == 3 and scheduler.main.gamma == 0.1


def test_scheduler_resumes_from_a_bare_steplr_state():
    # Checkpoints written before warm-up support saved StepLR's own state_dict.
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    old = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(3):
        opt.step()
        old.step()
    opt2 = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    new = EpochScheduler(opt2, "step", 6, step_size=2, gamma=0.5)
    new.load_state_dict(old.state_dict())
    opt2.param_groups[0]["lr"] = opt.param_groups[0]["lr"]  # as the optimizer's own state restores it
    for _ in range(2):
        opt.step(), old.step(), opt2.step(), new.step()
    assert new.epoch == 5 and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 0.25

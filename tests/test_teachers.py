import torch
from torch import nn

from mtkd.teachers import TeacherEnsemble


class Fixed(nn.Module):
    """A 'teacher' that returns fixed logits and holds one parameter."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits)
        self.scale = nn.Parameter(torch.ones(()))
        self.bn = nn.BatchNorm1d(1)

    def forward(self, x):
        return self.scale * self.logits.expand(len(x), -1)


def make_ensemble():
    # Teacher 0 covers global classes (2, 0); teacher 1 covers (1, 2).
    return TeacherEnsemble([Fixed([0.0, 0.0]), Fixed([0.0, 0.0])], [[2, 0], [1, 2]], [1.0, 1.0], 3)


def test_ensemble_maps_local_outputs_to_global_classes():
    q = make_ensemble().soft_targets(torch.zeros(4, 1), temperature=1.0)
    # Each teacher splits its half of the mass evenly: class 2 is shared.
    assert q[0].tolist() == [0.25, 0.25, 0.5]
    assert torch.allclose(q.sum(1), torch.ones(4))


def test_ensemble_is_frozen_and_stays_in_eval_mode():
    ens = make_ensemble()
    ens.train()
    assert not ens.training and not any(t.training for t in ens.teachers)
    assert not any(p.requires_grad for p in ens.parameters())


def test_a_teacher_in_fp32_stays_in_fp32_inside_the_students_autocast():
    torch.manual_seed(0)
    ens = TeacherEnsemble([nn.Linear(64, 3)], [[0, 1, 2]], [1.0], 3)  # precision: fp32 / NCHW
    x = torch.randn(16, 64)
    outside = ens(x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = ens(x)[0]
    assert torch.equal(inside, outside)

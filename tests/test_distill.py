import math

import pytest
import timm
import torch
from torch import nn

from mtkd.distill import Distiller
from mtkd.terms import AGGREGATIONS, KD_LOSSES, KDConfig
from mtkd.errors import UserError
from mtkd.losses import WEIGHTINGS
from mtkd.optim import create_optimizer
from mtkd.teachers import TeacherEnsemble


class LinearTeacher(nn.Module):
    def __init__(self, n_out, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(4, n_out)

    def forward(self, x):
        return self.fc(x)


def make_ensemble():
    # Overlapping specialists over 4 global classes, as in task B.
    return TeacherEnsemble([LinearTeacher(2, 0), LinearTeacher(3, 1)], [[0, 1], [1, 2, 3]], [1.0, 2.0], 4,
                           ["low", "high"])


X, Y = torch.randn(8, 4), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])


@pytest.mark.parametrize("kd_loss", KD_LOSSES)
@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_every_method_trains_the_student_only(aggregation, weighting, kd_loss):
    ens, student = make_ensemble(), nn.Linear(4, 4)
    cfg = KDConfig(alpha=0.7, temperature=2.0, aggregation=aggregation, weighting=weighting, kd_loss=kd_loss)
    out = Distiller(student, ens, cfg)(X, Y)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["loss_soft"] > 0
    assert student.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in ens.parameters())
    # The weights actually used are reported per teacher, each a mean of rows summing to 1 (an aggregation
    # that weighs the teachers itself, stacked, uses and reports none).
    if AGGREGATIONS.get(aggregation).weighted:
        assert out["weight_low"] + out["weight_high"] == pytest.approx(1.0)
    else:
        assert not [k for k in out if k.startswith("weight_")]


def test_cached_teacher_logits_give_the_online_loss():
    ens, student = make_ensemble(), nn.Linear(4, 4)
    step = Distiller(student, ens, KDConfig(alpha=0.5, temperature=3.0, aggregation="consensus"))
    assert step(X, Y)["loss"].item() == pytest.approx(step(X, Y, teacher_logits=ens(X))["loss"].item(), rel=1e-6)


def test_alpha_zero_never_runs_the_teachers():
    class Exploding(nn.Module):
        def forward(self, x):
            raise AssertionError("teacher was run")

    ens = TeacherEnsemble([Exploding()], [[0, 1, 2]], [1.0], 3)
    out = Distiller(nn.Linear(1, 3), ens, KDConfig(alpha=0.0))(torch.randn(2, 1), torch.tensor([0, 1]))
    assert out["loss_soft"].item() == 0.0


def test_single_teacher_over_all_classes_is_classic_kd():
    teacher = TeacherEnsemble([LinearTeacher(4, 3)], [[0, 1, 2, 3]], [1.0], 4)
    grads = []
    for aggregation in AGGREGATIONS:
        student = nn.Linear(4, 4)
        torch.nn.init.constant_(student.weight, 0.1)
        torch.nn.init.zeros_(student.bias)
        step = Distiller(student, teacher, KDConfig(alpha=1.0, temperature=2.0, aggregation=aggregation))
        if step.stacker is not None:  # a stacker fitted to the identity passes the teacher's logits through
            with torch.no_grad():
                step.stacker.linear.weight.copy_(torch.eye(4))
        out = step(X, Y)
        out["loss"].backward()
        grads.append(student.weight.grad)
    assert all(torch.allclose(g, grads[0], atol=1e-6) for g in grads)


def test_temperature_schedule_and_dkd_warmup():
    ens = make_ensemble()
    step = Distiller(nn.Linear(4, 4), ens, KDConfig(alpha=0.5, temperature=4.0, temperature_final=1.0, epochs=5,
                                                    kd_loss="dkd", dkd_warmup=4))
    temps = []
    for epoch in (1, 3, 5):
        step.set_epoch(epoch)
        temps.append(step.term("kd").temperature(step.epoch))
    assert temps == [4.0, 2.5, 1.0]
    step.set_epoch(1)
    out = step(X, Y)
    # Epoch 1 of a 4-epoch warm-up: the soft term counts a quarter.
    assert out["loss"].item() == pytest.approx(0.5 * out["loss_hard"].item() + 0.5 * 0.25 * out["loss_soft"].item(),
                                               rel=1e-5)


def test_ema_teacher_joins_the_ensemble_and_follows_the_student():
    student = nn.Linear(4, 4)
    step = Distiller(student, make_ensemble(), KDConfig(alpha=0.5, temperature=2.0, ema_decay=0.5))
    opt = create_optimizer(step, "adam", lr=0.1)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == 20  # the student's 16 + 4 only
    for _ in range(3):
        before = student.weight.detach().clone()
        ema_before = step.term("ema").ema.module.weight.clone()
        for _ in range(2):  # two micro-batches (gradient accumulation), one optimiser step
            out = step(X, Y)
            out["loss"].backward()
            assert torch.equal(step.term("ema").ema.module.weight, ema_before)  # a forward pass never moves the EMA
        opt.step()
        opt.zero_grad()
        step.after_optimizer_step()
        # Once per optimiser step, with the weights that step produced: decay * old + (1 - decay) * new.
        assert torch.allclose(step.term("ema").ema.module.weight, 0.5 * ema_before + 0.5 * student.weight.detach())
        assert not torch.equal(before, student.weight)
    assert out["weight_ema"] > 0
    ema_w = step.term("ema").ema.module.weight
    assert not ema_w.requires_grad
    assert not torch.equal(ema_w, student.weight) and (ema_w - student.weight).abs().max() < 1.0


def tiny_resnet(n):
    return timm.create_model("resnet18", num_classes=n, in_chans=1)


def test_feature_matching_trains_adapters_and_student_only():
    torch.manual_seed(0)
    ens = TeacherEnsemble([tiny_resnet(2), tiny_resnet(3)], [[0, 1], [1, 2, 3]], [1.0, 1.0], 4)
    student = timm.create_model("mobilenetv3_small_100", num_classes=4, in_chans=1)
    step = Distiller(student, ens, KDConfig(alpha=0.5, temperature=2.0, feature_weight=1.0,
                                            feature_layers=["-1", "2"], aggregation="consensus"))
    assert len(step.term("features").adapters) == 2 and len(step.term("features").adapters[0]) == 2
    assert step.term("features").adapters[0][1].out_channels == 512  # resnet18's last stage
    step.train()
    out = step(torch.randn(4, 1, 32, 32), Y[:4])
    out["loss"].backward()
    assert out["loss_feat"] > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in step.term("features").adapters.parameters())
    assert all(p.grad is None for p in ens.parameters())
    # Stage names are resolved per model; a name the student lacks is a clear error.
    with pytest.raises(UserError, match="no stage 'layer3'"):
        Distiller(student, ens, KDConfig(alpha=0.5, feature_weight=1.0, feature_layers=["layer3"]))


def test_feature_maps_of_other_sizes_resize_the_teachers_side_only(monkeypatch):
    """Resampling kernels have non-deterministic CUDA backwards: they must never see the student's graph."""
    import types

    import torch.nn.functional as F

    from mtkd import terms

    seen = []

    def spying(original):
        def spy(x, *args, **kwargs):
            seen.append(x.requires_grad)
            return original(x, *args, **kwargs)
        return spy

    # mtkd.terms's own view of torch.nn.functional, with the two resampling functions spied on.
    proxy = types.SimpleNamespace(**{n: getattr(F, n) for n in dir(F) if not n.startswith("__")})
    proxy.adaptive_avg_pool2d, proxy.interpolate = spying(F.adaptive_avg_pool2d), spying(F.interpolate)
    monkeypatch.setattr(terms, "F", proxy)
    torch.manual_seed(0)
    teacher = tiny_resnet(2)  # stage 1 (layer1) at full resolution after the stem: 8x8 on 32x32 inputs
    ens = TeacherEnsemble([teacher], [[0, 1]], [1.0], 2)
    student = timm.create_model("resnet18", num_classes=2, in_chans=1)
    student.maxpool = nn.Identity()  # the student's layer1 is twice the teacher's size
    step = Distiller(student, ens, KDConfig(alpha=0.5, feature_weight=1.0, feature_layers=["layer1"]))
    out = step(torch.randn(2, 1, 32, 32), torch.tensor([0, 1]))
    out["loss"].backward()
    assert seen and not any(seen)
    assert all(p.grad is not None for p in step.term("features").adapters.parameters())


def test_compiled_student_matches_and_keeps_its_state_dict_keys():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 4))
    x = torch.randn(8, 1, 8, 8)
    compiled = Distiller(student, None, KDConfig(), compile=True)
    out = compiled(x, Y)
    assert torch.allclose(out["logits"], Distiller(student)(x, Y)["logits"], atol=1e-5)
    assert list(compiled.state_dict()) == [f"student.{k}" for k in student.state_dict()]
    out["loss"].backward()
    assert student[3].weight.grad.abs().sum() > 0


class FixedLogits(nn.Module):
    """A model whose logits are fixed (a parameter, so that the student can have gradients)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits))

    def forward(self, x):
        return self.logits.expand(len(x), -1)


def _softmax(z, T=1.0):
    e = [math.exp(v / T) for v in z]
    return [v / sum(e) for v in e]


def _kl(p, q):
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q) if a > 0)


S_FIXED, Y_FIXED = [1.0, 2.0, 0.0], 1


@pytest.mark.parametrize("aggregation", ["consensus", "mixture"])
def test_golden_loss_of_the_training_step_one_teacher(aggregation):
    """The Distiller (what trains) against hand-computed values: (1 - a) CE + a T^2 KL(softmax(z/T) || softmax(s/T))."""
    T, alpha, z = 2.0, 0.3, [2.0, 0.0, 1.0]
    ce = -math.log(_softmax(S_FIXED)[Y_FIXED])
    kd = T * T * _kl(_softmax(z, T), _softmax(S_FIXED, T))
    ens = TeacherEnsemble([FixedLogits(z)], [[0, 1, 2]], [1.0], 3)
    out = Distiller(FixedLogits(S_FIXED), ens, KDConfig(alpha=alpha, temperature=T, aggregation=aggregation))(
        torch.zeros(1, 1), torch.tensor([Y_FIXED]))
    assert out["loss_hard"].item() == pytest.approx(ce, rel=1e-6)
    assert out["loss_soft"].item() == pytest.approx(kd, rel=1e-5)
    assert out["loss"].item() == pytest.approx((1 - alpha) * ce + alpha * kd, rel=1e-5)


def test_golden_loss_of_the_training_step_amalgamate_two_specialists():
    """Disjoint specialists {0, 1} and {2}: sum_k w_k T^2 KL(p_k || softmax(s[C_k] / T)), w = 1/2 each."""
    T, alpha = 3.0, 0.5
    z0, z1 = [0.5, -0.5], [4.0]
    kd = 0.5 * T * T * _kl(_softmax(z0, T), _softmax(S_FIXED[:2], T)) + 0.5 * T * T * _kl([1.0], [1.0])
    ce = -math.log(_softmax(S_FIXED)[Y_FIXED])
    ens = TeacherEnsemble([FixedLogits(z0), FixedLogits(z1)], [[0, 1], [2]], [1.0, 1.0], 3)
    out = Distiller(FixedLogits(S_FIXED), ens, KDConfig(alpha=alpha, temperature=T, aggregation="amalgamate"))(
        torch.zeros(1, 1), torch.tensor([Y_FIXED]))
    assert out["loss_soft"].item() == pytest.approx(kd, rel=1e-5)
    assert out["loss"].item() == pytest.approx((1 - alpha) * ce + alpha * kd, rel=1e-5)


class BatchLogits(nn.Module):
    """A teacher with fixed logits per sample (row ``b`` for sample ``b``)."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("logits", torch.tensor(logits))

    def forward(self, x):
        return self.logits[: len(x)]


S_BATCH, Y_BATCH, Z_BATCH = [[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]], [1, 2], [[2.0, 0.0, 1.0], [0.0, 3.0, -1.0]]


def _golden_ce_kd(T):
    ce = sum(-math.log(_softmax(s)[y]) for s, y in zip(S_BATCH, Y_BATCH)) / 2
    kd = sum(T * T * _kl(_softmax(z, T), _softmax(s, T)) for s, z in zip(S_BATCH, Z_BATCH)) / 2
    return ce, kd


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_the_training_step_mixes_hard_and_soft(alpha):
    """(1 - a) * mean CE + a * T^2 * mean KL, against values computed with the math module."""
    T = 2.0
    ce, kd = _golden_ce_kd(T)
    ens = TeacherEnsemble([BatchLogits(Z_BATCH)], [[0, 1, 2]], [1.0], 3)
    student = BatchLogits(S_BATCH)
    out = Distiller(student, ens, KDConfig(alpha=alpha, temperature=T, aggregation="mixture"))(
        torch.zeros(2, 1), torch.tensor(Y_BATCH))
    assert out["loss"].item() == pytest.approx((1 - alpha) * ce + alpha * kd, rel=1e-5)
    assert out["loss_hard"].item() == pytest.approx(ce, rel=1e-6)
    assert out["loss_soft"].item() == pytest.approx(0.0 if alpha == 0 else kd, rel=1e-5)


def test_alpha_one_ignores_labels_and_alpha_zero_ignores_teachers():
    ens = TeacherEnsemble([BatchLogits(Z_BATCH)], [[0, 1, 2]], [1.0], 3)
    grads = []
    for labels in (Y_BATCH, [0, 0]):
        student = FixedLogits([0.0, 0.0, 0.0])
        student.logits.data = torch.tensor(S_BATCH)
        student.forward = lambda x, m=student: m.logits
        Distiller(student, ens, KDConfig(alpha=1.0, temperature=2.0, aggregation="mixture"))(
            torch.zeros(2, 1), torch.tensor(labels))["loss"].backward()
        grads.append(student.logits.grad.clone())
    assert torch.equal(grads[0], grads[1])
    out = Distiller(BatchLogits(S_BATCH), ens, KDConfig(alpha=0.0))(torch.zeros(2, 1), torch.tensor(Y_BATCH))
    assert out["loss"].item() == pytest.approx(_golden_ce_kd(2.0)[0], rel=1e-6)


@pytest.mark.parametrize("aggregation, weighting, kd_loss", [("consensus", "fixed", "kl"),
                                                            ("mixture", "confidence", "kl"),
                                                            ("amalgamate", "fixed", "dkd")])
def test_an_unlabelled_image_is_taught_as_if_labelled_with_the_combinations_class(aggregation, weighting, kd_loss):
    """Label -1: no cross-entropy; where the method needs a label, the specialist combination's class."""
    ens = make_ensemble()
    cfg = KDConfig(alpha=0.5, temperature=2.0, aggregation=aggregation, weighting=weighting, kd_loss=kd_loss,
                   unlabelled=True)
    student = nn.Linear(4, 4)
    step = Distiller(student, ens, cfg)
    pseudo = ens.combine(ens(X)).argmax(1)
    hidden = torch.full_like(Y, -1)
    out = step(X, hidden)
    assert out["loss_hard"].item() == 0.0
    assert out["loss_soft"].item() == pytest.approx(step(X, pseudo)["loss_soft"].item(), rel=1e-6)
    if aggregation == "consensus" and not torch.equal(pseudo, Y):  # the rule matters: the true labels differ
        assert out["loss_soft"].item() != pytest.approx(step(X, Y)["loss_soft"].item(), rel=1e-6)


class ConstantStudent(nn.Module):
    """A 'student' that returns fixed logits (so that only the loss's precision is tested)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(logits)

    def forward(self, x):
        return self.logits


@pytest.mark.parametrize("kd_loss", KD_LOSSES)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_soft_targets_and_losses_are_fp32_under_the_students_autocast(aggregation, kd_loss):
    torch.manual_seed(0)
    # Teachers over 40 overlapping classes, confident enough that bf16 rounding shows.
    ids = [list(range(0, 25)), list(range(15, 40))]
    ens = TeacherEnsemble([nn.Linear(4, 25), nn.Linear(4, 25)], ids, [1.0, 2.0], 40)
    for t in ens.teachers:
        nn.init.normal_(t.weight, std=3.0)
    x, y = torch.randn(32, 4), torch.randint(0, 40, (32,))
    cfg = KDConfig(alpha=0.5, temperature=2.0, aggregation=aggregation, kd_loss=kd_loss)
    step = Distiller(ConstantStudent(3 * torch.randn(32, 40)), ens, cfg)
    reference = step(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = step(x, y)
    assert inside["loss"].dtype == torch.float32
    assert inside["loss"].item() == pytest.approx(reference["loss"].item(), rel=1e-6, abs=1e-7)
    assert inside["loss_soft"].item() == pytest.approx(reference["loss_soft"].item(), rel=1e-6, abs=1e-7)


def test_attention_transfer_is_one_more_term_that_trains_the_student_only():
    torch.manual_seed(0)
    teachers = [timm.create_model("resnet10t", num_classes=2), timm.create_model("resnet18", num_classes=3)]
    ens = TeacherEnsemble(teachers, [[0, 1], [1, 2, 3]], [1.0, 1.0], 4)
    student = timm.create_model("mobilenetv3_small_050", num_classes=4)
    step = Distiller(student, ens, KDConfig(alpha=0.0, attention_weight=2.0, feature_layers=["1", "-1"]))
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    out = step(x, y)
    assert out["loss_attention"] > 0 and step.term("attention") is not None and step.term("features") is None
    # alpha 0: the loss is the cross-entropy plus the weighted attention term alone.
    assert out["loss"].item() == pytest.approx(out["loss_hard"].item() + 2.0 * out["loss_attention"].item(), rel=1e-6)
    out["loss"].backward()
    assert all(p.grad is None for p in ens.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_embedding_matching_is_one_more_term_that_trains_the_student_and_its_adapters_only():
    from mtkd.losses import embedding_loss
    from mtkd.models import capturing_embedding

    torch.manual_seed(0)
    teachers = [timm.create_model("resnet10t", num_classes=2), timm.create_model("resnet18", num_classes=3)]
    ens = TeacherEnsemble(teachers, [[0, 1], [1, 2, 3]], [1.0, 3.0], 4)
    student = timm.create_model("mobilenetv3_small_050", num_classes=4)
    step = Distiller(student, ens, KDConfig(alpha=0.0, embedding_weight=2.0))
    adapters = step.term("embedding").adapters
    assert [(a.in_features, a.out_features) for a in adapters] == [(1024, 512), (1024, 512)]
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    step.train()
    out = step(x, y)
    # The value is losses.embedding_loss of what each classifier reads, under the teachers' per-sample weights:
    # consensus (the default) takes the teachers that cover the label, in the task's ratio (1:3) where both do.
    with torch.no_grad(), capturing_embedding(student) as seen:
        student(x)
    _, _, targets = ens.outputs(x, embeddings=True)
    w = torch.tensor([[1.0, 0.0], [0.25, 0.75], [0.0, 1.0], [0.0, 1.0]])
    expected = embedding_loss([a(seen[0]) for a in adapters], targets, w)
    assert out["loss_embed"].item() == pytest.approx(expected.item(), rel=1e-5)
    # alpha 0: the cross-entropy plus the weighted embedding term alone.
    assert out["loss"].item() == pytest.approx(out["loss_hard"].item() + 2.0 * out["loss_embed"].item(), rel=1e-6)
    out["loss"].backward()
    assert all(p.grad is None for p in ens.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    # The cache's logits and embeddings give the online loss; given them, the teachers do not run.
    logits, _, embeddings = ens.outputs(x, embeddings=True)
    for teacher in teachers:
        teacher.forward = None
    cached = step(x, y, teacher_logits=logits, teacher_embeddings=embeddings)
    assert cached["loss"].item() == pytest.approx(out["loss"].item(), rel=1e-6)


def test_embedding_matching_needs_a_linear_classifier():
    ens = make_ensemble()
    student = nn.Sequential(nn.Linear(4, 4))  # no get_classifier: nothing says what its pooled features are
    with pytest.raises(UserError, match="--embedding_weight: the student"):
        Distiller(student, ens, KDConfig(alpha=0.5, embedding_weight=1.0))


def test_golden_loss_of_the_training_step_with_the_probability_shift():
    """--kd_loss shift: a teacher wrong on the label (its top class 0, label 1) has q_0 and q_1 swapped, then
    T^2 KL as usual; through consensus over all classes and per teacher through amalgamate."""
    T, alpha, z = 2.0, 0.5, [2.0, 0.0, 1.0]
    p = _softmax(z, T)
    shifted = [p[1], p[0], p[2]]
    ce = -math.log(_softmax(S_FIXED)[Y_FIXED])
    kd = T * T * _kl(shifted, _softmax(S_FIXED, T))
    ens = TeacherEnsemble([FixedLogits(z)], [[0, 1, 2]], [1.0], 3)
    for aggregation in ("consensus", "amalgamate"):
        out = Distiller(FixedLogits(S_FIXED), ens, KDConfig(alpha=alpha, temperature=T, aggregation=aggregation,
                                                           kd_loss="shift"))(torch.zeros(1, 1), torch.tensor([1]))
        assert out["loss_soft"].item() == pytest.approx(kd, rel=1e-5), aggregation
        assert out["loss"].item() == pytest.approx((1 - alpha) * ce + alpha * kd, rel=1e-5)
    # A teacher right on the label gives the plain KD.
    out = Distiller(FixedLogits(S_FIXED), ens, KDConfig(alpha=alpha, temperature=T, kd_loss="shift"))(
        torch.zeros(1, 1), torch.tensor([0]))
    assert out["loss_soft"].item() == pytest.approx(T * T * _kl(p, _softmax(S_FIXED, T)), rel=1e-5)

"""The training step built of loss terms gives what the step before it gave, to the last bit.

``legacy_distill`` is the step as it was before the refactor; both run on the
same Task B batch, with the same student, teachers and adapters, for every
method combination the command line offers, and must agree exactly on the
loss, every logged part and every gradient (and, with the EMA teacher, on the
next step after an optimiser step).
"""
import copy
import itertools

import pytest
import torch

import legacy_distill
from mtkd.config import get_args_parser
from mtkd.data import BatchTransform, load_task_data
from mtkd.distill import Distiller
from mtkd.terms import AGGREGATIONS, KD_LOSSES, KDConfig
from mtkd.losses import WEIGHTINGS
from mtkd.models import create_model
from mtkd.spec import get_task
from mtkd.specialists import create_ensemble

import tasks  # noqa: F401  (registers Task B)

# Every option the replaced step had (KD losses and aggregations added since, like ``shift`` and ``stacked``,
# have tests of their own).
LEGACY_KD_LOSSES = [k for k in KD_LOSSES if k in ("kl", "dkd")]
LEGACY_AGGREGATIONS = [a for a in AGGREGATIONS if a != "stacked"]
COMBOS = [dict(aggregation=a, teacher_weighting=w, kd_loss=k, unlabelled=u)
          for a, w, k, u in itertools.product(LEGACY_AGGREGATIONS, WEIGHTINGS, LEGACY_KD_LOSSES, (False, True))]
SPECIAL = [
    dict(aggregation="consensus", teacher_weighting="fixed", kd_loss="kl", feature_weight=0.3),
    dict(aggregation="amalgamate", teacher_weighting="confidence", kd_loss="dkd", feature_weight=0.3,
         feature_layers="1,-1", unlabelled=True),
    dict(aggregation="mixture", teacher_weighting="entropy", kd_loss="kl", ema_teacher=0.9),
    dict(aggregation="consensus", teacher_weighting="confidence", kd_loss="dkd", ema_teacher=0.5, unlabelled=True),
    dict(aggregation="combination", teacher_weighting="fixed", kd_loss="kl", temperature_final=1.0),
    dict(aggregation="consensus", teacher_weighting="fixed", kd_loss="dkd", dkd_warmup=3),
    dict(aggregation="amalgamate", teacher_weighting="fixed", kd_loss="kl", teacher_weights="1,2,0.5"),
    dict(alpha=0.0, aggregation="consensus", teacher_weighting="fixed", kd_loss="kl"),
    dict(alpha=0.0, aggregation="mixture", teacher_weighting="fixed", kd_loss="kl", feature_weight=0.2),
    dict(alpha=1.0, aggregation="combination", teacher_weighting="confidence", kd_loss="dkd", unlabelled=True),
]


@pytest.fixture(scope="module")
def batch():
    task = get_task("B")
    train = load_task_data(task).train
    images, labels = train.__getitems__(list(range(24)))
    x = BatchTransform.for_task(task)(images, augment=True, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    teachers = [create_model("resnet10t", len(t.classes), 1, 8) for t in task.teachers]
    return task, x, labels, create_ensemble(task, teachers)


def _args(combo: dict):
    flags = [f"--{k}={v}" for k, v in combo.items() if k not in ("unlabelled", "alpha")]
    return get_args_parser().parse_args(["--alpha", str(combo.get("alpha", 0.6)), "--temperature", "3",
                                         "--num_epochs", "5", *flags])


def _steps(task, ensemble, combo):
    from dataclasses import replace

    args = _args(combo)
    torch.manual_seed(1)
    student = create_model("resnet10t", task.num_classes, 1, 8)
    made = []
    for module in (legacy_distill, None):
        config = (legacy_distill.KDConfig if module else KDConfig).from_args(args)
        config = replace(config, unlabelled=combo.get("unlabelled", False))
        torch.manual_seed(2)  # the feature adapters' initialisation
        made.append((legacy_distill.Distiller if module else Distiller)(copy.deepcopy(student), ensemble, config))
    return made


def _run(step, x, y, teacher_logits, epoch):
    step.train()
    step.set_epoch(epoch)
    step.zero_grad(set_to_none=True)
    out = step(x, y, teacher_logits=teacher_logits)
    out["loss"].backward()
    parts = {k: v.detach().clone() for k, v in out.items() if torch.is_tensor(v)}
    # The student's gradients by name; the rest (feature adapters) in module order, wherever they live.
    grads = {n: p.grad.clone() for n, p in step.student.named_parameters() if p.grad is not None}
    others = [p.grad for n, p in step.named_parameters() if not n.startswith("student.") and p.grad is not None]
    grads.update({f"other {i}": g.clone() for i, g in enumerate(others)})
    return parts, grads


def _same(a: dict, b: dict, what: str):
    assert set(a) == set(b), what
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), f"{what}: {key}"


@pytest.mark.parametrize("combo", COMBOS + SPECIAL, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_the_step_built_of_terms_is_the_step_it_replaced(batch, combo):
    task, x, labels, ensemble = batch
    y = labels.clone()
    if combo.get("unlabelled"):
        y[::3] = -1
    legacy, step = _steps(task, ensemble, combo)
    cached = None if combo.get("feature_weight") else [z.half().float() for z in ensemble(x)]
    for epoch, teacher_logits in ((1, None), (2, cached)):
        parts_a, grads_a = _run(legacy, x, y, teacher_logits, epoch)
        parts_b, grads_b = _run(step, x, y, teacher_logits, epoch)
        parts_a.pop("counts", None), parts_b.pop("counts", None)
        _same(parts_a, parts_b, f"epoch {epoch} parts")
        _same(grads_a, grads_b, f"epoch {epoch} gradients")
        with torch.no_grad():  # the same update on both, then each step's own after-step state (the EMA)
            for p_a, p_b in zip(legacy.student.parameters(), step.student.parameters()):
                if p_a.grad is not None:
                    p_a -= 0.1 * p_a.grad
                    p_b -= 0.1 * p_b.grad
        legacy.after_optimizer_step()
        step.after_optimizer_step()


def test_a_checkpoint_written_before_the_terms_restores_their_state(batch):
    """Adapters and EMA weights saved under their old names (``adapters.*``, ``ema.*``) load into the terms."""
    task, x, labels, ensemble = batch
    combo = dict(aggregation="consensus", teacher_weighting="fixed", kd_loss="kl", feature_weight=0.3,
                 ema_teacher=0.9)
    legacy, step = _steps(task, ensemble, combo)
    old = {k: v for k, v in legacy.state_dict().items() if k.startswith(("adapters.", "ema."))}
    assert old and any(k.startswith("ema.module.") for k in old)
    with torch.no_grad():
        for v in old.values():
            if v.is_floating_point():
                v.add_(1.0)  # distinguishable from the fresh step's own state
    step.load_extra_state(old)
    new = step.extra_state()
    assert len(new) == len(old)
    for key, value in old.items():
        renamed = key.replace("adapters.", "terms.features.adapters.", 1) if key.startswith("adapters.") \
            else key.replace("ema.", "terms.ema.ema.", 1)
        assert torch.equal(new[renamed], value)

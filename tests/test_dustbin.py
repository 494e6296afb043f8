"""Teachers with a dustbin (``--teacher_dustbin``, Hinton et al. 2015): their data, the home probability that
weighs them, the training step that reads it, and a run end to end."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import train
from mtkd.checkpoint import load_checkpoint
from mtkd.data import ImageTensorDataset, with_others
from mtkd.distill import Distiller
from mtkd.evaluate import evaluate_task
from mtkd.results import method_name, planned_config, record
from mtkd.taskfile import load_task_file
from mtkd.teachers import TeacherEnsemble
from mtkd.terms import KDConfig
from test_taskfile import TOML, write_images


def test_a_dustbin_teacher_trains_on_its_classes_and_as_many_others():
    labels = torch.tensor([0, 1, 2, 3, 4, 5] * 4 + [-1] * 3)
    n = len(labels)
    ids = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    data = ImageTensorDataset(ids, labels)  # each image's pixels say which image it is
    out = with_others(data, [4, 1], seed=0)
    source = out.images[:, 0, 0, 0].long()
    assert len(out) == 16 and torch.bincount(out.labels).tolist() == [4, 4, 8]
    assert (labels[source][out.labels == 0] == 4).all() and (labels[source][out.labels == 1] == 1).all()
    others = labels[source][out.labels == 2]
    assert not torch.isin(others, torch.tensor([1, 4, -1])).any()  # other classes' labelled images only
    assert torch.equal(with_others(data, [4, 1], seed=0).images, out.images)
    assert not torch.equal(with_others(data, [4, 1], seed=1).images, out.images)
    # Fewer others than own images: all of them.
    few = with_others(data, [0, 1, 2, 3, 4], seed=0)
    assert torch.bincount(few.labels).tolist() == [4] * 5 + [4]


def _ensemble(dustbin=(True, True)):
    return TeacherEnsemble([nn.Identity(), nn.Identity()], [[0, 1], [2, 3]], [1.0, 3.0], 4, ["a", "b"],
                           dustbin=list(dustbin))


RAW = [torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 3.0]]), torch.tensor([[0.0, 1.0, 4.0], [1.0, 2.0, 0.5]])]


def _by_hand(raw, weights, dustbin, temperature=1.0):
    """The weighted mixture of the teachers' own-class distributions at T, each teacher's weight times its
    home probability 1 - p(other) at T = 1, written out with math only."""
    rows = []
    for b in range(raw[0].shape[0]):
        parts, mass = [], 0.0
        for z, w, d in zip(raw, weights, dustbin):
            v = z[b].tolist()
            home = 1 - math.exp(v[-1]) / sum(math.exp(t) for t in v) if d else 1.0
            own = v[:-1] if d else v
            e = [math.exp(t / temperature) for t in own]
            parts.append([w * home * x / sum(e) for x in e])
            mass += w * home
        rows.append([x / mass for p in parts for x in p])
    return torch.tensor(rows)


def test_the_home_probability_scales_each_teacher_where_teachers_are_combined():
    ens = _ensemble()
    assert ens.output_sizes == [3, 3]
    own, home = ens.split(RAW)
    assert [tuple(z.shape) for z in own] == [(2, 2), (2, 2)]
    assert torch.allclose(home[:, 0], 1 - F.softmax(RAW[0], 1)[:, 2])
    q = ens.combine(RAW, "mixture").exp()
    assert torch.allclose(q, _by_hand(RAW, [1.0, 3.0], [True, True]), atol=1e-6)
    # The second image is out of teacher a's home (p(other) = 0.91): teacher b's classes get the mass.
    assert q[1, 2:].sum() > 0.9
    # The combination reads the same weights: the group of the teacher at home wins (teacher b, three times
    # a's weight, is out of its home on the first image: p(other) = 0.95).
    assert ens.combine(RAW, "combination").argmax(1).tolist() == [0, 3]
    # A teacher without a dustbin is always at home.
    mixed = _ensemble((True, False))
    raw = [RAW[0], RAW[1][:, :2]]
    assert mixed.output_sizes == [3, 2]
    assert torch.allclose(mixed.combine(raw, "mixture").exp(), _by_hand(raw, [1.0, 3.0], [True, False]), atol=1e-6)
    assert _ensemble((False, False)).split(RAW)[1] is None


def test_the_training_step_weighs_dustbin_teachers_by_their_home_probability():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(4, 4))
    x, y = torch.randn(2, 1, 2, 2), torch.tensor([1, 2])
    T, alpha = 2.0, 0.5
    step = Distiller(student, _ensemble(), KDConfig(alpha=alpha, temperature=T, aggregation="mixture"))
    out = step(x, y, teacher_logits=RAW)
    s = student(x)
    q = _by_hand(RAW, [1.0, 3.0], [True, True], T)
    kl = (q * (q.clamp_min(1e-30).log() - F.log_softmax(s / T, 1))).sum(1).mean()
    expected = (1 - alpha) * F.cross_entropy(s, y) + alpha * T * T * kl
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    home = 1 - torch.stack([F.softmax(z, 1)[:, -1] for z in RAW], 1)
    w = torch.tensor([1.0, 3.0]) * home
    w = w / w.sum(1, keepdim=True)
    assert out["weight_a"].item() == pytest.approx(w[:, 0].mean().item(), rel=1e-5)
    assert out["weight_b"].item() == pytest.approx(w[:, 1].mean().item(), rel=1e-5)


@pytest.fixture
def animals(tmp_path):
    write_images(tmp_path / "images", per_class=10)
    path = tmp_path / "animals.toml"
    path.write_text(TOML)
    return path


def test_train_py_trains_dustbin_teachers_beside_the_plain_ones_and_distils_from_them(animals, tmp_path, capsys):
    out, cache = tmp_path / "runs", tmp_path / "cache"
    flags = ["--task", str(animals), "--teacher_dustbin", "--teacher_epochs", "1", "--num_epochs", "1",
             "--student_model", "MobileNetV3", "--alpha", "0.5", "--aggregation", "combination",
             "--teacher_cache", str(cache), "--output_dir", str(out)]
    assert train.main(flags + ["--run", "first"]) == 0
    cats, stripes = out / "Taskanimals" / "teachers" / "cats-dustbin.pt", tmp_path / "teachers" / "stripes-dustbin.pt"
    assert cats.is_file() and stripes.is_file()  # stripes names its own checkpoint: the dustbin one is beside it
    assert not (out / "Taskanimals" / "teachers" / "cats.pt").exists() and not (tmp_path / "teachers/stripes.pt").exists()
    state = load_checkpoint(cats)
    assert state["dustbin"] is True and state["model"]["fc.weight"].shape[0] == 3  # lynx, hyena, other
    assert 0 <= state["metrics"]["val_acc"] <= 1 and 0 <= state["metrics"]["dustbin_val_acc"] <= 1
    run = next((out / "Taskanimals").glob("*_first"))
    summary = json.loads((run / "summary.json").read_text())
    assert all(0 <= t["val_acc"] <= 1 for t in summary["teachers"])
    args = json.loads((run / "args.json").read_text())
    assert method_name(argparse_namespace(args)) == "combination/fixed/kl+dustbin"
    # Evaluation knows the run was taught by the dustbin teachers: each is scored on its own classes.
    task = load_task_file(animals)
    results = evaluate_task(task, output_dir=out, eval_dir=tmp_path / "eval", data_root=tmp_path, run_dir=run,
                            speed_repeats=1)
    assert [t["name"] for t in results["teachers"]] == ["cats", "stripes"]
    assert all(0 <= t["overall_accuracy"] <= 1 for t in results["teachers"])
    # A second run reuses them and the cache; a run without the flag does not take them for plain teachers.
    capsys.readouterr()
    assert train.main(flags + ["--dustbin_from_plain", "--run", "second"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "reused" in printed and "Training teacher" not in printed
    # --dustbin_from_plain says how a missing dustbin teacher would start; these were trained from scratch,
    # and the record says so (from the checkpoints), not what the flag says.
    second = next((out / "Taskanimals").glob("*_second"))
    args = json.loads((second / "args.json").read_text())
    assert method_name(argparse_namespace(args)) == "combination/fixed/kl+dustbin(plain)"
    summary = json.loads((second / "summary.json").read_text())
    assert [t["init"] for t in summary["teachers"]] == ["random", "random"]
    assert record(summary, args)["method"] == "combination/fixed/kl+dustbin"
    # A sweep knows it before the run (it skips what is recorded): from the checkpoints on disk, and where
    # there are none yet, from the flag that will start them.
    assert planned_config(args)["method"] == "combination/fixed/kl+dustbin"
    stripes.rename(stripes.with_name("away.pt"))  # cats-dustbin.pt is under --output_dir, stripes' is its own
    assert planned_config({**args, "output_dir": str(tmp_path / "none")})["method"] == \
        "combination/fixed/kl+dustbin(plain)"
    stripes.with_name("away.pt").rename(stripes)
    cats.rename(cats.with_name("cats.pt"))
    plain = [f for f in flags if f != "--teacher_dustbin"]
    assert train.main(plain + ["--run", "plain"]) == 2
    assert "was trained as resnet10t on ['lynx', 'hyena'] with a dustbin" in " ".join(capsys.readouterr().err.split())


def argparse_namespace(args: dict):
    from argparse import Namespace

    return Namespace(**args)


def test_grow_classifier_keeps_the_plain_teachers_weights_and_adds_a_fresh_output():
    from mtkd.errors import UserError
    from mtkd.models import create_model
    from mtkd.specialists import grow_classifier

    torch.manual_seed(0)
    plain, grown = create_model("resnet10t", 2, 3, 16), create_model("resnet10t", 3, 3, 16)
    fresh = {k: v.clone() for k, v in grown.state_dict().items()}
    grow_classifier(grown, plain, "teacher 'cats'")
    mine, theirs = grown.state_dict(), plain.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs if not k.startswith("fc."))
    assert torch.equal(mine["fc.weight"][:2], theirs["fc.weight"]) and torch.equal(mine["fc.bias"][:2], theirs["fc.bias"])
    assert torch.equal(mine["fc.weight"][2], fresh["fc.weight"][2]) and torch.equal(mine["fc.bias"][2], fresh["fc.bias"][2])
    x = torch.rand(4, 3, 16, 16)
    grown.eval(), plain.eval()
    assert torch.allclose(grown(x)[:, :2], plain(x), atol=1e-6)  # on its own classes it starts as the plain one
    with pytest.raises(UserError, match="not the one its dustbin teacher is built as"):
        grow_classifier(create_model("resnet18", 3, 3, 16), plain, "teacher 'cats'")  # another network


def test_train_py_starts_dustbin_teachers_from_the_plain_ones_with_dustbin_from_plain(animals, tmp_path, capsys):
    out = tmp_path / "runs"
    base = ["--task", str(animals), "--teacher_epochs", "1", "--num_epochs", "1", "--student_model", "MobileNetV3",
            "--alpha", "0.5", "--aggregation", "combination", "--output_dir", str(out)]
    dustbin = base + ["--teacher_dustbin", "--dustbin_from_plain", "--teacher_lr", "1e-12"]
    # Without the plain teachers there is nothing to start from: one message, exit 2, nothing written.
    assert train.main(dustbin + ["--run", "none"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "--dustbin_from_plain starts its dustbin teacher from the plain teacher" in err and "Fix:" in err
    assert not list(tmp_path.rglob("*-dustbin.pt"))
    assert train.main(base + ["--run", "plain"]) == 0  # trains the plain teachers
    teachers = out / "Taskanimals" / "teachers"
    plain = {"cats": load_checkpoint(teachers / "cats.pt"), "stripes": load_checkpoint(tmp_path / "teachers/stripes.pt")}
    capsys.readouterr()
    assert train.main(dustbin + ["--run", "grown"]) == 0
    assert "starting from plain teacher" in " ".join(capsys.readouterr().out.split())
    for name, path in (("cats", teachers / "cats-dustbin.pt"), ("stripes", tmp_path / "teachers/stripes-dustbin.pt")):
        state, before = load_checkpoint(path), plain[name]["model"]
        assert state["dustbin"] is True and state["init"].startswith("plain teacher")
        assert state["pretrained_layout"] is False
        # At a learning rate of 1e-12 one epoch moves nothing measurably: the weights are the plain teacher's.
        assert torch.allclose(state["model"]["conv1.0.weight"], before["conv1.0.weight"], atol=1e-7)
        assert torch.allclose(state["model"]["fc.weight"][:2], before["fc.weight"], atol=1e-7)
        assert state["model"]["fc.weight"].shape[0] == 3
    run = next((out / "Taskanimals").glob("*_grown"))
    assert method_name(argparse_namespace(json.loads((run / "args.json").read_text()))) \
        == "combination/fixed/kl+dustbin(plain)"
    capsys.readouterr()
    assert train.main(dustbin + ["--run", "again"]) == 0  # the dustbin teachers are reused, not grown again
    assert "reused" in " ".join(capsys.readouterr().out.split())
    for name in ("grown", "again"):  # trained then, reused now: both read their start from the checkpoints
        done = next((out / "Taskanimals").glob(f"*_{name}"))
        summary = json.loads((done / "summary.json").read_text())
        assert all(t["init"].startswith("plain teacher") for t in summary["teachers"])
        assert record(summary, json.loads((done / "args.json").read_text()))["method"] \
            == "combination/fixed/kl+dustbin(plain)"
    # The flag alone says nothing: exit 2 before any data is read.
    assert train.main(base + ["--dustbin_from_plain", "--run", "alone"]) == 2
    assert "Fix: add --teacher_dustbin" in " ".join(capsys.readouterr().err.split())

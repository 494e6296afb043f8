import argparse

import pytest
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


def test_teacher_precisions_are_recorded_per_machine_and_kept_on_resume(tmp_path, monkeypatch):
    import mtkd.specialists as specialists
    from mtkd.precision import Precision, SavedPrecisions

    timed = []

    def fake_choose(amp, model, example, train, deterministic, who):
        timed.append(who)
        return Precision("bf16", True) if len(timed) % 2 else Precision("fp32", False)

    monkeypatch.setattr(specialists, "choose_precision", fake_choose)
    paths = [tmp_path / "a.pt", tmp_path / "b.pt"]
    for p in paths:
        p.write_bytes(b"weights")
    ens = make_ensemble()
    ens.names = ["a", "b"]
    record = tmp_path / "precisions.json"
    x = torch.zeros(4, 1)
    first = specialists.teacher_precisions(ens, paths, x, "auto", False, record)
    assert timed == ["teacher a", "teacher b"] and record.exists()
    # The next run on this machine finds the recorded choices: nothing is timed, nothing flips.
    assert specialists.teacher_precisions(ens, paths, x, "auto", False, record) == first and len(timed) == 2
    # New weights for one teacher: that one is timed again.
    paths[1].write_bytes(b"other weights")
    specialists.teacher_precisions(ens, paths, x, "auto", False, record)
    assert timed[2:] == ["teacher b"]
    # A forced --amp is the rule itself (no record is used or written).
    specialists.teacher_precisions(ens, paths, x, "off", False, record)
    assert timed[3:] == ["teacher a", "teacher b"]
    # A resumed run keeps its own choices, unless --amp is given again.
    saved = SavedPrecisions("fp32/NCHW", ("fp32/NHWC", "fp32/NCHW"), "cpu", False)  # fp32: runs on any CPU
    record.unlink()
    kept = specialists.teacher_precisions(ens, paths, x, "auto", False, record, saved)
    assert [str(p) for p in kept] == ["fp32/NHWC", "fp32/NCHW"] and len(timed) == 5
    specialists.teacher_precisions(ens, paths, x, "auto", False, record, SavedPrecisions(
        saved.student, saved.teachers, "cpu", amp_given=True))
    assert len(timed) == 7


def test_teacher_recipe_flags_choose_how_missing_teachers_are_trained(tmp_path, monkeypatch):
    import tasks
    from mtkd import specialists
    from conftest import run_script
    from mtkd.checkpoint import load_checkpoint
    from mtkd.config import get_args_parser
    from mtkd.data import load_task_data
    from mtkd.results import load_records

    parser = get_args_parser(tasks.list_tasks())
    default = specialists.TeacherRecipe.from_args(parser.parse_args(["--lr", "0.002"]))
    assert (default.optimizer, default.lr, default.weight_decay) == ("adam", 0.002, 0.0005)  # the student's
    recipe = specialists.TeacherRecipe.from_args(parser.parse_args(
        ["--lr", "0.002", "--teacher_optimizer", "sgd", "--teacher_lr", "0.05", "--teacher_weight_decay", "0.001",
         "--teacher_epochs", "1", "--teacher_cutout", "3"]))
    made, cutouts = [], []
    real = specialists.create_optimizer
    real_transform = specialists.BatchTransform.for_task

    def spy(*args):
        made.append(real(*args))
        return made[-1]

    def spy_transform(task, cutout=0):
        cutouts.append(cutout)
        return real_transform(task, cutout)

    monkeypatch.setattr(specialists, "create_optimizer", spy)
    monkeypatch.setattr(specialists.BatchTransform, "for_task", spy_transform)
    task = tasks.get_task("B")
    path = tmp_path / "teacher.pt"
    specialists.train_teacher(task.teachers[0], task, load_task_data(task, tmp_path), recipe, torch.device("cpu"),
                              path)
    assert type(made[0]) is torch.optim.SGD
    assert made[0].defaults["lr"] == 0.05 and made[0].defaults["weight_decay"] == 0.001
    assert cutouts[0] == 3  # the teacher's training views
    saved = load_checkpoint(path)
    assert saved["recipe"] == {"optimizer": "sgd", "lr": 0.05, "weight_decay": 0.001, "batch_size": 32,
                               "scheduler": "cosine", "seed": 42, "cutout": 3}
    assert saved["epochs"] == 1
    assert saved["training"]["seconds"] > 0 and saved["training"]["machine"]["threads"] >= 1

    # The teachers' study file: one row per recipe, rendered into the pages that name it.
    study = tmp_path / "results" / "teachers.csv"
    assert run_script("benchmarks/study.py", "teachers", path, "--to", study).returncode == 0
    row, = load_records(study)
    assert (row["teacher"], row["optimizer"], row["lr"], row["cutout"], row["epochs"]) == ("teacher", "sgd", "0.05",
                                                                                           "3", "1")
    assert float(row["val_acc"]) == saved["metrics"]["val_acc"]
    assert row["precision"] == saved["training"]["precision"] != ""
    assert "already recorded" in run_script("benchmarks/study.py", "teachers", path, "--to", study).stdout
    (tmp_path / "README.md").write_text("<!-- results: teachers.csv -->\n<!-- end results -->\n")
    assert run_script("benchmarks/study.py", "readme", "--root", tmp_path).returncode == 0
    assert f"| teacher | {saved['architecture']} | sgd lr 0.05, wd 0.001, batch 32, Cutout 3 | 1 | 42 |" in \
        (tmp_path / "README.md").read_text()
    torch.save(saved["model"], tmp_path / "elsewhere.pt")
    refused = run_script("benchmarks/study.py", "teachers", tmp_path / "elsewhere.pt", "--to", study)
    assert refused.returncode == 2 and "weights trained elsewhere" in refused.stderr
    assert len(load_records(study)) == 1


def test_pre_logits_are_what_each_teachers_classifier_reads():
    from mtkd.models import create_model

    torch.manual_seed(0)
    teachers = [create_model("resnet18", n, 3, 32).eval() for n in (2, 3)]
    ens = TeacherEnsemble(teachers, [[0, 1], [2, 3, 4]], [1.0, 1.0], 5)
    x = torch.randn(4, 3, 32, 32)
    feats, logits = ens.pre_logits(x), ens(x)
    assert [f.shape for f in feats] == [(4, 512), (4, 512)]
    for teacher, f, z in zip(teachers, feats, logits):
        assert torch.allclose(teacher.get_classifier()(f), z, atol=1e-5)


@pytest.mark.slow
def test_teachers_of_another_architecture_are_fine_tuned_from_an_mtkd_network(tmp_path, capsys):
    """--teacher_architecture / --teacher_pretrained, end to end: Task B's teachers become resnet18s started
    from a small-input resnet18 (as Task A85's teacher); their checkpoints say so, the run's record names the
    recipe, and a run that asks for the task's own teachers is refused without touching them."""
    import json

    import tasks
    import train
    from mtkd.checkpoint import load_checkpoint
    from mtkd.models import create_model
    from mtkd.results import method_name

    source = create_model("resnet18", 7, 1, 8)  # 3x3 small-input stem, 7 classes of something else
    torch.save(source.state_dict(), tmp_path / "others.pt")
    out = tmp_path / "runs"
    common = ["--task", "B", "--teacher_epochs", "1", "--teacher_lr", "1e-12", "--num_epochs", "1", "--amp", "off",
              "--student_model", "MobileNetV3", "--alpha", "0.5", "--output_dir", str(out)]
    assert train.main(common + ["--teacher_architecture", "resnet18", "--teacher_pretrained",
                                str(tmp_path / "others.pt"), "--run", "pt"]) == 0
    assert "starting from file" in " ".join(capsys.readouterr().out.split())
    for spec in ("digits_0123", "digits_3456", "digits_67890"):
        state = load_checkpoint(out / "TaskB" / "teachers" / f"{spec}.pt")
        assert state["architecture"] == "resnet18" and state["init"] == f"file {tmp_path / 'others.pt'}"
        assert state["pretrained_layout"] is False and state["model"]["conv1.weight"].shape[-1] == 3
        # At a learning rate of 1e-12 one epoch moves no weight measurably: the start is the source network's.
        assert torch.allclose(state["model"]["layer4.1.conv2.weight"], source.state_dict()["layer4.1.conv2.weight"],
                              atol=1e-7)
    run = next((out / "TaskB").glob("*_pt"))
    args = json.loads((run / "args.json").read_text())
    assert method_name(argparse.Namespace(**args)) == "consensus/fixed/kl+teachers(resnet18 from others.pt)"
    # Evaluation scores the run next to the teachers it was taught by (resnet18s), not the task's own.
    from mtkd.evaluate import evaluate_task

    results = evaluate_task(tasks.get_task("B"), output_dir=out, eval_dir=tmp_path / "eval", run_dir=run,
                            speed_repeats=1)
    assert [t["name"] for t in results["teachers"]] == ["digits_0123", "digits_3456", "digits_67890"]
    assert all(0 <= t["overall_accuracy"] <= 1 for t in results["teachers"])
    before = (out / "TaskB" / "teachers" / "digits_0123.pt").read_bytes()
    assert train.main(common + ["--run", "own"]) == 2
    assert "was trained as resnet18" in " ".join(capsys.readouterr().err.split())
    assert (out / "TaskB" / "teachers" / "digits_0123.pt").read_bytes() == before

import csv
import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from conftest import run_script
from mtkd.checkpoint import load_checkpoint


def test_smoke_run_writes_checkpoints_metrics_and_args(smoke_run):
    run_dir = smoke_run["run_dir"]
    assert run_dir.name.startswith("ResNet18_a0.1_T2_e2_s42_") and run_dir.name.endswith("_smoke")
    args = json.loads((run_dir / "args.json").read_text())
    assert args["task"] == "B" and args["num_epochs"] == 2 and args["alpha"] == 0.1
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert {"train_loss", "train_loss_hard", "train_loss_soft", "train_acc", "val_acc", "lr"} <= set(rows[0])
    best, last = load_checkpoint(run_dir / "best.pt"), load_checkpoint(run_dir / "last.pt")
    assert last["epoch"] == 2 and best["val_acc"] == max(float(r["val_acc"]) for r in rows)
    assert {"model", "optimizer", "scheduler", "epoch", "args"} <= set(last)
    teachers = smoke_run["output_dir"] / "TaskB" / "teachers"
    assert sorted(p.name for p in teachers.glob("*.pt")) == ["digits_0123.pt", "digits_3456.pt", "digits_67890.pt"]


def test_smoke_run_summary_is_consistent(smoke_run):
    s = smoke_run["summary"]
    assert 0.0 <= s["test_acc"] <= 1.0 and s["best_epoch"] in (1, 2)
    assert [t["name"] for t in s["teachers"]] == ["digits_0123", "digits_3456", "digits_67890"]
    assert all(t["status"] == "trained" for t in s["teachers"])
    # Two epochs take each specialist far above chance (1/4 or 1/5) on its own classes,
    # and the student above chance (1/10) on all ten.
    assert all(t["test_acc"] > 0.6 for t in s["teachers"])
    assert s["test_acc"] > 0.3
    assert "test acc" in smoke_run["stdout"]


def test_smoke_run_tensorboard_tags(smoke_run):
    acc = EventAccumulator(str(smoke_run["run_dir"]))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {"train/loss", "train/loss_hard", "train/loss_soft", "train/acc", "val/acc", "val/loss", "lr",
                "hparam/test_acc", "hparam/best_val_acc"}
    assert expected <= tags
    assert [e.step for e in acc.Scalars("val/acc")] == [1, 2]
    assert acc.Scalars("train/loss_soft")[0].value > 0  # the teachers did contribute


def test_second_run_reuses_teachers_and_gets_a_new_folder(smoke_run, baseline_run):
    assert "reused" in baseline_run["stdout"] and baseline_run["teachers_untouched"]
    runs = sorted(p for p in (smoke_run["output_dir"] / "TaskB").iterdir() if p.name != "teachers")
    assert runs == sorted([smoke_run["run_dir"], baseline_run["run_dir"]])
    assert baseline_run["run_dir"].name.startswith("MobileNetV3_a0_T2_e2_s42_")


def test_run_curves_are_written_next_to_the_checkpoints(smoke_run):
    from PIL import Image

    for name in ("curves.png", "top1_top3.png"):
        with Image.open(smoke_run["run_dir"] / name) as img:
            assert img.format == "PNG" and img.size[0] > 300 and img.size[1] > 200


@pytest.mark.parametrize("flags, message", [
    (["--alpha", "1.5"], "--alpha: 1.5 is out of range"),
    (["--alpha", "-0.1"], "--alpha: -0.1 is out of range"),
    (["--temperature", "0"], "--temperature: 0 is out of range"),
    (["--lr", "-1"], "--lr: -1 is out of range"),
    (["--lr", "fast"], "--lr: 'fast' is not a valid float"),
    (["--batch_size", "0"], "--batch_size: 0 is out of range"),
    (["--num_epochs", "0"], "--num_epochs: 0 is out of range"),
    (["--student_model", "VGG"], "--student_model: invalid choice: 'VGG'"),
    (["--task", "Z"], "--task: unknown task 'Z'; known: A, B, or a PATH.toml task file"),
])
def test_parser_rejects_bad_values_with_exit_2(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(flags)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_flag_from_the_command_line_exits_2_without_a_run_folder(tmp_path):
    proc = run_script("train.py", "--alpha", "2", "--output_dir", tmp_path / "runs")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_missing_cifar_exits_2_with_one_message(tmp_path, monkeypatch):
    # No network in tests: make the download fail the way an offline machine does.
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets.CIFAR100, "download", offline)
    code = train.main(["--task", "A", "--data_root", str(tmp_path / "data"), "--output_dir", str(tmp_path / "runs")])
    assert code == 2
    assert not (tmp_path / "runs").exists()


def test_cpu_device_and_bad_device(tmp_path, capsys):
    code = train.main(["--device", "tpu", "--output_dir", str(tmp_path)])
    assert code == 2 and "is not a device" in capsys.readouterr().err
    assert torch.device("cpu").type == "cpu"


def test_resume_continues_exactly(smoke_run, tmp_path):
    """Two epochs straight == one epoch, then --resume to two: every tensor of the model is equal."""
    out = smoke_run["output_dir"]
    flags = ["--student_model", "MobileNetV3", "--batch_size", "256", "--alpha", "0.5", "--output_dir", out]
    assert run_script("train.py", *flags, "--num_epochs", "2", "--run", "straight").returncode == 0
    assert run_script("train.py", *flags, "--num_epochs", "1", "--run", "cut").returncode == 0
    cut = next((out / "TaskB").glob("*_cut"))
    proc = run_script("train.py", "--resume", cut, "--num_epochs", "2")
    assert proc.returncode == 0, proc.stderr
    assert "Resuming at epoch 2 of 2" in proc.stdout
    straight = load_checkpoint(next((out / "TaskB").glob("*_straight")) / "last.pt")
    resumed = load_checkpoint(cut / "last.pt")
    assert resumed["epoch"] == 2
    assert all(torch.equal(straight["model"][k], resumed["model"][k]) for k in straight["model"])
    assert [int(r["epoch"]) for r in csv.DictReader((cut / "metrics.csv").open())] == [1, 2]
    assert json.loads((cut / "args.json").read_text())["num_epochs"] == 2
    # Finished: resuming again without more epochs is refused, and nothing is touched.
    before = (cut / "last.pt").stat().st_mtime_ns
    proc = run_script("train.py", "--resume", cut)
    assert proc.returncode == 2 and "already finished 2 of 2 epochs" in proc.stderr
    assert (cut / "last.pt").stat().st_mtime_ns == before

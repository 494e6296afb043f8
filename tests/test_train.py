import argparse
import csv
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from conftest import ROOT, run_script
from mtkd.checkpoint import load_checkpoint


def test_smoke_run_writes_checkpoints_metrics_and_args(smoke_run):
    run_dir = smoke_run["run_dir"]
    assert run_dir.name.startswith("ResNet18_a0.1_T2_e2_s42_") and run_dir.name.endswith("_smoke")
    args = json.loads((run_dir / "args.json").read_text())
    assert args["task"] == "B" and args["num_epochs"] == 2 and args["alpha"] == 0.1 and args["aggregation"] == "consensus"
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
    # The ensemble rows are those of the teachers evaluated as one classifier, each way of combining them.
    from mtkd.data import BatchTransform, create_loader, load_task_data
    from mtkd.engine import evaluate
    from mtkd.evaluate import load_ensemble
    from mtkd.teachers import EnsembleClassifier
    from tasks import get_task

    from mtkd.precision import Precision

    task = get_task("B")
    ensemble, _ = load_ensemble(task, smoke_run["output_dir"])
    ensemble.set_precisions([Precision.parse(t["precision"]) for t in s["teachers"]])  # as the run had them
    test = create_loader(load_task_data(task).test, 512, train=False)
    for method in ("combination", "mixture"):
        # On the run's device: the teachers' bf16 kernels differ between devices (one image moved on a GPU).
        acc = evaluate(EnsembleClassifier(ensemble, method), test, BatchTransform.for_task(task),
                       torch.device(s["device"]))
        assert s["ensemble"][method]["test_acc"] == pytest.approx(acc["acc"], abs=1e-6)  # float32 mean; an image is 3e-3
    assert s["ensemble_test_acc"] == s["ensemble"]["combination"]["test_acc"]


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
    (["--task", "Z"], "--task: unknown task 'Z'; known: A, A85, B, or a PATH.toml task file"),
    (["--aggregation", "vote"], "--aggregation: invalid choice: 'vote'"),
    (["--teacher_weighting", "random"], "--teacher_weighting: invalid choice: 'random'"),
    (["--teacher_weights", "0.5,x"], "--teacher_weights: '0.5,x' is not a comma-separated list of numbers"),
    (["--teacher_weights", "0.5,0"], "--teacher_weights: 0.5,0: every weight must be > 0"),
    (["--kd_loss", "mse"], "--kd_loss: invalid choice: 'mse'"),
    (["--ema_teacher", "1"], "--ema_teacher: 1 is out of range: must be in [0, 1)"),
    (["--cache_views", "0"], "--cache_views: 0 is out of range"),
    (["--feature_weight", "-1"], "--feature_weight: -1 is out of range"),
    (["--attention_weight", "-1"], "--attention_weight: -1 is out of range"),
    (["--label_fraction", "0"], "--label_fraction: 0 is out of range: must be in (0, 1]"),
    (["--label_fraction", "1.5"], "--label_fraction: 1.5 is out of range: must be in (0, 1]"),
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


def test_a_transfer_set_on_a_task_without_other_images_exits_2_before_any_teacher_trains(tmp_path, capsys):
    assert train.main(["--transfer_images", "100", "--output_dir", str(tmp_path / "runs")]) == 2
    assert "task B is not one. Fix: drop --transfer_images" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_transfer_set_joins_the_students_training_images_unlabelled_and_its_cache(tmp_path, capsys):
    """Task A on a miniature CIFAR-100 (real on-disk format): the transfer images are taught by the teachers
    only; the teachers train on the task's images alone; the cache holds both; the record names the recipe."""
    from tests.test_data import write_mini_cifar100
    from mtkd.results import method_name

    write_mini_cifar100(tmp_path / "data", per_class_train=10, per_class_test=1)
    out = tmp_path / "runs"
    argv = ["--task", "A", "--data_root", str(tmp_path / "data"), "--output_dir", str(out), "--teacher_architecture",
            "resnet18", "--teacher_epochs", "1", "--num_epochs", "1", "--student_model", "MobileNetV3", "--amp", "off",
            "--aggregation", "amalgamate", "--alpha", "0.5", "--transfer_images", "85", "--teacher_cache",
            str(tmp_path / "cache"), "--cache_views", "2", "--batch_size", "16", "--run", "transfer"]
    assert train.main(argv) == 0
    printed = " ".join(capsys.readouterr().out.split())
    # 10 images per class, 10% of each class for validation: 9 x 15 labelled; one image of each other class.
    assert "Training images 135 labelled, 85 unlabelled" in printed
    assert "2 views x 220 images x 3 teachers" in printed
    run = next((out / "TaskA").glob("*_transfer"))
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["labelled_images"], summary["unlabelled_images"]) == (135, 85)
    assert summary["pseudo_label_acc"] is None  # no hidden labels: the transfer images have none in the task
    args = json.loads((run / "args.json").read_text())
    assert method_name(argparse.Namespace(**args)) == "amalgamate/fixed/kl+teachers(resnet18)+transfer(85)"


def test_embedding_matching_trains_from_the_cache_and_is_named_in_the_record(smoke_run, tmp_path, capsys):
    from mtkd.results import method_name

    out = _runs_with_teachers(smoke_run, tmp_path)
    flags = ["--student_model", "MobileNetV3", "--batch_size", "256", "--alpha", "0.5", "--embedding_weight", "2",
             "--teacher_cache", str(tmp_path / "cache"), "--cache_views", "2", "--num_epochs", "1",
             "--output_dir", str(out)]
    assert train.main(flags + ["--run", "first"]) == 0
    assert ": built, 2 views" in capsys.readouterr().out
    assert train.main(flags + ["--run", "second"]) == 0
    assert ": reused, 2 views" in capsys.readouterr().out  # the embeddings were kept with the logits
    run = next((out / "TaskB").glob("*_second"))
    row = next(csv.DictReader((run / "metrics.csv").open()))
    assert 0 < float(row["train_loss_embed"]) <= 4  # 2 - 2 cos, averaged
    assert float(row["train_loss"]) > float(row["train_loss_hard"]) * 0.5
    args = json.loads((run / "args.json").read_text())
    assert method_name(argparse.Namespace(**args)) == "consensus/fixed/kl+embed(2)"
    # The adapters are the step's state: saved beside the student for --resume.
    assert any(k.startswith("terms.embedding.adapters.") for k in load_checkpoint(run / "last.pt")["distiller"])


def test_an_earlier_student_teaches_over_every_class_as_an_assistant(smoke_run, tmp_path, capsys):
    """--teacher_assistant: the smoke run's ResNet18 student is the one teacher, its weights as they were."""
    from mtkd.results import method_name

    out = _runs_with_teachers(smoke_run, tmp_path)
    best = smoke_run["run_dir"] / "best.pt"
    flags = ["--student_model", "MobileNetV3", "--batch_size", "256", "--alpha", "0.5", "--embedding_weight", "1",
             "--teacher_assistant", str(best), "--teacher_cache", str(tmp_path / "cache"), "--cache_views", "2",
             "--num_epochs", "1", "--output_dir", str(out), "--run", "assisted"]
    assert train.main(flags) == 0
    assert ": built, 2 views" in capsys.readouterr().out
    run = next((out / "TaskB").glob("*_assisted"))
    s = json.loads((run / "summary.json").read_text())
    (teacher,) = s["teachers"]
    assert teacher["name"] == "assistant" and teacher["architecture"] == "resnet18"
    assert teacher["classes"] == [str(i) for i in range(10)] and teacher["status"] == "external"
    # Measured on every class, it reads what the smoke run's student read on the test split (one image: 1/360).
    assert teacher["test_acc"] == pytest.approx(smoke_run["summary"]["test_acc"], abs=0.006)
    args = json.loads((run / "args.json").read_text())
    assert method_name(argparse.Namespace(**args)) == "consensus/fixed/kl+embed(1)+assistant(ResNet18)"
    # Its specialists are untouched; evaluation rebuilds the assistant from the run's arguments.
    assert sorted(p.name for p in (out / "TaskB" / "teachers").glob("*.pt")) == \
        ["digits_0123.pt", "digits_3456.pt", "digits_67890.pt"]
    from mtkd.evaluate import evaluate_task
    from tasks import get_task
    results = evaluate_task(get_task("B"), output_dir=out, eval_dir=tmp_path / "eval", run_dir=run, speed_repeats=1)
    assert [t["name"] for t in results["teachers"]] == ["assistant"]
    assert results["teachers"][0]["overall_accuracy"] == pytest.approx(teacher["test_acc"], abs=0.006)


def test_an_assistant_of_another_task_or_beside_a_dustbin_exits_2(smoke_run, tmp_path, capsys):
    best = smoke_run["run_dir"] / "best.pt"
    state = load_checkpoint(best)
    other = tmp_path / "other.pt"
    torch.save({**state, "task": "A", "class_names": [f"c{i}" for i in range(15)]}, other)
    out = tmp_path / "runs"
    assert train.main(["--teacher_assistant", str(other), "--output_dir", str(out)]) == 2
    assert f"--teacher_assistant {other} is a student of task A (15 classes), not of task B" in capsys.readouterr().err
    assert train.main(["--teacher_assistant", str(best), "--teacher_dustbin", "--output_dir", str(out)]) == 2
    assert "--teacher_dustbin gives the task's specialists a dustbin, but --teacher_assistant" in \
        capsys.readouterr().err
    assert train.main(["--teacher_assistant", str(tmp_path / "none.pt"), "--output_dir", str(out)]) == 2
    assert f"--teacher_assistant {tmp_path / 'none.pt'}: no such file" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--teacher_weights", "1,2"], "--teacher_weights has 2 weights but task B has 3 teachers"),
    (["--teacher_cache", "c", "--feature_weight", "1"], "logits and pooled features only, but --feature_weight"),
    (["--teacher_cache", "c", "--attention_weight", "1"], "but --attention_weight needs their feature maps"),
    (["--stacker_prior", "combination"], "but --aggregation is consensus. Fix: add --aggregation stacked"),
])
def test_distillation_flags_that_do_not_fit_the_task_exit_2(flags, message, tmp_path, capsys):
    assert train.main(flags + ["--output_dir", str(tmp_path / "runs")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_cpu_device_and_bad_device(tmp_path, capsys):
    code = train.main(["--device", "tpu", "--output_dir", str(tmp_path)])
    assert code == 2 and "is not a device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert train.main(["--device", "cuda", "--output_dir", str(tmp_path)]) == 2
        assert "no CUDA device is available. Fix: use --device cpu" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written


def _runs_with_teachers(smoke_run, tmp_path):
    """An output folder that shares the smoke run's teachers."""
    out = tmp_path / "runs"
    (out / "TaskB").mkdir(parents=True)
    (out / "TaskB" / "teachers").symlink_to(smoke_run["output_dir"] / "TaskB" / "teachers")
    return out


def _start(*flags):
    return subprocess.Popen([sys.executable, "train.py", *map(str, flags)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_epoch(proc, run_glob, epoch, timeout=600):
    """Poll until ``metrics.csv`` of the run has ``epoch`` rows (or the process ends)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        metrics = list(run_glob())
        if metrics and len(metrics[0].read_text().splitlines()) > epoch:
            return
        time.sleep(0.05)
    raise AssertionError(f"epoch {epoch} never finished: {proc.poll()} {proc.stderr.read() if proc.poll() else ''}")


def test_interrupted_and_killed_runs_resume_exactly(smoke_run, tmp_path, capsys):
    """3 epochs straight == SIGTERM in epoch 2, resume, SIGKILL after epoch 2, resume: every tensor equal.

    The runs distil from the teacher cache (built by the first, reused by the others), so this also
    shows that a resumed run replays the same cached views.
    """
    out = _runs_with_teachers(smoke_run, tmp_path)
    flags = ["--student_model", "MobileNetV3", "--batch_size", "256", "--alpha", "0.5", "--aggregation", "consensus",
             "--teacher_cache", str(tmp_path / "cache"), "--cache_views", "2", "--deterministic",
             "--num_epochs", "3", "--output_dir", str(out)]
    assert train.main(flags + ["--run", "straight"]) == 0
    assert ": built, 2 views" in capsys.readouterr().out

    proc = _start(*flags, "--run", "cut")
    _wait_for_epoch(proc, lambda: (out / "TaskB").glob("*_cut/metrics.csv"), 1)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    cut = next((out / "TaskB").glob("*_cut"))
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "SIGTERM at epoch 2" in stderr and f"Resume with: python train.py --resume {cut}" in stderr
    assert "Traceback" not in stderr and ": reused, 2 views" in stdout
    assert load_checkpoint(cut / "last.pt")["epoch"] == 1

    proc = _start("--resume", cut)
    _wait_for_epoch(proc, lambda: [cut / "metrics.csv"], 2)
    proc.kill()
    proc.communicate()
    assert load_checkpoint(cut / "last.pt")["epoch"] in (1, 2)  # SIGKILL: whatever was saved last

    assert train.main(["--resume", str(cut)]) == 0
    straight = load_checkpoint(next((out / "TaskB").glob("*_straight")) / "last.pt")
    resumed = load_checkpoint(cut / "last.pt")
    assert resumed["epoch"] == 3
    assert all(torch.equal(straight["model"][k], resumed["model"][k]) for k in straight["model"])
    assert [int(r["epoch"]) for r in csv.DictReader((cut / "metrics.csv").open())] == [1, 2, 3]
    # Finished: resuming again without more epochs is refused, and nothing is touched.
    before = (cut / "last.pt").stat().st_mtime_ns
    assert train.main(["--resume", str(cut)]) == 2
    assert "already finished 3 of 3 epochs" in capsys.readouterr().err
    assert (cut / "last.pt").stat().st_mtime_ns == before


def test_torchrun_two_processes_match_a_single_process_evaluation(smoke_run, tmp_path):
    import shutil

    out = tmp_path / "runs"
    shutil.copytree(smoke_run["output_dir"] / "TaskB" / "teachers", out / "TaskB" / "teachers",
                    ignore=shutil.ignore_patterns("digits_*"))  # the checkpoints, not their event folders
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train.py", "--num_epochs", "1", "--student_model", "ResNet18", "--batch_size", "64",
                           "--alpha", "0.5", "--output_dir", str(out), "--run_name", "ddp",
                           "--retrain_teachers", "--teacher_epochs", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "x 2 processes" in proc.stdout and proc.stdout.count("Run folder") == 1  # rank 0 prints
    # --retrain_teachers retrains each teacher once (rank 0); the other rank loads them.
    events = sorted(p.parent.name for p in (out / "TaskB" / "teachers").glob("*/events.out.tfevents.*"))
    assert events == ["digits_0123", "digits_3456", "digits_67890"]
    runs = [p for p in (out / "TaskB").iterdir() if p.name != "teachers"]
    assert len(runs) == 1 and (runs[0] / "summary.json").is_file()
    reported = float(next(csv.DictReader((runs[0] / "metrics.csv").open()))["val_acc"])

    from mtkd.data import BatchTransform, create_loader, load_task_data
    from mtkd.engine import evaluate
    from mtkd.models import create_student
    from tasks import get_task

    from mtkd.precision import Precision

    task = get_task("B")
    student = create_student("ResNet18", task)
    last = load_checkpoint(runs[0] / "last.pt")
    student.load_state_dict(last["model"])
    precision = Precision.parse(last["precision"])  # as the run evaluated it (bf16 where the CPU has the units)
    val = evaluate(precision.prepare_model(student), create_loader(load_task_data(task).val, 512, train=False),
                   BatchTransform.for_task(task), torch.device("cpu"), precision=precision)
    assert reported == pytest.approx(val["acc"], abs=1e-9)


@pytest.mark.slow
def _children(pid: int) -> list[int]:
    """The direct child processes of ``pid`` (from /proc)."""
    import os

    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry))
    return kids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds torchrun's workers through /proc")
def test_sigterm_to_one_torchrun_worker_stops_every_rank_the_same_way(smoke_run, tmp_path):
    """A SIGTERM to rank 1 alone: both ranks stop at the same step through mtkd's own stop path (same
    message, exit code 143), and rank 0 saves the last complete epoch, as a single process does."""
    out = _runs_with_teachers(smoke_run, tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train.py", "--num_epochs", "50", "--student_model", "MobileNetV3", "--batch_size", "32",
                             "--alpha", "0", "--output_dir", str(out), "--run_name", "term"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    _wait_for_epoch(proc, lambda: (out / "TaskB").glob("*_term/metrics.csv"), 1)
    workers = sorted(_children(proc.pid))
    assert len(workers) == 2, workers
    rank1 = next(w for w in workers if "LOCAL_RANK=1" in open(f"/proc/{w}/environ").read().replace("\0", " "))
    __import__("os").kill(rank1, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    import re

    stops = re.findall(r"error: (SIGTERM at epoch \d+, step \d+)", stderr)
    assert len(stops) == 2 and stops[0] == stops[1], stderr[-3000:]  # both ranks, the same step
    assert proc.returncode != 0 and "exitcode  : -9" not in stderr  # nobody killed from outside
    epoch = int(re.search(r"epoch (\d+)", stops[0]).group(1))
    assert load_checkpoint(next((out / "TaskB").glob("*_term")) / "last.pt")["epoch"] == epoch - 1


@pytest.mark.slow
def test_single_teacher_task_with_every_distillation_signal(tmp_path, monkeypatch):
    """One teacher over all classes (classic KD), with DKD, features, EMA teacher and a temperature
    schedule; and the training options: SGD, plateau schedule with warm-up, clipping, accumulation,
    early stopping and top-k checkpoints."""
    from dataclasses import replace

    from mtkd.spec import TASKS, TeacherSpec
    from tasks import task_b

    single = replace(task_b.TASK, name="B1", teachers=(TeacherSpec("all", "resnet10t", task_b.DIGITS),))
    monkeypatch.setitem(TASKS._items, "B1", single)
    out = tmp_path / "runs"
    code = train.main(["--task", "B1", "--teacher_epochs", "1", "--num_epochs", "3", "--student_model", "ResNet18",
                       "--batch_size", "128", "--alpha", "0.5", "--aggregation", "amalgamate",
                       "--teacher_weighting", "confidence", "--kd_loss", "dkd", "--dkd_warmup", "2",
                       "--feature_weight", "0.5", "--feature_layers", "layer2,-1", "--ema_teacher", "0.9",
                       "--temperature", "4", "--temperature_final", "1", "--optimizer", "sgd", "--lr", "0.05",
                       "--scheduler", "plateau", "--warmup_epochs", "1", "--clip_grad", "5", "--grad_accum", "2",
                       "--early_stopping", "1", "--save_top_k", "2", "--output_dir", str(out)])
    assert code == 0
    run_dir = next(p for p in (out / "TaskB1").iterdir() if p.name != "teachers")
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert [float(r["train_temperature"]) for r in rows] == [4.0, 2.5, 1.0][: len(rows)]
    assert all(float(r["train_loss_feat"]) > 0 and float(r["train_loss_soft"]) > 0 for r in rows)
    # The teacher and the EMA teacher share the weight per sample; TensorBoard gets the means.
    assert all(float(r["train_weight_all"]) + float(r["train_weight_ema"]) == pytest.approx(1.0) for r in rows)
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    assert {"train/weight_all", "train/weight_ema", "train/loss_feat"} <= set(acc.Tags()["scalars"])
    # Adapters and the EMA model are saved with the student.
    best = load_checkpoint(run_dir / "best.pt")
    assert any(k.startswith("terms.features.adapters.0.1.") for k in best["distiller"])
    assert any(k.startswith("terms.ema.ema.module.") for k in best["distiller"])
    assert json.loads((run_dir / "summary.json").read_text())["aggregation"] == "amalgamate"
    # Warm-up: lr 0.025 in epoch 1, then 0.05.
    assert [float(r["lr"]) for r in rows[:2]] == pytest.approx([0.025, 0.05][: len(rows[:2])])
    # Early stopping (patience 1): the run ends at the first epoch that does not beat the best so far.
    val = [float(r["val_acc"]) for r in rows]
    first_flat = next((e for e in range(1, len(val)) if val[e] <= max(val[:e])), None)
    assert len(rows) == (first_flat + 1 if first_flat is not None else 3)
    # Top-2 checkpoints by validation accuracy (ties: the earlier epoch).
    ranked = sorted(range(len(val)), key=lambda e: (-val[e], e))[:2]
    assert sorted(p.name for p in (run_dir / "top").glob("*.pt")) == sorted(f"epoch_{e + 1:03d}.pt" for e in ranked)


def test_fp16_runs_checkpoint_and_restore_their_grad_scaler(smoke_run, tmp_path, monkeypatch):
    """The GradScaler's state is in last.pt and a resume loads it. fp16 autocast itself is emulated on a CPU
    (about 35x slower), so it is replaced by a no-op here: this checks the checkpoint plumbing."""
    from contextlib import nullcontext

    from mtkd.precision import Precision

    monkeypatch.setattr(Precision, "autocast", lambda self, device: nullcontext())
    loaded = []
    original = torch.amp.GradScaler.load_state_dict
    monkeypatch.setattr(torch.amp.GradScaler, "load_state_dict",
                        lambda self, state: (loaded.append(dict(state)), original(self, state))[1])
    out = _runs_with_teachers(smoke_run, tmp_path)
    flags = ["--student_model", "MobileNetV3", "--batch_size", "256", "--alpha", "0", "--amp", "fp16",
             "--num_epochs", "1", "--output_dir", str(out), "--run", "fp16"]
    assert train.main(flags) == 0
    run_dir = next((out / "TaskB").glob("*_fp16"))
    last = load_checkpoint(run_dir / "last.pt")
    assert last["precision"] == "fp16/NCHW" and last["scaler"]["scale"] > 0
    assert train.main(["--resume", str(run_dir), "--num_epochs", "2"]) == 0
    assert loaded and loaded[0]["scale"] == last["scaler"]["scale"]
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 2


def test_a_pretrained_student_records_its_weights_and_evaluates_with_its_layout(smoke_run, tmp_path):
    import timm

    from mtkd.evaluate import load_student
    from tasks import get_task

    weights = tmp_path / "resnet18_imagenet.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), weights)
    out = _runs_with_teachers(smoke_run, tmp_path)
    assert train.main(["--student_model", "ResNet18", "--pretrained", str(weights), "--alpha", "0",
                       "--num_epochs", "1", "--output_dir", str(out), "--run", "pretrained"]) == 0
    run_dir = next((out / "TaskB").glob("*_pretrained"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["student_init"] == f"file {weights}"
    best = load_checkpoint(run_dir / "best.pt")
    assert best["init"] == f"file {weights}" and best["model"]["conv1.weight"].shape[-1] == 7
    assert best["image_size"] == summary["student_image_size"] == 8
    student, _ = load_student(run_dir / "best.pt", get_task("B"))  # the pretrained layout: the 7x7 stem
    assert student.conv1.kernel_size == (7, 7) and student.conv1.stride == (1, 1)


def test_a_student_of_other_inputs_is_refused_by_evaluation(smoke_run, tmp_path):
    from dataclasses import replace

    from mtkd.checkpoint import save_checkpoint
    from mtkd.errors import UserError
    from mtkd.evaluate import load_student
    from tasks import get_task

    state = load_checkpoint(smoke_run["run_dir"] / "best.pt")
    assert state["image_size"] == 8
    task = get_task("B")
    assert load_student(smoke_run["run_dir"] / "best.pt", task)[1]["image_size"] == 8
    with pytest.raises(UserError, match="a student of 8-px inputs, but task B now has 16-px images"):
        load_student(save_checkpoint(state, tmp_path / "best.pt"), replace(task, image_size=16))


def test_the_students_auto_precision_is_recorded_for_the_next_run_on_this_machine(smoke_run):
    from mtkd.precision import PrecisionRecord

    record = PrecisionRecord(smoke_run["output_dir"] / "TaskB" / "teachers" / "precisions.json", torch.device("cpu"))
    entry = record.known["student ResNet18, batch 32x1x8x8, random"]
    assert entry["precision"] == smoke_run["summary"]["precision"] and entry["batch"] == [32, 1, 8, 8]


def test_eval_every_validates_every_nth_epoch_and_the_last_and_chooses_among_those(smoke_run, tmp_path):
    """--eval_every 2 over 5 epochs: validation after epochs 2, 4 and 5 only; the other metrics.csv rows have
    empty val columns; the best, top-k and plateau schedule see validated epochs only; curves are drawn."""
    out = _runs_with_teachers(smoke_run, tmp_path)
    flags = ["--student_model", "MobileNetV3", "--batch_size", "256", "--alpha", "0", "--num_epochs", "5",
             "--eval_every", "2", "--save_top_k", "2", "--scheduler", "plateau", "--scheduler_step", "1",
             "--output_dir", str(out), "--run", "sparse"]
    assert train.main(flags) == 0
    run_dir = next((out / "TaskB").glob("*_sparse"))
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4", "5"]
    assert [r["val_acc"] != "" for r in rows] == [False, True, False, True, True]
    assert all(r["train_loss"] != "" for r in rows)
    val = {int(r["epoch"]): float(r["val_acc"]) for r in rows if r["val_acc"]}
    summary = json.loads((run_dir / "summary.json").read_text())
    best = max(val, key=lambda e: (val[e], -e))
    assert summary["best_epoch"] == best and summary["best_val_acc"] == pytest.approx(val[best])
    assert load_checkpoint(run_dir / "best.pt")["epoch"] == best
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 5
    kept = json.loads((run_dir / "top" / "index.json").read_text())
    assert {e["epoch"] for e in kept} <= set(val) and len(kept) == 2
    # Plateau, patience 1 counted in validations: three validations cannot lower the rate before epoch 5 ends
    # (counted in epochs, with the last accuracy repeated, they could).
    assert len({r["lr"] for r in rows}) == 1
    assert (run_dir / "curves.png").is_file() and (run_dir / "top1_top3.png").is_file()
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    assert [e.step for e in acc.Scalars("val/acc")] == [2, 4, 5]
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5]


def test_loop_validates_every_nth_epoch_and_the_last():
    from mtkd.loop import LoopConfig

    loop = LoopConfig(32, 0, eval_every=3)
    assert [e for e in range(1, 8) if loop.validates(e, 7)] == [3, 6, 7]
    assert all(LoopConfig(32, 0).validates(e, 7) for e in range(1, 8))

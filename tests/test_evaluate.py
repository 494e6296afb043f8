import json

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import tasks
from conftest import run_script
from mtkd.data import load_task_data

RESULT_KEYS = {
    "task", "model_path", "student_model", "overall_accuracy", "per_class_accuracy", "top3_accuracy",
    "precision_micro", "precision_macro", "precision_weighted", "recall_micro", "recall_macro", "recall_weighted",
    "f1_micro", "f1_macro", "f1_weighted", "roc_auc_ovr_macro", "roc_auc_ovr_weighted", "ece",
    "teacher_student_agreement", "num_parameters", "teachers", "ensemble", "baseline", "size_speed",
}


@pytest.fixture(scope="module")
def evaluated(smoke_run, baseline_run, tmp_path_factory):
    """evaluation.py on Task B's distilled smoke run (a baseline run exists beside it)."""
    eval_dir = tmp_path_factory.mktemp("evaluation")
    proc = run_script("evaluation.py", "--task", "B", "--run_dir", smoke_run["run_dir"], "--output_dir",
                      smoke_run["output_dir"], "--eval_dir", eval_dir, "--speed_repeats", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = eval_dir / "TaskB"
    return {"dir": out, "eval_dir": eval_dir, "stdout": proc.stdout,
            "results": json.loads((out / "results.json").read_text()), "run_dir": smoke_run["run_dir"]}


def test_results_schema(evaluated):
    r = evaluated["results"]
    assert RESULT_KEYS <= set(r)
    assert r["task"] == "B" and r["student_model"] == "ResNet18" and r["model_path"].endswith("best.pt")
    assert list(r["per_class_accuracy"]) == list("0123456789")
    assert 0 <= r["ece"] <= 1 and 0 <= r["teacher_student_agreement"] <= 1
    assert [t["name"] for t in r["teachers"]] == ["digits_0123", "digits_3456", "digits_67890"]
    assert r["baseline"]["student_model"] == "MobileNetV3" and "_baseline" in r["baseline"]["model_path"]
    assert [row["model"] for row in r["size_speed"]] == [
        "student ResNet18", "teacher digits_0123", "teacher digits_3456", "teacher digits_67890"]
    for row in r["size_speed"]:
        assert row["latency_b1_ms"] > 0 and row["latency_b64_ms"] > row["latency_b1_ms"] / 2
        assert row["checkpoint_mb"] > row["weights_mb"] * 0.9
        assert not np.isnan(row["peak_memory_b64_mb"])


def test_test_accuracy_matches_the_training_summary(evaluated, smoke_run):
    """Evaluation runs the student in the precision the run recorded (bf16 on a CPU with bf16 units)."""
    assert evaluated["results"]["precision"] == smoke_run["summary"]["precision"]
    assert evaluated["results"]["overall_accuracy"] == pytest.approx(smoke_run["summary"]["test_acc"], abs=1e-6)


@pytest.mark.parametrize("name", ["confusion_matrix.png", "sample_predictions.png", "comparison.png"])
def test_figures_are_real_pngs(evaluated, name):
    with Image.open(evaluated["dir"] / name) as img:
        assert img.format == "PNG" and img.size[0] >= 400 and img.size[1] >= 300
        assert len(set(img.convert("L").getdata())) > 10  # not a blank canvas


def test_text_reports(evaluated):
    report = (evaluated["dir"] / "classification_report.txt").read_text()
    assert "precision" in report and "macro avg" in report
    comparison = (evaluated["dir"] / "comparison.md").read_text()
    assert "| overall_accuracy |" in comparison and "baseline (alpha 0)" in comparison
    assert "| student ResNet18 |" in (evaluated["dir"] / "size_speed.md").read_text()


def test_summary_json_and_table(evaluated):
    rows = json.loads((evaluated["eval_dir"] / "summary.json").read_text())
    assert len(rows) == 1 and rows[0]["task"] == "B"
    r = evaluated["results"]
    assert rows[0]["delta_vs_baseline"] == pytest.approx(r["overall_accuracy"] - r["baseline"]["overall_accuracy"])
    assert rows[0]["delta_vs_ensemble"] == pytest.approx(r["overall_accuracy"] - r["ensemble"]["overall_accuracy"])
    assert "Evaluation summary" in evaluated["stdout"]


def test_figures_and_metrics_reach_the_runs_tensorboard(evaluated):
    acc = EventAccumulator(str(evaluated["run_dir"]))
    acc.Reload()
    assert {"test/confusion_matrix", "test/sample_predictions"} <= set(acc.Tags()["images"])
    assert "test/overall_accuracy" in acc.Tags()["scalars"]


def test_untrained_task_gets_a_row_and_exit_1(tmp_path):
    proc = run_script("evaluation.py", "--output_dir", tmp_path / "runs", "--eval_dir", tmp_path / "ev")
    assert proc.returncode == 1
    rows = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert [r["error"] for r in rows] == ["not trained yet: python train.py --task A",
                                          "not trained yet: python train.py --task B"]
    assert "Traceback" not in proc.stderr


def test_single_image_prediction(smoke_run, tmp_path):
    task = tasks.get_task("B")
    test = load_task_data(task).test
    i = int((test.labels == 7).nonzero()[0])
    # A 64x64 RGB PNG of a test digit: the script converts it to 8x8 grey.
    Image.fromarray(test.images[i, 0].numpy()).resize((64, 64), Image.NEAREST).convert("RGB").save(tmp_path / "d.png")
    proc = run_script("evaluation.py", "--task", "B", "--image", tmp_path / "d.png", "--run_dir",
                      smoke_run["run_dir"], "--topk", "3")
    assert proc.returncode == 0, proc.stderr
    lines = [line.split() for line in proc.stdout.splitlines() if line.strip()[:2] in ("1.", "2.", "3.")]
    assert len(lines) == 3
    probs = [float(line[2]) for line in lines]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001


def test_single_image_that_is_not_an_image(smoke_run, tmp_path):
    (tmp_path / "x.png").write_text("not an image")
    proc = run_script("evaluation.py", "--task", "B", "--image", tmp_path / "x.png", "--run_dir", smoke_run["run_dir"])
    assert proc.returncode == 2 and "cannot read image" in proc.stderr and "Traceback" not in proc.stderr


def test_single_image_is_preprocessed_like_training_images(tmp_path, monkeypatch):
    """A transparent RGBA file goes through data.read_image (composited onto black), as in training."""
    from dataclasses import replace

    import torch
    from torch import nn

    from mtkd import evaluate as ev
    from mtkd.data import BatchTransform, read_image
    from tasks import task_a

    task = replace(task_a.TASK, image_size=4)
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red, fully transparent: black after compositing
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    seen = []

    class Spy(nn.Module):
        def forward(self, x):
            seen.append(x)
            return torch.zeros(len(x), task.num_classes)

    monkeypatch.setattr(ev, "find_checkpoint", lambda *a, **k: tmp_path / "best.pt")
    monkeypatch.setattr(ev, "load_student", lambda path, t: (Spy(), {}))
    ev.predict_image(task, tmp_path / "t.png")
    expected = BatchTransform.for_task(task)(torch.from_numpy(read_image(tmp_path / "t.png", 3, 4))[None])
    assert torch.equal(seen[0], expected)
    assert torch.equal(seen[0], BatchTransform.for_task(task)(torch.zeros(1, 3, 4, 4, dtype=torch.uint8)))


def test_evaluation_runs_each_task_script(tmp_path, monkeypatch):
    import evaluation
    import evaluation_taska
    import evaluation_taskb
    from mtkd.errors import UserError

    called = []

    def fake(name):
        def evaluate(args):
            called.append(name)
            raise UserError(f"not trained yet: python train.py --task {name}")
        return evaluate

    monkeypatch.setattr(evaluation_taska, "evaluate", fake("A"))
    monkeypatch.setattr(evaluation_taskb, "evaluate", fake("B"))
    assert evaluation.main(["--eval_dir", str(tmp_path)]) == 1
    assert called == ["A", "B"]
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert [r["error"] for r in rows] == ["not trained yet: python train.py --task A",
                                          "not trained yet: python train.py --task B"]

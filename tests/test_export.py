import pytest
import torch

import tasks
from conftest import run_script
from mtkd.checkpoint import save_checkpoint
from mtkd.export import export
from mtkd.models import STUDENTS, create_student

TASK_B = tasks.get_task("B")


def student_checkpoint(tmp_path, name):
    """A Task B student checkpoint in the layout train.py writes (weights from initialisation)."""
    torch.manual_seed(0)
    model = create_student(name, TASK_B).eval()
    path = tmp_path / f"{name}.pt"
    save_checkpoint({"model": model.state_dict(), "student_model": name, "task": "B",
                     "class_names": list(TASK_B.class_names), "args": {"task": "B"}, "epoch": 0}, path)
    return path


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("student", list(STUDENTS))
def test_export_matches_pytorch_on_test_images(tmp_path, student, fmt):
    r = export(student_checkpoint(tmp_path, student), fmt, tmp_path / f"out.{fmt}")
    assert r["test_images"] == 360 and r["max_abs_diff"] < 1e-4
    assert r["max_abs_diff_logits"] < 1e-4 * max(1.0, r["max_abs_logit"])
    assert (tmp_path / f"out.{fmt}").stat().st_size > 1e6


def test_onnx_has_dynamic_batch_and_opset_17(tmp_path):
    import onnx
    import onnxruntime as ort

    export(student_checkpoint(tmp_path, "MobileNetV3"), "onnx", tmp_path / "m.onnx")
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        assert session.run(None, {"images": torch.rand(batch, 1, 8, 8).numpy()})[0].shape == (batch, 10)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_dynamic_quantisation_reports_accuracy_change(tmp_path, fmt):
    r = export(student_checkpoint(tmp_path, "ResNet18"), fmt, tmp_path / f"q.{fmt}", quantize="dynamic")
    assert r["int8_accuracy_change"] == pytest.approx(r["int8_accuracy"] - r["accuracy"])
    assert 0.0 <= r["int8_accuracy"] <= 1.0


def test_export_command_line(tmp_path):
    proc = run_script("-m", "mtkd.export", "--checkpoint", student_checkpoint(tmp_path, "EfficientNet"),
                      "--format", "onnx", "--output", tmp_path / "e.onnx", "--quantize", "dynamic")
    assert proc.returncode == 0, proc.stderr
    assert "max abs diff vs PyTorch on 360 test images" in proc.stdout and "in probabilities" in proc.stdout
    assert "change" in proc.stdout


def test_export_of_a_missing_checkpoint_exits_2(tmp_path):
    proc = run_script("-m", "mtkd.export", "--checkpoint", tmp_path / "none.pt", "--format", "onnx",
                      "--output", tmp_path / "e.onnx")
    assert proc.returncode == 2 and "checkpoint not found" in proc.stderr and not (tmp_path / "e.onnx").exists()

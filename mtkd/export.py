"""Export a trained student for deployment: ONNX or TorchScript, optionally int8.

    python -m mtkd.export --checkpoint runs/TaskB/<run>/best.pt --format onnx --output student.onnx

The exported model takes float32 images in [0, 1], shape (N, C, H, W) with a
dynamic batch size, and returns logits; the task's normalisation is part of
the graph. The export is run on the task's real test images and compared with
PyTorch: the maximum absolute difference of the softmax probabilities must
not exceed 1e-4 (else exit code 1). The logits' difference is printed too; it
is not the criterion because fp32 rounding alone grows with the logits'
magnitude (a confident student's logits reach the hundreds).
``--quantize dynamic`` stores int8 weights (onnxruntime's dynamic quantisation
for ONNX; ``torch.ao`` dynamic quantisation of the linear layers for
TorchScript) and prints the accuracy change on the test split.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import FOR_STUDENT, load_checkpoint
from .data import load_task_data
from .errors import UserError
from .report import console, print_error

TOLERANCE = 1e-4


class DeployModel(nn.Module):
    """``(x - mean) / std`` then the student: images in [0, 1] in, logits out."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return self.model((x - self.mean) / self.std)


def load_deploy_model(checkpoint: str | Path):
    """The checkpoint's student as a ``DeployModel``, its task, and the task's test images in [0, 1]."""
    from .evaluate import load_student
    from .taskfile import resolve_task

    state = load_checkpoint(checkpoint, required=FOR_STUDENT)
    task = resolve_task(state.get("args", {}).get("task", state["task"]))
    student, _ = load_student(Path(checkpoint), task)
    return DeployModel(student, task.mean, task.std).eval(), task


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, opset: int = 17) -> None:
    # The TorchScript-based exporter needs no extra packages (the dynamo one needs
    # onnxscript) and handles these CNNs with a dynamic batch axis.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset, input_names=["images"],
                          output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})


def onnx_runner(path: Path):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"images": x.numpy()})[0]


def torchscript_runner(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated upstream, as in export_torchscript
        module = torch.jit.load(str(path))
    return lambda x: module(x).detach().numpy()


def export_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        # TorchScript is deprecated upstream but still what many deployment stacks load.
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.trace(model, example), str(path))


def quantize_onnx(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # Pre-processing folds constants (e.g. BatchNorm into conv weights), so that
    # every weight is an initializer the quantiser can convert.
    prepared = src.with_name(src.stem + ".prepared.onnx")
    quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
    quantize_dynamic(str(prepared), str(dst), weight_type=QuantType.QInt8)


def softmax(logits: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(logits).double(), 1).numpy()


def batched(run, images: torch.Tensor, batch: int = 256) -> np.ndarray:
    return np.concatenate([run(images[i:i + batch]) for i in range(0, len(images), batch)])


def export(checkpoint, fmt: str, output, quantize: str | None = None, data_root="data") -> dict:
    """Export, check against PyTorch on the test split, and return the numbers."""
    model, task = load_deploy_model(checkpoint)
    test = load_task_data(task, data_root).test
    images, labels = test.__getitems__(range(len(test)))
    images, labels = images.float() / 255, labels.numpy()
    with torch.inference_mode():
        reference = batched(lambda x: model(x).numpy(), images)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    example = images[:2]
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / f"fp32.{fmt}" if quantize else output
        if fmt == "onnx":
            export_onnx(model, example, fp32)
            run_fp32 = onnx_runner(fp32)
        else:
            export_torchscript(model, example, fp32)
            run_fp32 = torchscript_runner(fp32)
        exported = batched(run_fp32, images)
        result = {"format": fmt, "output": str(output), "max_abs_diff": float(np.abs(softmax(exported) -
                                                                               softmax(reference)).max()),
                  "max_abs_diff_logits": float(np.abs(exported - reference).max()),
                  "max_abs_logit": float(np.abs(reference).max()),
                  "test_images": len(labels), "accuracy": float((exported.argmax(1) == labels).mean())}
        if quantize:
            if fmt == "onnx":
                quantize_onnx(fp32, output)
                run_int8 = onnx_runner(output)
            else:
                qmodel = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
                export_torchscript(qmodel, example, output)
                run_int8 = torchscript_runner(output)
            int8 = batched(run_int8, images)
            result["int8_accuracy"] = float((int8.argmax(1) == labels).mean())
            result["int8_accuracy_change"] = result["int8_accuracy"] - result["accuracy"]
    result["size_mb"] = os.path.getsize(output) / 2**20
    return result


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mtkd.export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="student checkpoint (best.pt or last.pt of a run)")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"], help="export format")
    p.add_argument("--output", required=True, help="file to write")
    p.add_argument("--quantize", choices=["dynamic"], help="int8 dynamic quantisation")
    p.add_argument("--data_root", default="data", help="where the task's dataset is found")
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    # Like the top-level scripts, the command line registers the built-in tasks.
    importlib.import_module("tasks")
    try:
        r = export(args.checkpoint, args.format, args.output, args.quantize, args.data_root)
    except UserError as e:
        print_error(e)
        return e.exit_code
    except ImportError as e:
        print_error(f"{e}. Fix: pip install -e \".[export]\"")
        return 2
    console.print(f"wrote {r['output']} ({r['size_mb']:.2f} MiB)")
    console.print(f"max abs diff vs PyTorch on {r['test_images']} test images: {r['max_abs_diff']:.3e} "
                  f"in probabilities (tolerance {TOLERANCE:g}); {r['max_abs_diff_logits']:.3e} in logits "
                  f"(largest |logit| {r['max_abs_logit']:.1f})")
    console.print(f"test accuracy (fp32 export): {r['accuracy']:.4f}")
    if "int8_accuracy" in r:
        console.print(f"test accuracy (int8): {r['int8_accuracy']:.4f}  change {r['int8_accuracy_change']:+.4f}")
    if r["max_abs_diff"] > TOLERANCE:
        print_error(f"the export differs from PyTorch by {r['max_abs_diff']:.3e} > {TOLERANCE:g}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

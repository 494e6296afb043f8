"""Evaluate a trained student on its task's test split, with reference rows and reports.

Used by ``evaluation_taska.py``, ``evaluation_taskb.py`` and ``evaluation.py``.
"""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
from PIL import UnidentifiedImageError
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from . import plots
from .checkpoint import FOR_STUDENT, load_checkpoint
from .data import BatchTransform, TaskData, create_loader, load_task_data, read_image
from .engine import predict
from .errors import UserError
from .metrics import classification_metrics, confusion, report_text
from .models import STUDENTS, count_parameters, create_model, create_student
from .precision import FP32, Precision, SavedPrecisions, keep_saved
from .spec import TaskSpec
from .speed import file_size_mb, latency_ms, peak_inference_memory_mb
from .teachers import EnsembleClassifier, TeacherEnsemble
from .specialists import create_ensemble, load_teacher, taught_task, teacher_path
from .runs import list_runs, log_hparams, read_metrics


def find_checkpoint(task: TaskSpec, output_dir: str | Path, run_dir=None, checkpoint=None) -> Path:
    """``checkpoint``, else ``run_dir/best.pt``, else the newest run's ``best.pt``."""
    if checkpoint:
        return Path(checkpoint)
    if run_dir:
        path = Path(run_dir) / "best.pt"
        if not path.is_file():
            raise UserError(f"{run_dir} is not a run folder (no best.pt). Fix: pass a folder under "
                            f"{Path(output_dir) / f'Task{task.name}'} written by train.py.")
        return path
    runs = list_runs(output_dir, task)
    if not runs:
        raise NotTrainedError(f"not trained yet: python train.py --task {task.name}")
    return runs[-1] / "best.pt"


class NotTrainedError(UserError):
    """The task has no trained student yet."""


def load_student(path: Path, task: TaskSpec) -> tuple[nn.Module, dict]:
    state = load_checkpoint(path, required=FOR_STUDENT)
    if state.get("task") != task.name or list(state["class_names"]) != list(task.class_names):
        raise UserError(f"checkpoint {path} is a student of task {state.get('task')!r} with "
                        f"{len(state['class_names'])} classes, not of task {task.name} ({task.num_classes} classes). "
                        f"Fix: pass a checkpoint of task {task.name}.")
    if state["student_model"] not in STUDENTS:
        raise UserError(f"checkpoint {path} names an unknown student {state['student_model']!r}.")
    if state.get("image_size", task.image_size) != task.image_size:  # older checkpoints do not record it
        raise UserError(f"checkpoint {path} is a student of {state['image_size']}-px inputs, but task {task.name} "
                        f"now has {task.image_size}-px images. Fix: evaluate it with the task as it was trained, "
                        "or train a student for the task as it is.")
    # A student started from pretrained weights keeps their stem at small inputs (models.create_model).
    model = create_student(state["student_model"], task, pretrained_layout=state.get("init", "random") != "random")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise UserError(f"checkpoint {path} does not fit a {state['student_model']} for task {task.name}: "
                        f"{str(e).splitlines()[0]}") from None
    return model, state


def load_ensemble(task: TaskSpec, output_dir: str | Path) -> tuple[TeacherEnsemble | None, list]:
    paths = [teacher_path(output_dir, task, t) for t in task.teachers]
    if not all(p.is_file() for p in paths):
        return None, []
    loaded = [load_teacher(t, task, p) for t, p in zip(task.teachers, paths)]
    models = [m for m, _ in loaded]
    return create_ensemble(task, models), models


def _short_metrics(m: dict) -> dict:
    return {k: m[k] for k in ("overall_accuracy", "top3_accuracy", "f1_macro", "ece")}


class Evaluator:
    """Runs models over one task's test split (CPU or GPU) and computes metrics."""

    def __init__(self, task: TaskSpec, data: TaskData, device: torch.device):
        self.task, self.data, self.device = task, data, device
        self.transform = BatchTransform.for_task(task).to(device)

    def logits(self, model: nn.Module, dataset=None, precision: Precision = FP32):
        loader = create_loader(dataset if dataset is not None else self.data.test, 256, train=False)
        return predict(precision.prepare_model(model.to(self.device)), loader, self.transform, self.device, precision)

    def metrics(self, model: nn.Module, class_names=None, dataset=None, precision: Precision = FP32) -> dict:
        logits, labels = self.logits(model, dataset, precision)
        return classification_metrics(logits, labels, list(class_names or self.task.class_names))


def run_precisions(state: dict, device: torch.device) -> tuple[Precision, list[Precision] | None]:
    """The student's and the teachers' precisions as the run recorded them in ``state`` (its checkpoint), so
    that evaluation reads the numbers the run reported; fp32 for any the device cannot run natively, or that
    were chosen on another device type (``precision.keep_saved``), and for older checkpoints."""
    saved = SavedPrecisions.from_checkpoint(state, amp_given=False)
    student = keep_saved(saved.student, saved, device, "student")[0] or FP32
    teachers = [keep_saved(t, saved, device, "teacher")[0] or FP32 for t in saved.teachers] \
        if saved.teachers else None
    return student, teachers


def evaluate_task(task: TaskSpec, *, output_dir="runs", eval_dir="evaluation", data_root="data",
                  checkpoint=None, run_dir=None, device="cpu", speed_repeats: int = 20) -> dict:
    """Evaluate the chosen (default: newest) student of ``task``; write the reports; return results."""
    device = torch.device(device)
    path = find_checkpoint(task, output_dir, run_dir, checkpoint)
    student, state = load_student(path, task)
    args = state.get("args", {})
    # The run's teachers as it had them: another architecture (--teacher_architecture), a dustbin, an assistant
    # (no teacher rows when its checkpoint has gone since).
    assistant = args.get("teacher_assistant")
    taught = None if assistant and not Path(assistant).is_file() else taught_task(task, args)
    data = load_task_data(task, data_root)
    ev = Evaluator(task, data, device)
    out_dir = Path(eval_dir) / f"Task{task.name}"
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(task.class_names)

    precision, teacher_precisions = run_precisions(state, device)
    logits, labels = ev.logits(student, precision=precision)
    results = {"task": task.name, "model_path": str(path), "student_model": state["student_model"],
               "alpha": args.get("alpha"), "epoch": state.get("epoch"),
               "precision": str(precision), "num_parameters": count_parameters(student),
               **classification_metrics(logits, labels, names)}

    # Reference rows: teachers on their own classes, the ensemble on all classes, the baseline student.
    ensemble, teachers = load_ensemble(taught, output_dir) if taught else (None, [])
    results["teachers"], results["ensemble"] = [], None
    if ensemble is not None:
        if teacher_precisions is not None and len(teacher_precisions) == len(teachers):
            ensemble.set_precisions(teacher_precisions)  # as the run had them (the ensemble runs each its own)
        for k, (spec, model) in enumerate(zip(taught.teachers, teachers)):
            own = data.test.select_classes(task.class_indices(spec.classes))
            m = ev.metrics(ensemble.teacher_model(k), spec.classes, own)
            results["teachers"].append({"name": spec.name, "architecture": spec.architecture,
                                        "classes": list(spec.classes), "num_parameters": count_parameters(model),
                                        **_short_metrics(m)})
        ens_logits, _ = ev.logits(EnsembleClassifier(ensemble))
        ens_metrics = classification_metrics(ens_logits, labels, names)
        results["ensemble"] = {"num_parameters": count_parameters(ensemble), **_short_metrics(ens_metrics)}
        results["teacher_student_agreement"] = (logits.argmax(1) == ens_logits.argmax(1)).float().mean().item()
    else:
        results["teacher_student_agreement"] = None

    this_run = path.parent.resolve()
    baselines = [r for r in list_runs(output_dir, task) if r.resolve() != this_run and _alpha(r) == 0]
    results["baseline"] = None
    if baselines and results["alpha"] != 0:
        base_model, base_state = load_student(baselines[-1] / "best.pt", task)
        results["baseline"] = {"model_path": str(baselines[-1] / "best.pt"),
                               "student_model": base_state["student_model"],
                               "num_parameters": count_parameters(base_model),
                               **ev.metrics(base_model, precision=run_precisions(base_state, device)[0])}
        write_comparison(out_dir, task, baselines[-1], this_run, results["baseline"], results)

    # Files.
    (out_dir / "classification_report.txt").write_text(report_text(logits, labels, names))
    cm_fig = plots.confusion_matrix_figure(confusion(logits, labels, task.num_classes), names,
                                           f"Task {task.name}: {state['student_model']} student (test)")
    plots.save(cm_fig, out_dir / "confusion_matrix.png")
    sample_fig = sample_predictions(data, logits, labels, names, f"Task {task.name}: predicted (true)")
    plots.save(sample_fig, out_dir / "sample_predictions.png")
    results["size_speed"] = size_speed_rows(taught or task, path, student, teachers, output_dir, speed_repeats)
    (out_dir / "size_speed.md").write_text(size_speed_markdown(results["size_speed"]))
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    _log_to_run(this_run, cm_fig, sample_fig, state, results)
    plots.close(cm_fig)
    plots.close(sample_fig)
    return results


def _alpha(run_dir: Path):
    try:
        return json.loads((run_dir / "args.json").read_text()).get("alpha")
    except (OSError, ValueError):
        return None


def sample_predictions(data: TaskData, logits, labels, names, title, n: int = 32):
    """Up to ``n`` test images, spread over the split, mistakes first so they are seen."""
    pred = logits.argmax(1)
    wrong = torch.nonzero(pred != labels).flatten()[: n // 4]
    rest = torch.linspace(0, len(labels) - 1, n - len(wrong)).long()
    idx = torch.cat([wrong, rest[~torch.isin(rest, wrong)]])[:n]
    return plots.sample_predictions_figure(data.test.__getitems__(idx.tolist())[0].numpy(), pred[idx].tolist(),
                                           labels[idx].tolist(), names, title)


def size_speed_rows(task: TaskSpec, student_path: Path, student, teachers, output_dir, repeats: int) -> list[dict]:
    """Parameters, weight and checkpoint-file MiB, CPU latency at batch 1 and 64 (median), peak inference memory.

    A student's checkpoint file also holds the optimizer state, hence larger than its weights.
    """
    shape = (task.channels, task.image_size, task.image_size)
    entries = [(f"student {student_name(student)}", student, student_path, _arch(student))]
    for spec, model in zip(task.teachers, teachers):
        entries.append((f"teacher {spec.name}", model, teacher_path(output_dir, task, spec),
                        spec.architecture))
    rows = []
    for name, model, ckpt, arch in entries:
        build = partial(create_model, arch, model.num_classes, task.channels, task.image_size)
        params = count_parameters(model)
        rows.append({"model": name, "parameters": params, "weights_mb": params * 4 / 2**20,
                     "checkpoint_mb": file_size_mb(ckpt),
                     "latency_b1_ms": latency_ms(model, shape, 1, repeats),
                     "latency_b64_ms": latency_ms(model, shape, 64, max(3, repeats // 4)),
                     "peak_memory_b64_mb": peak_inference_memory_mb(build, shape, 64)})
    return rows


def _arch(model) -> str:
    return model.pretrained_cfg["architecture"]


def student_name(model) -> str:
    """The command-line student name of a timm model (its architecture if not a student)."""
    arch = _arch(model)
    return next((k for k in STUDENTS if STUDENTS.get(k) == arch), arch)


def size_speed_markdown(rows: list[dict]) -> str:
    lines = ["| model | parameters | fp32 weights (MiB) | checkpoint file (MiB) | CPU latency b=1 (ms) "
             "| CPU latency b=64 (ms) | peak inference memory b=64 (MiB) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['parameters'] / 1e6:.2f}M | {r['weights_mb']:.1f} | {r['checkpoint_mb']:.1f} | "
                     f"{r['latency_b1_ms']:.2f} | {r['latency_b64_ms']:.2f} | {r['peak_memory_b64_mb']:.1f} |")
    return "\n".join(lines) + "\n"


COMPARED = ("overall_accuracy", "top3_accuracy", "precision_macro", "recall_macro", "f1_macro", "f1_weighted",
            "roc_auc_ovr_macro", "ece")


def write_comparison(out_dir: Path, task: TaskSpec, baseline_run: Path, run: Path, base: dict, results: dict):
    """``comparison.md`` (metrics side by side) and ``comparison.png`` (validation curves)."""
    lines = [f"# Task {task.name}: baseline vs distilled student (test split)", "",
             f"- baseline (alpha 0): `{baseline_run}`", f"- distilled (alpha {results['alpha']}): `{run}`", "",
             "| metric | baseline | distilled | delta |", "|---|---:|---:|---:|"]
    for key in COMPARED:
        b, d = base[key], results[key]
        lines.append(f"| {key} | {b:.4f} | {d:.4f} | {d - b:+.4f} |")
    lines.append(f"| parameters | {base['num_parameters']:,} | {results['num_parameters']:,} | |")
    (out_dir / "comparison.md").write_text("\n".join(lines) + "\n")
    fig = plots.comparison_figure({f"baseline ({baseline_run.name})": read_metrics(baseline_run),
                                   f"distilled ({run.name})": read_metrics(run)}, f"Task {task.name}")
    plots.save(fig, out_dir / "comparison.png")
    plots.close(fig)


def _log_to_run(run_dir: Path, cm_fig, sample_fig, state: dict, results: dict) -> None:
    """Figures into the run's TensorBoard, final test metrics into its HPARAMS view."""
    writer = SummaryWriter(str(run_dir))
    step = int(state.get("epoch") or 0)
    writer.add_figure("test/confusion_matrix", cm_fig, step, close=False)
    writer.add_figure("test/sample_predictions", sample_fig, step, close=False)
    metrics = {f"test/{k}": results[k] for k in ("overall_accuracy", "top3_accuracy", "f1_macro", "ece")}
    log_hparams(writer, state.get("args", {}), metrics, step)
    writer.close()


def predict_image(task: TaskSpec, image_path: str | Path, *, output_dir="runs", checkpoint=None, run_dir=None,
                  topk: int = 3, device="cpu") -> list[tuple[str, float]]:
    """Top-k (class, probability) for one image file, converted to the task's channels and size."""
    try:
        # The training images' reader: the same conversion (transparent areas onto black) and resizing.
        arr = read_image(image_path, task.channels, task.image_size)
    except (OSError, UnidentifiedImageError) as e:
        raise UserError(f"cannot read image {image_path}: {e}. Fix: pass a PNG, JPEG, BMP, ... file.") from None
    student, _ = load_student(find_checkpoint(task, output_dir, run_dir, checkpoint), task)
    x = torch.from_numpy(arr)[None]
    transform = BatchTransform.for_task(task)
    with torch.inference_mode():
        probs = torch.softmax(student.eval()(transform(x)), 1)[0]
    values, ids = probs.topk(min(topk, task.num_classes))
    return [(task.class_names[i], float(v)) for v, i in zip(values, ids)]


def run_task(task: TaskSpec, args) -> dict:
    """Evaluate one task from parsed evaluation arguments, print its table, return the results."""
    from .report import console, evaluation_table
    from .loop import resolve_device

    results = evaluate_task(task, output_dir=args.output_dir, eval_dir=args.eval_dir, data_root=args.data_root,
                            checkpoint=args.checkpoint, run_dir=args.run_dir,
                            device=str(resolve_device(args.device)), speed_repeats=args.speed_repeats)
    console.print(evaluation_table(results))
    console.print(f"Reports written to {Path(args.eval_dir) / f'Task{task.name}'}", soft_wrap=True)
    return results


def summary_row(results: dict) -> dict:
    acc = results["overall_accuracy"]
    base, ens = results.get("baseline"), results.get("ensemble")
    return {"task": results["task"], "student_model": results["student_model"],
            "num_parameters": results["num_parameters"], "overall_accuracy": acc, "f1_macro": results["f1_macro"],
            "delta_vs_baseline": acc - base["overall_accuracy"] if base else None,
            "delta_vs_ensemble": acc - ens["overall_accuracy"] if ens else None,
            "model_path": results["model_path"]}


def task_script_main(task_name: str, argv=None) -> int:
    """``main`` of ``evaluation_task<x>.py``: evaluate one task, exit 2 on a user error."""
    from .config import get_eval_args_parser
    from .report import print_error
    from .taskfile import resolve_task

    args = get_eval_args_parser(with_task=False).parse_args(argv)
    try:
        run_task(resolve_task(task_name), args)
    except UserError as e:
        print_error(e)
        return e.exit_code
    return 0

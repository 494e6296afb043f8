"""The main job: prepare the teachers, then distil them into a student run.

``run(args)`` is what ``train.py`` calls. Teachers are trained once per task
(and reused from ``<output_dir>/Task<X>/teachers/``); each student run gets a
new folder with its arguments, TensorBoard events, per-epoch metrics and
checkpoints.
"""
from __future__ import annotations

import csv
import json
import random
import time
from argparse import Namespace
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from .checkpoint import load_checkpoint, save_checkpoint
from .data import BatchTransform, TaskData, create_loader, load_task_data
from .distill import Distiller
from .engine import evaluate, train_one_epoch
from .errors import UserError
from .models import count_parameters, create_student, create_teacher
from .report import console, create_progress, run_summary_table, teachers_table
from .spec import TaskSpec, get_task
from .teachers import TeacherEnsemble

CHECKPOINT_VERSION = 1


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device. Fix: use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA, but no CUDA device is available. Fix: use --device cpu.")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def teacher_dir(output_dir: str | Path, task: TaskSpec) -> Path:
    return Path(output_dir) / f"Task{task.name}" / "teachers"


def fit(step: nn.Module, data: TaskData, *, epochs: int, optimizer, scheduler, args: Namespace,
        device: torch.device, transform: BatchTransform, on_epoch, val_model: nn.Module,
        title: str) -> None:
    """Train ``step`` for ``epochs``; after each, evaluate ``val_model`` and call ``on_epoch``."""
    pin = device.type == "cuda"
    train_loader = create_loader(data.train, args.batch_size, train=True, seed=args.seed,
                                 num_workers=args.num_workers, pin_memory=pin)
    val_loader = create_loader(data.val, 512, train=False, num_workers=args.num_workers, pin_memory=pin)
    generator = torch.Generator().manual_seed(args.seed + 1)
    with create_progress() as progress:
        for epoch in range(1, epochs + 1):
            start = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            train = train_one_epoch(step, train_loader, optimizer, transform, device, epoch=epoch,
                                    generator=generator, progress=progress)
            val = evaluate(val_model, val_loader, transform, device)
            scheduler.step()
            seconds = time.perf_counter() - start
            console.print(f"{title} {epoch:>3}/{epochs}  loss {train['loss']:.4f}  acc {train['acc']:.4f}  "
                          f"val {val['acc']:.4f}  lr {lr:.1e}  {seconds:.1f}s")
            on_epoch(epoch, train, val, lr, seconds)


def _adam(model: nn.Module, args: Namespace) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)


def _teacher_row(spec, model, metrics: dict, status: str) -> dict:
    return {"name": spec.name, "architecture": spec.architecture, "classes": list(spec.classes),
            "weight": spec.weight, "params": count_parameters(model), "val_acc": metrics["val_acc"],
            "test_acc": metrics["test_acc"], "status": status}


def train_teacher(spec, task: TaskSpec, data: TaskData, args: Namespace, device: torch.device,
                  path: Path) -> tuple[nn.Module, dict]:
    """Train one specialist on its classes; keep the weights of its best validation epoch.

    Adam with the run's ``--lr`` / ``--weight_decay`` / ``--batch_size`` and a
    cosine schedule over ``--teacher_epochs``.
    """
    ids = task.class_indices(spec.classes)
    own = TaskData(*(data.split(s).select_classes(ids) for s in ("train", "val", "test")))
    model = create_teacher(spec, task).to(device)
    optimizer = _adam(model, args)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.teacher_epochs)
    transform = BatchTransform.for_task(task).to(device)
    best = {"val_acc": -1.0}
    writer = SummaryWriter(str(path.with_suffix("")))

    def on_epoch(epoch, train, val, lr, seconds):
        writer.add_scalar("train/loss", train["loss"], epoch)
        writer.add_scalar("train/acc", train["acc"], epoch)
        writer.add_scalar("val/acc", val["acc"], epoch)
        if val["acc"] > best["val_acc"]:
            best.update(val_acc=val["acc"], epoch=epoch,
                        model={k: v.detach().clone() for k, v in model.state_dict().items()})

    seed_everything(args.seed)
    fit(Distiller(model), own, epochs=args.teacher_epochs, optimizer=optimizer, scheduler=scheduler,
        args=args, device=device, transform=transform, on_epoch=on_epoch, val_model=model,
        title=f"teacher {spec.name}")
    writer.close()
    model.load_state_dict(best["model"])
    test = evaluate(model, create_loader(own.test, 512, train=False), transform, device)
    metrics = {"val_acc": best["val_acc"], "test_acc": test["acc"], "best_epoch": best["epoch"]}
    save_checkpoint({"model": model.state_dict(), "architecture": spec.architecture,
                     "classes": list(spec.classes), "task": task.name, "metrics": metrics,
                     "epochs": args.teacher_epochs, "version": CHECKPOINT_VERSION}, path)
    return model, metrics


def load_teacher(spec, task: TaskSpec, path: Path) -> tuple[nn.Module, dict]:
    state = load_checkpoint(path, required=("model", "architecture", "classes", "metrics"))
    if state["architecture"] != spec.architecture or list(state["classes"]) != list(spec.classes):
        raise UserError(
            f"teacher checkpoint {path} was trained as {state['architecture']} on {state['classes']}, "
            f"but task {task.name} now asks for {spec.architecture} on {list(spec.classes)}. "
            "Fix: pass --retrain_teachers, or move the old checkpoint away.")
    model = create_teacher(spec, task)
    model.load_state_dict(state["model"])
    return model, state["metrics"]


def prepare_teachers(task: TaskSpec, data: TaskData, args: Namespace,
                     device: torch.device) -> tuple[TeacherEnsemble, list[dict]]:
    """Load each teacher's checkpoint, training those that have none (or all, if asked)."""
    folder = teacher_dir(args.output_dir, task)
    models, rows = [], []
    for spec in task.teachers:
        path = folder / f"{spec.name}.pt"
        if path.exists() and not args.retrain_teachers:
            model, metrics = load_teacher(spec, task, path)
            status = "reused"
        else:
            console.print(f"[bold]Training teacher {spec.name}[/] ({spec.architecture}, "
                          f"classes {' '.join(spec.classes)})")
            model, metrics = train_teacher(spec, task, data, args, device, path)
            status = "trained"
        models.append(model)
        rows.append(_teacher_row(spec, model, metrics, status))
    ensemble = TeacherEnsemble(models, [task.class_indices(t.classes) for t in task.teachers],
                               [t.weight for t in task.teachers], task.num_classes).to(device)
    return ensemble, rows


def create_run_dir(args: Namespace, task: TaskSpec) -> Path:
    """A new folder ``<output_dir>/Task<X>/<student>_a.._T.._s.._<time>[_<run>]``; never an existing one."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"{args.student_model}_a{args.alpha:g}_T{args.temperature:g}_e{args.num_epochs}_s{args.seed}_{stamp}"
    if args.run:
        name += f"_{args.run}"
    parent = Path(args.output_dir) / f"Task{task.name}"
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        path = parent / (name if n == 1 else f"{name}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise UserError(f"could not create a new run folder under {parent}")


def run(args: Namespace) -> dict:
    """Teachers, then the student; returns the run's summary (also in ``summary.json``)."""
    started = time.perf_counter()
    task = get_task(args.task)
    device = resolve_device(args.device)
    data = load_task_data(task, args.data_root)
    seed_everything(args.seed)
    student = create_student(args.student_model, task).to(device)
    ensemble, teacher_rows = prepare_teachers(task, data, args, device)
    console.print(teachers_table(teacher_rows))
    console.print(f"Teacher checkpoints: {teacher_dir(args.output_dir, task)}")

    run_dir = create_run_dir(args, task)
    (run_dir / "args.json").write_text(json.dumps(vars(args), indent=2))
    console.print(f"[bold]Run folder[/] {run_dir}  (device {device}, {len(data.train)} train / "
                  f"{len(data.val)} val / {len(data.test)} test images)")
    seed_everything(args.seed)
    step = Distiller(student, ensemble, alpha=args.alpha, temperature=args.temperature)
    optimizer = _adam(student, args)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.scheduler_step, gamma=args.scheduler_gamma)
    transform = BatchTransform.for_task(task).to(device)
    writer = SummaryWriter(str(run_dir))
    best = {"val_acc": -1.0, "epoch": 0}
    metrics_path = run_dir / "metrics.csv"

    def on_epoch(epoch, train, val, lr, seconds):
        row = {"epoch": epoch, **{f"train_{k}": v for k, v in train.items()},
               "val_loss": val["loss"], "val_acc": val["acc"], "lr": lr, "time_s": seconds}
        for key, value in row.items():
            if key != "epoch":
                writer.add_scalar(key.replace("_", "/", 1) if key.startswith(("train_", "val_")) else key, value, epoch)
        new_file = not metrics_path.exists()
        with metrics_path.open("a", newline="") as f:
            out = csv.DictWriter(f, fieldnames=list(row))
            if new_file:
                out.writeheader()
            out.writerow(row)
        state = {"model": student.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "epoch": epoch, "val_acc": val["acc"],
                 "best_val_acc": max(best["val_acc"], val["acc"]), "args": vars(args), "task": task.name,
                 "student_model": args.student_model, "class_names": list(task.class_names),
                 "version": CHECKPOINT_VERSION}
        if val["acc"] > best["val_acc"]:
            best.update(val_acc=val["acc"], epoch=epoch)
            save_checkpoint(state, run_dir / "best.pt")
        save_checkpoint(state, run_dir / "last.pt")

    fit(step, data, epochs=args.num_epochs, optimizer=optimizer, scheduler=scheduler, args=args,
        device=device, transform=transform, on_epoch=on_epoch, val_model=student, title="student")

    student.load_state_dict(load_checkpoint(run_dir / "best.pt")["model"])
    test = evaluate(student, create_loader(data.test, 512, train=False), transform, device)
    ensemble_model = _EnsembleClassifier(ensemble)
    ensemble_val = evaluate(ensemble_model, create_loader(data.val, 512, train=False), transform, device)
    ensemble_test = evaluate(ensemble_model, create_loader(data.test, 512, train=False), transform, device)
    summary = {
        "task": task.name, "student_model": args.student_model, "run_dir": str(run_dir),
        "alpha": args.alpha, "temperature": args.temperature, "epochs": args.num_epochs, "seed": args.seed,
        "best_epoch": best["epoch"], "best_val_acc": best["val_acc"], "test_acc": test["acc"],
        "student_params": count_parameters(student), "teachers": teacher_rows,
        "ensemble_params": count_parameters(ensemble), "ensemble_val_acc": ensemble_val["acc"],
        "ensemble_test_acc": ensemble_test["acc"], "device": str(device),
        "wall_time_s": time.perf_counter() - started,
    }
    _log_hparams(writer, args, summary)
    writer.close()
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(run_summary_table(summary))
    return summary


class _EnsembleClassifier(nn.Module):
    """The teacher ensemble as a classifier over the task's classes (for reference accuracy)."""

    def __init__(self, ensemble: TeacherEnsemble):
        super().__init__()
        self.ensemble = ensemble

    def forward(self, x):
        return self.ensemble.global_logprobs(x)


def _log_hparams(writer: SummaryWriter, args: Namespace, summary: dict) -> None:
    """Hyper-parameters and final metrics into the run's own event file (TensorBoard's HPARAMS tab)."""
    hp = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
    metrics = {"hparam/best_val_acc": summary["best_val_acc"], "hparam/test_acc": summary["test_acc"]}
    exp, ssi, sei = hparams(hp, metrics)
    for s in (exp, ssi, sei):
        writer.file_writer.add_summary(s)
    for k, v in metrics.items():
        writer.add_scalar(k, v)

"""The main job: prepare the teachers, then distil them into a student run.

``run(args)`` is what ``train.py`` calls. Teachers are trained once per task
(and reused; see ``specialists``); each student run gets a new folder with its
arguments, TensorBoard events, per-epoch metrics and checkpoints, and can be
resumed from it.
"""
from __future__ import annotations

import csv
import json
import time
from argparse import Namespace
from datetime import datetime
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from . import plots
from .checkpoint import load_checkpoint, save_checkpoint
from .cache import CachedViews, open_teacher_cache
from .data import BatchTransform, TaskData, create_loader, load_task_data
from .distill import Distiller, KDConfig
from .engine import evaluate
from .errors import UserError
from .loop import RunRng, create_optimizer, fit, resolve_device, seed_everything
from .models import check_architecture, count_parameters, create_student
from .report import console, run_summary_table, teachers_table
from .specialists import CHECKPOINT_VERSION, prepare_teachers, teacher_path
from .spec import TaskSpec
from .taskfile import resolve_task
from .teachers import EnsembleClassifier


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


def list_runs(output_dir: str | Path, task: TaskSpec, needs: str = "best.pt") -> list[Path]:
    """The task's run folders holding ``needs``, oldest first (by when their run started)."""
    parent = Path(output_dir) / f"Task{task.name}"
    if not parent.is_dir():
        return []
    runs = [p for p in parent.iterdir() if p.is_dir() and (p / needs).is_file() and (p / "args.json").is_file()]
    return sorted(runs, key=lambda p: ((p / "args.json").stat().st_mtime, p.name))


def open_resume(args: Namespace, task: TaskSpec, explicit: set[str]) -> tuple[Path, Namespace, dict]:
    """The run folder to resume, its saved arguments (explicit flags override them), its last.pt."""
    if args.resume == "latest":
        runs = list_runs(args.output_dir, task, needs="last.pt")
        if not runs:
            raise UserError(f"--resume latest: no run of task {task.name} under {args.output_dir} to resume. "
                            f"Fix: start one with python train.py --task {args.task}.")
        run_dir = runs[-1]
    else:
        run_dir = Path(args.resume)
        if not (run_dir / "last.pt").is_file() or not (run_dir / "args.json").is_file():
            raise UserError(f"--resume {args.resume}: not a run folder (it needs last.pt and args.json). "
                            f"Fix: pass a folder under {Path(args.output_dir) / f'Task{task.name}'} "
                            "written by train.py, or --resume latest.")
    saved = json.loads((run_dir / "args.json").read_text())
    merged = Namespace(**{**vars(args), **saved})
    for name in explicit:
        setattr(merged, name, getattr(args, name))
    merged.resume = str(run_dir)
    last = load_checkpoint(run_dir / "last.pt", required=("model", "optimizer", "scheduler", "epoch", "rng"))
    if last["epoch"] >= merged.num_epochs:
        raise UserError(f"--resume {run_dir}: the run already finished {last['epoch']} of {merged.num_epochs} "
                        f"epochs. Fix: pass --num_epochs N with N > {last['epoch']} to train it further.")
    return run_dir, merged, last


def _truncate_metrics(path: Path, before_epoch: int) -> None:
    """Keep the rows of epochs that the resumed checkpoint already holds."""
    if path.exists():
        rows = [r for r in csv.DictReader(path.open(newline="")) if int(r["epoch"]) < before_epoch]
        with path.open("w", newline="") as f:
            if rows:
                out = csv.DictWriter(f, fieldnames=list(rows[0]))
                out.writeheader()
                out.writerows(rows)


def run(args: Namespace, explicit: set[str] = frozenset()) -> dict:
    """Teachers, then the student; returns the run's summary (also in ``summary.json``).

    With ``args.resume`` the run continues in its own folder from its
    ``last.pt``, with its saved arguments; flags in ``explicit`` (those given
    on the command line) override them, e.g. a larger ``--num_epochs``.
    """
    started = time.perf_counter()
    task = resolve_task(args.task)
    last = None
    if getattr(args, "resume", None):
        run_dir, args, last = open_resume(args, task, set(explicit) - {"resume"})
        task = resolve_task(args.task)
    for spec in task.teachers:  # fail before any data is read
        check_architecture(spec.architecture)
    kd = check_kd_args(args, task)
    device = resolve_device(args.device)
    data = load_task_data(task, args.data_root)
    if data.skipped:
        console.print(f"[yellow]skipped {len(data.skipped)} unreadable image file(s)[/], e.g. {data.skipped[0]}",
                      soft_wrap=True)
    seed_everything(args.seed)
    student = create_student(args.student_model, task).to(device)
    ensemble, teacher_rows = prepare_teachers(task, data, args, device)
    console.print(teachers_table(teacher_rows))
    console.print("Teacher checkpoints: " + ", ".join(sorted({str(teacher_path(args.output_dir, task, t).parent)
                                                              for t in task.teachers})), soft_wrap=True)

    if last is None:
        run_dir = create_run_dir(args, task)
    (run_dir / "args.json").write_text(json.dumps(vars(args), indent=2))
    if data.skipped:
        (run_dir / "skipped_files.txt").write_text("\n".join(data.skipped) + "\n")
    console.print(f"[bold]Run folder[/] {run_dir}  (device {device}, {len(data.train)} train / "
                  f"{len(data.val)} val / {len(data.test)} test images)", soft_wrap=True)
    seed_everything(args.seed)
    step = Distiller(student, ensemble, kd).to(device)
    transform = BatchTransform.for_task(task).to(device)
    train_data, cache_status = data, None
    if args.teacher_cache and step.ensemble is not None:
        started_cache = time.perf_counter()
        cache, cache_path, cache_status = open_teacher_cache(args.teacher_cache, task.name, ensemble, data.train,
                                                             transform, args.cache_views, device)
        console.print(f"[bold]Teacher cache[/] {cache_path}: {cache_status}, {cache.num_views} views "
                      f"({time.perf_counter() - started_cache:.1f}s)", soft_wrap=True)
        train_data = TaskData(CachedViews(data.train, cache), data.val, data.test)
    optimizer = create_optimizer(step, args)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.scheduler_step, gamma=args.scheduler_gamma)
    rng = RunRng(args.seed)
    best = {"val_acc": -1.0, "epoch": 0}
    start_epoch = 1
    metrics_path = run_dir / "metrics.csv"
    if last is not None:
        student.load_state_dict(last["model"])
        step.load_state_dict(last.get("distiller", {}), strict=False)
        optimizer.load_state_dict(last["optimizer"])
        scheduler.load_state_dict(last["scheduler"])
        rng.load_state_dict(last["rng"])
        best = {"val_acc": last["best_val_acc"], "epoch": last["best_epoch"]}
        start_epoch = last["epoch"] + 1
        _truncate_metrics(metrics_path, start_epoch)
        console.print(f"[bold]Resuming[/] at epoch {start_epoch} of {args.num_epochs}", soft_wrap=True)
    # purge_step drops events a killed run logged after its last checkpoint.
    writer = SummaryWriter(str(run_dir), purge_step=start_epoch if last is not None else None)

    def on_epoch(epoch, train, val, lr, seconds):
        row = {"epoch": epoch, **{f"train_{k}": v for k, v in train.items()},
               "val_loss": val["loss"], "val_acc": val["acc"], "val_top3": val["top3"], "lr": lr, "time_s": seconds}
        for key, value in row.items():
            if key != "epoch":
                writer.add_scalar(key.replace("_", "/", 1) if key.startswith(("train_", "val_")) else key, value, epoch)
        new_file = not metrics_path.exists() or metrics_path.stat().st_size == 0
        with metrics_path.open("a", newline="") as f:
            out = csv.DictWriter(f, fieldnames=list(row))
            if new_file:
                out.writeheader()
            out.writerow(row)
        if val["acc"] > best["val_acc"]:
            best.update(val_acc=val["acc"], epoch=epoch)
        state = {"model": student.state_dict(), "distiller": distiller_state(step), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "epoch": epoch, "val_acc": val["acc"],
                 "best_val_acc": best["val_acc"], "best_epoch": best["epoch"], "rng": rng.state_dict(),
                 "args": vars(args), "task": task.name, "student_model": args.student_model,
                 "class_names": list(task.class_names), "version": CHECKPOINT_VERSION}
        if best["epoch"] == epoch:
            save_checkpoint(state, run_dir / "best.pt")
        save_checkpoint(state, run_dir / "last.pt")

    fit(step, train_data, epochs=args.num_epochs, optimizer=optimizer, scheduler=scheduler, args=args,
        device=device, transform=transform, on_epoch=on_epoch, val_model=student, title="student",
        rng=rng, start_epoch=start_epoch)

    student.load_state_dict(load_checkpoint(run_dir / "best.pt")["model"])
    test = evaluate(student, create_loader(data.test, 512, train=False), transform, device)
    ensemble_model = EnsembleClassifier(ensemble)
    ensemble_val = evaluate(ensemble_model, create_loader(data.val, 512, train=False), transform, device)
    ensemble_test = evaluate(ensemble_model, create_loader(data.test, 512, train=False), transform, device)
    summary = {
        "task": task.name, "student_model": args.student_model, "run_dir": str(run_dir),
        "alpha": args.alpha, "temperature": args.temperature, "epochs": args.num_epochs, "seed": args.seed,
        "aggregation": kd.aggregation, "teacher_weighting": kd.weighting, "kd_loss": kd.kd_loss,
        "teacher_cache": cache_status,
        "best_epoch": best["epoch"], "best_val_acc": best["val_acc"], "test_acc": test["acc"],
        "student_params": count_parameters(student), "teachers": teacher_rows,
        "ensemble_params": count_parameters(ensemble), "ensemble_val_acc": ensemble_val["acc"],
        "ensemble_test_acc": ensemble_test["acc"], "device": str(device), "skipped_files": len(data.skipped),
        "wall_time_s": time.perf_counter() - started,
    }
    log_hparams(writer, vars(args), {"hparam/best_val_acc": summary["best_val_acc"],
                                     "hparam/test_acc": summary["test_acc"]})
    writer.close()
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    write_run_curves(run_dir)
    console.print(run_summary_table(summary))
    return summary


def check_kd_args(args: Namespace, task: TaskSpec) -> KDConfig:
    """The run's distillation settings, checked against the task before any work starts."""
    kd = KDConfig.from_args(args)
    if kd.teacher_weights is not None and len(kd.teacher_weights) != len(task.teachers):
        raise UserError(f"--teacher_weights has {len(kd.teacher_weights)} weights but task {task.name} has "
                        f"{len(task.teachers)} teachers ({', '.join(t.name for t in task.teachers)}). "
                        "Fix: give one weight per teacher, in that order.")
    if args.teacher_cache and kd.feature_weight > 0:
        raise UserError("--teacher_cache stores the teachers' logits only, but --feature_weight needs their "
                        "features on every step. Fix: drop one of the two.")
    return kd


def distiller_state(step: Distiller) -> dict:
    """What the step trains or tracks besides the student: feature adapters, the EMA teacher."""
    return {k: v for k, v in step.state_dict().items() if not k.startswith(("student.", "ensemble."))}


def read_metrics(run_dir: Path) -> list[dict]:
    with (Path(run_dir) / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def write_run_curves(run_dir: Path) -> list[Path]:
    """``curves.png`` (loss and accuracy) and ``top1_top3.png`` next to the run's checkpoints."""
    rows = read_metrics(run_dir)
    paths = []
    for name, figure in (("curves.png", plots.run_curves_figure), ("top1_top3.png", plots.topk_curves_figure)):
        fig = figure(rows, run_dir.name)
        paths.append(plots.save(fig, run_dir / name))
        plots.close(fig)
    return paths


def log_hparams(writer: SummaryWriter, args: dict, metrics: dict, step: int | None = None) -> None:
    """Hyper-parameters and ``metrics`` into the writer's own event file (TensorBoard's HPARAMS tab).

    Written through the summary API rather than ``add_hparams``, which would
    start a separate sub-run folder.
    """
    hp = {k: v for k, v in args.items() if isinstance(v, (int, float, str, bool))}
    for s in hparams(hp, metrics):
        writer.file_writer.add_summary(s)
    for k, v in metrics.items():
        writer.add_scalar(k, v, step)

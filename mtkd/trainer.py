"""The main job: prepare the teachers, then distil them into a student run.

``run(args)`` is what ``train.py`` calls. Teachers are trained once per task
(and reused; see ``specialists``); each student run gets a new folder with its
arguments, TensorBoard events, per-epoch metrics and checkpoints, and can be
resumed from it. Under ``torchrun`` the student trains with
DistributedDataParallel; only rank 0 writes files and prints.
"""
from __future__ import annotations

import json
import os
import signal
import time
from argparse import Namespace
from dataclasses import replace
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter

from .cache import CachedViews, open_teacher_cache
from .checkpoint import CHECKPOINT_VERSION, CheckpointSaver, load_checkpoint
from .data import BatchTransform, TaskData, count_labelled, create_loader, keep_labels, labelled_only, load_task_data
from .distill import Distiller, KDConfig
from .distributed import DistInfo, barrier, broadcast, cleanup, init_distributed, main_first
from .engine import TrainingInterrupted, evaluate, predict
from .errors import UserError
from .loop import GracefulStop, LoopConfig, RunRng, fit, resolve_device, seed_everything
from .metrics import restricted_accuracy
from .models import check_architecture, count_parameters, create_student
from .optim import EpochScheduler, create_optimizer, optimizer_kwargs, scheduler_kwargs
from .report import console, run_summary_table, teachers_table
from .runs import (append_metrics, create_run_dir, log_hparams, open_resume, truncate_metrics,
                   write_run_curves)
from .precision import Precision
from .specialists import TeacherRecipe, choose_precision, example_batch, prepare_teachers, teacher_path
from .spec import TaskSpec
from .taskfile import resolve_task
from .teachers import ENSEMBLE_METHODS


class RunInterrupted(UserError):
    """SIGINT / SIGTERM stopped the run; its last complete epoch is saved."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


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


def set_deterministic(on: bool) -> None:
    """``--deterministic``: only deterministic kernels (an error names any op without one)."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(on, warn_only=False)


def run(args: Namespace, explicit: set[str] = frozenset()) -> dict:
    """Teachers, then the student; returns the run's summary (also in ``summary.json``).

    With ``args.resume`` the run continues in its own folder from its
    ``last.pt``, with its saved arguments; flags in ``explicit`` (those given
    on the command line) override them, e.g. a larger ``--num_epochs``.
    """
    dist, device_name = init_distributed(args.device)
    console.quiet = not dist.is_main
    try:
        return _run(args, explicit, dist, device_name)
    finally:
        cleanup(dist)
        console.quiet = False


def _run(args: Namespace, explicit: set[str], dist: DistInfo, device_name: str) -> dict:
    started = time.perf_counter()
    task = resolve_task(args.task)
    last = None
    if getattr(args, "resume", None):
        run_dir, args, last = open_resume(args, task, set(explicit) - {"resume"})
        task = resolve_task(args.task)
    for spec in task.teachers:  # fail before any data is read
        check_architecture(spec.architecture)
    kd = check_kd_args(args, task)
    device = resolve_device(device_name)
    set_deterministic(args.deterministic)
    data = load_task_data(task, args.data_root)
    if data.skipped:
        console.print(f"[yellow]skipped {len(data.skipped)} unreadable image file(s)[/], e.g. {data.skipped[0]}",
                      soft_wrap=True)
    seed_everything(args.seed)
    student = create_student(args.student_model, task).to(device)
    # Missing teachers are trained by rank 0 alone; the other ranks wait, then load them.
    # The other ranks load what rank 0 trained, whatever --retrain_teachers says.
    recipe = TeacherRecipe.from_args(args)
    ensemble, teacher_rows = main_first(
        dist, lambda: prepare_teachers(task, data, args.output_dir, recipe, device, args.retrain_teachers),
        lambda: prepare_teachers(task, data, args.output_dir, recipe, device, retrain=False))
    # Every rank runs the teachers as rank 0 measured (the cache key records it).
    ensemble.set_precisions(broadcast(dist, ensemble.precisions))
    console.print(teachers_table(teacher_rows))
    console.print("Teacher checkpoints: " + ", ".join(sorted({str(teacher_path(args.output_dir, task, t).parent)
                                                              for t in task.teachers})), soft_wrap=True)

    if last is None:
        run_dir = Path(broadcast(dist, str(create_run_dir(args, task)) if dist.is_main else None))
    if dist.is_main:
        write_run_args(run_dir, args)
        if data.skipped:
            (run_dir / "skipped_files.txt").write_text("\n".join(data.skipped) + "\n")
    console.print(f"[bold]Run folder[/] {run_dir}  (device {device}"
                  f"{f' x {dist.world_size} processes' if dist.enabled else ''}, {len(data.train)} train / "
                  f"{len(data.val)} val / {len(data.test)} test images)", soft_wrap=True)
    transform = BatchTransform.for_task(task).to(device)
    if last is not None and "precision" in last:  # a resumed run keeps the precision it was measured with
        precision = Precision.parse(last["precision"])
    else:
        precision = choose_precision(args.amp, student, example_batch(data.train, transform, device, args.batch_size),
                                     True, args.deterministic, f"student {args.student_model}")
    precision = broadcast(dist, precision)  # DDP needs the same layout on every rank
    # Before the Distiller copies the student (EMA), so that every copy has the student's layout.
    precision.prepare_model(student)
    # The teachers were trained on every label of their classes; the student keeps --label_fraction of them.
    train_set = keep_labels(data.train, args.label_fraction, args.seed)
    kd = replace(kd, unlabelled=count_labelled(train_set)[1] > 0)
    seed_everything(args.seed)
    step = Distiller(student, ensemble, kd, compile=args.compile).to(device)
    if step.ensemble is None:  # labels only: an image without a label would teach nothing
        train_set = labelled_only(train_set)
    labelled, unlabelled = count_labelled(train_set)
    console.print(f"[bold]Training images[/] {labelled} labelled, {unlabelled} unlabelled", soft_wrap=True)
    if getattr(step, "adapters", None) is not None:
        precision.prepare_model(step.adapters)
    scaler = torch.amp.GradScaler(device.type) if precision.dtype == "fp16" else None
    train_data, cache_status = TaskData(train_set, data.val, data.test), None
    if args.teacher_cache and step.ensemble is not None:
        started_cache = time.perf_counter()
        # Rank 0 builds a missing cache; the others then find it.
        cache, cache_path, cache_status = main_first(dist, lambda: open_teacher_cache(
            args.teacher_cache, task.name, ensemble, train_set, transform, args.cache_views, device))
        console.print(f"[bold]Teacher cache[/] {cache_path}: {cache_status}, {cache.num_views} views "
                      f"({time.perf_counter() - started_cache:.1f}s)", soft_wrap=True)
        train_data = TaskData(CachedViews(train_set, cache), data.val, data.test)
    optimizer = create_optimizer(step, **optimizer_kwargs(args))
    scheduler = EpochScheduler(optimizer, epochs=args.num_epochs, **scheduler_kwargs(args))
    rng = RunRng(args.seed, dist.rank)
    best = {"val_acc": -1.0, "epoch": 0}
    start_epoch = 1
    metrics_path = run_dir / "metrics.csv"
    if last is not None:
        student.load_state_dict(last["model"])
        step.load_state_dict(last.get("distiller", {}), strict=False)
        optimizer.load_state_dict(last["optimizer"])
        scheduler.load_state_dict(last["scheduler"])
        rng.load_state_dict(last["rng"])
        if scaler is not None and last.get("scaler"):
            scaler.load_state_dict(last["scaler"])
        best = {"val_acc": last["best_val_acc"], "epoch": last["best_epoch"]}
        start_epoch = last["epoch"] + 1
        if dist.is_main:
            truncate_metrics(metrics_path, start_epoch)
        console.print(f"[bold]Resuming[/] at epoch {start_epoch} of {args.num_epochs}", soft_wrap=True)
    # purge_step drops events a killed run logged after its last checkpoint.
    writer = SummaryWriter(str(run_dir), purge_step=start_epoch if last is not None else None) if dist.is_main else None
    # No buffer broadcast on every forward: the Distiller also holds the frozen teachers and the EMA copy,
    # and the student's BatchNorm statistics are synchronised before each validation (loop.fit).
    train_step = DistributedDataParallel(step, broadcast_buffers=False) if dist.enabled else step

    saver = CheckpointSaver(run_dir, args.save_top_k)

    def on_epoch(epoch, train, val, lr, seconds) -> bool:
        if val["acc"] > best["val_acc"]:
            best.update(val_acc=val["acc"], epoch=epoch)
        rng_state = rng.state_dict(dist)  # every rank's, gathered (a collective: all ranks call it)
        if dist.is_main:
            row = {"epoch": epoch, **{f"train_{k}": v for k, v in train.items()}, "val_loss": val["loss"],
                   "val_acc": val["acc"], "val_top3": val["top3"], "lr": lr, "time_s": seconds}
            for key, value in row.items():
                if key != "epoch":
                    tag = key.replace("_", "/", 1) if key.startswith(("train_", "val_")) else key
                    writer.add_scalar(tag, value, epoch)
            append_metrics(metrics_path, row)
            state = {"model": student.state_dict(), "distiller": distiller_state(step),
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch,
                     "val_acc": val["acc"], "best_val_acc": best["val_acc"], "best_epoch": best["epoch"],
                     "rng": rng_state, "args": vars(args), "task": task.name,
                     "student_model": args.student_model, "class_names": list(task.class_names),
                     "precision": str(precision), "scaler": scaler.state_dict() if scaler is not None else {},
                     "version": CHECKPOINT_VERSION}
            saver.save(state, is_best=best["epoch"] == epoch)
        if args.early_stopping and epoch - best["epoch"] >= args.early_stopping:
            console.print(f"[bold]Early stopping[/]: no better validation accuracy for {args.early_stopping} "
                          f"epochs (best {best['val_acc']:.4f} at epoch {best['epoch']})")
            return True
        return False

    with GracefulStop() as stop:
        try:
            fit(train_step, train_data, epochs=args.num_epochs, optimizer=optimizer, scheduler=scheduler,
                loop=LoopConfig.from_args(args), device=device, transform=transform, on_epoch=on_epoch,
                val_model=student, title="student", rng=rng, start_epoch=start_epoch, stop=stop, dist=dist, precision=precision,
                scaler=scaler)
        except TrainingInterrupted as e:
            if writer is not None:
                writer.close()
            name = signal.Signals(e.signum).name
            if e.epoch > 1:
                saved = (f"{run_dir / 'last.pt'} holds epoch {e.epoch - 1}, the last complete one. "
                         f"Resume with: python train.py --resume {run_dir}")
            else:
                saved = "no epoch was complete, so there is nothing to resume: start the run again."
            raise RunInterrupted(f"{name} at epoch {e.epoch}, step {e.step}: epoch {e.epoch} is abandoned and "
                                 + saved, e.signum) from None

    summary = None
    if dist.is_main:
        summary = finish_run(run_dir, args, task, kd, student, ensemble, data, transform, device, best,
                             teacher_rows, cache_status, writer, started, precision, (labelled, unlabelled))
    barrier(dist)
    return broadcast(dist, summary)


def write_run_args(run_dir: Path, args: Namespace) -> None:
    """``args.json`` (for --resume) and ``config.yaml`` (for --config) of the resolved arguments."""
    import yaml

    (run_dir / "args.json").write_text(json.dumps(vars(args), indent=2))
    config = {k: v for k, v in vars(args).items() if k not in ("config", "resume")}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def finish_run(run_dir, args, task, kd, student, ensemble, data, transform, device, best, teacher_rows,
               cache_status, writer, started, precision, counts) -> dict:
    """Test the best checkpoint and the teacher ensemble; write summary.json, curves and the hparams."""
    student.load_state_dict(load_checkpoint(run_dir / "best.pt")["model"])
    test_loader = create_loader(data.test, 512, train=False)
    test = evaluate(student, test_loader, transform, device, precision=precision)
    logits, labels = predict(student, test_loader, transform, device, precision)
    for row, ids in zip(teacher_rows, ensemble.class_ids):
        # The student on the specialist's test images, choosing among the specialist's classes: its task.
        row["student_test_acc"] = restricted_accuracy(logits, labels, ids.cpu())
    ensemble_rows = {method: {} for method in ENSEMBLE_METHODS}
    for split, dataset in (("val", data.val), ("test", data.test)):
        # The teachers run once per split; each way of combining them reads the same logits.
        teacher_logits, split_labels = [], []
        with torch.inference_mode():
            for images, y in create_loader(dataset, 512, train=False):
                teacher_logits.append(ensemble(transform(images.to(device))))
                split_labels.append(y.to(device))
        for method in ENSEMBLE_METHODS:
            if not teacher_logits:  # an empty split
                ensemble_rows[method][f"{split}_acc"] = float("nan")
                continue
            pred = ensemble.combine([torch.cat(z) for z in zip(*teacher_logits)], method).argmax(1)
            ensemble_rows[method][f"{split}_acc"] = (pred == torch.cat(split_labels)).float().mean().item()
    summary = {
        "task": task.name, "student_model": args.student_model, "run_dir": str(run_dir),
        "alpha": args.alpha, "temperature": args.temperature, "epochs": args.num_epochs, "seed": args.seed,
        "aggregation": kd.aggregation, "teacher_weighting": kd.weighting, "kd_loss": kd.kd_loss,
        "teacher_cache": cache_status, "precision": str(precision), "label_fraction": args.label_fraction,
        "labelled_images": counts[0], "unlabelled_images": counts[1],
        "best_epoch": best["epoch"], "best_val_acc": best["val_acc"], "test_acc": test["acc"],
        "student_params": count_parameters(student), "teachers": teacher_rows,
        "ensemble_params": count_parameters(ensemble), "ensemble_val_acc": ensemble_rows["combination"]["val_acc"],
        "ensemble_test_acc": ensemble_rows["combination"]["test_acc"], "ensemble": ensemble_rows, "device": str(device), "skipped_files": len(data.skipped),
        "wall_time_s": time.perf_counter() - started,
    }
    log_hparams(writer, vars(args), {"hparam/best_val_acc": summary["best_val_acc"],
                                     "hparam/test_acc": summary["test_acc"]})
    writer.close()
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    write_run_curves(run_dir)
    console.print(run_summary_table(summary))
    return summary

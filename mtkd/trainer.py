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
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter

from .cache import CachedViews, open_teacher_cache, teacher_logits
from .checkpoint import CheckpointSaver, load_checkpoint, student_checkpoint
from .data import (BatchTransform, TaskData, concat, count_labelled, create_loader, keep_labels, labelled_only,
                   load_task_data, load_transfer_images)
from .distill import Distiller
from .terms import KDConfig
from .distributed import DistInfo, barrier, broadcast, cleanup, init_distributed, main_first
from .engine import TrainingInterrupted, evaluate, predict
from .errors import UserError
from .loop import GracefulStop, LoopConfig, RunRng, fit, resolve_device, seed_everything
from .metrics import restricted_accuracy
from .models import HUB, check_architecture, count_parameters, create_student, init_description
from .optim import EpochScheduler, create_optimizer, optimizer_kwargs, scheduler_kwargs
from .report import console, run_summary_table, teachers_table
from .results import git_commit, images_per_second, machine, utc_stamp
from .runs import (append_metrics, create_run_dir, log_hparams, open_resume, read_metrics, truncate_metrics,
                   write_run_curves)
from .precision import Precision, PrecisionRecord, SavedPrecisions, keep_saved, recorded_choice
from .specialists import (PRECISION_RECORD, TeacherRecipe, choose_precision, example_batch, prepare_teachers,
                          taught_task, teacher_dir, teacher_path)
from .spec import TaskSpec
from .taskfile import resolve_task
from .teachers import ENSEMBLE_METHODS, TeacherEnsemble


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
    if kd.stacker_prior != "zero" and kd.aggregation != "stacked":
        raise UserError(f"--stacker_prior {kd.stacker_prior} says what the stacker of --aggregation stacked shrinks "
                        f"toward, but --aggregation is {kd.aggregation}. Fix: add --aggregation stacked, or drop "
                        "--stacker_prior.")
    if kd.aggregation == "stacked" and kd.ema_decay > 0:
        raise UserError("--aggregation stacked reads the task's teachers through the stacker fitted before "
                        "training, so --ema_teacher (a teacher that changes as the student trains) would take no "
                        "part. Fix: drop --ema_teacher, or choose another --aggregation.")
    for flag in ("feature_weight", "attention_weight"):
        if args.teacher_cache and getattr(kd, flag) > 0:
            raise UserError(f"--teacher_cache stores the teachers' logits and pooled features only, but --{flag} "
                            "needs their feature maps on every step. Fix: drop one of the two (--embedding_weight "
                            "works with the cache).")
    if getattr(args, "teacher_cutout", 0) >= task.image_size:
        raise UserError(f"--teacher_cutout {args.teacher_cutout} is not smaller than task {task.name}'s "
                        f"{task.image_size}x{task.image_size} images: such a square erases from a quarter to all of "
                        "each view. Fix: give a square smaller than the image "
                        f"(DeVries & Taylor use about a quarter to half its side: {task.image_size // 4}), or 0.")
    return kd


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


@dataclass(frozen=True)
class RunConfig:
    """A student run's settings as typed values, built once from the parsed arguments (``from_args``): the
    parsed ``Namespace`` stops here (it is still saved with the run, for ``--resume`` and ``--config``)."""

    kd: KDConfig
    teachers: TeacherRecipe
    loop: LoopConfig
    optimizer: dict  # create_optimizer's keywords
    scheduler: dict  # EpochScheduler's keywords
    student_model: str
    epochs: int
    seed: int
    label_fraction: float
    transfer_images: int
    amp: str
    deterministic: bool
    compile: bool
    teacher_cache: str | None
    cache_views: int
    output_dir: str
    data_root: str
    retrain_teachers: bool
    early_stopping: int
    save_top_k: int
    pretrained: str | None

    @classmethod
    def from_args(cls, args: Namespace, task: TaskSpec) -> "RunConfig":
        return cls(check_kd_args(args, task), TeacherRecipe.from_args(args), LoopConfig.from_args(args),
                   optimizer_kwargs(args), scheduler_kwargs(args), args.student_model, args.num_epochs, args.seed,
                   args.label_fraction, args.transfer_images, args.amp, args.deterministic, args.compile,
                   args.teacher_cache, args.cache_views, args.output_dir, args.data_root, args.retrain_teachers,
                   args.early_stopping, args.save_top_k, args.pretrained)


@dataclass
class StudentRun:
    """One student run, complete when constructed: its configuration, data, teachers, student, training step,
    optimiser, schedule and random state. ``state_dict`` / ``load_state_dict`` hold everything a resume needs;
    ``checkpoint`` is a student checkpoint of it (``checkpoint.student_checkpoint``)."""

    args: Namespace  # the resolved arguments, saved with the run
    config: RunConfig
    task: TaskSpec
    dist: DistInfo
    device: torch.device
    data: TaskData  # the student's training images (with the teacher cache's views), validation, test
    ensemble: TeacherEnsemble
    teacher_rows: list[dict]
    run_dir: Path
    transform: BatchTransform
    student: nn.Module
    precision: Precision
    step: Distiller
    optimizer: torch.optim.Optimizer
    scheduler: EpochScheduler
    scaler: torch.amp.GradScaler | None
    rng: RunRng
    counts: tuple[int, int]  # labelled, unlabelled training images
    cache_status: str | None
    started: float
    commit: str  # the code this run loaded, read when it started
    # The images trained on without their label, with it (--label_fraction): (the training set, their indices).
    unlabelled_truth: tuple | None = None
    best: dict = field(default_factory=lambda: {"val_acc": -1.0, "epoch": 0})

    @property
    def kd(self) -> KDConfig:
        return self.step.config

    def state_dict(self) -> dict:
        """The training state (every rank's random state: a collective under DDP, so every rank calls it)."""
        return {"model": self.student.state_dict(), "distiller": self.step.extra_state(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else {},
                "rng": self.rng.state_dict(self.dist), "best_val_acc": self.best["val_acc"],
                "best_epoch": self.best["epoch"]}

    def load_state_dict(self, state: dict) -> int:
        """Restore a ``state_dict`` (a resumed run's ``last.pt``); returns the epoch to continue from."""
        self.student.load_state_dict(state["model"])
        self.step.load_extra_state(state.get("distiller", {}))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.rng.load_state_dict(state["rng"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.best = {"val_acc": state["best_val_acc"], "epoch": state["best_epoch"]}
        return state["epoch"] + 1

    def checkpoint(self, epoch: int, val_acc: float | None) -> dict:
        """A student checkpoint of the run after ``epoch`` (a collective under DDP: see ``state_dict``)."""
        return student_checkpoint(
            **self.state_dict(), epoch=epoch, val_acc=val_acc, args=vars(self.args), task=self.task.name,
            student_model=self.config.student_model, class_names=list(self.task.class_names),
            precision=str(self.precision), teacher_precisions=[str(p) for p in self.ensemble.precisions],
            precision_device=self.device.type, init=init_description(self.config.pretrained),
            image_size=self.task.image_size)


def _run(args: Namespace, explicit: set[str], dist: DistInfo, device_name: str) -> dict:
    started, commit = time.perf_counter(), git_commit()
    args, task, run_dir, last = _resolve(args, explicit)
    config = RunConfig.from_args(args, task)
    device = resolve_device(device_name)
    set_deterministic(config.deterministic)
    data = _load_data(task, config.data_root)
    # Read before the teachers train: a task without such images stops here, before anything is written.
    transfer = load_transfer_images(task, config.data_root, config.transfer_images) if config.transfer_images else None
    saved = SavedPrecisions.from_checkpoint(last, amp_given="amp" in explicit)
    transform = BatchTransform.for_task(task).to(device)
    seed_everything(config.seed)
    # Drawn before the teachers train (seeded); a resumed run's weights come from its checkpoint.
    student = create_student(config.student_model, task, pretrained=config.pretrained if last is None else None,
                             pretrained_layout=config.pretrained is not None).to(device)
    if config.pretrained and last is None:
        console.print(f"[bold]Student[/] {config.student_model} starts from {init_description(config.pretrained)}",
                      soft_wrap=True)
    ensemble, teacher_rows = _teachers(config, task, data, device, dist, saved)
    if last is None:
        run_dir = Path(broadcast(dist, str(create_run_dir(args, task)) if dist.is_main else None))
    _write_run_files(run_dir, args, data, device, dist)
    precision = _student_precision(config, student, data, transform, device, dist, saved,
                                   teacher_dir(config.output_dir, task) / PRECISION_RECORD)
    train_set = keep_labels(data.train, config.label_fraction, config.seed)
    hidden = torch.nonzero((train_set.labels < 0) & (data.train.labels >= 0)).squeeze(1)
    unlabelled_truth = (data.train, hidden) if len(hidden) else None  # their labels, for the report only
    if transfer is not None:  # after data.train's images, so that their indices stay those of data.train
        train_set = concat(train_set, transfer)
    kd = replace(config.kd, unlabelled=count_labelled(train_set)[1] > 0)
    seed_everything(config.seed)
    step = Distiller(student, ensemble, kd, compile=config.compile).to(device)
    if step.stacker is not None and last is None:  # a resumed run's stacker is in its checkpoint
        _fit_stacker(config, task, step, data.train, train_set, transform, device, dist)
    if step.term("features") is not None:
        precision.prepare_model(step.term("features"))
    train_set, counts, cache_status = _training_images(config, task, step, train_set, transform, device, dist)
    optimizer = create_optimizer(step, **config.optimizer)
    run = StudentRun(args, config, task, dist, device, TaskData(train_set, data.val, data.test, data.skipped), ensemble,
                     teacher_rows, run_dir, transform, student, precision, step, optimizer,
                     EpochScheduler(optimizer, epochs=config.epochs, **config.scheduler),
                     torch.amp.GradScaler(device.type) if precision.dtype == "fp16" else None,
                     RunRng(config.seed, dist.rank), counts, cache_status, started, commit, unlabelled_truth)
    start_epoch = _restore(run, last) if last is not None else 1
    # purge_step drops events a killed run logged after its last checkpoint.
    writer = (SummaryWriter(str(run_dir), purge_step=start_epoch if last is not None else None)
              if dist.is_main else None)
    # No buffer broadcast on every forward: the Distiller also holds the frozen teachers and the EMA copy,
    # and the student's BatchNorm statistics are synchronised before each validation (loop.fit).
    train_step = DistributedDataParallel(step, broadcast_buffers=False) if dist.enabled else step
    with GracefulStop() as stop:
        try:
            fit(train_step, run.data, epochs=config.epochs, optimizer=optimizer, scheduler=run.scheduler,
                loop=config.loop, device=device, transform=transform,
                on_epoch=EpochRecorder(run, writer, CheckpointSaver(run_dir, config.save_top_k)), val_model=student,
                title="student", rng=run.rng, start_epoch=start_epoch, stop=stop, dist=dist, precision=precision,
                scaler=run.scaler)
        except TrainingInterrupted as e:
            if writer is not None:
                writer.close()
            raise _interrupted(e, run_dir) from None
    summary = finish_run(run, writer) if dist.is_main else None
    barrier(dist)
    return broadcast(dist, summary)


def _resolve(args: Namespace, explicit: set[str]):
    """The run's arguments and task; for ``--resume``, its folder and ``last.pt`` (else None, None)."""
    task = resolve_task(args.task)
    run_dir = last = None
    if getattr(args, "resume", None):
        run_dir, args, last = open_resume(args, task, set(explicit) - {"resume"})
        task = resolve_task(args.task)
    student_start = getattr(args, "pretrained", None)  # a resumed run's student comes from its checkpoint
    if last is None and student_start not in (None, HUB):
        _require_file("--pretrained", student_start, "pass the student's weights file (.safetensors, .pth or .bin, "
                      "timm's format), --pretrained alone for timm's own, or drop the flag.")
    assistant, pretrained = getattr(args, "teacher_assistant", None), getattr(args, "teacher_pretrained", None)
    if assistant:
        _require_file("--teacher_assistant", assistant, "pass the best.pt of an earlier run of this task, or drop "
                      "the flag.")
    elif pretrained:
        _require_file("--teacher_pretrained", pretrained, "pass the weights file the teachers start from (a timm "
                      "state dict or an mtkd teacher checkpoint), or drop the flag.")
    task = taught_task(task, vars(args))
    if not getattr(args, "teacher_dustbin", False) and getattr(args, "dustbin_from_plain", False):
        raise UserError("--dustbin_from_plain says how teachers with a dustbin start, but --teacher_dustbin is not "
                        "given. Fix: add --teacher_dustbin, or drop --dustbin_from_plain.")
    for spec in task.teachers:  # fail before any data is read
        check_architecture(spec.architecture)
    return args, task, run_dir, last


def _require_file(flag: str, path: str, fix: str) -> None:
    """Stop before any data is read when a flag names a weights file that is not there."""
    if not Path(path).is_file():
        raise UserError(f"{flag} {path}: no such file. Fix: {fix}")


def _load_data(task: TaskSpec, data_root: str) -> TaskData:
    data = load_task_data(task, data_root)
    if data.skipped:
        console.print(f"[yellow]skipped {len(data.skipped)} unreadable image file(s)[/], e.g. {data.skipped[0]}",
                      soft_wrap=True)
    return data


def _teachers(config: RunConfig, task: TaskSpec, data: TaskData, device: torch.device, dist: DistInfo,
              saved: SavedPrecisions):
    """The ensemble and its table rows. Missing teachers are trained by rank 0 alone; the other ranks wait,
    then load what rank 0 trained, whatever --retrain_teachers says."""
    out, recipe = config.output_dir, config.teachers
    ensemble, rows = main_first(
        dist, lambda: prepare_teachers(task, data, out, recipe, device, config.retrain_teachers, saved),
        lambda: prepare_teachers(task, data, out, recipe, device, False, saved))
    # Every rank runs the teachers as rank 0 measured (the cache key records it).
    ensemble.set_precisions(broadcast(dist, ensemble.precisions))
    console.print(teachers_table(rows))
    console.print("Teacher checkpoints: " + ", ".join(sorted({str(teacher_path(out, task, t).parent)
                                                              for t in task.teachers})), soft_wrap=True)
    return ensemble, rows


def _write_run_files(run_dir: Path, args: Namespace, data: TaskData, device: torch.device, dist: DistInfo) -> None:
    if dist.is_main:
        write_run_args(run_dir, args)
        if data.skipped:
            (run_dir / "skipped_files.txt").write_text("\n".join(data.skipped) + "\n")
    console.print(f"[bold]Run folder[/] {run_dir}  (device {device}"
                  f"{f' x {dist.world_size} processes' if dist.enabled else ''}, {len(data.train)} train / "
                  f"{len(data.val)} val / {len(data.test)} test images)", soft_wrap=True)


def _student_precision(config: RunConfig, student: nn.Module, data: TaskData, transform: BatchTransform,
                       device: torch.device, dist: DistInfo, saved: SavedPrecisions, record: Path) -> Precision:
    """As the resumed run had it (``precision.keep_saved``), or as recorded for this machine in ``record``
    under ``--amp auto``, or by the ``--amp`` rule (rank 0's, on every rank); applied to ``student`` before the
    Distiller copies it (EMA), so that every copy has its layout."""
    who = f"student {config.student_model}"
    precision, why = keep_saved(saved.student, saved, device, who)
    if why:
        console.print(f"[yellow]{why}[/]", soft_wrap=True)
    if precision is None and dist.is_main:
        example = example_batch(data.train, transform, device, config.loop.batch_size)
        identity = {"batch": list(example.shape), "init": init_description(config.pretrained),
                    "compile": config.compile}
        # One entry per student and setting, so that runs of other batch sizes do not replace each other's.
        name = f"{who}, batch {'x'.join(map(str, example.shape))}, {identity['init']}" + \
            (", compiled" if config.compile else "")
        precision = recorded_choice(PrecisionRecord(record, device), name, identity, config.amp, config.deterministic,
                                    lambda: choose_precision(config.amp, student, example, True,
                                                             config.deterministic, who), f"{who} training")
    precision = broadcast(dist, precision)  # DDP needs the same layout on every rank
    precision.prepare_model(student)
    return precision


def _training_images(config: RunConfig, task: TaskSpec, step: Distiller, train_set, transform: BatchTransform,
                     device: torch.device, dist: DistInfo):
    """The images the student trains on (labels only: the labelled ones), with the teacher cache's views;
    their (labelled, unlabelled) counts; the cache's status (None without a cache)."""
    if step.ensemble is None:  # labels only: an image without a label would teach nothing
        train_set = labelled_only(train_set)
    counts = count_labelled(train_set)
    console.print(f"[bold]Training images[/] {counts[0]} labelled, {counts[1]} unlabelled", soft_wrap=True)
    if not (config.teacher_cache and step.ensemble is not None):
        return train_set, counts, None
    started = time.perf_counter()
    # Rank 0 builds a missing cache; the others then find it.
    cache, path, status = main_first(dist, lambda: open_teacher_cache(
        config.teacher_cache, task.name, step.ensemble, train_set, transform, config.cache_views, device,
        embeddings=config.kd.embedding_weight > 0))
    console.print(f"[bold]Teacher cache[/] {path}: {status}, {cache.num_views} views "
                  f"({time.perf_counter() - started:.1f}s)", soft_wrap=True)
    return CachedViews(train_set, cache), counts, status


def _fit_stacker(config: RunConfig, task: TaskSpec, step: Distiller, full_train, train_set,
                 transform: BatchTransform, device: torch.device, dist: DistInfo) -> None:
    """``--aggregation stacked``: fit the stacker on the teachers' logits of the labelled training images
    (un-augmented; with ``--teacher_cache`` the logits of every training image are kept there, as the run
    report's); rank 0 fits, every rank loads its weights."""
    def fit():
        labelled = torch.nonzero(train_set.labels >= 0).squeeze(1)
        if config.teacher_cache:  # the same file the report's rows read (keyed on the images, not the labels)
            logits = [z[labelled] for z in teacher_logits(step.ensemble, {"train": full_train}, transform,
                                                          device, config.teacher_cache, task.name)["train"]]
        else:
            logits = teacher_logits(step.ensemble, {"train": full_train.subset(labelled)}, transform,
                                    device)["train"]
        info = step.stacker.fit(logits, train_set.labels[labelled])
        return info, {k: v.cpu() for k, v in step.stacker.state_dict().items()}

    info, state = broadcast(dist, fit() if dist.is_main else None)
    step.stacker.load_state_dict(state)
    cv = ", ".join(f"{l2:g}: {acc:.2%}" for l2, acc in info["cv_acc"].items())
    console.print(f"[bold]Stacker[/] fitted on {info['images']} labelled images: L2 {info['l2']:g} "
                  f"(5-fold accuracy {cv}); {info['fit_acc']:.2%} on the images fitted", soft_wrap=True)


def _restore(run: StudentRun, last: dict) -> int:
    """Load a resumed run's state from its ``last.pt``; returns the epoch to start from."""
    start_epoch = run.load_state_dict(last)
    if run.dist.is_main:
        truncate_metrics(run.run_dir / "metrics.csv", start_epoch)
    console.print(f"[bold]Resuming[/] at epoch {start_epoch} of {run.config.epochs}", soft_wrap=True)
    return start_epoch


class EpochRecorder:
    """``fit``'s ``on_epoch``: after each epoch, the best epoch so far, TensorBoard scalars, a metrics.csv row,
    the checkpoints (best / top-k / last) and the early-stopping decision (True stops the run). Every rank calls
    it (the checkpoint gathers every rank's random state); rank 0 writes."""

    def __init__(self, run: StudentRun, writer, saver: CheckpointSaver):
        self.run, self.writer, self.saver = run, writer, saver

    def __call__(self, epoch: int, train: dict, val: dict | None, lr: float, seconds: float) -> bool:
        """``val`` None: an epoch without validation (``--eval_every``): no best, top-k or early-stopping
        decision; its metrics.csv row has empty val columns; last.pt is written as after any epoch."""
        run, best = self.run, self.run.best
        if val is not None and val["acc"] > best["val_acc"]:
            best.update(val_acc=val["acc"], epoch=epoch)
        state = run.checkpoint(epoch, val["acc"] if val else None)
        if run.dist.is_main:
            measured = {"val_loss": val["loss"], "val_acc": val["acc"], "val_top3": val["top3"]} if val else \
                {"val_loss": "", "val_acc": "", "val_top3": ""}
            row = {"epoch": epoch, **{f"train_{k}": v for k, v in train.items()}, **measured, "lr": lr,
                   "time_s": seconds}
            for key, value in row.items():
                if key != "epoch" and value != "":
                    tag = key.replace("_", "/", 1) if key.startswith(("train_", "val_")) else key
                    self.writer.add_scalar(tag, value, epoch)
            append_metrics(run.run_dir / "metrics.csv", row)
            self.saver.save(state, is_best=best["epoch"] == epoch)
        patience = run.config.early_stopping
        if val is not None and patience and epoch - best["epoch"] >= patience:
            console.print(f"[bold]Early stopping[/]: no better validation accuracy for {patience} "
                          f"epochs (best {best['val_acc']:.4f} at epoch {best['epoch']})")
            return True
        return False


def _interrupted(e: TrainingInterrupted, run_dir: Path) -> RunInterrupted:
    name = signal.Signals(e.signum).name
    if e.epoch > 1:
        saved = (f"{run_dir / 'last.pt'} holds epoch {e.epoch - 1}, the last complete one. "
                 f"Resume with: python train.py --resume {run_dir}")
    else:
        saved = "no epoch was complete, so there is nothing to resume: start the run again."
    return RunInterrupted(f"{name} at epoch {e.epoch}, step {e.step}: epoch {e.epoch} is abandoned and " + saved,
                          e.signum)


def write_run_args(run_dir: Path, args: Namespace) -> None:
    """``args.json`` (for --resume) and ``config.yaml`` (for --config) of the resolved arguments."""
    import yaml

    (run_dir / "args.json").write_text(json.dumps(vars(args), indent=2))
    config = {k: v for k, v in vars(args).items() if k not in ("config", "resume")}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def finish_run(run: StudentRun, writer) -> dict:
    """Test the best checkpoint and the teacher ensemble; write summary.json, curves and the hparams."""
    config, data, device, student, ensemble = run.config, run.data, run.device, run.student, run.ensemble
    student.load_state_dict(load_checkpoint(run.run_dir / "best.pt")["model"])
    test_loader = create_loader(data.test, 512, train=False)
    test = evaluate(student, test_loader, run.transform, device, precision=run.precision)
    logits, labels = predict(student, test_loader, run.transform, device, run.precision)
    for row, ids in zip(run.teacher_rows, ensemble.class_ids):
        # The student on the specialist's test images, choosing among the specialist's classes: its task.
        row["student_test_acc"] = restricted_accuracy(logits, labels, ids.cpu())
    splits = {"val": (data.val, None), "test": (data.test, None)}
    if run.unlabelled_truth is not None:  # how good the teachers' labels for the unlabelled images are
        splits["unlabelled"] = run.unlabelled_truth
    stacker = run.step.stacker
    ensemble_rows = ensemble_accuracy(ensemble, splits, run.transform, device, config.teacher_cache, run.task.name,
                                      stacker)
    kd = run.kd
    summary = {
        "task": run.task.name, "student_model": config.student_model, "run_dir": str(run.run_dir),
        "alpha": kd.alpha, "temperature": kd.temperature, "epochs": config.epochs, "seed": config.seed,
        "aggregation": kd.aggregation, "teacher_weighting": kd.weighting, "kd_loss": kd.kd_loss,
        "teacher_cache": run.cache_status, "precision": str(run.precision), "label_fraction": config.label_fraction,
        "labelled_images": run.counts[0], "unlabelled_images": run.counts[1],
        "best_epoch": run.best["epoch"], "best_val_acc": run.best["val_acc"], "test_acc": test["acc"],
        "student_params": count_parameters(student), "student_init": init_description(config.pretrained),
        "student_image_size": run.task.image_size,
        "teachers": run.teacher_rows,
        "ensemble_params": count_parameters(ensemble), "ensemble_val_acc": ensemble_rows["combination"]["val_acc"],
        "ensemble_test_acc": ensemble_rows["combination"]["test_acc"], "ensemble": ensemble_rows,
        # The pseudo-label's accuracy on the images used without their label: the stacker's class, else the
        # specialist combination's.
        "pseudo_label_acc": ensemble_rows["stacked" if stacker is not None else "combination"].get("unlabelled_acc"),
        "stacker_l2": stacker.l2.item() if stacker is not None else None,
        "device": str(device), "skipped_files": len(data.skipped), "wall_time_s": time.perf_counter() - run.started,
        "train_images_per_s": images_per_second(read_metrics(run.run_dir), sum(run.counts)), "machine": machine(device),
        "commit": run.commit,
        "finished": utc_stamp(),
    }
    log_hparams(writer, vars(run.args), {"hparam/best_val_acc": summary["best_val_acc"],
                                     "hparam/test_acc": summary["test_acc"]})
    writer.close()
    (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    write_run_curves(run.run_dir)
    console.print(run_summary_table(summary))
    return summary


def ensemble_accuracy(ensemble: TeacherEnsemble, splits: dict, transform: BatchTransform, device: torch.device,
                      cache_dir: str | Path | None = None, task_name: str = "",
                      stacker: nn.Module | None = None) -> dict[str, dict[str, float]]:
    """``{method: {"<split>_acc": ...}}`` for each of ``ENSEMBLE_METHODS``, and ``stacked`` for a fitted
    ``stacker`` (``--aggregation stacked``).

    ``splits``: ``{split: (dataset, indices or None)}``, the split being ``dataset[indices]``. The teachers run
    once per dataset (``cache.teacher_logits``; with ``cache_dir`` read from there when an earlier run kept them,
    and then on the whole ``dataset``, so that runs of other seeds and label fractions share them) and each way of
    combining them reads the same logits.
    """
    datasets = {split: d if idx is None or cache_dir is not None else d.subset(idx)
                for split, (d, idx) in splits.items()}
    logits_of = teacher_logits(ensemble, datasets, transform, device, cache_dir, task_name)
    readers = {method: (lambda z, m=method: ensemble.combine(z, m)) for method in ENSEMBLE_METHODS}
    if stacker is not None:
        readers["stacked"] = stacker
    rows = {method: {} for method in readers}
    for split, (dataset, idx) in splits.items():
        logits, labels = logits_of[split], datasets[split].labels
        if idx is not None and cache_dir is not None:
            logits, labels = [z[idx] for z in logits], labels[idx]
        for method, read in readers.items():
            if not len(labels):  # an empty split
                rows[method][f"{split}_acc"] = float("nan")
                continue
            pred = read([z.to(device) for z in logits]).argmax(1).cpu()
            rows[method][f"{split}_acc"] = (pred == labels).float().mean().item()
    return rows

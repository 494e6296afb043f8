"""Specialist teachers: train each on its own classes, or load it; build the ensemble."""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from .checkpoint import CHECKPOINT_VERSION, FOR_STUDENT, load_checkpoint, load_weights_file, save_checkpoint
from .data import BatchTransform, TaskData, create_loader, hash_tensor, with_others
from .distill import Distiller
from .engine import evaluate
from .errors import UserError
from .loop import LoopConfig, RunRng, fit, seed_everything
from .optim import EpochScheduler, create_optimizer
from .models import (SMALL_INPUT, STUDENTS, classifier_keys, count_parameters, create_teacher, init_description,
                     load_fitting_state, small_stem_weights, stem_in_weights)
from .precision import (FP32, NOT_SAVED, MachineRecord, Precision, PrecisionRecord, SavedPrecisions, keep_saved,
                        recorded_choice, resolve_precision)
from .report import console, step_progress
from .results import git_commit, machine, utc_stamp
from .spec import TaskSpec
from .teachers import OwnClasses, TeacherEnsemble, TeacherInput


@dataclass(frozen=True)
class TeacherRecipe:
    """How a missing teacher is trained: ``optimizer`` (``optim.OPTIMIZERS``) with ``lr`` / ``weight_decay``, a
    cosine schedule over ``epochs``, the task's crop and flip (and a ``cutout``-pixel Cutout square when > 0),
    no accumulation or clipping, whatever the student's options; precision by the ``amp`` rule."""

    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 5e-4
    batch_size: int = 32
    seed: int = 42
    amp: str = "auto"
    deterministic: bool = False
    num_workers: int = 0
    optimizer: str = "adam"
    dustbin_from_plain: bool = False  # a dustbin teacher starts from the plain teacher beside it
    cutout: int = 0  # side of the Cutout square in pixels; 0: off

    @classmethod
    def from_args(cls, args) -> "TeacherRecipe":
        lr = args.lr if args.teacher_lr is None else args.teacher_lr
        wd = args.weight_decay if args.teacher_weight_decay is None else args.teacher_weight_decay
        return cls(args.teacher_epochs, lr, wd, args.batch_size, args.seed, args.amp, args.deterministic,
                   args.num_workers, args.teacher_optimizer, getattr(args, "dustbin_from_plain", False),
                   getattr(args, "teacher_cutout", 0))

    def record(self) -> dict:
        """What a teacher checkpoint says of how it was trained."""
        return {"optimizer": self.optimizer, "lr": self.lr, "weight_decay": self.weight_decay,
                "batch_size": self.batch_size, "scheduler": "cosine", "seed": self.seed, "cutout": self.cutout}


def teacher_dir(output_dir: str | Path, task: TaskSpec) -> Path:
    return Path(output_dir) / f"Task{task.name}" / "teachers"


def teacher_path(output_dir: str | Path, task: TaskSpec, spec) -> Path:
    """The teacher's own ``checkpoint`` if its spec names one, else ``<teacher_dir>/<name>.pt``; with a
    dustbin, ``-dustbin`` added to the file's stem (beside the plain teacher, never replacing it)."""
    path = Path(spec.checkpoint) if spec.checkpoint else teacher_dir(output_dir, task) / f"{spec.name}.pt"
    return path.with_name(f"{path.stem}-dustbin{path.suffix}") if spec.dustbin else path


def taught_task(task: TaskSpec, args: dict) -> TaskSpec:
    """The task with the teachers a run (its arguments, ``args``) has: an earlier student of the task
    (``--teacher_assistant``), or the task's specialists as ``--teacher_architecture``, ``--teacher_pretrained``
    and ``--teacher_dustbin`` make them."""
    assistant = args.get("teacher_assistant")
    if assistant:
        if args.get("teacher_dustbin"):
            raise UserError("--teacher_dustbin gives the task's specialists a dustbin, but --teacher_assistant "
                            "teaches with one student over every class instead. Fix: drop one of the two.")
        return assistant_task(task, assistant)
    task = task.with_teachers(args.get("teacher_architecture"), args.get("teacher_pretrained"))
    return task.with_dustbins() if args.get("teacher_dustbin") else task


def assistant_task(task: TaskSpec, path: str | Path) -> TaskSpec:
    """The task taught by the student in checkpoint ``path`` (a run's ``best.pt``): checked to be a student of
    this task, with its classes in the task's order."""
    state = load_checkpoint(path, required=FOR_STUDENT)
    if state["task"] != task.name or list(state["class_names"]) != list(task.class_names):
        raise UserError(f"--teacher_assistant {path} is a student of task {state['task']} "
                        f"({len(state['class_names'])} classes), not of task {task.name}. Fix: pass the best.pt of "
                        f"a task {task.name} run (under its output folder's Task{task.name}/).")
    if state["student_model"] not in STUDENTS:
        raise UserError(f"--teacher_assistant {path}: its student {state['student_model']!r} is none of "
                        f"{', '.join(STUDENTS)}. Fix: pass a checkpoint written by train.py.")
    return task.with_assistant(STUDENTS.get(state["student_model"]), str(path))


def _teacher_row(spec, model, metrics: dict, status: str, init: str) -> dict:
    """One teacher's line of the run's summary; ``init``: what its weights started from, as its checkpoint
    records it (``external`` for weights trained elsewhere, ``unknown`` for a checkpoint that predates it)."""
    return {"name": spec.name, "architecture": spec.architecture, "classes": list(spec.classes),
            "weight": spec.weight, "params": count_parameters(model), "val_acc": metrics["val_acc"],
            "test_acc": metrics["test_acc"], "status": status, "init": init}


def example_batch(dataset, transform: BatchTransform, device: torch.device, n: int) -> torch.Tensor:
    """The first ``n`` images of ``dataset``, normalised on ``device``: what a model is timed on."""
    images, _ = dataset.__getitems__(list(range(min(n, len(dataset)))))
    return transform(images.to(device))


def choose_precision(amp: str, model: nn.Module, example: torch.Tensor, train: bool,
                     deterministic: bool, who: str) -> Precision:
    """``resolve_precision`` for one model; prints the choice and what was measured."""
    precision, speeds = resolve_precision(amp, example.device, model, example, train, deterministic)
    measured = ("  (images/s " + ", ".join(f"{k} {v:.0f}" for k, v in speeds.items()) + ")") if speeds else ""
    console.print(f"[bold]Precision[/] {who} {'training' if train else 'inference'}: {precision} "
                  f"(--amp {amp}){measured}", soft_wrap=True)
    return precision


def teacher_input(spec, task: TaskSpec) -> TeacherInput | None:
    """The teacher's own input (``image_size`` / ``mean`` / ``std`` it declares), or None: the task's."""
    size, mean, std = spec.image_size or task.image_size, spec.mean or task.mean, spec.std or task.std
    if (size, tuple(mean), tuple(std)) == (task.image_size, tuple(task.mean), tuple(task.std)):
        return None
    return TeacherInput(task.mean, task.std, mean, std, size)


def input_record(spec, task: TaskSpec) -> dict:
    """What a teacher is trained on: its input size, normalisation and stem (saved in its checkpoint)."""
    size = spec.image_size or task.image_size
    return {"image_size": size, "mean": [float(v) for v in spec.mean or task.mean],
            "std": [float(v) for v in spec.std or task.std],
            "adapt_small_input": bool(size < SMALL_INPUT if spec.adapt is None else spec.adapt)}


def _own_classes(spec, task: TaskSpec, data: TaskData) -> TaskData:
    ids = task.class_indices(spec.classes)
    return TaskData(*(data.split(s).select_classes(ids) for s in ("train", "val", "test")))


def _teacher_data(spec, task: TaskSpec, data: TaskData, seed: int) -> TaskData:
    """What a teacher trains and is chosen on: its own classes; with a dustbin, and others as "other"."""
    if not spec.dustbin:
        return _own_classes(spec, task, data)
    ids = task.class_indices(spec.classes)
    return TaskData(*(with_others(data.split(s), ids, seed) for s in ("train", "val", "test")))


def _with_input(model: nn.Module, spec, task: TaskSpec) -> nn.Module:
    """The teacher as it sees the student's batches: its own input preparation first, if it has one."""
    inputs = teacher_input(spec, task)
    return model if inputs is None else nn.Sequential(inputs, model)


def choose_teacher_precisions(ensemble: TeacherEnsemble, example: torch.Tensor, amp: str,
                              deterministic: bool = False) -> list[Precision]:
    """``choose_precision`` for inference of each teacher, timed on ``example`` (the student's batch) as it
    reaches that teacher."""
    return [choose_precision(amp, t, inputs(example), False, deterministic, f"teacher {name}")
            for t, inputs, name in zip(ensemble.teachers, ensemble.inputs, ensemble.names)]


# Beside the teacher checkpoints: --amp auto's choices for the task's models, {machine: {teacher or
# "student <model>": choice}} (precision.PrecisionRecord).
PRECISION_RECORD = "precisions.json"
# Beside them too: the accuracies measured of teachers trained elsewhere, per machine (precision.MachineRecord).
MEASURED_RECORD = "measured.json"


def _weights_id(path: Path) -> dict:
    st = path.stat()
    return {"checkpoint": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def teacher_precisions(ensemble: TeacherEnsemble, paths: list[Path], example: torch.Tensor, amp: str,
                       deterministic: bool, record: Path, saved: SavedPrecisions = NOT_SAVED) -> list[Precision]:
    """Each teacher's inference precision.

    In order: a resumed run's own choice (``precision.keep_saved``); under ``--amp auto``, the choice recorded
    in ``record`` (a ``PrecisionRecord``) for this machine and these weights (checkpoint path, size,
    modification time); else the ``--amp`` rule, timed, and (``auto``) recorded. So a near tie in the timing
    cannot flip a teacher between runs, and the teacher cache keyed on the choice is found again.
    """
    recorded = PrecisionRecord(record, example.device)
    out = []
    for k, (teacher, inputs, name) in enumerate(zip(ensemble.teachers, ensemble.inputs, ensemble.names)):
        who = f"teacher {name}"
        kept, why = keep_saved(saved.teachers[k] if saved.teachers else None, saved, example.device, who)
        if why:
            console.print(f"[yellow]{why}[/]", soft_wrap=True)
        out.append(kept or recorded_choice(recorded, name, _weights_id(paths[k]), amp, deterministic,
                                           lambda: choose_precision(amp, teacher, inputs(example), False,
                                                                    deterministic, who), f"{who} inference"))
    return out


def plain_start(spec, task: TaskSpec, output_dir: str | Path) -> tuple[nn.Module, str, bool]:
    """What a dustbin teacher starts from under ``--dustbin_from_plain``: the plain teacher beside it (an mtkd
    checkpoint or weights trained elsewhere), a description of it, and whether it has a pretrained model's
    layout (``models.create_model``)."""
    plain = replace(spec, dustbin=False)
    path = teacher_path(output_dir, task, plain)
    if not path.exists():
        raise UserError(f"teacher {spec.name!r}: --dustbin_from_plain starts its dustbin teacher from the plain "
                        f"teacher {path}, which does not exist. Fix: train or copy the plain teacher there first "
                        "(a run without --teacher_dustbin trains it), or drop --dustbin_from_plain.")
    model, state = load_teacher(plain, task, path)
    return model, f"plain teacher {path}", _pretrained_layout(state)


def _pretrained_layout(state: dict | None) -> bool:
    """Whether an mtkd teacher checkpoint's model has a pretrained model's layout (``models.create_model``)."""
    if state is None:
        return False
    return bool(state.get("pretrained_layout", state.get("init", "random") != "random"))


def grow_classifier(model: nn.Module, plain: nn.Module, who: str) -> None:
    """Copy ``plain``'s weights into ``model``, the same network with more outputs: every weight but the
    classifier's as it is, the classifier's rows for ``plain``'s outputs into its first rows (the rest keep
    their fresh initialisation)."""
    names = set(classifier_keys(model, ("weight", "bias")))
    own, theirs = model.state_dict(), plain.state_dict()
    bad = [k for k in own if k not in theirs or (k not in names and own[k].shape != theirs[k].shape)]
    if bad or len(theirs) != len(own):
        raise UserError(f"{who}: the plain teacher's network is not the one its dustbin teacher is built as "
                        f"(first difference at {bad[0] if bad else 'the keys'}): e.g. another stem. Fix: set the "
                        "teacher's adapt_small_input / image_size in the task file to how the plain teacher was "
                        "built, or drop --dustbin_from_plain.")
    grown = {k: v.clone() for k, v in theirs.items()}
    for k in names:
        rows = theirs[k].shape[0]
        grown[k] = own[k].clone()
        grown[k][:rows] = theirs[k].to(own[k].dtype)
    model.load_state_dict(grown)


def train_teacher(spec, task: TaskSpec, data: TaskData, recipe: TeacherRecipe, device: torch.device,
                  path: Path, start: tuple[nn.Module, str, bool] | None = None) -> tuple[nn.Module, dict, str]:
    """Train one specialist on its classes by ``recipe``; keep the weights of its best validation epoch.
    Returns the teacher, its metrics and what its weights started from (as its checkpoint records it).

    A teacher with a dustbin trains (and is chosen) on ``with_others``: its classes and as many images of
    the task's other classes, labelled "other". Its reported accuracies are on its own classes' images,
    choosing among its own classes (as a plain teacher's), beside ``dustbin_val_acc`` (its own task, val).
    ``start`` (``plain_start``): the plain teacher it starts from, its description and layout."""
    own = _teacher_data(spec, task, data, recipe.seed)
    if start is not None:
        plain, init, layout = start
        console.print(f"teacher {spec.name}: starting from {init}", soft_wrap=True)
        model = create_teacher(spec, task, layout_of_pretrained=layout)
        grow_classifier(model, plain, f"teacher {spec.name!r}")
        model = model.to(device)
    else:
        if spec.pretrained:
            console.print(f"teacher {spec.name}: starting from {init_description(spec.pretrained)}", soft_wrap=True)
        model = create_teacher(spec, task, pretrained=True).to(device)
        # Weights of an mtkd small-input network start the usual small-input layout (models.create_model).
        init = init_description(spec.pretrained)
        layout = bool(spec.pretrained) and not small_stem_weights(spec.pretrained)
    net = _with_input(model, spec, task).to(device)
    optimizer = create_optimizer(model, recipe.optimizer, recipe.lr, recipe.weight_decay)
    scheduler = EpochScheduler(optimizer, "cosine", recipe.epochs)
    transform = BatchTransform.for_task(task, recipe.cutout).to(device)
    precision = choose_precision(recipe.amp, net, example_batch(own.train, transform, device, recipe.batch_size),
                                 True, recipe.deterministic, f"teacher {spec.name}")
    precision.prepare_model(net)
    scaler = torch.amp.GradScaler(device.type) if precision.dtype == "fp16" else None
    best = {"val_acc": -1.0}
    writer = SummaryWriter(str(path.with_suffix("")))

    def on_epoch(epoch, train, val, lr, seconds):
        writer.add_scalar("train/loss", train["loss"], epoch)
        writer.add_scalar("train/acc", train["acc"], epoch)
        writer.add_scalar("val/acc", val["acc"], epoch)
        if val["acc"] > best["val_acc"]:
            best.update(val_acc=val["acc"], epoch=epoch,
                        model={k: v.detach().clone() for k, v in model.state_dict().items()})

    seed_everything(recipe.seed)
    started = time.perf_counter()
    fit(Distiller(net), own, epochs=recipe.epochs, optimizer=optimizer, scheduler=scheduler,
        loop=LoopConfig(recipe.batch_size, recipe.seed, recipe.num_workers), device=device, transform=transform,
        on_epoch=on_epoch, val_model=net, title=f"teacher {spec.name}", rng=RunRng(recipe.seed),
        precision=precision, scaler=scaler)
    writer.close()
    seconds = time.perf_counter() - started
    model.load_state_dict(best["model"])
    if spec.dustbin:
        metrics = {**_own_accuracy(spec, task, net, data, device, precision), "best_epoch": best["epoch"],
                   "dustbin_val_acc": best["val_acc"]}
    else:
        test = evaluate(net, create_loader(own.test, 512, train=False), transform, device, precision=precision)
        metrics = {"val_acc": best["val_acc"], "test_acc": test["acc"], "best_epoch": best["epoch"]}
    model.to(memory_format=torch.contiguous_format)  # checkpoints hold plain NCHW weights
    save_checkpoint({"model": model.state_dict(), "architecture": spec.architecture,
                     "classes": list(spec.classes), "dustbin": spec.dustbin, "task": task.name, "metrics": metrics,
                     "epochs": recipe.epochs, "recipe": recipe.record(), "input": input_record(spec, task),
                     "init": init, "pretrained_layout": layout, "training": training_record(seconds, precision, device),
                     "version": CHECKPOINT_VERSION}, path)
    return model, metrics, init


def training_record(seconds: float, precision, device: torch.device) -> dict:
    """Where and how fast a teacher was trained, as its checkpoint keeps it (``results.teacher_record``)."""
    return {"seconds": round(seconds, 1), "precision": str(precision), "machine": machine(device),
            "commit": git_commit(), "finished": utc_stamp()}


def saved_inits(task: TaskSpec, output_dir: str | Path) -> list[dict]:
    """What each of ``task``'s teachers started from, as its checkpoint under ``output_dir`` records it
    (``{"init": ...}``: ``"unknown"`` for weights from elsewhere or an older checkpoint, None where there is
    none yet and a run would train it): what a run reusing them would be taught by, known before it runs."""
    inits = []
    for spec in task.teachers:
        path = teacher_path(output_dir, task, spec)
        if not path.is_file():
            inits.append({"init": None})
            continue
        state = load_weights_file(path, f"teacher {spec.name!r}")[1]  # None: weights from elsewhere
        inits.append({"init": (state or {}).get("init", "unknown")})
    return inits


def load_teacher(spec, task: TaskSpec, path: Path) -> tuple[nn.Module, dict | None]:
    """The teacher from an mtkd teacher checkpoint, or from a state dict trained elsewhere; and the mtkd
    checkpoint (None for the latter)."""
    who = f"teacher {spec.name!r} ({spec.architecture}, {len(spec.classes)} classes" \
          f"{' and a dustbin' if spec.dustbin else ''})"
    weights, state = load_weights_file(path, who)
    if state is not None and (state["architecture"] != spec.architecture
                              or list(state["classes"]) != list(spec.classes)
                              or bool(state.get("dustbin", False)) != spec.dustbin):
        raise UserError(
            f"teacher checkpoint {path} was trained as {state['architecture']} on {state['classes']}"
            f"{' with a dustbin' if state.get('dustbin') else ''}, but task {task.name} now asks for "
            f"{spec.architecture} on {list(spec.classes)}{' with a dustbin' if spec.dustbin else ''}. "
            "Fix: pass --retrain_teachers, or move the old checkpoint away.")
    now = input_record(spec, task)
    if state is not None and state.get("input") is not None and state["input"] != now:
        # Checkpoints written before inputs were recorded have none: they are taken as they are.
        changed = ", ".join(f"{k} {state['input'].get(k)} -> {v}" for k, v in now.items()
                            if state["input"].get(k) != v)
        raise UserError(
            f"teacher checkpoint {path} was trained on another input than task {task.name} now declares for "
            f"teacher {spec.name!r} ({changed}). Fix: pass --retrain_teachers, or move the old checkpoint away.")
    if state is None:  # weights from elsewhere say which stem they have
        spec = follow_stem(spec, task, weights)
    # A teacher mtkd fine-tuned from pretrained weights has their layout (models.create_model).
    model = create_teacher(spec, task, layout_of_pretrained=_pretrained_layout(state))
    load_fitting_state(model, weights, f"{who}, checkpoint {path}", len(spec.classes) + int(spec.dustbin))
    return model, state


def follow_stem(spec, task: TaskSpec, weights: dict):
    """``spec`` with the stem its weights were trained with, where they say (``models.stem_in_weights``) and
    it differs from what the task file's ``adapt_small_input`` (or the size rule) gives; printed."""
    found = stem_in_weights(weights)
    declared = input_record(spec, task)["adapt_small_input"]
    if found is None or found[0] == declared:
        return spec
    adapt, kernel = found
    console.print(f"[yellow]teacher {spec.name}[/]: its weights have a {kernel}x{kernel} first convolution, so it "
                  f"keeps {'the small-input stem (stride 1)' if adapt else 'timm’s ImageNet stem (stride 4)'} "
                  f"(adapt_small_input = {str(adapt).lower()}) for its {input_record(spec, task)['image_size']}-px "
                  "input", soft_wrap=True)
    return replace(spec, adapt=adapt)


def _own_accuracy(spec, task: TaskSpec, net: nn.Module, data: TaskData, device: torch.device,
                  precision: Precision = FP32) -> dict:
    """Validation and test accuracy of a teacher (``net``: as it sees the task's batches) on the images of its
    own classes, choosing among them (a dustbin's output dropped)."""
    ids = task.class_indices(spec.classes)
    net = nn.Sequential(net, OwnClasses()) if spec.dustbin else net
    transform = BatchTransform.for_task(task).to(device)
    own = {split: data.split(split).select_classes(ids) for split in ("val", "test")}
    with step_progress(f"measuring teacher {spec.name}", sum(len(d) for d in own.values())) as advance:
        acc = {split: evaluate(net, create_loader(d, 512, train=False), transform, device, precision=precision,
                               advance=advance)["acc"] for split, d in own.items()}
    return {"val_acc": acc["val"], "test_acc": acc["test"]}


def measure_teacher(spec, task: TaskSpec, model: nn.Module, data: TaskData, device: torch.device) -> dict:
    """Validation and test accuracy of a teacher trained elsewhere, on its own classes of this task."""
    metrics = _own_accuracy(spec, task, _with_input(model, spec, task).to(device), data, device)
    model.cpu()
    return metrics


def _own_images_id(spec, task: TaskSpec, data: TaskData) -> str:
    """sha256 over the val and test images of the teacher's classes and their labels: what it is measured on."""
    h = hashlib.sha256()
    ids = task.class_indices(spec.classes)
    for split in ("val", "test"):
        own = data.split(split).select_classes(ids)
        own.fingerprint(h)
        hash_tensor(h, own.labels)
    return h.hexdigest()


def _measured(spec, task: TaskSpec, model: nn.Module, data: TaskData, device: torch.device, path: Path,
              output_dir: str | Path) -> dict:
    """``measure_teacher``'s accuracies, kept in the teacher folder's ``MEASURED_RECORD`` for this machine and
    found again for the same weights (path, size, modification time), input and images: a study's runs
    measure a teacher trained elsewhere once."""
    record = MachineRecord(teacher_dir(output_dir, task) / MEASURED_RECORD, device)
    identity = {**_weights_id(path), "input": input_record(spec, task), "dustbin": spec.dustbin,
                "images": _own_images_id(spec, task, data)}
    entry = record.entry(spec.name, identity)
    if entry is not None:
        console.print(f"teacher {spec.name}: accuracy as measured before on this machine ({record.path})",
                      soft_wrap=True)
        return {"val_acc": entry["val_acc"], "test_acc": entry["test_acc"]}
    metrics = measure_teacher(spec, task, model, data, device)
    record.put_entry(spec.name, identity, metrics)
    return metrics


def _is_external(path: Path) -> bool:
    return path.suffix == ".safetensors" or load_weights_file(path, str(path))[1] is None


def prepare_teachers(task: TaskSpec, data: TaskData, output_dir: str | Path, recipe: TeacherRecipe,
                     device: torch.device, retrain: bool = False,
                     saved: SavedPrecisions = NOT_SAVED) -> tuple[TeacherEnsemble, list[dict]]:
    """Load each teacher's checkpoint, training by ``recipe`` those that have none (or all, with ``retrain``).

    Each teacher then runs in the inference precision ``teacher_precisions`` gives it (a resumed run's
    ``saved`` choices, the machine's recorded one, or the ``recipe.amp`` rule).
    """
    models, rows, paths = [], [], []
    for spec in task.teachers:
        path = teacher_path(output_dir, task, spec)
        paths.append(path)
        # A teacher trained elsewhere is never overwritten, --retrain_teachers or not.
        if path.exists() and (not retrain or _is_external(path)):
            model, state = load_teacher(spec, task, path)
            if state is not None:
                metrics, status, init = state["metrics"], "reused", state.get("init", "unknown")
            else:
                metrics, status, init = (_measured(spec, task, model, data, device, path, output_dir), "external",
                                         "external")
        elif path.suffix == ".safetensors":
            raise UserError(f"teacher {spec.name!r}: checkpoint {path} not found (mtkd trains missing teachers, "
                            "but writes its own format, not .safetensors). Fix: check the path, or name a .pt file.")
        else:
            console.print(f"[bold]Training teacher {spec.name}[/] ({spec.architecture}, "
                          f"classes {' '.join(spec.classes)})")
            start = plain_start(spec, task, output_dir) if spec.dustbin and recipe.dustbin_from_plain else None
            model, metrics, init = train_teacher(spec, task, data, recipe, device, path, start)
            status = "trained"
        models.append(model)
        rows.append(_teacher_row(spec, model, metrics, status, init))
    ensemble = create_ensemble(task, models).to(device)
    example = example_batch(data.train, BatchTransform.for_task(task).to(device), device, recipe.batch_size)
    ensemble.set_precisions(teacher_precisions(ensemble, paths, example, recipe.amp, recipe.deterministic,
                                               teacher_dir(output_dir, task) / PRECISION_RECORD, saved))
    for row, precision in zip(rows, ensemble.precisions):
        row["precision"] = str(precision)
    return ensemble, rows


def create_ensemble(task: TaskSpec, models: list[nn.Module]) -> TeacherEnsemble:
    """The task's teachers (``models``, in the task's order) as one frozen ensemble."""
    return TeacherEnsemble(models, [task.class_indices(t.classes) for t in task.teachers],
                           [t.weight for t in task.teachers], task.num_classes, [t.name for t in task.teachers],
                           [teacher_input(t, task) for t in task.teachers], [t.dustbin for t in task.teachers])

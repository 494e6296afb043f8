"""Study records: one CSV row per finished run, appended as each run ends, and tables rendered from them.

A study (``results/task_a.csv``, say) is a list of runs. Each row holds what
is needed to trust and reproduce that run: the task, student and method with
every setting that differs between runs, the outcome (best epoch, best
validation and test accuracy, the student on each teacher's classes, the
teachers' own accuracies), the cost (wall time, images/s) and where it ran
(precision, machine, threads, torch, commit). Accuracies are fractions.
``selection`` marks runs that chose hyper-parameters (on validation only);
their test accuracy is recorded but never used to choose.

The README's result tables are rendered from these files
(``benchmarks/study.py readme``), so the two cannot disagree.
"""
from __future__ import annotations

import csv
import math
import statistics
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from .checkpoint import FOR_STUDENT, load_checkpoint
from .errors import UserError
from .models import init_description
from .precision import cpu_bf16_units, cpu_model
from .terms import AGGREGATIONS

# The columns of a study file, in order (see README, Results).
COLUMNS = (
    "task", "student", "method", "aggregation", "weighting", "kd_loss", "alpha", "temperature",
    "label_fraction", "labelled_images", "unlabelled_images", "epochs", "eval_every", "lr", "optimizer", "scheduler",
    "scheduler_step", "scheduler_gamma", "warmup_epochs", "batch_size", "weight_decay", "cache_views", "seed",
    "init", "selection", "best_epoch", "best_val_acc", "test_acc", "student_on_teachers", "teachers_test_acc",
    "ensemble_test_acc", "pseudo_label_acc", "wall_time_s", "train_images_per_s", "precision",
    "teacher_precisions", "device", "cpu", "bf16_units", "threads", "torch", "commit", "run_dir", "finished",
)
# What makes two records the same run (a sweep skips a configuration already recorded).
KEY = ("task", "student", "method", "alpha", "temperature", "label_fraction", "epochs", "eval_every", "lr", "optimizer",
       "scheduler", "scheduler_step", "scheduler_gamma", "warmup_epochs", "batch_size", "weight_decay",
       "cache_views", "seed", "init", "selection")

# The columns of a teachers' study file: one row per teacher mtkd trained (its checkpoint), accuracies on its own
# classes as fractions.
TEACHER_COLUMNS = (
    "task", "teacher", "architecture", "classes", "dustbin", "init", "optimizer", "lr", "weight_decay", "batch_size",
    "epochs", "cutout", "seed", "best_epoch", "val_acc", "test_acc", "dustbin_val_acc", "train_seconds", "precision",
    "device", "cpu", "bf16_units", "threads", "torch", "commit", "checkpoint", "finished",
)
# A teacher's record is its checkpoint: the recipe and when its training ended (the same recipe trained again,
# on another machine say, is another teacher, with accuracies of its own).
TEACHER_KEY = ("task", "teacher", "architecture", "dustbin", "init", "optimizer", "lr", "weight_decay", "batch_size",
               "epochs", "cutout", "seed", "finished")


def method_name(args) -> str:
    """``labels`` (alpha 0, no feature terms) or ``aggregation/weighting/kd_loss`` (``aggregation/kd_loss``
    where the aggregation weighs the teachers itself: ``stacked``, ``stacked(combination)`` with
    ``--stacker_prior combination``; ``dkd(a=.. b=.. warm=..)`` with DKD's weights and warm-up;
    ``+feat(W@STAGES)`` with feature matching, ``+at(W@STAGES)`` with attention transfer, ``+embed(W)`` with
    embedding matching, ``+T_final(T)``
    with an annealed temperature, ``+ema(DECAY)`` with the EMA teacher, ``+weights(W1 ..)`` with fixed teacher
    weights given, ``+dustbin`` from teachers with a dustbin, ``+dustbin(plain)`` from dustbin teachers
    started from the plain ones: ``--dustbin_from_plain``; a record reads which from the teachers' checkpoints,
    ``taught_by``); ``+teachers(ARCH from FILE)`` from teachers of another architecture or start than the
    task's (``--teacher_architecture``, ``--teacher_pretrained``); ``+assistant(STUDENT)`` taught by an earlier
    student (ResNet18, ...) instead (``--teacher_assistant``); ``+transfer(N)`` with N transfer images
    (``--transfer_images``)."""
    features, attention = getattr(args, "feature_weight", 0), getattr(args, "attention_weight", 0)
    embedding = getattr(args, "embedding_weight", 0)
    if args.alpha == 0 and not features and not attention and not embedding:
        return "labels"
    weighting = [args.teacher_weighting] if AGGREGATIONS.get(args.aggregation).weighted else []
    prior = getattr(args, "stacker_prior", "zero")
    aggregation = args.aggregation + (f"({prior})" if args.aggregation == "stacked" and prior != "zero" else "")
    kd = args.kd_loss
    if kd == "dkd":  # DKD's own weights and warm-up tell one DKD recipe from another
        kd += f"(a={args.dkd_alpha:g} b={args.dkd_beta:g} warm={args.dkd_warmup})"
    name = "/".join([aggregation, *weighting, kd])
    layers = getattr(args, "feature_layers", "-1")
    extras = [f"+feat({features:g}@{layers})" if features else "", f"+at({attention:g}@{layers})" if attention else "",
              f"+embed({embedding:g})" if embedding else "",
              f"+T_final({args.temperature_final:g})" if getattr(args, "temperature_final", None) else "",
              f"+ema({args.ema_teacher:g})" if getattr(args, "ema_teacher", 0) else "",
              "+weights(" + " ".join(f"{w:g}" for w in args.teacher_weights) + ")"
              if getattr(args, "teacher_weights", None) else ""]
    transfer = getattr(args, "transfer_images", 0)
    return (name + "".join(extras) + _dustbin_suffix(args) + _teachers_suffix(args)
            + (f"+transfer({transfer})" if transfer else ""))


def _teachers_suffix(args) -> str:
    """``+teachers(ARCH from FILE)`` for teachers of ``--teacher_architecture`` / from ``--teacher_pretrained``;
    ``+assistant(STUDENT)`` for an earlier student teaching instead (those flags then go unused)."""
    assistant = getattr(args, "teacher_assistant", None)
    if assistant:
        return f"+assistant({_assistant_name(assistant)})"
    architecture, pretrained = getattr(args, "teacher_architecture", None), getattr(args, "teacher_pretrained", None)
    parts = ([architecture] if architecture else []) + ([f"from {Path(pretrained).name}"] if pretrained else [])
    return f"+teachers({' '.join(parts)})" if parts else ""


def _assistant_name(path: str) -> str:
    """The student an assistant checkpoint holds (ResNet18, ...): the same name for every seed's assistant, so
    their runs are one method in the tables; its run folder's name if the file can no longer be read."""
    try:
        return load_checkpoint(path, required=FOR_STUDENT)["student_model"]
    except UserError:
        return Path(path).parent.name


def _dustbin_suffix(args) -> str:
    if not getattr(args, "teacher_dustbin", False):
        return ""
    return "+dustbin(plain)" if getattr(args, "dustbin_from_plain", False) else "+dustbin"


def taught_by(args: dict, teachers: list[dict]) -> dict:
    """A run's resolved arguments with ``dustbin_from_plain`` as the teachers' checkpoints tell it (the
    summary's ``init`` of each): the flag only says how a missing dustbin teacher would start, so a run given it
    that reuses dustbin teachers trained from scratch was taught by ``+dustbin`` teachers. Unchanged without a
    dustbin, or when a teacher's ``init`` is not known (summaries written before it was recorded)."""
    inits = [t.get("init") for t in teachers]
    if not args.get("teacher_dustbin") or any(i in (None, "unknown") for i in inits):
        return args
    return {**args, "dustbin_from_plain": all(str(i).startswith("plain teacher") for i in inits)}


def git_commit(root: Path | None = None) -> str:
    """The checkout's commit (``+dirty`` when tracked files differ from it); ``unknown`` outside git."""
    root = root or Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def utc_stamp(when: datetime | None = None) -> str:
    """``when`` (default: now) as the records write it: UTC, to the second, ``2026-12-05T03:12:00Z``."""
    return (when or datetime.now(timezone.utc)).astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def machine(device=None) -> dict:
    """Where a run ran: the CPU model, its bf16 units, torch's thread count and version, and the GPU's name when
    ``device`` (a ``torch.device``) is a CUDA device."""
    import torch

    where = {"cpu": cpu_model(), "bf16_units": cpu_bf16_units() or "none", "threads": torch.get_num_threads(),
             "torch": str(torch.__version__)}  # a plain str: teacher checkpoints keep it (weights_only)
    if device is not None and device.type == "cuda":
        where["gpu"] = torch.cuda.get_device_name(device)
    return where


def device_of(summary: dict) -> str:
    """The study's ``device`` cell: ``cpu``, or ``cuda`` with the GPU's name (``cuda (NVIDIA H200)``)."""
    gpu = summary.get("machine", {}).get("gpu")
    return f"{summary['device'].split(':')[0]} ({gpu})" if gpu else summary["device"]


def platform_of(row: dict) -> str:
    """``GPU`` for a study row that ran on CUDA, else ``CPU``: the tables never pool the two (their precision and
    kernels differ), and gains are paired within one."""
    return "GPU" if str(row.get("device", "")).startswith("cuda") else "CPU"


def images_per_second(metrics: list[dict], images: int) -> float:
    """Training images per second of epoch wall time (training and validation), from ``metrics.csv`` rows."""
    seconds = sum(float(r["time_s"]) for r in metrics)
    return images * len(metrics) / seconds if seconds else math.nan


def _pairs(values: dict) -> str:
    return ";".join(f"{k}={v:.4f}" for k, v in values.items())


def parse_pairs(text: str) -> dict[str, float]:
    """``'a=0.5;b=0.25'`` -> ``{'a': 0.5, 'b': 0.25}`` (the per-teacher columns)."""
    return {k: float(v) for k, v in (p.split("=") for p in text.split(";") if p)}


def config_of(args: dict, selection: bool = False) -> dict:
    """The ``KEY`` columns (and the method's parts) of a run, from its resolved arguments alone: what a sweep
    compares before it runs a configuration."""
    from argparse import Namespace

    method = method_name(Namespace(**args))
    task = args["task"]
    return {
        "task": Path(task).stem if str(task).endswith(".toml") else task, "student": args["student_model"],
        "method": method, "aggregation": args["aggregation"], "weighting": args["teacher_weighting"],
        "kd_loss": args["kd_loss"], "alpha": args["alpha"], "temperature": args["temperature"],
        "label_fraction": args["label_fraction"], "epochs": args["num_epochs"],
        "eval_every": args.get("eval_every", 1), "lr": args["lr"],
        "optimizer": args["optimizer"], "scheduler": args["scheduler"], "scheduler_step": args["scheduler_step"],
        "scheduler_gamma": args["scheduler_gamma"], "warmup_epochs": args["warmup_epochs"],
        "batch_size": args["batch_size"], "weight_decay": args["weight_decay"],
        "cache_views": args["cache_views"] if args.get("teacher_cache") and method != "labels" else 0,
        "seed": args["seed"], "init": init_description(args.get("pretrained")), "selection": bool(selection),
    }


def planned_config(args: dict, selection: bool = False) -> dict:
    """``config_of`` a run about to start, as ``record`` will write it: its dustbin teachers' start read from
    their checkpoints on disk (``taught_by``); a teacher it will train starts as ``--dustbin_from_plain`` says."""
    if args.get("teacher_dustbin") and not args.get("retrain_teachers"):
        from .specialists import saved_inits
        from .taskfile import resolve_task

        by_flag = "plain teacher" if args.get("dustbin_from_plain") else "random"
        inits = saved_inits(resolve_task(str(args["task"])).with_dustbins(), args["output_dir"])
        args = taught_by(args, [{"init": by_flag if t["init"] is None else t["init"]} for t in inits])
    return config_of(args, selection)


def finished_config(summary: dict, args: dict, selection: bool = False) -> dict:
    """``config_of`` a finished run, its dustbin teachers' start read from its ``summary.json`` (``taught_by``),
    and its teachers' own test accuracies (``teachers_test_acc``): the columns ``record`` writes for it that
    tell it from other runs."""
    return {**config_of(taught_by(args, summary["teachers"]), selection),
            "teachers_test_acc": _pairs({t["name"]: t["test_acc"] for t in summary["teachers"]})}


def record(summary: dict, args: dict, selection: bool = False) -> dict:
    """One study row from a finished run's ``summary.json`` and resolved arguments (``args.json``)."""
    teachers = summary["teachers"]
    where = summary.get("machine", {})
    row = {
        **finished_config(summary, args, selection), "task": summary["task"],
        "labelled_images": summary["labelled_images"], "unlabelled_images": summary["unlabelled_images"],
        "best_epoch": summary["best_epoch"], "best_val_acc": summary["best_val_acc"], "test_acc": summary["test_acc"],
        "student_on_teachers": _pairs({t["name"]: t["student_test_acc"] for t in teachers}),
        "ensemble_test_acc": summary["ensemble_test_acc"], "pseudo_label_acc": "" if summary.get("pseudo_label_acc") is None else summary["pseudo_label_acc"],
        "wall_time_s": round(summary["wall_time_s"], 1),
        "train_images_per_s": round(summary.get("train_images_per_s", math.nan), 1),
        "precision": summary["precision"], "teacher_precisions": ";".join(t.get("precision", "?") for t in teachers),
        "device": device_of(summary), "cpu": where.get("cpu", "?"), "bf16_units": where.get("bf16_units", "?"),
        "threads": where.get("threads", "?"), "torch": where.get("torch", "?"),
        "commit": summary.get("commit", "unknown"), "run_dir": summary["run_dir"],
        "finished": summary.get("finished", ""),
    }
    return {k: row[k] for k in COLUMNS}


def _same(a, b) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    except (TypeError, ValueError):
        return str(a) == str(b)


def key_of(row: dict) -> tuple:
    return tuple(str(row[k]) for k in KEY)


def teachers_of(r: dict) -> str:
    """The teachers a distilled run was taught by, as the study tells them apart: their own test accuracies
    (``teachers_test_acc``). Empty for labels only, which they teach nothing."""
    return "" if r["method"] == "labels" else r.get("teachers_test_acc", "")


def is_recorded(rows: list[dict], row: dict, platform: str | None = None) -> bool:
    """Whether ``rows`` already hold a run of ``row``'s configuration (``KEY``); with ``platform`` (``GPU`` or
    ``CPU``), one that ran there (the same recipe on the other platform is another run). A finished run's row
    (``finished_config``: it knows its teachers) distilled from other teachers (``teachers_of``) is another run;
    a planned one (``planned_config``) is compared by its flags alone."""
    known = "teachers_test_acc" in row
    return any(all(_same(r.get(k), row.get(k)) for k in KEY) and (not known or teachers_of(r) == teachers_of(row))
               for r in rows if platform is None or platform_of(r) == platform)


def teacher_record(state: dict, path: str | Path) -> dict:
    """A teachers' study row from the mtkd teacher checkpoint ``state`` at ``path`` (``specialists.train_teacher``):
    its recipe, its accuracy on its own classes, and, where the checkpoint keeps them (``training``), where and how
    long it trained. The teacher's name is the file's (``trees`` for ``trees.pt`` and ``trees-dustbin.pt``)."""
    recipe, metrics = state.get("recipe") or {}, state["metrics"]
    training = state.get("training") or {}
    where = training.get("machine") or {}
    name = Path(path).stem
    return {
        "task": state.get("task", ""), "teacher": name.removesuffix("-dustbin") if state.get("dustbin") else name,
        "architecture": state["architecture"], "classes": " ".join(state["classes"]),
        "dustbin": bool(state.get("dustbin", False)), "init": state.get("init", "unknown"),
        "optimizer": recipe.get("optimizer", ""), "lr": recipe.get("lr", ""),
        "weight_decay": recipe.get("weight_decay", ""), "batch_size": recipe.get("batch_size", ""),
        "epochs": state.get("epochs", ""), "cutout": recipe.get("cutout", 0), "seed": recipe.get("seed", ""),
        "best_epoch": metrics.get("best_epoch", ""), "val_acc": metrics["val_acc"], "test_acc": metrics["test_acc"],
        "dustbin_val_acc": metrics.get("dustbin_val_acc", ""), "train_seconds": training.get("seconds", ""),
        "precision": training.get("precision", ""),
        "device": f"cuda ({where['gpu']})" if where.get("gpu") else ("cpu" if where else ""),
        "cpu": where.get("cpu", ""), "bf16_units": where.get("bf16_units", ""), "threads": where.get("threads", ""),
        "torch": where.get("torch", ""), "commit": training.get("commit", ""), "checkpoint": str(path),
        "finished": training.get("finished", ""),
    }


def teacher_is_recorded(rows: list[dict], row: dict) -> bool:
    """Whether ``rows`` already hold ``row``'s teacher: its recipe, trained to the same end (``TEACHER_KEY``)."""
    return any(all(_same(r.get(k), row.get(k)) for k in TEACHER_KEY) for r in rows)


def teacher_table(rows: list[dict]) -> str:
    """The teachers' study as a markdown table: per teacher, each recipe with its accuracies on its own classes."""
    lines = ["| teacher | architecture | recipe | epochs | seed | best epoch | val acc | test acc | training time | on |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in sorted(rows, key=lambda r: (r["teacher"], r["dustbin"], -float(r["val_acc"]))):
        recipe = f"{r['optimizer']} lr {float(r['lr']):g}, wd {float(r['weight_decay']):g}, batch {r['batch_size']}"
        recipe += f", Cutout {r['cutout']}" if int(r["cutout"] or 0) else ""
        recipe += ", dustbin" if r["dustbin"] == "True" else ""
        if r["init"].startswith("plain teacher"):
            recipe += ", from the plain teacher"
        elif r["init"].startswith("file "):  # where the file lay is in the record; its name says which
            recipe += f", from {Path(r['init'].removeprefix('file ')).name}"
        elif r["init"] not in ("random", ""):
            recipe += f", from {r['init']}"
        seconds = float(r["train_seconds"] or "nan")
        seconds = "" if math.isnan(seconds) else f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"
        on = r["device"] if r["device"].startswith("cuda") else \
            f"{r['cpu']}, {r['threads']} thread(s)" if r["cpu"] else "not recorded"
        lines.append(f"| {r['teacher']} | {r['architecture']} | {recipe} | {r['epochs']} | {r['seed']} | "
                     f"{r['best_epoch']} | {100 * float(r['val_acc']):.2f} | {100 * float(r['test_acc']):.2f} | "
                     f"{seconds} | {on} |")
    return "\n".join(lines)


def load_records(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def append_record(path: str | Path, row: dict, columns: tuple[str, ...] = COLUMNS) -> None:
    """Append one row (the header ``columns`` first when the file is new); a file with other columns is an
    error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if tuple(header) != columns:
            raise ValueError(f"{path} has other columns than a study file of this kind; write to a new file")
    with path.open("a", newline="") as f:
        out = csv.DictWriter(f, fieldnames=columns)
        if new:
            out.writeheader()
        out.writerow(row)


def _mean_std(values: list[float]) -> str:
    pct = [100 * v for v in values]
    std = statistics.stdev(pct) if len(pct) > 1 else 0.0
    return f"{statistics.mean(pct):.2f} ± {std:.2f}"


def _setting(r: dict) -> str:
    sched = r["scheduler"] + (f" {r['scheduler_step']}/{r['scheduler_gamma']}" if r["scheduler"] == "step" else "")
    parts = [f"lr {float(r['lr']):g}", sched]
    if r["method"] != "labels":
        parts += [f"alpha {float(r['alpha']):g}", f"T {float(r['temperature']):g}",
                  f"cache {r['cache_views']} views" if int(r["cache_views"]) else "online"]
    if int(r.get("eval_every") or 1) > 1:
        parts.append(f"val every {r['eval_every']} epochs")
    return ", ".join(parts)


def optimizer_steps(r: dict) -> int:
    """The optimiser steps a run took: its epochs times the batches of its training images (labels only trains
    on the labelled ones; the last batch of an epoch may be short)."""
    images = int(r["labelled_images"]) + int(r["unlabelled_images"])
    return int(r["epochs"]) * math.ceil(images / int(r["batch_size"]))


def _teachers_group(r: dict) -> str:
    """The teachers a run pools by in the tables: ``teachers_of``, except for runs taught by an assistant
    (``+assistant(STUDENT)``), whose teacher is by design another student for each seed (that seed's earlier run):
    those pool by method alone, and the table gives their assistants' mean accuracy."""
    return "" if _by_assistant(r["method"]) else teachers_of(r)


def _by_assistant(method: str) -> bool:
    return "+assistant(" in method


def _pooled(rows: list[dict], column: str) -> dict[str, list[float]]:
    """Each name's values in a ``NAME=VALUE;...`` column (``parse_pairs``) over ``rows``."""
    pooled: dict[str, list[float]] = {}
    for r in rows:
        for name, value in parse_pairs(r[column]).items():
            pooled.setdefault(name, []).append(value)
    return pooled


def _recipe(r: dict) -> tuple:
    """A run's recipe (every ``KEY`` but seed and selection), the platform it ran on and its teachers
    (``_teachers_group``): the runs that pool as seeds of one row."""
    return tuple(str(r[k]) for k in KEY if k not in ("seed", "selection")) + (platform_of(r), _teachers_group(r))


def selection_table(rows: list[dict]) -> str:
    """The hyper-parameter selection runs: one row each, ranked by best validation accuracy within a student."""
    rows = [r for r in rows if r["selection"] == "True"]
    lines = ["| student | labels | method | setting | epochs | seed | teachers (own classes, test) | best val acc | "
             "best epoch |",
             "|---|---:|---|---|---:|---:|---|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["student"], -float(r["label_fraction"]), r["method"] != "labels",
                                         r["method"], -float(r["best_val_acc"]))):
        # Runs of one recipe taught by other teachers (retrained elsewhere) are told apart by their accuracies.
        teachers = " / ".join(f"{100 * acc:.1f}" for acc in parse_pairs(teachers_of(r)).values())
        lines.append(f"| {r['student']} | {float(r['label_fraction']):g} | {r['method']} | {_setting(r)} | "
                     f"{r['epochs']} | {r['seed']} | {teachers} | {100 * float(r['best_val_acc']):.2f} | "
                     f"{r['best_epoch']} |")
    return "\n".join(lines)


# The columns a results table can be filtered on (``results_table``'s ``where``), by the text of their cell.
FILTERS = ("student", "labels", "on")


def results_table(rows: list[dict], where: dict[str, set[str]] | None = None) -> str:
    """The main runs: test accuracy mean ± std over seeds per (student, method, setting), the student on each
    teacher's classes (mean) next to the teachers' own, and the teacher ensemble.

    ``where`` keeps only the rows whose cells in the columns ``FILTERS`` name are among the given texts (e.g.
    ``{"labels": {"1"}, "on": {"CPU"}}``); gains are paired with labels-only runs the filter leaves out too.

    A selection run of a recipe that has main runs (every ``KEY`` but seed and selection equal, on the same
    platform) is one of its seeds, unless a main run has that seed: the run that chose the recipe is not run twice.
    Runs on a GPU and on CPUs are separate rows (column "on"), each paired with labels only on its own platform;
    runs distilled from other teachers are separate rows too (the teachers' accuracies in brackets tell them apart),
    paired with the same labels-only runs; runs taught by an assistant pool by method (``_teachers_group``)."""
    unknown = set(where or {}) - set(FILTERS)
    if unknown:
        raise ValueError(f"cannot filter a results table on {', '.join(sorted(unknown))}: only on "
                         f"{', '.join(FILTERS)}")
    main = [r for r in rows if r["selection"] != "True"]
    recipes = {_recipe(r) for r in main}
    seeds = {(_recipe(r), r["seed"]) for r in main}
    main += [r for r in rows
             if r["selection"] == "True" and _recipe(r) in recipes and (_recipe(r), r["seed"]) not in seeds]
    groups: dict[tuple, list[dict]] = {}
    for r in main:
        groups.setdefault((r["student"], float(r["label_fraction"]), r["method"], _setting(r), r["epochs"],
                           platform_of(r), _teachers_group(r)), []).append(r)
    lines = ["| student | labels | method | setting | epochs | on | seeds | test acc (mean ± std) | gain over labels "
             "only (points, paired by seed) | same, labels only at equal optimiser steps | best val (mean) | "
             "student on each teacher's classes (teacher) | pseudo-labels right (mean) |",
             "|---|---:|---|---|---:|---|---|---:|---:|---:|---:|---|---:|"]
    for (student, fraction, method, setting, epochs, on, _), rs in sorted(groups.items(), key=lambda kv: (
            kv[0][0], kv[0][5], -kv[0][1], kv[0][2] != "labels", kv[0][2], int(kv[0][4]), kv[0][3], kv[0][6])):
        cells = {"student": student, "labels": f"{fraction:g}", "on": on}
        if any(cells[k] not in allowed for k, allowed in (where or {}).items()):
            continue
        labels_only = [(k, g) for k, g in groups.items()
                       if k[2] == "labels" and k[:2] == (student, fraction) and k[5] == on]
        gain = "" if method == "labels" else _paired_gain(rs, [g for k, g in labels_only if k[4] == epochs])
        # Labels only trains on the labelled images alone: at equal epochs it takes fewer steps than a student
        # that also learns from the unlabelled ones (within 1%: the last short batch of an epoch).
        steps = optimizer_steps(rs[0])
        gain_steps = "" if method == "labels" else _paired_gain(rs, [
            g for _, g in labels_only if abs(optimizer_steps(g[0]) - steps) <= 0.01 * steps])
        own = _pooled(rs, "student_on_teachers")
        # A row's teachers are its first run's (one set per row), or the mean of its assistants (one per seed).
        teachers = _pooled(rs if _by_assistant(method) else rs[:1], "teachers_test_acc")
        per_teacher = ", ".join(f"{n} {100 * statistics.mean(v):.1f} "
                                f"({100 * statistics.mean(teachers.get(n, [math.nan])):.1f})"
                                for n, v in own.items())
        seeds = " ".join(sorted((r["seed"] for r in rs), key=int))
        # How often the teachers' label for an image used without its own is right (runs that distil only).
        pseudo = [float(r["pseudo_label_acc"]) for r in rs if r["pseudo_label_acc"] != "" and method != "labels"]
        pseudo_cell = f"{100 * statistics.mean(pseudo):.1f}" if pseudo else ""
        lines.append(f"| {student} | {fraction:g} | {method} | {setting} | {epochs} | {on} | {seeds} | "
                     f"{_mean_std([float(r['test_acc']) for r in rs])} | {gain} | {gain_steps} | "
                     f"{statistics.mean(100 * float(r['best_val_acc']) for r in rs):.2f} | {per_teacher} | "
                     f"{pseudo_cell} |")
    return "\n".join(lines)


def _paired_gain(runs: list[dict], baselines: list[list[dict]]) -> str:
    """Test accuracy of ``runs`` minus the labels-only runs of the same seeds, in points: mean ± std over the
    seeds both have, against the labels-only recipe (of the same student, labels and epochs) sharing the most
    seeds; empty where none shares one."""
    mine = {r["seed"]: float(r["test_acc"]) for r in runs}
    best: list[float] = []
    for group in baselines:
        base = {r["seed"]: float(r["test_acc"]) for r in group}
        diffs = [100 * (mine[s] - base[s]) for s in sorted(mine, key=int) if s in base]
        if len(diffs) > len(best):
            best = diffs
    if not best:
        return ""
    std = statistics.stdev(best) if len(best) > 1 else 0.0
    return f"{statistics.mean(best):+.2f} ± {std:.2f} ({len(best)} seed{'s' if len(best) > 1 else ''})"

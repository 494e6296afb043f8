"""Console output: progress bars, per-epoch lines and summary tables (rich)."""
from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

from .errors import UserError

# Rich assumes 80 columns when output is not a terminal; logs and CI read better wider.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
# Errors are not wrapped: a path or command in them must survive copy and paste.
error_console = Console(stderr=True, highlight=False, soft_wrap=True)


def print_error(message: str) -> None:
    """``error: <message>`` on stderr; the message is text, not rich markup."""
    error_console.print(f"[bold red]error:[/] {escape(str(message))}")


def run_reading(main, args, show) -> None:
    """A reading script's ``__main__``: ``main(args)``'s result printed by ``show``, or with ``args.json`` as
    JSON alone on stdout (messages and progress then go to stderr); a ``UserError`` is one message and its
    exit code."""
    if args.json:
        console.file = sys.stderr
    try:
        result = main(args)
    except UserError as e:
        print_error(e)
        sys.exit(e.exit_code)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        show(result)


def create_progress(disable: bool = False) -> Progress:
    """A progress display whose bars show ``metrics`` (live loss / accuracy)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[metrics]}"),
        console=console,
        transient=True,
        disable=disable,
    )


class RateColumn(ProgressColumn):
    """Items per second, e.g. ``312.5 images/s``."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.1f} {self.unit}/s")


LOG_EVERY_S = 30.0  # outside a terminal, a long step prints a progress line this often


@contextmanager
def step_progress(description: str, total: int, unit: str = "images"):
    """A bar with a rate and an estimated end for a long step that is not an epoch (the teacher cache, measuring
    teachers); yields ``advance(n)``. Kept on screen when done. Outside a terminal (a log file) a plain line
    with the count, rate and estimated end every ``LOG_EVERY_S`` seconds, and one at the end."""
    if console.is_terminal or console.quiet:
        progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            RateColumn(unit), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                            console=console, disable=console.quiet)
        with progress:
            task = progress.add_task(description, total=total)
            yield lambda n=1: progress.update(task, advance=n)
        return
    start = last = time.perf_counter()
    done = 0

    def line(now: float) -> str:
        rate = done / max(now - start, 1e-9)
        eta = (total - done) / rate if rate > 0 else float("inf")
        return (f"{description}: {done:,}/{total:,} {unit} ({rate:,.1f} {unit}/s, {_duration(now - start)} "
                f"elapsed, eta {_duration(eta)})")

    def advance(n: int = 1) -> None:
        nonlocal done, last
        done += n
        now = time.perf_counter()
        if now - last >= LOG_EVERY_S and done < total:
            last = now
            console.print(line(now), soft_wrap=True)

    yield advance
    console.print(line(time.perf_counter()), soft_wrap=True)


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"


def percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def teachers_table(rows: list[dict]) -> Table:
    table = Table(title="Teachers (accuracy on their own classes)")
    for col in ("teacher", "arch", "classes", "params", "val acc", "test acc", "status"):
        table.add_column(col, justify="right" if col in ("params", "val acc", "test acc") else "left")
    for r in rows:
        table.add_row(r["name"], r["architecture"], " ".join(r["classes"]), f"{r['params'] / 1e6:.1f}M",
                      percent(r["val_acc"]), percent(r["test_acc"]), r["status"])
    return table


def run_summary_table(summary: dict) -> Table:
    table = Table(title=f"Task {summary['task']}: {summary['student_model']} student")
    table.add_column("model")
    table.add_column("params", justify="right")
    table.add_column("val acc", justify="right")
    table.add_column("test acc", justify="right")
    for t in summary["teachers"]:
        student = f" (student: {percent(t['student_test_acc'])})" if "student_test_acc" in t else ""
        table.add_row(f"teacher {t['name']} (own classes)", f"{t['params'] / 1e6:.1f}M",
                      percent(t["val_acc"]), percent(t["test_acc"]) + student)
    rows = summary.get("ensemble") or {"combination": {"val_acc": summary["ensemble_val_acc"],
                                                       "test_acc": summary["ensemble_test_acc"]}}
    for method, row in rows.items():
        table.add_row(f"teacher ensemble, {method} (all classes)", f"{summary['ensemble_params'] / 1e6:.1f}M",
                      percent(row["val_acc"]), percent(row["test_acc"]))
    table.add_row(f"[bold]student {summary['student_model']}[/] (best epoch {summary['best_epoch']})",
                  f"{summary['student_params'] / 1e6:.1f}M",
                  percent(summary["best_val_acc"]), f"[bold]{percent(summary['test_acc'])}")
    images = (f", {summary['labelled_images']} labelled + {summary['unlabelled_images']} unlabelled training images"
              if "labelled_images" in summary else "")
    init = f", student from {summary['student_init']}" if summary.get("student_init", "random") != "random" else ""
    table.caption = (f"alpha {summary['alpha']}, T {summary['temperature']}{images}{init}, "
                     f"time {summary['wall_time_s']:.0f} s")
    return table


def signed_points(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.2f}"


def evaluation_table(r: dict) -> Table:
    """One task's test results: the student and its reference rows."""
    table = Table(title=f"Task {r['task']} test split: {r['student_model']} student ({r['model_path']})")
    for col in ("model", "params", "accuracy", "top-3", "macro-F1", "ECE"):
        table.add_column(col, justify="left" if col == "model" else "right")

    def add(name, m, params):
        table.add_row(name, f"{params / 1e6:.1f}M", percent(m["overall_accuracy"]), percent(m["top3_accuracy"]),
                      f"{m['f1_macro']:.4f}", f"{m['ece']:.4f}")

    add(f"[bold]student {r['student_model']}", r, r["num_parameters"])
    if r.get("baseline"):
        add(f"baseline student {r['baseline']['student_model']} (alpha 0)", r["baseline"], r["baseline"]["num_parameters"])
    if r.get("ensemble"):
        add("teacher ensemble (all classes)", r["ensemble"], r["ensemble"]["num_parameters"])
    for t in r.get("teachers", []):
        add(f"teacher {t['name']} (own classes)", t, t["num_parameters"])
    agreement = r.get("teacher_student_agreement")
    table.caption = f"teacher-student agreement {percent(agreement)}; ROC-AUC (macro) {r['roc_auc_ovr_macro']:.4f}"
    return table


def summary_table(rows: list[dict]) -> Table:
    """Across tasks: student, size, accuracy, macro-F1, deltas vs the baseline student and the ensemble."""
    table = Table(title="Evaluation summary (test split)")
    for col in ("task", "student", "params", "accuracy", "macro-F1", "vs baseline (pts)", "vs ensemble (pts)"):
        table.add_column(col, justify="left" if col in ("task", "student") else "right")
    for row in rows:
        if row.get("error"):
            table.add_row(row["task"], f"[yellow]{row['error']}", "", "", "", "", "")
            continue
        table.add_row(row["task"], row["student_model"], f"{row['num_parameters'] / 1e6:.1f}M",
                      percent(row["overall_accuracy"]), f"{row['f1_macro']:.4f}",
                      signed_points(row["delta_vs_baseline"]), signed_points(row["delta_vs_ensemble"]))
    return table

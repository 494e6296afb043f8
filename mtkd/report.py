"""Console output: progress bars, per-epoch lines and summary tables (rich)."""
from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console(highlight=False)
error_console = Console(stderr=True, highlight=False)


def create_progress() -> Progress:
    """A progress display whose bars show ``metrics`` (live loss / accuracy)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[metrics]}"),
        console=console,
        transient=True,
    )


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
        table.add_row(f"teacher {t['name']} (own classes)", f"{t['params'] / 1e6:.1f}M",
                      percent(t["val_acc"]), percent(t["test_acc"]))
    table.add_row("teacher ensemble (all classes)", f"{summary['ensemble_params'] / 1e6:.1f}M",
                  percent(summary["ensemble_val_acc"]), percent(summary["ensemble_test_acc"]))
    table.add_row(f"[bold]student {summary['student_model']}[/] (best epoch {summary['best_epoch']})",
                  f"{summary['student_params'] / 1e6:.1f}M",
                  percent(summary["best_val_acc"]), f"[bold]{percent(summary['test_acc'])}")
    table.caption = f"alpha {summary['alpha']}, T {summary['temperature']}, time {summary['wall_time_s']:.0f} s"
    return table

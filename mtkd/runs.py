"""Run folders: naming, finding, resuming, per-epoch metrics, curves and TensorBoard hyper-parameters."""
from __future__ import annotations

import csv
import json
from argparse import Namespace
from datetime import datetime
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from . import plots
from .checkpoint import FOR_RESUME, load_checkpoint
from .errors import UserError
from .spec import TaskSpec


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
    last = load_checkpoint(run_dir / "last.pt", required=FOR_RESUME)
    if last["epoch"] >= merged.num_epochs:
        raise UserError(f"--resume {run_dir}: the run already finished {last['epoch']} of {merged.num_epochs} "
                        f"epochs. Fix: pass --num_epochs N with N > {last['epoch']} to train it further.")
    return run_dir, merged, last


def truncate_metrics(path: Path, before_epoch: int) -> None:
    """Keep the rows of epochs that the resumed checkpoint already holds."""
    if path.exists():
        rows = [r for r in csv.DictReader(path.open(newline="")) if int(r["epoch"]) < before_epoch]
        with path.open("w", newline="") as f:
            if rows:
                out = csv.DictWriter(f, fieldnames=list(rows[0]))
                out.writeheader()
                out.writerows(rows)


def append_metrics(path: Path, row: dict) -> None:
    """One row of ``metrics.csv`` (the header when the file is new)."""
    new_file = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        out = csv.DictWriter(f, fieldnames=list(row))
        if new_file:
            out.writeheader()
        out.writerow(row)


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

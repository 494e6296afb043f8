"""The command line: one argparse parser holding every default, and its validation.

Out-of-range values are rejected by the parser itself (exit code 2, one
message naming the flag) before any work starts.
"""
from __future__ import annotations

import argparse

from .models import list_students


def _ranged(kind, low=None, high=None, low_open=False, what=""):
    """An argparse type that parses ``kind`` and checks ``low <= v <= high``."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and value > high
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {what}")
        return value

    return parse


positive_float = _ranged(float, 0.0, low_open=True, what="> 0")
unit_float = _ranged(float, 0.0, 1.0, what="between 0 and 1")
nonneg_float = _ranged(float, 0.0, what=">= 0")
positive_int = _ranged(int, 1, what=">= 1")
nonneg_int = _ranged(int, 0, what=">= 0")


def get_args_parser(task_names: list[str] | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a task's specialist teachers (when missing) and distil them into one student.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--task", default="B", choices=task_names, help="task name")
    p.add_argument("--lr", type=positive_float, default=0.001, help="learning rate (Adam)")
    p.add_argument("--batch_size", type=positive_int, default=32, help="batch size")
    p.add_argument("--num_epochs", type=positive_int, default=100, help="student training epochs")
    p.add_argument("--weight_decay", type=nonneg_float, default=0.0005, help="weight decay")
    p.add_argument("--temperature", type=positive_float, default=2.0, help="distillation temperature T")
    p.add_argument("--alpha", type=unit_float, default=0.1,
                   help="weight of the teachers' soft loss: 0 = labels only, 1 = teachers only")
    p.add_argument("--scheduler_step", type=positive_int, default=30, help="StepLR step size (epochs)")
    p.add_argument("--scheduler_gamma", type=_ranged(float, 0.0, 1.0, low_open=True, what="in (0, 1]"),
                   default=0.5, help="StepLR decay factor")
    p.add_argument("--student_model", default="EfficientNet", choices=list_students(), help="student architecture")
    p.add_argument("--seed", type=int, default=42, help="random seed")
    p.add_argument("--run", default="", help="suffix appended to the run folder name")
    p.add_argument("--data_root", default="data", help="where datasets are found or downloaded")
    p.add_argument("--output_dir", default="runs", help="where run folders and teachers are written")
    p.add_argument("--device", default="auto", help="'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--teacher_epochs", type=positive_int, default=30, help="epochs for each teacher trained")
    p.add_argument("--retrain_teachers", action="store_true", help="train the teachers even if checkpoints exist")
    p.add_argument("--num_workers", type=nonneg_int, default=0,
                   help="DataLoader worker processes (in-memory tasks are fastest with 0)")
    return p


def parse_args(argv: list[str] | None = None, task_names: list[str] | None = None) -> argparse.Namespace:
    return get_args_parser(task_names).parse_args(argv)

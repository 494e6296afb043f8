"""Evaluate Task A's student (CIFAR-100 specialists) on its test split.

    python evaluation_taska.py [--checkpoint PATH | --run_dir DIR]

Writes evaluation/TaskA/: results.json, classification_report.txt,
confusion_matrix.png, sample_predictions.png, size_speed.md, and, when a
baseline (alpha 0) run exists, comparison.md / comparison.png.
"""
import sys

import tasks  # noqa: F401  (registers the built-in tasks)
from mtkd.evaluate import run_task, task_script_main
from mtkd.taskfile import resolve_task

TASK = "A"


def evaluate(args) -> dict:
    """Evaluate Task A from parsed evaluation arguments (what evaluation.py calls); returns the results."""
    return run_task(resolve_task(TASK), args)


if __name__ == "__main__":
    sys.exit(task_script_main(TASK))

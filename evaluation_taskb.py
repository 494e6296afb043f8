"""Evaluate Task B's student (digits specialists) on its test split.

    python evaluation_taskb.py [--checkpoint PATH | --run_dir DIR]

Writes evaluation/TaskB/: results.json, classification_report.txt,
confusion_matrix.png, sample_predictions.png, size_speed.md, and, when a
baseline (alpha 0) run exists, comparison.md / comparison.png.
"""
import sys

import tasks  # noqa: F401  (registers the built-in tasks)
from mtkd.evaluate import task_script_main

TASK = "B"


if __name__ == "__main__":
    sys.exit(task_script_main(TASK))

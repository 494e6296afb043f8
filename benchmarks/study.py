"""Study records: add finished runs to a study file, print its tables, render them into the README.

    python benchmarks/study.py record RUN_DIR [RUN_DIR ...] --to results/task_a.csv [--selection]
    python benchmarks/study.py teachers TEACHER.pt [TEACHER.pt ...] --to results/task_a_teachers.csv
    python benchmarks/study.py table results/task_a.csv
    python benchmarks/study.py readme [--check]

``record`` appends one row per run folder (its ``summary.json`` and
``args.json``; a run already recorded is skipped). ``teachers`` appends one row
per teacher checkpoint mtkd trained (its recipe, its accuracy on its own
classes, where and how long it trained; a checkpoint already recorded is skipped,
the same recipe trained again is a row of its own).
``readme`` replaces the text between ``<!-- results: NAME.csv -->`` and
``<!-- end results -->`` in ``README.md`` (and the pages under ``docs/``) by
the tables of ``results/NAME.csv``; with ``--check`` it changes nothing and exits 1 if a page
and its data disagree. A marker may filter the main runs by column, e.g.
``<!-- results: task_a.csv labels=1 on=CPU student=ResNet18,EfficientNet -->``
(columns ``student``, ``labels``, ``on``; a comma between values a column may take):
such a block holds that part of the main table alone, without the selection runs.
"""
import argparse
import json
from datetime import datetime, timezone
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mtkd.checkpoint import load_weights_file  # noqa: E402
from mtkd.errors import UserError  # noqa: E402
from mtkd.results import (FILTERS, TEACHER_COLUMNS, append_record, finished_config, images_per_second,  # noqa: E402
                          is_recorded, load_records, machine, platform_of, record, results_table, selection_table,
                          teacher_is_recorded, teacher_record, teacher_table, utc_stamp)
from mtkd.runs import read_metrics  # noqa: E402

BLOCK = re.compile(r"(<!-- results: (?P<spec>[^\n]*?) -->\n)(?P<body>.*?)(<!-- end results -->)", re.S)


def parse_spec(spec: str) -> tuple[str, dict[str, set[str]]]:
    """A marker's study file and filters: ``task_a.csv student=ResNet18 labels=1`` ->
    ``("task_a.csv", {"student": {"ResNet18"}, "labels": {"1"}})``."""
    name, *parts = spec.split()
    if not re.fullmatch(r"[\w.-]+\.csv", name) or not all(re.fullmatch(r"\w+=[^=,]+(,[^=,]+)*", p) for p in parts):
        raise ValueError(f"cannot read the marker '<!-- results: {spec} -->': it takes a study file, then filters "
                         f"COLUMN=VALUE[,VALUE] (columns {', '.join(FILTERS)})")
    return name, {key: set(values.split(",")) for key, values in (p.split("=", 1) for p in parts)}


def tables(rows: list[dict], where: dict[str, set[str]] | None = None) -> str:
    """A study file's tables; with ``where`` (a marker's filters) that part of the main table alone."""
    if rows and "teacher" in rows[0]:  # a teachers' study file
        if where:
            raise ValueError("a teachers' study file takes no filters")
        return "Teachers (accuracy on each teacher's own classes; chosen on val acc only):\n\n" + \
            teacher_table(rows) + "\n"
    text = "Main runs (test accuracy, mean ± std over seeds; the selection run that chose a recipe is its seed 0; " \
           "accuracies on each teacher's classes are the student's, the teacher's own in brackets; the teachers " \
           "were trained on every label of their own classes, also where the student has fewer (labels < 1); " \
           "pseudo-labels right: the teachers' class (the stacker's with `stacked`, else their specialist " \
           "combination's) on the training images the student uses without their label):\n\n" + \
           results_table(rows, where) + "\n"
    if not where and any(r["selection"] == "True" for r in rows):
        text += "\nSelection runs (seed 0, chosen on best validation accuracy only):\n\n" + selection_table(rows) + "\n"
    return text


def render(text: str, results_dir: Path) -> str:
    def block(m):
        name, where = parse_spec(m["spec"])
        path = results_dir / name
        if not path.is_file():
            raise ValueError(f"the marker '<!-- results: {m['spec']} -->' names {path}, which does not exist")
        rows = load_records(path)
        return m.group(1) + "\n" + tables(rows, where) + "\n" + m.group(4)

    return BLOCK.sub(block, text)


def pages(root: Path) -> list[Path]:
    return [root / "README.md"] + sorted((root / "docs").glob("*.md"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="append finished runs to a study file")
    rec.add_argument("run_dirs", nargs="+", type=Path)
    rec.add_argument("--to", required=True, type=Path, metavar="FILE.csv")
    rec.add_argument("--selection", action="store_true", help="hyper-parameter selection runs")
    rec.add_argument("--commit", help="for runs whose summary.json does not record it: the commit they ran")
    rec.add_argument("--same_machine", action="store_true",
                     help="for runs whose summary.json does not record their machine: they ran on this one")
    rec.add_argument("--threads", type=int, help="with --same_machine: the threads each run used")
    tea = sub.add_parser("teachers", help="append teacher checkpoints mtkd trained to a teachers' study file")
    tea.add_argument("checkpoints", nargs="+", type=Path)
    tea.add_argument("--to", required=True, type=Path, metavar="FILE.csv")
    tab = sub.add_parser("table", help="print a study file's tables")
    tab.add_argument("file", type=Path)
    rd = sub.add_parser("readme", help="render results/*.csv into README.md and docs/*.md")
    rd.add_argument("--check", action="store_true", help="change nothing; exit 1 if a page disagrees with its data")
    rd.add_argument("--root", type=Path, default=ROOT)
    args = p.parse_args(argv)
    if args.command == "record":
        for run_dir in args.run_dirs:
            summary_path, args_path = run_dir / "summary.json", run_dir / "args.json"
            if not summary_path.is_file() or not args_path.is_file():
                print(f"error: {run_dir} is not a finished run folder (it needs summary.json and args.json). "
                      "Fix: pass the folder of a run that ran to its end.", file=sys.stderr)
                return 2
            saved = json.loads(args_path.read_text())
            summary = json.loads(summary_path.read_text())
            if is_recorded(load_records(args.to), finished_config(summary, saved, args.selection),
                           platform_of(summary)):
                print(f"{run_dir}: already recorded in {args.to}")
                continue
            if args.commit and "commit" not in summary:
                summary["commit"] = args.commit
            if "train_images_per_s" not in summary:  # runs from before it was recorded: from their metrics
                summary["train_images_per_s"] = images_per_second(
                    read_metrics(run_dir), summary["labelled_images"] + summary["unlabelled_images"])
            if "finished" not in summary:
                summary["finished"] = utc_stamp(datetime.fromtimestamp(summary_path.stat().st_mtime, timezone.utc))
            if args.same_machine and "machine" not in summary:
                summary["machine"] = {**machine(), **({"threads": args.threads} if args.threads else {})}
            append_record(args.to, record(summary, saved, args.selection))
            print(f"{run_dir}: recorded in {args.to}")
        return 0
    if args.command == "teachers":
        return record_teachers(args.checkpoints, args.to)
    if args.command == "table":
        print(tables(load_records(args.file)))
        return 0
    stale = []
    for page in pages(args.root):
        if not page.exists():
            continue
        text = page.read_text()
        try:
            new = render(text, args.root / "results")
        except ValueError as e:
            print(f"error: {page}: {e}. Fix: correct the marker.", file=sys.stderr)
            return 2
        if new != text:
            stale.append(page)
            if not args.check:
                page.write_text(new)
    if args.check and stale:
        print("out of date with results/: " + ", ".join(str(p) for p in stale) +
              ". Fix: python benchmarks/study.py readme", file=sys.stderr)
        return 1
    return 0


def record_teachers(paths: list[Path], to: Path) -> int:
    for path in paths:
        if not path.is_file():
            print(f"error: teacher checkpoint {path} not found. Fix: pass the .pt files under "
                  "OUTPUT_DIR/Task<X>/teachers/ that train.py wrote.", file=sys.stderr)
            return 2
        try:
            state = load_weights_file(path, f"teacher {path.stem!r}")[1]
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if state is None:
            print(f"error: {path} holds weights trained elsewhere (a plain state dict): no recipe to record. Fix: "
                  "pass teacher checkpoints that train.py wrote.", file=sys.stderr)
            return 2
        row = teacher_record(state, path)
        if teacher_is_recorded(load_records(to), row):
            print(f"{path}: already recorded in {to}")
            continue
        append_record(to, row, TEACHER_COLUMNS)
        print(f"{path}: recorded in {to}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

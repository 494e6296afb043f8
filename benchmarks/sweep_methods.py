"""Run a grid of configurations on a task, several seeds each, and record every finished run.

Each configuration is one ``train.py`` run (in this process). When it ends,
one row is appended to the study file ``--results`` (``mtkd.results``: task,
student, method and every setting, best epoch, val and test accuracy, the
student on each teacher's classes, wall time, images/s, precision, machine,
commit); a configuration already recorded there is skipped, so an interrupted
or split study continues where it stopped. At the end the tables are printed
from the file (mean ± std of the test accuracy over seeds).

    python benchmarks/sweep_methods.py --task B --student_model ResNet18 --num_epochs 8 --alpha 0.5 \\
        --seeds 0 1 2 --teacher_cache cache --results results/task_b.csv

Methods are ``baseline`` (alpha 0: labels only) or ``AGGREGATION:WEIGHTING``;
``+online`` at the end of a method runs it without the teacher cache.
``--label_fractions 1 0.1`` repeats every method at each ``--label_fraction``
(the baseline then trains on the labelled images only); ``--alphas`` and
``--temperatures`` repeat every distilled method at each value. ``--selection``
marks the runs as hyper-parameter selection (chosen on validation only).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, for tasks/
import tasks  # noqa: E402,F401
from mtkd.config import get_args_parser  # noqa: E402
from mtkd.terms import AGGREGATIONS  # noqa: E402
from mtkd.losses import WEIGHTINGS  # noqa: E402
from mtkd.results import (append_record, is_recorded, load_records, planned_config, platform_of,  # noqa: E402
                          record, results_table, selection_table)
from mtkd.loop import resolve_device  # noqa: E402
from mtkd.spec import list_tasks  # noqa: E402
from mtkd.trainer import run  # noqa: E402

ALL = ["baseline"] + [f"{a}:{w}" for a in AGGREGATIONS for w in WEIGHTINGS]


def method_flags(method: str) -> dict:
    online = method.endswith("+online")
    name = method.removesuffix("+online")
    if name == "baseline":
        return {"alpha": 0.0}
    aggregation, weighting = name.split(":")
    return {"aggregation": aggregation, "teacher_weighting": weighting, **({"teacher_cache": None} if online else {})}


def configurations(base: argparse.Namespace, own: argparse.Namespace) -> list[argparse.Namespace]:
    """Every run of the grid, in order: label fraction, method, alpha, temperature, seed."""
    out = []
    for fraction in own.label_fractions or [base.label_fraction]:
        for method in own.methods:
            flags = method_flags(method)
            distilled = "alpha" not in flags
            for alpha in (own.alphas or [base.alpha]) if distilled else [0.0]:
                for temperature in (own.temperatures or [base.temperature]) if distilled else [base.temperature]:
                    for seed in own.seeds:
                        name = f"sweep_{method.replace(':', '_').replace('+', '_')}_f{fraction:g}"
                        out.append(argparse.Namespace(**{**vars(base), **flags, "alpha": alpha,
                                                         "temperature": temperature, "seed": seed,
                                                         "label_fraction": fraction, "run": name}))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=ALL)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--label_fractions", nargs="+", type=float, default=None,
                   help="run every method at each of these --label_fraction values (default: --label_fraction)")
    p.add_argument("--alphas", nargs="+", type=float, default=None, help="distilled methods: each of these alphas")
    p.add_argument("--temperatures", nargs="+", type=float, default=None,
                   help="distilled methods: each of these temperatures")
    p.add_argument("--results", default=None, metavar="FILE.csv",
                   help="the study file the runs are recorded in (default: <output_dir>/sweep.csv)")
    p.add_argument("--selection", action="store_true", help="record the runs as hyper-parameter selection runs")
    p.add_argument("--table_only", action="store_true", help="print the tables of the results so far")
    own, rest = p.parse_known_args(argv)
    base = get_args_parser(list_tasks()).parse_args(rest)
    path = Path(own.results or Path(base.output_dir) / "sweep.csv")
    for args in [] if own.table_only else configurations(base, own):
        on = platform_of({"device": str(resolve_device(args.device))})
        if is_recorded(load_records(path), planned_config(vars(args), own.selection), on):
            continue
        summary = run(args)
        append_record(path, record(summary, vars(args), own.selection))
    rows = load_records(path)
    print(results_table(rows))
    if any(r["selection"] == "True" for r in rows):
        print("\nSelection runs (validation only):\n" + selection_table(rows))


if __name__ == "__main__":
    main()

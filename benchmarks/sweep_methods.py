"""Compare distillation methods: every (aggregation, weighting) on a task, several seeds each.

Each configuration is one ``train.py`` run (in this process); results are
appended to ``<output_dir>/sweep.jsonl`` as they finish, so an interrupted
sweep continues where it stopped. At the end a markdown table gives the mean
and standard deviation of the test accuracy per method, next to the labels-only
baseline and the teacher ensemble.

    python benchmarks/sweep_methods.py --task B --student_model ResNet18 --num_epochs 8 --alpha 0.5 \\
        --seeds 0 1 2 --teacher_cache cache --output_dir sweep

Methods are ``baseline`` (alpha 0) or ``AGGREGATION:WEIGHTING``; ``+online``
at the end of a method runs it without the teacher cache (to check parity).
``--label_fractions 1 0.1`` repeats every method at each ``--label_fraction``
(the baseline then trains on the labelled images only).
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, for tasks/
import tasks  # noqa: E402,F401
from mtkd.config import get_args_parser  # noqa: E402
from mtkd.distill import AGGREGATIONS  # noqa: E402
from mtkd.losses import WEIGHTINGS  # noqa: E402
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


def table(rows: list[dict]) -> str:
    by = {}
    for r in rows:
        by.setdefault((r.get("label_fraction", 1.0), r["method"]), []).append(r)
    lines = ["| label fraction | method | labelled / unlabelled images | seeds | test acc (mean ± std) | "
             "best val (mean) |", "|---:|---|---:|---:|---:|---:|"]
    for (fraction, method), rs in sorted(by.items(), key=lambda kv: -kv[0][0]):
        acc = [100 * r["test_acc"] for r in rs]
        std = statistics.stdev(acc) if len(acc) > 1 else 0.0
        val = statistics.mean(100 * r["best_val_acc"] for r in rs)
        images = f"{rs[0].get('labelled_images', '?')} / {rs[0].get('unlabelled_images', '?')}"
        lines.append(f"| {fraction:g} | {method} | {images} | {len(rs)} | {statistics.mean(acc):.2f} ± {std:.2f} | "
                     f"{val:.2f} |")
    ens = statistics.mean(100 * r["ensemble_test_acc"] for r in rows)
    lines.append(f"| teacher ensemble (specialist combination, T=1) | - | {ens:.2f} | - |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=ALL)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--label_fractions", nargs="+", type=float, default=None,
                   help="run every method at each of these --label_fraction values (default: --label_fraction)")
    p.add_argument("--table_only", action="store_true", help="print the table of the results so far")
    own, rest = p.parse_known_args(argv)
    base = get_args_parser(list_tasks()).parse_args(rest)
    log = Path(base.output_dir) / "sweep.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    fractions = own.label_fractions or [base.label_fraction]
    todo = [] if own.table_only else [(f, m, s) for f in fractions for m in own.methods for s in own.seeds]
    for fraction, method, seed in todo:
        if any(r["method"] == method and r["seed"] == seed and r.get("label_fraction", 1.0) == fraction
               for r in done):
            continue
        args = argparse.Namespace(**{**vars(base), **method_flags(method), "seed": seed, "label_fraction": fraction,
                                     "run": f"sweep_{method.replace(':', '_').replace('+', '_')}_f{fraction:g}"})
        summary = run(args)
        row = {"method": method, "seed": seed, "label_fraction": fraction, **{k: summary[k] for k in (
            "test_acc", "best_val_acc", "best_epoch", "ensemble_test_acc", "wall_time_s", "run_dir",
            "labelled_images", "unlabelled_images")}}
        done.append(row)
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
    print(table(done))


if __name__ == "__main__":
    main()

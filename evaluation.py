"""Evaluate every task's student and print a summary across tasks; or predict one image.

    python evaluation.py                          # evaluation_taska.py + evaluation_taskb.py, then a summary
    python evaluation.py --task B --image x.png   # top-k classes of one image

Exit code: 0 when every task asked for was evaluated, 1 when some were not
(e.g. not trained yet), 2 on bad input.
"""
import json
import sys
from pathlib import Path

import evaluation_taska
import evaluation_taskb
import tasks
from mtkd.config import get_eval_args_parser
from mtkd.errors import UserError
from mtkd.evaluate import predict_image, run_task, summary_row
from mtkd.report import console, print_error, summary_table
from mtkd.taskfile import resolve_task
from mtkd.loop import resolve_device

SCRIPTS = {script.TASK: script for script in (evaluation_taska, evaluation_taskb)}


def predict(args) -> int:
    if not args.task or len(args.task) != 1:
        print_error("--image needs exactly one --task, e.g. --task B")
        return 2
    task = resolve_task(args.task[0])
    top = predict_image(task, args.image, output_dir=args.output_dir, checkpoint=args.checkpoint,
                        run_dir=args.run_dir, topk=args.topk, device=str(resolve_device(args.device)))
    console.print(f"{args.image} (task {task.name}):")
    for rank, (name, prob) in enumerate(top, 1):
        console.print(f"  {rank}. {name:<16} {prob:.4f}")
    return 0


def main(argv=None) -> int:
    args = get_eval_args_parser(tasks.list_tasks()).parse_args(argv)
    try:
        if args.image:
            return predict(args)
        rows = []
        for name in args.task or list(SCRIPTS):
            try:
                # A built-in task is evaluated by its own script; a task file directly.
                results = SCRIPTS[name].evaluate(args) if name in SCRIPTS else run_task(resolve_task(name), args)
                rows.append(summary_row(results))
            except UserError as e:
                rows.append({"task": name, "error": str(e).splitlines()[0]})
    except UserError as e:
        print_error(e)
        return e.exit_code
    console.print(summary_table(rows))
    Path(args.eval_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.eval_dir) / "summary.json").write_text(json.dumps(rows, indent=2))
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

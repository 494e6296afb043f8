"""Several checkpoints of one specialist, alone and averaged: is a group's ensemble a stronger teacher?

    python benchmarks/teacher_ensemble.py --task A --data_root ../shared/data --teacher trees \
        runs/TaskA/teachers/trees.pt other/TaskA/teachers/trees.pt [...] [--teacher_dustbin] [--json]

Each checkpoint (an mtkd teacher checkpoint or weights trained elsewhere, loaded as ``train.py`` loads a
teacher: another recipe, another seed) runs in fp32 on the teacher's own classes' validation and test
images, as they are and mirrored. Printed per split: each checkpoint's accuracy, and that of every
combination of two or more with their softmax probabilities averaged (choosing among the teacher's own
classes; a dustbin's "other" output is left out), each without and with the mirrored images averaged in
(flip test-time augmentation). Whether a study should train several teachers per group, or evaluate them
on mirrored views, before it spends the hours.
"""
import argparse
import itertools
import sys
from pathlib import Path

import torch
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, for tasks/
import tasks  # noqa: E402
from mtkd.data import BatchTransform, load_task_data  # noqa: E402
from mtkd.errors import UserError  # noqa: E402
from mtkd.report import console, run_reading  # noqa: E402
from mtkd.specialists import load_teacher, teacher_input  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoints", nargs="+", type=Path, help="checkpoints of the one teacher")
    p.add_argument("--task", default="A", choices=tasks.list_tasks())
    p.add_argument("--data_root", default="data")
    p.add_argument("--teacher", required=True, help="the task's teacher they all are (its classes)")
    p.add_argument("--teacher_dustbin", action="store_true", help="checkpoints with a dustbin output")
    p.add_argument("--batch_size", type=int, default=250)
    p.add_argument("--json", action="store_true", help="print the readings as JSON")
    return p


def probabilities(model, images: torch.Tensor, classes: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the teacher's own ``classes`` outputs, of the images and of their mirror images."""
    plain, mirrored = [], []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size]
            plain.append(model(x)[:, :classes].float().softmax(1))
            mirrored.append(model(x.flip(-1))[:, :classes].float().softmax(1))
    return torch.cat(plain), torch.cat(mirrored)


def readings(probs: list[tuple[torch.Tensor, torch.Tensor]], labels: torch.Tensor) -> dict:
    """Accuracy of each member and of every combination of two or more, probabilities averaged, without
    (``acc``) and with (``flip_acc``) the mirrored images' probabilities averaged in."""
    def acc(p: torch.Tensor) -> float:
        return (p.argmax(1) == labels).float().mean().item()

    out = {"single": [], "ensembles": []}
    for plain, mirrored in probs:
        out["single"].append({"acc": acc(plain), "flip_acc": acc(plain + mirrored)})
    for size in range(2, len(probs) + 1):
        for members in itertools.combinations(range(len(probs)), size):
            plain = sum(probs[i][0] for i in members)
            out["ensembles"].append({"members": list(members), "acc": acc(plain),
                                     "flip_acc": acc(plain + sum(probs[i][1] for i in members))})
    return out


def main(args) -> dict:
    task = tasks.get_task(args.task)
    task = task.with_dustbins() if args.teacher_dustbin else task
    spec = next((t for t in task.teachers if t.name == args.teacher), None)
    if spec is None:
        raise UserError(f"task {task.name} has no teacher {args.teacher!r}. Fix: --teacher one of "
                        f"{', '.join(t.name for t in task.teachers)}.")
    missing = [str(p) for p in args.checkpoints if not p.is_file()]
    if missing:
        raise UserError(f"teacher checkpoints not found: {', '.join(missing)}. Fix: give the paths of "
                        f"{spec.name!r} checkpoints (train.py keeps them in <output_dir>/Task{task.name}/teachers/).")
    data = load_task_data(task, args.data_root)
    transform = BatchTransform.for_task(task)
    own_input = teacher_input(spec, task)  # None: the task's own size and normalisation
    splits = {name: data.split(name).select_classes(task.class_indices(spec.classes)) for name in ("val", "test")}
    images = {name: transform(d.images) if own_input is None else own_input(transform(d.images))
              for name, d in splits.items()}
    probs = {name: [] for name in splits}
    for path in args.checkpoints:
        model = load_teacher(spec, task, path)[0].eval()
        for name in splits:
            probs[name].append(probabilities(model, images[name], len(spec.classes), args.batch_size))
    return {"task": task.name, "teacher": spec.name, "checkpoints": [str(p) for p in args.checkpoints],
            "images": {name: len(d) for name, d in splits.items()},
            "splits": {name: readings(probs[name], splits[name].labels) for name in splits}}


def print_tables(out: dict) -> None:
    for i, path in enumerate(out["checkpoints"]):
        console.print(f"[{i}] {path}")
    for name, r in out["splits"].items():
        table = Table(title=f"teacher {out['teacher']}, {name} ({out['images'][name]} images of its classes)")
        for column in ("checkpoints", "acc", "acc with mirrored images"):
            table.add_column(column, justify="left" if column == "checkpoints" else "right")
        for i, s in enumerate(r["single"]):
            table.add_row(f"[{i}]", f"{100 * s['acc']:.2f}%", f"{100 * s['flip_acc']:.2f}%")
        for e in r["ensembles"]:
            table.add_row(" + ".join(f"[{i}]" for i in e["members"]), f"{100 * e['acc']:.2f}%",
                          f"{100 * e['flip_acc']:.2f}%")
        console.print(table)


if __name__ == "__main__":
    run_reading(main, get_args_parser().parse_args(), print_tables)

"""What a task's specialist teachers can tell a student, measured against the labels.

    python benchmarks/teacher_diagnostics.py --task A --data_root ../shared/data --output_dir runs [--json]

Loads the task's teachers from ``OUTPUT_DIR/Task<X>/teachers/`` (as ``train.py`` finds them; nothing is
trained) and runs them, at the inference precision ``train.py`` gives them, on the validation split and
on ``--train_images`` training images (un-augmented: images the teachers were trained on), and with
``--cache FILE`` reads a teacher cache (``train.py --teacher_cache``) for the augmented views of every
training image that the student is distilled on. Prints:

* per teacher, on its own classes: accuracy, NLL, expected calibration error, mean confidence and
  normalised entropy at each ``--temperatures`` (how much a soft target says beyond its argmax);
* on every image of the split: how often each home-ground score (``diagnostics.HOME_SCORES``) picks the
  teacher whose classes hold the label, and the accuracy over all classes of routing each image to that
  teacher's top class, beside the ensemble's ``combination`` and ``mixture`` readings.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, for tasks/
import tasks  # noqa: E402
from mtkd.data import BatchTransform, create_loader, load_task_data  # noqa: E402
from mtkd.diagnostics import HOME_SCORES, calibration, routed_predictions  # noqa: E402
from mtkd.errors import UserError  # noqa: E402
from mtkd.loop import resolve_device  # noqa: E402
from mtkd.losses import coverage  # noqa: E402
from mtkd.report import console, print_error, step_progress  # noqa: E402
from mtkd.specialists import (PRECISION_RECORD, create_ensemble, example_batch, load_teacher,  # noqa: E402
                              teacher_dir, teacher_path, teacher_precisions)


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="A", choices=tasks.list_tasks())
    p.add_argument("--data_root", default="data")
    p.add_argument("--output_dir", default="runs", help="where train.py keeps the task's teachers")
    p.add_argument("--train_images", type=int, default=750, help="training images to measure (seeded sample)")
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, help="a teacher cache file of this task's teachers and training images")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    return p


def teacher_outputs(ensemble, dataset, transform, device, what: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every teacher's logits (CPU, fp32) on ``dataset`` and its labels."""
    outs, labels = [], []
    with step_progress(f"teachers on {what}", len(dataset)) as advance:
        for x, y in create_loader(dataset, 256, train=False):
            outs.append([z.cpu() for z in ensemble(transform(x.to(device)))])
            labels.append(y)
            advance(len(y))
    return [torch.cat(zs) for zs in zip(*outs)], torch.cat(labels)


def measure(ensemble, logits: list[torch.Tensor], labels: torch.Tensor, temperatures: list[float]) -> dict:
    ids = [i.cpu() for i in ensemble.class_ids]
    own = {}
    for name, z, c in zip(ensemble.names, logits, ids):
        mine = (labels[:, None] == c[None, :]).any(1)
        local = (labels[mine][:, None] == c[None, :]).long().argmax(1)
        own[name] = {f"T{t:g}": calibration(z[mine], local, t) for t in temperatures}
    cover = coverage(ids, labels)  # (N, K): which teachers hold each label (several where classes overlap)
    home = {}
    for score in HOME_SCORES.list():
        k, pred = routed_predictions(logits, ids, score)
        home[score] = {"group_acc": cover.gather(1, k[:, None]).float().mean().item(),
                       "acc": (pred == labels).float().mean().item()}
    readings = {m: (ensemble.combine(logits, m).argmax(1) == labels).float().mean().item()
                for m in ("combination", "mixture")}
    return {"images": len(labels), "own_classes": own, "home_ground": home, "ensemble_acc": readings}


def cached_views(path: Path, labels: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The teacher logits of every cached view, views stacked as images, and their labels."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        logits = [z.float() for z in state["logits"]]
    except Exception as e:
        raise UserError(f"--cache {path}: not a readable teacher cache ({type(e).__name__}). Fix: name a file "
                        "that train.py --teacher_cache DIR wrote in DIR.") from None
    if any(z.shape[1] != len(labels) for z in logits):
        raise UserError(f"--cache {path}: cached for {logits[0].shape[1]} training images, this task has "
                        f"{len(labels)}. Fix: name a cache of this task's teachers and data.")
    return [z.reshape(-1, z.shape[-1]) for z in logits], labels.repeat(logits[0].shape[0])


def print_tables(out: dict) -> None:
    for split, res in out["splits"].items():
        t = Table(title=f"{out['task']} teachers on their own classes, {split} ({res['images']} images in all)")
        cols = ("acc", "nll", "ece", "confidence", "label_prob", "entropy")
        for col in ("teacher", "T") + cols:
            t.add_column(col, justify="left" if col == "teacher" else "right")
        for name, by_t in res["own_classes"].items():
            for temp, m in by_t.items():
                t.add_row(name, temp[1:], *(f"{m[k]:.3f}" for k in cols))
        console.print(t)
        t = Table(title=f"home ground on {split}: the teacher picked by each score")
        for col in ("score", "right teacher", "accuracy over all classes"):
            t.add_column(col, justify="left" if col == "score" else "right")
        for score, m in res["home_ground"].items():
            t.add_row(score, f"{m['group_acc']:.2%}", f"{m['acc']:.2%}")
        for method, acc in res["ensemble_acc"].items():
            t.add_row(f"({method})", "", f"{acc:.2%}")
        console.print(t)


def main(args) -> dict:
    task = tasks.get_task(args.task)
    device = resolve_device(args.device)
    paths = [teacher_path(args.output_dir, task, spec) for spec in task.teachers]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise UserError(f"teacher checkpoints not found: {', '.join(missing)}. Fix: train them with "
                        f"`python train.py --task {task.name} --output_dir {args.output_dir}`, or copy them there.")
    data = load_task_data(task, args.data_root)
    cached = cached_views(args.cache, data.train.labels) if args.cache is not None else None
    ensemble = create_ensemble(task, [load_teacher(spec, task, p)[0] for spec, p in zip(task.teachers, paths)])
    ensemble = ensemble.to(device)
    transform = BatchTransform.for_task(task).to(device)
    example = example_batch(data.train, transform, device, 32)
    ensemble.set_precisions(teacher_precisions(ensemble, paths, example, args.amp, False,
                                               teacher_dir(args.output_dir, task) / PRECISION_RECORD))
    g = torch.Generator().manual_seed(args.seed)
    n = min(args.train_images, len(data.train))
    splits = {"val": data.val, f"train ({n} images)": data.train.subset(torch.randperm(len(data.train), generator=g)[:n])}
    out = {"task": task.name, "precisions": [str(p) for p in ensemble.precisions], "splits": {}}
    for name, dataset in splits.items():
        logits, labels = teacher_outputs(ensemble, dataset, transform, device, name)
        out["splits"][name] = measure(ensemble, logits, labels, args.temperatures)
    if cached is not None:
        logits, labels = cached
        out["splits"][f"train, {len(labels) // len(data.train)} cached views"] = measure(
            ensemble, logits, labels, args.temperatures)
    return out


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    if args.json:  # stdout holds the JSON object alone; messages and progress go to stderr
        console.file = sys.stderr
    try:
        result = main(args)
    except UserError as e:
        print_error(e)
        sys.exit(e.exit_code)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_tables(result)

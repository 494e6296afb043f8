"""What a task's specialist teachers can tell a student, measured against the labels.

    python benchmarks/teacher_diagnostics.py --task A --data_root ../shared/data --output_dir runs [--json]

Loads the task's teachers from ``OUTPUT_DIR/Task<X>/teachers/`` (as ``train.py`` finds them; nothing is
trained) and runs them, at the inference precision ``train.py`` gives them, on the validation split and
on ``--train_images`` training images (un-augmented: images the teachers were trained on), and with
``--teacher_cache DIR`` reads the teacher cache ``train.py --teacher_cache DIR --cache_views N`` built for
these teachers and data (the augmented views of every training image the student is distilled on). Prints:

* per teacher, on its own classes: accuracy, NLL, expected calibration error, mean confidence and
  normalised entropy at each ``--temperatures`` (how much a soft target says beyond its argmax);
* on every image of the split: how often each home-ground score (``diagnostics.HOME_SCORES``) picks the
  teacher whose classes hold the label, and the accuracy over all classes of routing each image to that
  teacher's top class, beside the ensemble's ``combination`` and ``mixture`` readings;
* with ``--label_fractions F ...``: the stacker ``train.py --aggregation stacked --label_fraction F`` fits
  (``mtkd.stacking``; the labelled images drawn as the run draws them, for each ``--stack_seeds`` seed, and
  shrunk toward each ``--stacker_priors``),
  measured on the training images whose label it did not see (the pseudo-labels' accuracy, and how often
  their class is in the right teacher's group) and on the validation split; with ``--stack_features`` also
  the same logistic regression on the teachers' pooled features (the input of their classifiers, each
  standardised over the training images) instead of their logits: whether the teachers know more about the
  other groups' images than their logits say.
"""
import argparse
import sys
from pathlib import Path

import torch
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, for tasks/
import tasks  # noqa: E402
from mtkd.cache import CacheError, TeacherCache, cache_key, cache_path, teacher_logits  # noqa: E402
from mtkd.data import BatchTransform, create_loader, keep_labels, load_task_data  # noqa: E402
from mtkd.diagnostics import HOME_SCORES, calibration, routed_predictions  # noqa: E402
from mtkd.errors import UserError  # noqa: E402
from mtkd.loop import resolve_device  # noqa: E402
from mtkd.evaluate import load_ensemble  # noqa: E402
from mtkd.losses import coverage, local_labels  # noqa: E402
from mtkd.report import console, run_reading, step_progress  # noqa: E402
from mtkd.stacking import PRIORS, Stacker, choose_l2, fit_logistic  # noqa: E402
from mtkd.specialists import (PRECISION_RECORD, example_batch, taught_task, teacher_dir, teacher_path,  # noqa: E402
                              teacher_precisions)


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
    p.add_argument("--teacher_cache", type=Path, metavar="DIR", help="where train.py keeps its teacher cache")
    p.add_argument("--cache_views", type=int, default=8, help="the views of that cache (as train.py)")
    p.add_argument("--teacher_dustbin", action="store_true",
                   help="the teachers with a dustbin (train.py --teacher_dustbin): their home probability is "
                        "one more home-ground score")
    p.add_argument("--teacher_architecture", metavar="ARCH",
                   help="the teachers' architecture, as train.py was given it")
    p.add_argument("--teacher_pretrained", metavar="FILE",
                   help="what the teachers started from, as train.py was given it")
    p.add_argument("--label_fractions", type=float, nargs="*", default=[],
                   help="fit the stacker of --aggregation stacked on this fraction of the training labels and "
                        "measure it on the rest (pseudo-labels) and on validation")
    p.add_argument("--stack_seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="the --seed of each run whose labelled images the stacker is fitted on")
    p.add_argument("--stacker_priors", nargs="+", choices=PRIORS, default=["zero"],
                   help="with --label_fractions: the stacker shrunk toward each of these (train.py --stacker_prior)")
    p.add_argument("--stack_features", action="store_true",
                   help="with --label_fractions: fit the same regression on the teachers' pooled features too")
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


def measure(ensemble, raw: list[torch.Tensor], labels: torch.Tensor, temperatures: list[float]) -> dict:
    ids = [i.cpu() for i in ensemble.class_ids]
    logits, dustbin_home = ensemble.split(raw)  # over each teacher's own classes; a dustbin's home probability
    cover = coverage(ids, labels)  # (N, K): which teachers hold each label (several where classes overlap)
    own = {}
    for k, (name, z, c) in enumerate(zip(ensemble.names, logits, ids)):
        mine = cover[:, k]
        own[name] = {f"T{t:g}": calibration(z[mine], local_labels(c, labels[mine]), t) for t in temperatures}
    home = {}
    scores = {name: name for name in HOME_SCORES.list()}
    if dustbin_home is not None:
        scores["dustbin"] = dustbin_home
    for score, by in scores.items():
        k, pred = routed_predictions(logits, ids, by)
        home[score] = {"group_acc": cover.gather(1, k[:, None]).float().mean().item(),
                       "acc": (pred == labels).float().mean().item()}
    readings = {m: (ensemble.combine(raw, m).argmax(1) == labels).float().mean().item()
                for m in ("combination", "mixture")}
    return {"images": len(labels), "own_classes": own, "home_ground": home, "ensemble_acc": readings}


def cached_views(args, task, ensemble, data, transform) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The teacher logits of every view in the cache ``train.py`` built for these teachers and data, views
    stacked as images, and their labels."""
    key = cache_key(ensemble, data.train, transform, args.cache_views)
    path = cache_path(args.teacher_cache, task.name, key)
    dustbin = " --teacher_dustbin" if args.teacher_dustbin else ""
    fix = (f"Fix: build it with `python train.py --task {task.name}{dustbin} --teacher_cache {args.teacher_cache} "
           f"--cache_views {args.cache_views}` (and these teachers), or name the DIR and views it was built with.")
    if not path.exists():
        raise UserError(f"--teacher_cache {args.teacher_cache}: no cache of these teachers and data with "
                        f"{args.cache_views} views ({path.name}). {fix}")
    try:
        cache = TeacherCache.load(path, key, args.cache_views, len(data.train), ensemble.output_sizes)
    except CacheError as e:
        raise UserError(f"--teacher_cache {args.teacher_cache}: {path.name} is not usable ({e}). {fix}") from None
    return ([z.float().reshape(-1, z.shape[-1]) for z in cache.logits],
            data.train.labels.repeat(args.cache_views))


# The features are thousands of numbers an image where the logits are a few: a wider penalty grid.
FEATURE_L2_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


def teacher_features(ensemble, dataset, transform, device, what: str) -> torch.Tensor:
    """Every teacher's pooled features (``TeacherEnsemble.pre_logits``) on ``dataset``, side by side (CPU)."""
    outs = []
    with step_progress(f"teachers' features on {what}", len(dataset)) as advance:
        for x, y in create_loader(dataset, 256, train=False):
            outs.append(torch.cat([h.cpu() for h in ensemble.pre_logits(transform(x.to(device)))], 1))
            advance(len(y))
    return torch.cat(outs)


def standardised(train: torch.Tensor, val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both feature sets standardised by the statistics of every training image (no label)."""
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    return (train - mean) / std, (val - mean) / std


def feature_probe(train: torch.Tensor, val: torch.Tensor, kept: torch.Tensor, num_classes: int) -> tuple:
    """The logistic regression of the stacker on (standardised) features, its penalty chosen by
    cross-validation on the labelled ones; returns ``(l2, train predictions, val predictions)``."""
    labelled = kept >= 0
    x, y = train[labelled], kept[labelled]
    l2, _ = choose_l2(x, y, num_classes, FEATURE_L2_GRID)
    weight, bias = fit_logistic(x, y, num_classes, l2)
    return l2, (train @ weight.T + bias).argmax(1), (val @ weight.T + bias).argmax(1)


def stacker_readings(ensemble, train_set, train_logits: list[torch.Tensor], val_logits: list[torch.Tensor],
                     val_labels: torch.Tensor, fractions: list[float], seeds: list[int],
                     features: tuple[torch.Tensor, torch.Tensor] | None = None,
                     priors: tuple[str, ...] = ("zero",)) -> list[dict]:
    """For each label fraction and seed: the stacker fitted on the labels that run keeps (``keep_labels``),
    on the training images whose label is hidden its accuracy and how often its class is in the right group
    (some teacher holds both it and the label), the same two for the label-free specialist combination, and
    the stacker's validation accuracy, for each of ``priors`` (``--stacker_prior``); with ``features`` (train,
    val; standardised) the same regression on them (``features_*``, in the first prior's row)."""
    ids = [i.cpu() for i in ensemble.class_ids]
    truth_all = train_set.labels
    device = ensemble.weights.device  # the logits are on the CPU, the ensemble's class ids where it runs
    combined = ensemble.combine([z.to(device) for z in train_logits], "combination").argmax(1).cpu()
    rows = []
    for fraction in fractions:
        for seed in seeds:
            kept = keep_labels(train_set, fraction, seed).labels
            hidden = kept < 0
            for prior in priors:
                stacker = Stacker.for_ensemble(ensemble, prior)
                info = stacker.fit(train_logits, kept)
                row = {"label_fraction": fraction, "seed": seed, "prior": prior, "labelled": info["images"],
                       "l2": info["l2"], "fit_acc": info["fit_acc"]}
                with torch.no_grad():
                    if hidden.any():
                        truth = truth_all[hidden]
                        for name, pred in (("unlabelled", stacker([z[hidden] for z in train_logits]).argmax(1)),
                                           ("combination", combined[hidden])):
                            row[f"{name}_acc"] = (pred == truth).float().mean().item()
                            row[f"{name}_group_acc"] = (coverage(ids, pred) & coverage(ids, truth)).any(
                                1).float().mean().item()
                    row["val_acc"] = (stacker(val_logits).argmax(1) == val_labels).float().mean().item()
                if features is not None and prior == priors[0]:
                    row["features_l2"], pred, val_pred = feature_probe(*features, kept, ensemble.num_classes)
                    if hidden.any():
                        row["features_unlabelled_acc"] = (pred[hidden] == truth_all[hidden]).float().mean().item()
                    row["features_val_acc"] = (val_pred == val_labels).float().mean().item()
                rows.append(row)
    return rows


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
    if out.get("stacked"):
        t = Table(title="the stacker (--aggregation stacked) fitted on a fraction of the training labels")
        features = "features_val_acc" in out["stacked"][0]
        for col in ("labels", "seed", "prior", "labelled images", "L2", "acc on them", "pseudo-labels right",
                    "right group", "(combination: right / group)", "val acc",
                    *(("(on features: L2 / right / val)",) if features else ())):
            t.add_column(col, justify="right")
        nan = float("nan")
        for r in out["stacked"]:
            t.add_row(f"{r['label_fraction']:g}", str(r["seed"]), r["prior"], str(r["labelled"]), f"{r['l2']:g}",
                      f"{r['fit_acc']:.2%}", f"{r.get('unlabelled_acc', nan):.2%}",
                      f"{r.get('unlabelled_group_acc', nan):.2%}",
                      f"{r.get('combination_acc', nan):.2%} / {r.get('combination_group_acc', nan):.2%}",
                      f"{r['val_acc']:.2%}",
                      *((f"{r['features_l2']:g} / {r.get('features_unlabelled_acc', nan):.2%} / "
                         f"{r['features_val_acc']:.2%}" if "features_l2" in r else "",) if features else ()))
        console.print(t)


def main(args) -> dict:
    if args.stack_features and not args.label_fractions:
        raise UserError("--stack_features reads the stacker's fit on features: it needs --label_fractions F ... "
                        "Fix: add e.g. --label_fractions 0.1.")
    task = taught_task(tasks.get_task(args.task), vars(args))
    device = resolve_device(args.device)
    paths = [teacher_path(args.output_dir, task, spec) for spec in task.teachers]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise UserError(f"teacher checkpoints not found: {', '.join(missing)}. Fix: train them with "
                        f"`python train.py --task {task.name}{' --teacher_dustbin' if args.teacher_dustbin else ''} "
                        f"--output_dir {args.output_dir}`, or copy them there.")
    data = load_task_data(task, args.data_root)
    ensemble = load_ensemble(task, args.output_dir)[0].to(device)
    transform = BatchTransform.for_task(task).to(device)
    example = example_batch(data.train, transform, device, 32)
    ensemble.set_precisions(teacher_precisions(ensemble, paths, example, args.amp, False,
                                               teacher_dir(args.output_dir, task) / PRECISION_RECORD))
    cached = cached_views(args, task, ensemble, data, transform) if args.teacher_cache is not None else None
    g = torch.Generator().manual_seed(args.seed)
    n = min(args.train_images, len(data.train))
    sample = data.train.subset(torch.randperm(len(data.train), generator=g)[:n])
    splits = {"val": data.val, f"train ({n} images)": sample}
    out = {"task": task.name, "precisions": [str(p) for p in ensemble.precisions], "splits": {}}
    for name, dataset in splits.items():
        logits, labels = teacher_outputs(ensemble, dataset, transform, device, name)
        out["splits"][name] = measure(ensemble, logits, labels, args.temperatures)
    if cached is not None:
        logits, labels = cached
        out["splits"][f"train, {len(labels) // len(data.train)} cached views"] = measure(
            ensemble, logits, labels, args.temperatures)
    if args.label_fractions:  # the plain images' logits, as train.py fits on (kept with --teacher_cache)
        plain = teacher_logits(ensemble, {"train": data.train, "val": data.val}, transform, device,
                               args.teacher_cache, task.name)
        features = (standardised(teacher_features(ensemble, data.train, transform, device, "train"),
                                 teacher_features(ensemble, data.val, transform, device, "val"))
                    if args.stack_features else None)
        out["stacked"] = stacker_readings(ensemble, data.train, plain["train"], plain["val"], data.val.labels,
                                          args.label_fractions, args.stack_seeds, features,
                                          tuple(args.stacker_priors))
    return out


if __name__ == "__main__":
    run_reading(main, get_args_parser().parse_args(), print_tables)

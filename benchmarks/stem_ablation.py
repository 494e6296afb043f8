"""What the small-input changes buy: one student trained on labels only in several variants,
same data, seed, epochs and recipe (the parser's defaults and flags).

* ``mtkd``: as ``create_student`` builds it (small-input stem, total stride 8,
  fan-in classifier initialisation);
* ``timm_head``: the same with timm's classifier initialisation
  (U(+-1/sqrt(num_classes)) for EfficientNet / MobileNetV3);
* ``stride16``: EfficientNet / MobileNetV3 with only the stem's stride removed;
* ``imagenet``: timm's ImageNet stem, no adaptation.

    python benchmarks/stem_ablation.py --task B --student_model ResNet18 --num_epochs 8 --variants mtkd imagenet
    python benchmarks/stem_ablation.py --task B --student_model EfficientNet --num_epochs 20 \\
        --variants mtkd timm_head stride16
"""
import argparse
import sys
import time
from pathlib import Path

import timm
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, for tasks/
import tasks  # noqa: E402
from mtkd.config import get_args_parser  # noqa: E402
from mtkd.data import BatchTransform, create_loader, load_task_data  # noqa: E402
from mtkd.distill import Distiller  # noqa: E402
from mtkd.engine import evaluate  # noqa: E402
from mtkd.loop import LoopConfig, RunRng, fit, resolve_device, seed_everything  # noqa: E402
from mtkd.optim import EpochScheduler, create_optimizer, optimizer_kwargs, scheduler_kwargs  # noqa: E402
from mtkd.models import STUDENTS, adapt_to_small_inputs, count_parameters, reset_classifier_init  # noqa: E402

VARIANTS = ("mtkd", "timm_head", "stride16", "imagenet")


def create_variant(name: str, task, variant: str) -> nn.Module:
    model = timm.create_model(STUDENTS.get(name), pretrained=False, num_classes=task.num_classes, in_chans=task.channels)
    if variant != "timm_head":
        reset_classifier_init(model)
    if variant != "imagenet":
        adapt_to_small_inputs(model, first_block=variant != "stride16")
    return model


def train_and_test(task, data, args, variant: str) -> dict:
    device = resolve_device(args.device)
    seed_everything(args.seed)
    model = create_variant(args.student_model, task, variant).to(device)
    optimizer = create_optimizer(model, **optimizer_kwargs(args))
    scheduler = EpochScheduler(optimizer, epochs=args.num_epochs, **scheduler_kwargs(args))
    transform = BatchTransform.for_task(task).to(device)
    best = {"acc": -1.0}
    last = {}

    def on_epoch(epoch, train, val, lr, seconds):
        last.update(train=train["acc"], val=val["acc"])
        if val["acc"] > best["acc"]:
            best.update(acc=val["acc"], state={k: v.clone() for k, v in model.state_dict().items()})

    start = time.perf_counter()
    fit(Distiller(model), data, epochs=args.num_epochs, optimizer=optimizer, scheduler=scheduler,
        loop=LoopConfig.from_args(args),
        device=device, transform=transform, on_epoch=on_epoch, val_model=model, title=variant, rng=RunRng(args.seed))
    seconds = time.perf_counter() - start
    model.load_state_dict(best["state"])
    test = evaluate(model, create_loader(data.test, 512, train=False), transform, device)
    return {"best_val": best["acc"], "last_train": last["train"], "last_val": last["val"], "test": test["acc"],
            "params": count_parameters(model), "seconds": seconds}


def main(argv=None):
    parser = argparse.ArgumentParser(parents=[get_args_parser(tasks.list_tasks())], add_help=False)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["mtkd", "imagenet"])
    args = parser.parse_args(argv)
    task = tasks.get_task(args.task)
    data = load_task_data(task, args.data_root)
    rows = {v: train_and_test(task, data, args, v) for v in args.variants}
    print(f"task {task.name}, {args.student_model}, {args.num_epochs} epochs, alpha 0, seed {args.seed}")
    print("| variant | best val acc | last train acc | last val acc | test acc (best val epoch) | train time (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for v, r in rows.items():
        print(f"| {v} | {r['best_val']:.4f} | {r['last_train']:.4f} | {r['last_val']:.4f} | {r['test']:.4f} | "
              f"{r['seconds']:.0f} |")
    return rows


if __name__ == "__main__":
    main()

"""What the small-input stem adaptation buys: one student trained (labels only)
with the adapted stem and with timm's ImageNet stem, same data, seed and epochs.

    python benchmarks/stem_ablation.py --task B --student_model ResNet18 --num_epochs 10
"""
import argparse
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, for tasks/
import tasks  # noqa: E402
from mtkd.config import get_args_parser  # noqa: E402
from mtkd.data import BatchTransform, create_loader, load_task_data
from mtkd.distill import Distiller
from mtkd.engine import evaluate
from mtkd.loop import RunRng, fit, resolve_device, seed_everything
from mtkd.optim import create_optimizer, create_scheduler
from mtkd.models import STUDENTS, count_parameters, create_model


def train_and_test(task, data, args, adapt: bool) -> dict:
    device = resolve_device(args.device)
    seed_everything(args.seed)
    model = create_model(STUDENTS[args.student_model], task.num_classes, task.channels, task.image_size,
                         adapt=adapt).to(device)
    optimizer = create_optimizer(model, args)
    scheduler = create_scheduler(optimizer, args, args.num_epochs)
    transform = BatchTransform.for_task(task).to(device)
    best = {"acc": -1.0}

    def on_epoch(epoch, train, val, lr, seconds):
        if val["acc"] > best["acc"]:
            best.update(acc=val["acc"], state={k: v.clone() for k, v in model.state_dict().items()})

    start = time.perf_counter()
    fit(Distiller(model), data, epochs=args.num_epochs, optimizer=optimizer, scheduler=scheduler, args=args,
        device=device, transform=transform, on_epoch=on_epoch, val_model=model,
        title="adapted" if adapt else "imagenet-stem", rng=RunRng(args.seed))
    seconds = time.perf_counter() - start
    model.load_state_dict(best["state"])
    test = evaluate(model, create_loader(data.test, 512, train=False), transform, device)
    return {"best_val": best["acc"], "test": test["acc"], "params": count_parameters(model), "seconds": seconds}


def main():
    parser = argparse.ArgumentParser(parents=[get_args_parser(tasks.list_tasks())], add_help=False)
    args = parser.parse_args()
    task = tasks.get_task(args.task)
    data = load_task_data(task, args.data_root)
    rows = {adapt: train_and_test(task, data, args, adapt) for adapt in (True, False)}
    print(f"task {task.name}, {args.student_model}, {args.num_epochs} epochs, alpha 0, seed {args.seed}")
    print("| stem | best val acc | test acc | train time (s) |")
    print("|---|---:|---:|---:|")
    for adapt, r in rows.items():
        print(f"| {'adapted (stride 1)' if adapt else 'timm ImageNet stem'} | {r['best_val']:.4f} | "
              f"{r['test']:.4f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()

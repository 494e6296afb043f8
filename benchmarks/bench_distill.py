"""Throughput of distillation: baseline vs online KD vs cached KD, and of the data pipeline.

All in one process, on the same data and student:

* ``baseline_img_s``: the student trained on labels only (``alpha 0``);
* ``online_kd_img_s``: the student distilled from the task's teacher ensemble,
  the teachers run on every batch;
* ``cached_kd_img_s``: the same from the teacher-output cache (its one-off
  build time is ``cache_build_s``);
* ``data_batched_img_s``: the in-memory uint8 tensor, augmented per batch
  with tensor ops (mtkd's path), no model;
* ``data_pil_img_s``: a torchvision per-sample pipeline (``ToPILImage``,
  ``RandomCrop``, flip, ``ToTensor``, ``Normalize``) through a DataLoader.

With ``--precision_compare``, in the same process and taking turns:

* ``fp32_student_train_img_s`` / ``auto_student_train_img_s``: the student
  trained on labels only in fp32 / NCHW (the reference path) and in what
  ``--amp auto`` chooses for it on this device;
* ``fp32_teacher_infer_img_s`` / ``auto_teacher_infer_img_s``: the task's
  whole teacher ensemble (every teacher) on the training images, batches of
  ``--infer_batch_size``, likewise.

With ``--compile_compare``, likewise: ``eager_cached_kd_img_s`` /
``compiled_cached_kd_img_s``, the student distilled from the cache in the
main passes' precision, its forward as is and through ``torch.compile``
(``train.py --compile``); the compilation happens in the untimed warm-up pass.

Teachers are randomly initialised: speed does not depend on their weights.
``--synthetic N`` replaces the task's images with N random ones of its shape
(e.g. Task A's 32x32 RGB without downloading CIFAR-100). ``--amp`` sets the
precision of the main passes (default: auto, as in train.py).

    python benchmarks/bench_distill.py --task B --student_model ResNet18 --json
    python benchmarks/bench_distill.py --task A --synthetic 1024 --precision_compare --json
"""
import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, for tasks/
import tasks  # noqa: E402,F401
from mtkd.cache import CachedViews, open_teacher_cache  # noqa: E402
from mtkd.data import BatchTransform, ImageTensorDataset, create_loader, load_task_data  # noqa: E402
from mtkd.distill import Distiller  # noqa: E402
from mtkd.terms import KDConfig  # noqa: E402
from mtkd.engine import train_one_epoch  # noqa: E402
from mtkd.loop import resolve_device, seed_everything  # noqa: E402
from mtkd.optim import create_optimizer  # noqa: E402
from mtkd.precision import AMP_MODES, FP32, resolve_precision  # noqa: E402
from mtkd.models import create_student, create_teacher, list_students  # noqa: E402
from mtkd.spec import get_task, list_tasks  # noqa: E402
from mtkd.specialists import choose_teacher_precisions, create_ensemble, example_batch  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", default="B", choices=list_tasks())
    p.add_argument("--student_model", default="ResNet18", choices=list_students())
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--images", type=int, default=2048, help="training images per timed pass")
    p.add_argument("--synthetic", type=int, default=0, metavar="N", help="use N random images of the task's shape")
    p.add_argument("--cache_views", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto", choices=AMP_MODES)
    p.add_argument("--precision_compare", action="store_true",
                   help="also time fp32 / NCHW against --amp auto: student training and teacher inference")
    p.add_argument("--compile_compare", action="store_true",
                   help="also time the cached distillation with the student torch.compile'd (train.py --compile) "
                        "against eager")
    p.add_argument("--infer_batch_size", type=int, default=256, help="teacher inference batch (--precision_compare)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per measurement; the best is kept")
    p.add_argument("--data_root", default="data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def training_images(task, args) -> ImageTensorDataset:
    g = torch.Generator().manual_seed(args.seed)
    if args.synthetic:
        n = args.synthetic
        return ImageTensorDataset(
            torch.randint(0, 256, (n, task.channels, task.image_size, task.image_size), dtype=torch.uint8, generator=g),
            torch.randint(0, task.num_classes, (n,), generator=g))
    train = load_task_data(task, args.data_root).train
    reps = -(-args.images // len(train))  # repeat a small set up to --images
    idx = torch.arange(len(train)).repeat(reps)[: args.images]
    return ImageTensorDataset(train.images[idx], train.labels[idx])


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, fn) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def best_rates(device, repeats: int, passes: dict, n: int) -> dict[str, float]:
    """Images/s of each pass: one warm-up each, then ``repeats`` rounds taking turns, best kept.

    Taking turns spreads slow drifts of a shared machine over every pass alike.
    """
    for fn in passes.values():
        fn()  # warm-up: allocator, cudnn autotuning, lazy inits
    best = {name: float("inf") for name in passes}
    for _ in range(repeats):
        for name, fn in passes.items():
            best[name] = min(best[name], timed(device, fn))
    return {name: n / t for name, t in best.items()}


def student_precision(task, args, data, device, transform, amp):
    seed_everything(args.seed)
    student = create_student(args.student_model, task).to(device)
    return resolve_precision(amp, device, student, example_batch(data, transform, device, args.batch_size), train=True)[0]


def teacher_precisions(ensemble, data, device, transform, amp):
    return choose_teacher_precisions(ensemble, example_batch(data, transform, device, 64), amp)


def training_pass(task, data, ensemble, cfg, args, device, transform, cache=None, precision=FP32, compile=False):
    """A function that trains the student for one epoch over ``data`` (online or from ``cache``; its forward
    ``torch.compile``'d with ``compile``)."""
    seed_everything(args.seed)
    student = precision.prepare_model(create_student(args.student_model, task).to(device))
    step = Distiller(student, ensemble, cfg, compile=compile).to(device)
    optimizer = create_optimizer(step, "adam", lr=1e-3, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(device.type) if precision.dtype == "fp16" else None
    loader = create_loader(CachedViews(data, cache) if cache else data, args.batch_size, train=True)
    epoch = [0]

    def one_pass():
        epoch[0] += 1
        if cache:
            loader.dataset.set_epoch(epoch[0])
        train_one_epoch(step, loader, optimizer, transform, device, epoch=epoch[0], precision=precision,
                        scaler=scaler)

    return one_pass


def inference_pass(ensemble, data, args, device, transform):
    """A function that runs every teacher of ``ensemble`` over ``data``."""
    loader = create_loader(data, args.infer_batch_size, train=False)

    def one_pass():
        with torch.inference_mode():
            for images, _ in loader:
                ensemble(transform(images.to(device)))

    return one_pass


def precision_compare(task, data, args, device, transform) -> dict:
    """fp32 / NCHW against --amp auto, student training and teacher inference, taking turns."""
    auto_student = student_precision(task, args, data, device, transform, "auto")
    seed_everything(args.seed)
    teachers = [create_teacher(t, task) for t in task.teachers]
    fp32_ensemble = create_ensemble(task, teachers).to(device)
    auto_ensemble = create_ensemble(task, [copy.deepcopy(t) for t in teachers]).to(device)
    auto_ensemble.set_precisions(teacher_precisions(auto_ensemble, data, device, transform, "auto"))
    student = best_rates(device, args.repeats, {
        "fp32_student_train_img_s": training_pass(task, data, None, KDConfig(), args, device, transform),
        "auto_student_train_img_s": training_pass(task, data, None, KDConfig(), args, device, transform,
                                                  precision=auto_student)}, len(data))
    teacher = best_rates(device, args.repeats, {
        "fp32_teacher_infer_img_s": inference_pass(fp32_ensemble, data, args, device, transform),
        "auto_teacher_infer_img_s": inference_pass(auto_ensemble, data, args, device, transform)}, len(data))
    return {**student, **teacher,
            "auto_vs_fp32_student_train": student["auto_student_train_img_s"] / student["fp32_student_train_img_s"],
            "auto_vs_fp32_teacher_infer": teacher["auto_teacher_infer_img_s"] / teacher["fp32_teacher_infer_img_s"],
            "auto_student_precision": str(auto_student),
            "auto_teacher_precisions": {n: str(p) for n, p in zip(auto_ensemble.names, auto_ensemble.precisions)}}


class PILPipeline(Dataset):
    """The per-sample torchvision pipeline: uint8 tensor -> PIL -> crop / flip -> tensor -> normalise."""

    def __init__(self, data: ImageTensorDataset, task):
        self.data = data
        ops = [T.ToPILImage()]
        if task.crop_padding:
            ops.append(T.RandomCrop(task.image_size, padding=task.crop_padding))
        if task.hflip:
            ops.append(T.RandomHorizontalFlip())
        self.transform = T.Compose(ops + [T.ToTensor(), T.Normalize(task.mean, task.std)])

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.transform(self.data.images[i]), self.data.labels[i]


def data_passes(task, data, args, device, transform) -> dict:
    batched = create_loader(data, args.batch_size, train=True)
    pil = DataLoader(PILPipeline(data, task), batch_size=args.batch_size, shuffle=True)

    def run_batched():
        for images, labels in batched:
            transform(images.to(device), augment=True)
            labels.to(device)

    def run_pil():
        for x, labels in pil:
            x.to(device), labels.to(device)

    return {"data_batched_img_s": run_batched, "data_pil_img_s": run_pil}


def main(args) -> dict:
    device = resolve_device(args.device)
    task = get_task(args.task)
    data = training_images(task, args)
    transform = BatchTransform.for_task(task).to(device)
    seed_everything(args.seed)
    ensemble = create_ensemble(task, [create_teacher(t, task) for t in task.teachers]).to(device)
    ensemble.set_precisions(teacher_precisions(ensemble, data, device, transform, args.amp))
    precision = student_precision(task, args, data, device, transform, args.amp)
    kd = KDConfig(alpha=0.5, temperature=4.0)
    with tempfile.TemporaryDirectory() as cache_dir:
        start = time.perf_counter()
        cache, _, _ = open_teacher_cache(cache_dir, task.name, ensemble, data, transform, args.cache_views, device)
        cache_build_s = time.perf_counter() - start
    passes = {"baseline_img_s": training_pass(task, data, None, KDConfig(), args, device, transform,
                                              precision=precision),
              "online_kd_img_s": training_pass(task, data, ensemble, kd, args, device, transform,
                                               precision=precision),
              "cached_kd_img_s": training_pass(task, data, ensemble, kd, args, device, transform, cache,
                                               precision=precision)}
    result = best_rates(device, args.repeats, passes, len(data))
    result.update(best_rates(device, args.repeats, data_passes(task, data, args, device, transform), len(data)))
    result["cache_build_s"] = cache_build_s
    result["cached_vs_baseline"] = result["cached_kd_img_s"] / result["baseline_img_s"]
    result["online_vs_baseline"] = result["online_kd_img_s"] / result["baseline_img_s"]
    result["batched_vs_pil"] = result["data_batched_img_s"] / result["data_pil_img_s"]
    if args.precision_compare:
        result.update(precision_compare(task, data, args, device, transform))
    if args.compile_compare:
        compiled = best_rates(device, args.repeats, {
            f"{mode}_cached_kd_img_s": training_pass(task, data, ensemble, kd, args, device, transform, cache,
                                                     precision=precision, compile=mode == "compiled")
            for mode in ("eager", "compiled")}, len(data))
        result.update(compiled, compiled_vs_eager=compiled["compiled_cached_kd_img_s"] /
                      compiled["eager_cached_kd_img_s"])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    result.update(device=f"{device} ({name})", threads=torch.get_num_threads(), torch=torch.__version__,
                  task=task.name, student_model=args.student_model, batch_size=args.batch_size, images=len(data),
                  image_shape=list(data.images.shape[1:]), amp=args.amp, student_precision=str(precision),
                  teacher_precisions={n: str(p) for n, p in zip(ensemble.names, ensemble.precisions)},
                  cache_views=args.cache_views, repeats=args.repeats)
    return result


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    out = main(args)
    if args.json:
        print(json.dumps(out))
    else:
        width = max(map(len, out))
        for key, value in out.items():
            print(f"{key:<{width}}  {value:,.2f}" if isinstance(value, float) else f"{key:<{width}}  {value}")

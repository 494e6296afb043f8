"""How far a distilled step with online teachers is from the same step on cached teacher logits.

The training loop runs the whole step (student, teachers, loss) under the
student's autocast; the teacher cache runs the teachers on their own, outside
it, and stores their logits in fp16. Both must give the teachers' logits of
their own precision and a loss computed in fp32, so the only difference left is
the cache's fp16 rounding of the logits. Printed (one JSON object):

* ``teacher_logits_max_abs_diff``: online vs outside-autocast teacher logits;
* ``loss_abs_diff_vs_fp32``: the step's loss as training computes it (online
  teachers, under the student's autocast) vs the reference: the same student
  logits, the teachers outside autocast, the loss in fp32;
* ``loss_abs_diff_vs_cache``: online vs the step on the teachers' logits
  rounded to fp16, as the cache stores them (under the student's autocast too).

The student's logits are computed once, under its autocast, and shared by the
three steps, so the differences are the teachers' and the loss's alone.

Teachers run in ``--teacher_amp`` (default off: fp32, the case where the
student's bf16 must not reach them); the student in ``--student_amp`` (bf16).
Teachers are the task's, loaded from ``--output_dir`` when present, else
randomly initialised (``--synthetic`` images of the task's shape need no data).

    python benchmarks/online_vs_cached.py --task A --data_root ../shared/data --output_dir runs
"""
import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, for tasks/
import tasks  # noqa: E402,F401
from mtkd.data import BatchTransform, load_task_data  # noqa: E402
from mtkd.distill import Distiller  # noqa: E402
from mtkd.terms import AGGREGATIONS, KDConfig  # noqa: E402
from mtkd.models import create_student, create_teacher, list_students  # noqa: E402
from mtkd.precision import Precision, cpu_bf16_units  # noqa: E402
from mtkd.spec import get_task, list_tasks  # noqa: E402
from mtkd.specialists import create_ensemble, load_teacher, teacher_path  # noqa: E402


class Constant(torch.nn.Module):
    """A 'student' that returns fixed logits."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="B", choices=list_tasks())
    p.add_argument("--student_model", default="MobileNetV3", choices=list_students())
    p.add_argument("--aggregation", default="consensus", choices=AGGREGATIONS)
    p.add_argument("--student_amp", default="bf16", choices=("bf16", "fp16"))
    p.add_argument("--teacher_amp", default="off", choices=("off", "bf16"))
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--synthetic", action="store_true", help="random images of the task's shape")
    p.add_argument("--data_root", default="data")
    p.add_argument("--output_dir", default="runs")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    task, device = get_task(args.task), torch.device("cpu")
    if args.synthetic:
        images = torch.randint(0, 256, (args.batch_size, task.channels, task.image_size, task.image_size),
                               dtype=torch.uint8)
        labels = torch.randint(0, task.num_classes, (args.batch_size,))
    else:
        train = load_task_data(task, args.data_root).train
        images, labels = train.__getitems__(list(range(args.batch_size)))
    models, loaded = [], []
    for spec in task.teachers:
        path = teacher_path(args.output_dir, task, spec)
        models.append(load_teacher(spec, task, path)[0] if path.exists() else create_teacher(spec, task))
        loaded.append(path.exists())
    ensemble = create_ensemble(task, models)
    teacher_precision = Precision("fp32" if args.teacher_amp == "off" else "bf16")
    ensemble.set_precisions([teacher_precision] * len(models))
    student = create_student(args.student_model, task).eval()  # eval: BatchNorm uses its running statistics
    x = BatchTransform.for_task(task)(images, augment=True, generator=torch.Generator().manual_seed(args.seed))
    student_precision = Precision(args.student_amp)
    with torch.no_grad():
        with student_precision.autocast(device):
            logits = student(x)
        step = Distiller(Constant(logits), ensemble, KDConfig(alpha=0.5, temperature=2.0,
                                                              aggregation=args.aggregation)).eval()
        with student_precision.autocast(device):  # as engine.train_one_epoch runs the step
            online = step(x, labels)
            online_teachers = ensemble(x)
        outside = ensemble(x)  # as the cache builds its logits
        reference = step(x, labels, teacher_logits=outside)
        with student_precision.autocast(device):
            cached = step(x, labels, teacher_logits=[z.half().float() for z in outside])
    loss = online["loss"].item()
    print(json.dumps({
        "task": task.name, "student": args.student_model, "aggregation": args.aggregation,
        "student_amp": args.student_amp, "teacher_amp": args.teacher_amp, "teachers_loaded": all(loaded),
        "teacher_logits_max_abs_diff": max((a - b).abs().max().item() for a, b in zip(online_teachers, outside)),
        "loss_online": loss, "loss_abs_diff_vs_fp32": abs(loss - reference["loss"].item()),
        "loss_abs_diff_vs_cache": abs(loss - cached["loss"].item()),
        "cpu": platform.processor() or platform.machine(), "bf16_units": cpu_bf16_units(),
        "threads": torch.get_num_threads(), "torch": torch.__version__}, indent=1))


if __name__ == "__main__":
    main()

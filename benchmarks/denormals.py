"""What denormal weights cost on a CPU, and what flushing them to zero gives back.

Adam with L2 weight decay (mtkd's default optimiser) drives the weights of filters that stop
receiving gradient towards zero until they are denormal floats (below 1.2e-38): in Task A85's
resnet18 after 10 epochs, 96% of the last stage's convolution weights. x86 cores compute with those
on a slow path. ``mtkd.loop.resolve_device`` turns on ``torch.set_flush_denormal(True)`` for that.
This times fp32 training steps (forward and backward) and inference of one network with and
without the flush, on the weights of a checkpoint or on a fresh network whose weights are made
denormal in the same share:

    python benchmarks/denormals.py --architecture resnet18 --denormal 0.9
    python benchmarks/denormals.py --architecture resnet18 --checkpoint runs/TaskA85/teachers/others.pt
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mtkd.errors import UserError  # noqa: E402
from mtkd.models import create_model  # noqa: E402
from mtkd.precision import FP32, time_precision  # noqa: E402
from mtkd.report import print_error  # noqa: E402

TINY = torch.finfo(torch.float32).tiny  # the smallest normal float32


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--architecture", default="resnet18", help="a timm architecture mtkd builds")
    p.add_argument("--checkpoint", default=None, help="weights to start from (timm or mtkd format)")
    p.add_argument("--denormal", type=float, default=0.9,
                   help="without --checkpoint: the share of convolution weights made denormal")
    p.add_argument("--classes", type=int, default=85)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="timed steps (the best counts), after one warm-up")
    p.add_argument("--threads", type=int, default=1)
    return p


def make_denormal(model: torch.nn.Module, share: float, seed: int = 0) -> None:
    """Scale a random ``share`` of every convolution weight by 1e-40 (sign kept): denormal, as dead
    filters end up under Adam with L2 weight decay. Turns the flush off (it would make them zeros)."""
    torch.set_flush_denormal(False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                pick = torch.rand(m.weight.shape, generator=g) < share
                m.weight[pick] *= 1e-40


def denormal_share(model: torch.nn.Module) -> float:
    weights = [m.weight.detach().abs() for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    return sum(((w > 0) & (w < TINY)).sum().item() for w in weights) / sum(w.numel() for w in weights)


def main(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(False)  # as a checkpoint's denormals were written, whatever ran before
    torch.manual_seed(0)
    if args.checkpoint and not Path(args.checkpoint).is_file():
        raise UserError(f"--checkpoint {args.checkpoint} is not a file. Fix: give the path of a weights file.")
    model = create_model(args.architecture, args.classes, 3, 32, pretrained=args.checkpoint)
    if not args.checkpoint:
        make_denormal(model, args.denormal)
    x = torch.randn(args.batch_size, 3, 32, 32)
    print(f"{args.architecture}, {denormal_share(model):.1%} of convolution weights denormal, fp32, "
          f"batch {args.batch_size}, {args.threads} thread(s)")
    out = {}
    for flush in (False, True):
        torch.set_flush_denormal(flush)
        for train in (True, False):
            out[(flush, train)] = time_precision(model, x, FP32, train, steps=args.repeats)
            print(f"  flush denormals {'on ' if flush else 'off'}  {'train' if train else 'infer'}  "
                  f"{out[(flush, train)]:8.1f} images/s")
    return out


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except UserError as e:
        print_error(e)
        sys.exit(e.exit_code)

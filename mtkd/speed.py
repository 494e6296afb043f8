"""Size and speed of a model: parameters, checkpoint size, CPU latency, inference memory."""
from __future__ import annotations

import math
import multiprocessing as mp
import statistics
import time
from pathlib import Path

import torch
from torch import nn


def latency_ms(model: nn.Module, input_shape: tuple[int, ...], batch: int, repeats: int = 20,
               warmup: int = 3) -> float:
    """Median wall time of one forward pass at ``batch``, in milliseconds (CPU, inference mode)."""
    model = model.eval().cpu()
    x = torch.randn(batch, *input_shape)
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            model(x)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _peak_rss_child(build, input_shape, batch, queue):
    try:
        torch.set_num_threads(1)
        model = build().eval()
        x = torch.randn(batch, *input_shape)
        with torch.inference_mode():
            # Warm up at batch 1: lazy initialisation is not inference memory, and a
            # full-size pass would leave its memory in the allocator for the next one.
            model(x[:1])
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
            before = _status_kib("VmRSS")
            model(x)
        queue.put((_status_kib("VmHWM") - before) / 1024)
    except OSError:
        queue.put(math.nan)


def peak_inference_memory_mb(build, input_shape: tuple[int, ...], batch: int) -> float:
    """Peak resident memory added by one forward pass, in MiB (Linux; NaN elsewhere).

    Measured in a fresh process (``build`` must be picklable and return the
    model): after a batch-1 warm-up pass the kernel's peak-RSS counter is
    reset, and the number is how far the forward pass at ``batch`` pushes the
    peak above the resident memory it started from (weights and imports
    excluded).
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_rss_child, args=(build, input_shape, batch, queue))
    proc.start()
    proc.join(timeout=600)
    if proc.is_alive():
        proc.kill()
        proc.join()
    try:
        return queue.get(timeout=5) if proc.exitcode == 0 else math.nan
    except Exception:  # queue.Empty: the child died before reporting
        return math.nan


def file_size_mb(path: str | Path) -> float:
    return Path(path).stat().st_size / 2**20

"""Numeric precision and memory layout per device and model: ``--amp auto|off|bf16|fp16``.

A ``Precision`` is an autocast dtype (or none: fp32) and a memory layout
(NCHW, or channels_last, i.e. NHWC). ``resolve_precision`` turns ``--amp``
into one for a given model and role (training or inference):

* ``off``: fp32; channels_last on CUDA only (the reference path).
* ``bf16`` / ``fp16``: that autocast dtype, forced; channels_last on CUDA only.
* ``auto``:

  - CUDA: bf16 autocast where the GPU runs bf16 natively (Ampere and newer),
    else fp32; channels_last.
  - CPU: the candidates are fp32 in NCHW and in NHWC and, **only** on a CPU
    with bf16 units (x86 AMX or AVX512-BF16, Arm BF16), bf16 autocast in
    either layout. Each is timed on a few steps of the model itself at
    start-up (as ``cudnn.benchmark`` does for kernels), in the role it will
    run in; the fastest wins if it beats plain fp32 / NCHW by at least
    ``MIN_GAIN``. A CPU without bf16 units never gets bf16 (it would be
    emulated, several times slower).
  - with ``--deterministic`` nothing is timed (a timing must not decide the
    bits of a run): fp32, NCHW on the CPU; the CUDA rule above on a GPU.

The choice is printed and stored in the run's checkpoints and summary, the
student's and each teacher's. On resume the stored choices are kept
(``keep_saved``), unless ``--amp`` is given again (an explicit flag wins) or
the device cannot run them natively (another device type; bf16 saved on a
GPU, resumed on a CPU without bf16 units): then the rule above decides again,
and says why. Every ``auto`` choice on a CPU is also recorded per machine
(``PrecisionRecord``, beside the teacher checkpoints): a teacher's, so that
the next run on the same machine runs it, and finds its teacher cache, the
same way; the student's, so that the runs of a study on one machine do not
differ in precision by a near tie in the timing.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint import write_atomically
from .report import console

AMP_MODES = ("auto", "off", "bf16", "fp16")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MIN_GAIN = 1.05  # a candidate must be 5% faster than fp32 / NCHW to replace it
TIMED_STEPS = 3
# auto times its candidates in this many rounds of one step each, round robin, and keeps each one's best: a burst
# of load from another process (a test suite, a second run) then slows a round of every candidate instead of all
# of one candidate's steps (seen: bf16 timed at 11 images/s against 38 alone, and fp32 chosen).
TIMING_ROUNDS = 3
TIMING_BATCH = 64  # at most this many images per timed step


@dataclass(frozen=True)
class Precision:
    """An autocast dtype (``fp32`` = none) and a memory layout for one model."""

    dtype: str = "fp32"
    channels_last: bool = False

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose from {', '.join(DTYPES)}")

    def __str__(self) -> str:
        return f"{self.dtype}/{'NHWC' if self.channels_last else 'NCHW'}"

    @classmethod
    def parse(cls, text: str) -> "Precision":
        """The inverse of ``str``: ``'bf16/NHWC'`` -> ``Precision('bf16', True)``."""
        dtype, _, layout = text.partition("/")
        if layout not in ("NCHW", "NHWC"):
            raise ValueError(f"not a precision: {text!r}")
        return cls(dtype, layout == "NHWC")

    def autocast(self, device: torch.device | str):
        """``torch.autocast`` for bf16 / fp16; for fp32 autocast *off*, so that a model run in fp32 stays in
        fp32 inside a caller's autocast (a teacher inside the student's step, the loss after the student)."""
        device_type = device if isinstance(device, str) else device.type
        if self.dtype == "fp32":
            return torch.autocast(device_type, enabled=False)
        return torch.autocast(device_type, dtype=DTYPES[self.dtype])

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Put ``model``'s 4-d weights in this layout (in place; returns the model)."""
        return model.to(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def prepare_input(self, x: Tensor) -> Tensor:
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x


FP32 = Precision()


def _cpuinfo() -> str:
    """The text of ``/proc/cpuinfo``; empty where there is none."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _cpu_flags() -> set[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (``flags`` on x86, ``Features`` on Arm); empty elsewhere."""
    flags = set()
    for line in _cpuinfo().splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def cpu_bf16_units(flags: set[str] | None = None) -> str | None:
    """The name of the CPU's bf16 matrix / vector units (``amx_bf16``, ``avx512_bf16``, ``bf16``), or None.

    Asks PyTorch first (the units its kernels use), then the CPU's flags.
    """
    if flags is None:
        cpu = getattr(torch, "cpu", None)
        if cpu is not None and getattr(cpu, "_is_amx_tile_supported", lambda: False)():
            return "amx_bf16"
        if cpu is not None and getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
            return "avx512_bf16"
        flags = _cpu_flags()
    for name in ("amx_bf16", "avx512_bf16", "bf16"):  # x86 AMX, x86 AVX512-BF16, Arm BF16 (FEAT_BF16)
        if name in flags:
            return name
    return None


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name (``/proc/cpuinfo``'s ``model name``; the platform's processor elsewhere).

    With its x86 family and model where ``/proc/cpuinfo`` gives them: a virtual
    machine often names only the vendor's line ("AMD EPYC"), which is the same
    string for an AMD Zen 4 (family 25) and a Zen 5 (family 26).
    """
    fields = {}
    for line in (_cpuinfo() if cpuinfo is None else cpuinfo).splitlines():
        if not line.strip():  # the first processor's block is enough
            break
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    if "model name" in fields:
        name = fields["model name"]
        if "cpu family" in fields and "model" in fields:
            name += f" (family {fields['cpu family']}, model {fields['model']})"
        return name
    import platform

    return platform.processor() or platform.machine()


def device_model(device: torch.device) -> str:
    """What runs the models: the GPU's name, or the CPU's model and its bf16 units."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} (bf16 units: {cpu_bf16_units() or 'none'})"


def cuda_bf16(device: torch.device) -> bool:
    """Whether the GPU runs bf16 natively (compute capability 8.0 and newer), not by emulation."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # older torch without the argument
        return torch.cuda.get_device_capability(device)[0] >= 8


def runs_natively(precision: Precision, device: torch.device, bf16_units=cpu_bf16_units) -> bool:
    """Whether ``device`` has units for ``precision``'s dtype (fp32 always; no emulated bf16 / fp16)."""
    if precision.dtype == "fp32":
        return True
    if device.type == "cuda":
        return precision.dtype == "fp16" or cuda_bf16(device)
    return precision.dtype == "bf16" and bf16_units() is not None


@dataclass(frozen=True)
class SavedPrecisions:
    """What a resumed run's checkpoint says about precision: the student's, each teacher's (in the task's
    order), the device type they were chosen on (None in older checkpoints), and whether ``--amp`` was given
    again on the command line."""

    student: str | None = None
    teachers: tuple[str, ...] | None = None
    device: str | None = None
    amp_given: bool = False

    @classmethod
    def from_checkpoint(cls, state: dict | None, amp_given: bool) -> "SavedPrecisions":
        if state is None:
            return cls(amp_given=amp_given)
        teachers = state.get("teacher_precisions")
        return cls(state.get("precision"), tuple(teachers) if teachers else None, state.get("precision_device"),
                   amp_given)


NOT_SAVED = SavedPrecisions()


def keep_saved(saved: str | None, saved_precisions: SavedPrecisions, device: torch.device, who: str,
               bf16_units=cpu_bf16_units) -> tuple[Precision | None, str]:
    """A resumed run's stored precision ``saved`` (the student's or a teacher's), if it is to be kept:
    ``(precision, '')``; else ``(None, why)`` (empty when nothing was stored), and the ``--amp`` rule decides
    again."""
    if not saved:
        return None, ""
    precision = Precision.parse(saved)
    saved_device = saved_precisions.device
    if saved_precisions.amp_given:
        return None, f"{who}: --amp given again, so its rule replaces the saved precision {saved}"
    if saved_device is not None and saved_device != device.type:
        return None, (f"{who}: the saved precision {saved} was chosen on {saved_device}, the run now continues on "
                      f"{device.type}; the --amp rule chooses again")
    if not runs_natively(precision, device, bf16_units):
        return None, (f"{who}: the saved precision {saved} would be emulated on this {device.type} (no "
                      f"{precision.dtype} units); the --amp rule chooses again")
    return precision, ""


def candidates(device: torch.device, bf16_units: str | None) -> list[Precision]:
    """What ``--amp auto`` times on a CPU (the first one is the reference)."""
    out = [Precision("fp32", False), Precision("fp32", True)]
    if bf16_units:
        out += [Precision("bf16", True), Precision("bf16", False)]
    return out


def time_precision(model: nn.Module, example: Tensor, precision: Precision, train: bool,
                   steps: int = TIMED_STEPS) -> float:
    """Images per second of ``model`` (a copy of it is run) on ``example`` under ``precision``.

    Training times forward + backward; inference a forward under ``inference_mode``.
    The global random state is left as it was (dropout draws from it).
    """
    trial = precision.prepare_model(copy.deepcopy(model))
    trial.train(train)
    trial.requires_grad_(train)
    x = precision.prepare_input(example)
    device = example.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        best = 0.0
        for i in range(steps + 1):  # the first step warms up (allocations, kernel selection)
            start = time.perf_counter()
            if train:
                with precision.autocast(device):
                    out = trial(x)
                out.float().logsumexp(1).mean().backward()
                trial.zero_grad(set_to_none=True)
            else:
                with torch.inference_mode(), precision.autocast(device):
                    trial(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:
                best = max(best, len(x) / (time.perf_counter() - start))
    return best


def resolve_precision(amp: str, device: torch.device, model: nn.Module | None = None,
                      example: Tensor | None = None, train: bool = True, deterministic: bool = False,
                      timer=time_precision, bf16_units=cpu_bf16_units) -> tuple[Precision, dict[str, float]]:
    """``--amp`` -> the ``Precision`` for ``model`` in its role, and the images/s measured (if any).

    ``model`` and ``example`` (a batch on ``device``) are needed for ``auto`` on
    the CPU, where the candidates are timed (``TIMING_ROUNDS`` rounds of one step each, round robin, each
    candidate's best kept). ``timer`` and ``bf16_units`` are injectable for tests.
    """
    if amp not in AMP_MODES:
        raise ValueError(f"unknown --amp {amp!r}; choose from {', '.join(AMP_MODES)}")
    cuda = device.type == "cuda"
    if amp != "auto":
        return Precision("fp32" if amp == "off" else amp, cuda), {}
    if cuda:
        return Precision("bf16" if cuda_bf16(device) else "fp32", True), {}
    if deterministic or model is None or example is None:
        return FP32, {}
    options = candidates(device, bf16_units())
    example = example[:TIMING_BATCH]
    speeds = {str(p): 0.0 for p in options}
    for _ in range(TIMING_ROUNDS):
        for p in options:
            speeds[str(p)] = max(speeds[str(p)], timer(model, example, p, train, steps=1))
    reference = speeds[str(options[0])]
    best = max(options, key=lambda p: speeds[str(p)])
    chosen = best if speeds[str(best)] >= MIN_GAIN * reference else options[0]
    return chosen, speeds


class MachineRecord:
    """Values found on one machine (device, CPU or GPU model, torch version), kept in a JSON file
    ``{machine: {name: {**identity, **values}}}`` beside what other machines found. An entry is found again
    only for the same ``name`` and ``identity`` (e.g. the weights a teacher was loaded from)."""

    def __init__(self, path: Path, device: torch.device):
        self.path, self.machine = Path(path), f"{device.type} | {device_model(device)} | torch {torch.__version__}"
        table = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.known: dict = table.get(self.machine, {})

    def entry(self, name: str, identity: dict) -> dict | None:
        entry = self.known.get(name)
        if entry and {k: entry.get(k) for k in identity} == identity:
            return entry
        return None

    def put_entry(self, name: str, identity: dict, values: dict) -> None:
        """Record ``values``, written at once (atomically) with the other machines' entries as they are."""
        self.known[name] = {**identity, **values}
        table = json.loads(self.path.read_text()) if self.path.exists() else {}
        table[self.machine] = self.known
        write_atomically(self.path, lambda tmp: tmp.write_text(json.dumps(table, indent=1)))


class PrecisionRecord(MachineRecord):
    """``--amp auto``'s choices on one machine: ``{machine: {model: {**identity, "precision": str}}}``; a choice
    is found again only for the same model name and ``identity`` (the weights a teacher was loaded from, the
    student's architecture and batch)."""

    def get(self, name: str, identity: dict) -> Precision | None:
        entry = self.entry(name, identity)
        return Precision.parse(entry["precision"]) if entry else None

    def put(self, name: str, identity: dict, precision: Precision) -> None:
        self.put_entry(name, identity, {"precision": str(precision)})


def recorded_choice(record: PrecisionRecord, name: str, identity: dict, amp: str, deterministic: bool,
                    choose, role: str) -> Precision:
    """Under ``--amp auto`` (not ``--deterministic``), ``record``'s choice for ``name`` / ``identity``, or
    ``choose()``'s, then recorded; otherwise ``choose()`` (the ``--amp`` rule itself)."""
    if amp != "auto" or deterministic:
        return choose()
    kept = record.get(name, identity)
    if kept is not None:
        console.print(f"[bold]Precision[/] {role}: {kept} (--amp auto, as recorded for this machine in "
                      f"{record.path})", soft_wrap=True)
        return kept
    kept = choose()
    record.put(name, identity, kept)
    return kept

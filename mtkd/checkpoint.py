"""Checkpoints: the one place their format lives. Atomic writes, safe loads (``weights_only=True``),
the keys of each kind, and ``CheckpointSaver`` for a student run's best / top-k / last files."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import UserError


def write_atomically(path: str | Path, write) -> Path:
    """Make ``path`` with ``write(tmp)`` on a temporary file beside it, then a rename: a crash or error
    mid-write leaves the previous file intact, never a truncated one, and no temporary behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())

    return write_atomically(path, write)


def link_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Make ``dst`` the same file as ``src`` (a hard link; a copy where the file system has none), atomically.

    Checkpoints are only ever replaced by ``os.replace``, never written in place, so a later write to
    either name leaves the other one holding what it held.
    """
    def write(tmp: Path) -> None:
        tmp.unlink()  # os.link makes its target
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)

    return write_atomically(dst, write)


def load_checkpoint(path: str | Path, required: tuple[str, ...] = ("model",)) -> dict:
    """Load a checkpoint onto the CPU without running any pickled code.

    ``weights_only=True`` refuses anything but tensors and plain containers,
    so a checkpoint crafted to execute code on load is rejected.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}. Fix: check the path, or train first with train.py.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(
            f"cannot load checkpoint {path}: it is corrupt, truncated, or holds more than weights "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            "Fix: use a checkpoint written by mtkd, or retrain."
        ) from None
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        raise UserError(f"checkpoint {path} is not an mtkd checkpoint (missing {missing}).")
    return state


def load_weights_file(path: str | Path, who: str) -> tuple[dict, dict | None]:
    """A teacher's weights: ``(state_dict, mtkd checkpoint or None)``.

    ``path`` is an mtkd teacher checkpoint, a plain state dict saved with
    ``torch.save`` (a dict of tensors), a ``.safetensors`` file (the format
    weights are shared in), or an mtkd student checkpoint (a teacher assistant;
    its weights, taken as trained elsewhere). Anything else is one ``UserError``
    naming ``who``.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{who}: checkpoint {path} not found. Fix: check the path in the task file.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu"), None
        except Exception as e:
            raise UserError(f"{who}: cannot read {path} as safetensors ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}). Fix: re-export the weights.") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{who}: cannot load {path}: it is corrupt, truncated, or holds more than weights "
                        f"({type(e).__name__}). Fix: save the model's state_dict() with torch.save, or as "
                        ".safetensors.") from None
    if isinstance(state, dict) and all(k in state for k in FOR_TEACHER):
        return state["model"], state
    if isinstance(state, dict) and all(k in state for k in FOR_STUDENT):  # a student teaching (an assistant)
        return state["model"], None
    if isinstance(state, dict) and state and all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        return state, None
    raise UserError(f"{who}: {path} is neither an mtkd teacher checkpoint nor a state dict (a dict of tensors). "
                    "Fix: save model.state_dict() with torch.save, or as .safetensors.")


CHECKPOINT_VERSION = 1

# The keys of each kind of checkpoint, written by CheckpointSaver / specialists.train_teacher.
STUDENT_KEYS = ("model", "distiller", "optimizer", "scheduler", "scaler", "epoch", "val_acc", "best_val_acc",
                "best_epoch", "rng", "args", "task", "student_model", "class_names", "precision",
                "teacher_precisions", "precision_device", "init", "image_size", "version")
TEACHER_KEYS = ("model", "architecture", "classes", "dustbin", "task", "metrics", "epochs", "recipe", "input", "init",
                "pretrained_layout", "training", "version")
# What each reader needs (older checkpoints may lack the rest).
FOR_RESUME = ("model", "optimizer", "scheduler", "epoch", "rng")
FOR_STUDENT = ("model", "student_model", "class_names", "task")  # evaluation, export
FOR_TEACHER = ("model", "architecture", "classes", "metrics")


def student_checkpoint(**fields) -> dict:
    """A student checkpoint: exactly ``STUDENT_KEYS`` (``version`` is added); a missing or unknown key raises."""
    fields = {**fields, "version": CHECKPOINT_VERSION}
    missing, unknown = set(STUDENT_KEYS) - set(fields), set(fields) - set(STUDENT_KEYS)
    if missing or unknown:
        raise ValueError(f"a student checkpoint has keys {STUDENT_KEYS}; missing {sorted(missing)}, "
                         f"unknown {sorted(unknown)}")
    return {k: fields[k] for k in STUDENT_KEYS}


class CheckpointSaver:
    """A student run's checkpoints: ``best.pt`` (best validation accuracy), ``last.pt`` (every epoch) and,
    with ``top_k > 1``, the k best epochs as ``top/epoch_N.pt`` with ``top/index.json``."""

    def __init__(self, run_dir: str | Path, top_k: int = 1):
        self.run_dir, self.top_k = Path(run_dir), top_k

    def save(self, state: dict, is_best: bool) -> None:
        """Write this epoch's files, best first so that a crash before ``last.pt`` redoes the epoch on resume.
        The epoch's state is written once; its other names are hard links to that file (a ResNet18 state
        with its optimiser is about 130 MB)."""
        missing = [k for k in STUDENT_KEYS if k not in state]
        if missing:
            raise ValueError(f"a student checkpoint needs {missing}")
        written = save_checkpoint(state, self.run_dir / "best.pt") if is_best else None
        if state["val_acc"] is not None:  # None: an epoch without validation (--eval_every)
            written = self._keep_top_k(state, state["epoch"], state["val_acc"], written) or written
        self._write(state, self.run_dir / "last.pt", written)

    @staticmethod
    def _write(state: dict, path: Path, written: Path | None) -> Path:
        """``state`` at ``path``: a link to ``written`` (this epoch's file already on disk), else a new file."""
        return save_checkpoint(state, path) if written is None else link_checkpoint(written, path)

    def _keep_top_k(self, state: dict, epoch: int, val_acc: float, written: Path | None) -> Path | None:
        """Keep the k best epochs (ties: the earlier epoch); a resumed run redoes later epochs.
        Returns this epoch's file when it is kept (a link to ``written`` when that holds the same state)."""
        if self.top_k <= 1:
            return None
        top = self.run_dir / "top"
        top.mkdir(exist_ok=True)
        kept = json.loads((top / "index.json").read_text()) if (top / "index.json").exists() else []
        kept = [e for e in kept if e["epoch"] < epoch]
        kept.append({"epoch": epoch, "val_acc": val_acc})
        kept.sort(key=lambda e: (-e["val_acc"], e["epoch"]))
        path = None
        if any(e["epoch"] == epoch for e in kept[:self.top_k]):
            path = self._write(state, top / f"epoch_{epoch:03d}.pt", written)
        for e in kept[self.top_k:]:
            (top / f"epoch_{e['epoch']:03d}.pt").unlink(missing_ok=True)
        (top / "index.json").write_text(json.dumps(kept[:self.top_k], indent=1))
        return path

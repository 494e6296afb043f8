"""Checkpoints: atomic writes and safe loads (``weights_only=True``)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .errors import UserError


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically: a temporary file, then a rename.

    A crash mid-write leaves the previous file intact, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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

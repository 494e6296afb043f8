"""Teacher-output cache: the teachers' logits on K fixed augmented views of every training image.

A sweep over alpha, temperature, student or seed pays for the teachers once.
The cache stores, per view ``v`` and training image ``i``, the augmentation
parameters (crop offsets, flip) and each teacher's logits (fp16); for
``--embedding_weight``, each teacher's pooled features too (fp16, a file of its
own key). Student epoch
``e`` (counting from 1) replays view ``(e - 1) mod K``: the student sees
exactly the pixels the teachers saw (consistent teaching, Beyer et al., CVPR
2022; FKD, Shen & Xing, ECCV 2022).

The file name is a hash of everything the logits depend on: the teachers'
weights, classes and inputs, the training images (not their labels, so runs
that keep different labels share it), the augmentation settings and K. A
checksum over the stored tensors detects corruption; a corrupt, partial or
mismatched file is rebuilt, never used.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .checkpoint import save_checkpoint
from .data import BatchTransform, FileImageDataset, ImageTensorDataset, create_loader, hash_tensor
from .report import console, step_progress
from .teachers import TeacherEnsemble

CACHE_VERSION = 3  # 2: the key records each teacher's precision and the device type; 3: its input, not labels
EVAL_VERSION = 1  # of the files of teacher logits on un-augmented images (``teacher_logits``)
VIEW_SEED = 0  # views do not depend on the run's --seed, so every run of a sweep shares them


def _hash_teachers(h, ensemble: TeacherEnsemble) -> None:
    """Feed the teachers' weights, classes, inputs and precisions (dtype) into the hashlib object ``h``."""
    for teacher, ids, precision, inputs in zip(ensemble.teachers, ensemble.class_ids, ensemble.precisions,
                                               ensemble.inputs):
        # The dtype, not the memory layout: NCHW and NHWC give the same fp16-stored logits, and --amp auto's
        # timed choice of layout may differ from one run to the next.
        h.update(f"precision={precision.dtype} input={inputs!r}".encode())
        hash_tensor(h, ids)
        for name, t in teacher.state_dict().items():
            h.update(name.encode())
            hash_tensor(h, t)


def cache_key(ensemble: TeacherEnsemble, dataset: ImageTensorDataset | FileImageDataset,
              transform: BatchTransform, num_views: int, embeddings: bool = False) -> str:
    """sha256 over the teachers' weights, classes, inputs and precisions (dtype), the device type they run on, the
    images (pixels, or files' paths, sizes and modification times), augmentation, K and whether the teachers'
    pooled features are kept too."""
    device = ensemble.weights.device.type
    h = hashlib.sha256(f"mtkd-teacher-cache v{CACHE_VERSION} views={num_views} seed={VIEW_SEED} "
                       f"device={device}".encode())
    _hash_teachers(h, ensemble)
    dataset.fingerprint(h)
    h.update(f"pad={transform.crop_padding} flip={transform.hflip}".encode())
    if transform.cutout:  # keys of caches without Cutout stay as they were
        h.update(f" cutout={transform.cutout}".encode())
    if embeddings:  # and those of caches of logits only
        h.update(b" embeddings")
    hash_tensor(h, transform.mean.float())
    hash_tensor(h, transform.std.float())
    return h.hexdigest()


def _checksum(tensors: dict[str, Tensor | list[Tensor]]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        for t in tensors[name] if isinstance(tensors[name], list) else [tensors[name]]:
            h.update(name.encode())
            hash_tensor(h, t)
    return h.hexdigest()


class CacheError(Exception):
    """The cache file cannot be used (corrupt, partial, or for other teachers or data)."""


def _read_state(path: Path, version: int, key: str, mismatch: str) -> dict:
    """A cache file's contents, if it loads and is of this ``version`` and ``key``; else ``CacheError``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CacheError(f"unreadable ({type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("version") != version or state.get("key") != key:
        raise CacheError(mismatch)
    return state


class TeacherCache:
    """``logits[k]``: ``(K, N, C_k)`` fp16; ``dy``, ``dx``: ``(K, N)``; ``flip``: ``(K, N)`` bool;
    ``embeddings[k]`` (or None): ``(K, N, D_k)`` fp16, teacher ``k``'s pooled features."""

    def __init__(self, key: str, logits: list[Tensor], dy: Tensor, dx: Tensor, flip: Tensor,
                 embeddings: list[Tensor] | None = None):
        self.key, self.logits, self.dy, self.dx, self.flip = key, logits, dy, dx, flip
        self.embeddings = embeddings

    @property
    def num_views(self) -> int:
        return self.dy.shape[0]

    def tensors(self) -> dict:
        extra = {"embeddings": self.embeddings} if self.embeddings is not None else {}
        return {"logits": self.logits, "dy": self.dy, "dx": self.dx, "flip": self.flip, **extra}

    @classmethod
    @torch.no_grad()
    def build(cls, key: str, ensemble: TeacherEnsemble, dataset: ImageTensorDataset, transform: BatchTransform,
              num_views: int, device: torch.device, batch_size: int = 512,
              embeddings: bool = False) -> "TeacherCache":
        """Run every teacher once on each of ``num_views`` augmented views of the whole dataset (keeping their
        pooled features too with ``embeddings``).

        ``key`` is ``cache_key`` of these arguments (computed once, by the caller).
        """
        n = len(dataset)
        gen = torch.Generator().manual_seed(VIEW_SEED)
        logits = [torch.empty(num_views, n, c, dtype=torch.float16) for c in ensemble.output_sizes]
        embeds = ([torch.empty(num_views, n, d, dtype=torch.float16) for d in ensemble.embedding_sizes]
                  if embeddings else None)
        params = {k: [] for k in ("dy", "dx", "flip")}
        teachers = len(ensemble.teachers)
        console.print(f"[bold]Teacher cache[/]: computing {num_views} views x {n:,} images x {teachers} teachers "
                      f"= {num_views * n * teachers:,} teacher forward passes", soft_wrap=True)
        with step_progress("teacher cache", num_views * n, "images") as advance:
            for v in range(num_views):
                view = transform.sample(n, gen)
                for k in params:
                    params[k].append(view[k])
                for start in range(0, n, batch_size):
                    sl = slice(start, start + batch_size)
                    images, _ = dataset.__getitems__(range(start, min(start + batch_size, n)))
                    x = transform(images.to(device), augment=True,
                                  params={k: t[sl] for k, t in view.items()})
                    z_all, _, h_all = ensemble.outputs(x, embeddings=embeddings)
                    for k, z in enumerate(z_all):
                        logits[k][v, sl] = z.to("cpu", torch.float16)
                    for k, h in enumerate(h_all or []):
                        embeds[k][v, sl] = h.to("cpu", torch.float16)
                    advance(len(images))
        return cls(key, logits,
                   torch.stack(params["dy"]).to(torch.int16), torch.stack(params["dx"]).to(torch.int16),
                   torch.stack(params["flip"]), embeds)

    def save(self, path: Path) -> None:
        tensors = self.tensors()
        save_checkpoint({"version": CACHE_VERSION, "key": self.key, "checksum": _checksum(tensors), **tensors}, path)

    @classmethod
    def load(cls, path: Path, key: str, num_views: int, num_images: int, sizes: list[int],
             embedding_sizes: list[int] | None = None) -> "TeacherCache":
        """Load and verify a cache file (with ``embedding_sizes``, one that keeps the teachers' pooled features
        too); raise ``CacheError`` saying what is wrong."""
        state = _read_state(path, CACHE_VERSION, key, "written for other teachers, data or settings")
        try:
            embeds = None if embedding_sizes is None else list(state["embeddings"])
            cache = cls(key, list(state["logits"]), state["dy"], state["dx"], state["flip"], embeds)
            ok = ([tuple(z.shape) for z in cache.logits] == [(num_views, num_images, c) for c in sizes]
                  and all(tuple(t.shape) == (num_views, num_images) for t in (cache.dy, cache.dx, cache.flip))
                  and (embeds is None or [tuple(h.shape) for h in embeds]
                       == [(num_views, num_images, d) for d in embedding_sizes]))
        except (KeyError, TypeError, AttributeError):
            raise CacheError("incomplete") from None
        if not ok:
            raise CacheError("tensors of the wrong shape")
        if _checksum(cache.tensors()) != state.get("checksum"):
            raise CacheError("checksum mismatch")
        return cache


def cache_path(cache_dir: str | Path, task_name: str, key: str, kind: str = "") -> Path:
    """Where the file of ``key`` lives in ``cache_dir``: the cache (``cache_key``), or with ``kind`` "eval" the
    teacher logits on plain images (``eval_key``)."""
    return Path(cache_dir) / f"Task{task_name}-{kind + '-' if kind else ''}{key[:16]}.pt"


def open_teacher_cache(cache_dir: str | Path, task_name: str, ensemble: TeacherEnsemble,
                       dataset: ImageTensorDataset, transform: BatchTransform, num_views: int,
                       device: torch.device, embeddings: bool = False) -> tuple[TeacherCache, Path, str]:
    """Load the matching cache from ``cache_dir``, or build and save it (with ``embeddings``, one that keeps
    the teachers' pooled features too); returns it, its path, and ``'reused'``, ``'built'`` or
    ``'rebuilt (reason)'``."""
    key = cache_key(ensemble, dataset, transform, num_views, embeddings)
    path = cache_path(cache_dir, task_name, key)
    sizes = ensemble.output_sizes
    embedding_sizes = ensemble.embedding_sizes if embeddings else None
    status = "built"
    if path.exists():
        try:
            return TeacherCache.load(path, key, num_views, len(dataset), sizes, embedding_sizes), path, "reused"
        except CacheError as e:
            console.print(f"[yellow]teacher cache {path} is not usable ({e}); rebuilding it[/]", soft_wrap=True)
            status = f"rebuilt ({e})"
    cache = TeacherCache.build(key, ensemble, dataset, transform, num_views, device, embeddings=embeddings)
    cache.save(path)
    return cache, path, status


def eval_key(ensemble: TeacherEnsemble, dataset: ImageTensorDataset | FileImageDataset,
             transform: BatchTransform) -> str:
    """sha256 over what the teachers' logits on the un-augmented ``dataset`` depend on: the teachers (as in
    ``cache_key``), the device type, the images and the normalisation."""
    h = hashlib.sha256(f"mtkd-eval-logits v{EVAL_VERSION} device={ensemble.weights.device.type}".encode())
    _hash_teachers(h, ensemble)
    dataset.fingerprint(h)
    hash_tensor(h, transform.mean.float())
    hash_tensor(h, transform.std.float())
    return h.hexdigest()


def _load_eval_logits(path: Path, key: str, num_images: int, sizes: list[int]) -> list[Tensor]:
    """Load and verify a file of ``teacher_logits``; raise ``CacheError`` saying what is wrong."""
    state = _read_state(path, EVAL_VERSION, key, "written for other teachers or data")
    logits = state.get("logits")
    if not isinstance(logits, list) or [tuple(getattr(z, "shape", ())) for z in logits] != \
            [(num_images, c) for c in sizes]:
        raise CacheError("tensors of the wrong shape")
    if _checksum({"logits": logits}) != state.get("checksum"):
        raise CacheError("checksum mismatch")
    return logits


@torch.no_grad()
def teacher_logits(ensemble: TeacherEnsemble, datasets: dict, transform: BatchTransform, device: torch.device,
                   cache_dir: str | Path | None = None, task_name: str = "",
                   batch_size: int = 512) -> dict[str, list[Tensor]]:
    """``{name: [logits of teacher k, (N, C_k) fp32 on the CPU]}`` on each un-augmented dataset of ``datasets``.

    With ``cache_dir`` (``--teacher_cache``) each dataset's logits are kept there
    (``Task<X>-eval-<key>.pt``, key ``eval_key``) and read back by every later
    run of the same teachers on the same images: the run reports' teacher
    ensemble rows are then free. One progress bar covers what is computed.
    """
    sizes = ensemble.output_sizes
    out, todo = {}, {}
    for name, dataset in datasets.items():
        path = key = None
        if cache_dir is not None:
            key = eval_key(ensemble, dataset, transform)
            path = cache_path(cache_dir, task_name, key, "eval")
            if path.exists():
                try:
                    out[name] = _load_eval_logits(path, key, len(dataset), sizes)
                    continue
                except CacheError as e:
                    console.print(f"[yellow]teacher logits {path} are not usable ({e}); recomputing them[/]",
                                  soft_wrap=True)
        todo[name] = dataset, path, key
    if todo:
        with step_progress("teacher ensemble", sum(len(d) for d, _, _ in todo.values())) as advance:
            for name, (dataset, path, key) in todo.items():
                parts = [[torch.empty(0, c)] for c in sizes]
                for images, _ in create_loader(dataset, batch_size, train=False):
                    for k, z in enumerate(ensemble(transform(images.to(device)))):
                        parts[k].append(z.cpu())
                    advance(len(images))
                out[name] = [torch.cat(p) for p in parts]
                if path is not None:
                    save_checkpoint({"version": EVAL_VERSION, "key": key, "logits": out[name],
                                     "checksum": _checksum({"logits": out[name]})}, path)
    return {name: out[name] for name in datasets}


class CachedViews(Dataset):
    """The training set with its cached views: batches are ``(images, labels, extras)``.

    ``extras`` holds the view's augmentation parameters (``aug``), the
    teachers' logits on it (``teacher_logits``) and, where the cache keeps
    them, their pooled features (``teacher_embeddings``); ``set_epoch(e)``
    picks view ``(e - 1) mod K``.
    """

    def __init__(self, dataset: ImageTensorDataset, cache: TeacherCache):
        self.dataset, self.cache, self.view = dataset, cache, 0

    def set_epoch(self, epoch: int) -> None:
        self.view = (epoch - 1) % self.cache.num_views

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, indices):
        idx = torch.as_tensor(indices, dtype=torch.long)
        c, v = self.cache, self.view
        aug = {"dy": c.dy[v, idx], "dx": c.dx[v, idx], "flip": c.flip[v, idx]}
        images, labels = self.dataset.__getitems__(idx)
        extras = {"aug": aug, "teacher_logits": [z[v, idx] for z in c.logits]}
        if c.embeddings is not None:
            extras["teacher_embeddings"] = [h[v, idx] for h in c.embeddings]
        return images, labels, extras

    def __getitem__(self, i):
        return self.__getitems__([i])

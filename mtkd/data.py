"""Datasets: sources, class subsets, deterministic splits, loaders, batched augmentation.

Small datasets (digits, CIFAR) are held in memory as one ``uint8`` tensor of
shape ``(N, C, H, W)``. A ``DataLoader`` hands out whole batches of it (the
dataset implements ``__getitems__``), and augmentation runs on the batch, on the
training device, with tensor ops: no per-sample PIL round trips.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from PIL import Image, UnidentifiedImageError
from torchvision.datasets import CIFAR100
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from .errors import UserError
from .registry import Registry
from .spec import TaskSpec

SPLITS = ("train", "val", "test")
UNLABELLED = -1  # the label of a training image used without one (--label_fraction, a task's unlabelled folder)
# What PIL raises on a file that is not a readable image (truncated, wrong format, bad header).
READ_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError)


class ImageTensorDataset(Dataset):
    """Images as one ``uint8`` tensor ``(N, C, H, W)`` with ``int64`` labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]

    def __getitems__(self, indices):
        # DataLoader calls this with a whole batch of indices: one gather, not B.
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.images[idx], self.labels[idx]

    def select_classes(self, class_ids: list[int]) -> "ImageTensorDataset":
        """The samples of ``class_ids``, relabelled to their position in that list."""
        keep, local = _relabel(self.labels, class_ids)
        return ImageTensorDataset(self.images[keep], local[keep])

    def subset(self, idx) -> "ImageTensorDataset":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return ImageTensorDataset(self.images[idx], self.labels[idx])

    def with_labels(self, labels: torch.Tensor) -> "ImageTensorDataset":
        return ImageTensorDataset(self.images, labels)

    def fingerprint(self, h) -> None:
        """Feed the images (not the labels: the teachers never see them) into the hash ``h`` (cache key)."""
        hash_tensor(h, self.images)


def hash_tensor(h, t: torch.Tensor) -> None:
    """Feed a tensor's dtype, shape and bytes into the hashlib object ``h``."""
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    t = t.detach().cpu().contiguous().reshape(-1)
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _relabel(labels: torch.Tensor, class_ids: list[int]):
    lookup = torch.full((max(int(labels.max()) if len(labels) else 0, max(class_ids)) + 1,), -1, dtype=torch.long)
    lookup[torch.as_tensor(class_ids)] = torch.arange(len(class_ids))
    local = torch.where(labels >= 0, lookup[labels.clamp_min(0)], UNLABELLED)  # unlabelled images are left out
    return local >= 0, local


def with_others(dataset, class_ids: list[int], seed: int):
    """A dustbin teacher's images (``ImageTensorDataset`` or ``FileImageDataset``): those of ``class_ids``,
    relabelled to their position in that list, and as many labelled images of the other classes (a seeded
    sample; all of them if fewer) labelled ``len(class_ids)``, "other" (Hinton et al. 2015 train each
    specialist on data half of which is its own)."""
    mine, local = _relabel(dataset.labels, class_ids)
    own = torch.nonzero(mine).squeeze(1)
    others = torch.nonzero(~mine & (dataset.labels >= 0)).squeeze(1)
    others = others[torch.randperm(len(others), generator=torch.Generator().manual_seed(seed))[:len(own)]]
    idx = torch.cat([own, others]).sort().values
    local = torch.where(mine, local, len(class_ids))
    return dataset.subset(idx).with_labels(local[idx])


class FileImageDataset(Dataset):
    """Image files decoded on access, for image folders too large to hold in memory.

    Batches have the in-memory dataset's form (``uint8 (B, C, S, S)``, labels),
    so the same batched augmentation follows; decoding runs in DataLoader
    workers (``--num_workers``), with pinned memory and persistent workers.
    """

    def __init__(self, paths: list[str], labels: torch.Tensor, channels: int, size: int):
        self.paths, self.labels = list(paths), labels.long()
        self.channels, self.size = channels, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        return torch.from_numpy(self._read(self.paths[i])), self.labels[i]

    def __getitems__(self, indices):
        idx = [int(i) for i in indices]
        return torch.from_numpy(np.stack([self._read(self.paths[i]) for i in idx])), self.labels[idx]

    def _read(self, path: str) -> np.ndarray:
        try:
            return read_image(path, self.channels, self.size)
        except READ_ERRORS as e:
            raise UserError(f"cannot decode {path} ({type(e).__name__}: {e}), although it passed the check "
                            "when the task was loaded. Fix: remove or replace the file.") from None

    def select_classes(self, class_ids: list[int]) -> "FileImageDataset":
        keep, local = _relabel(self.labels, class_ids)
        return FileImageDataset([p for p, k in zip(self.paths, keep.tolist()) if k], local[keep],
                                self.channels, self.size)

    def subset(self, idx) -> "FileImageDataset":
        idx = [int(i) for i in idx]
        return FileImageDataset([self.paths[i] for i in idx], self.labels[idx], self.channels, self.size)

    def with_labels(self, labels: torch.Tensor) -> "FileImageDataset":
        return FileImageDataset(self.paths, labels, self.channels, self.size)

    def fingerprint(self, h) -> None:
        h.update(f"files {self.channels} {self.size}".encode())
        for path in self.paths:
            st = Path(path).stat()
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())


def count_labelled(dataset) -> tuple[int, int]:
    """``(labelled, unlabelled)`` images in ``dataset`` (unlabelled ones have label -1)."""
    labelled = int((dataset.labels >= 0).sum())
    return labelled, len(dataset) - labelled


def keep_labels(dataset, fraction: float, seed: int):
    """``dataset`` with the labels of a stratified, seeded ``fraction`` of its labelled images kept and the
    others set to -1 (used without a label). Images and their order do not change. When fewer images are to
    lose their label than there are classes (a fraction close to 1), they are a seeded random choice."""
    labels = dataset.labels.clone()
    labelled = torch.nonzero(labels >= 0).squeeze(1).numpy()
    if fraction >= 1 or len(labelled) == 0:
        return dataset
    classes = len(np.unique(labels[labelled].numpy()))
    keep_n = int(round(fraction * len(labelled)))
    if keep_n < classes:
        raise UserError(f"--label_fraction {fraction} keeps {keep_n} of {len(labelled)} labelled training images, "
                        f"fewer than the {classes} classes. Fix: raise --label_fraction to at least "
                        f"{classes / len(labelled):.3g}.")
    drop_n = len(labelled) - keep_n
    if drop_n >= classes:
        _, kept = stratified_split(labels[labelled].numpy(), keep_n, seed)
        drop = np.setdiff1d(np.arange(len(labelled)), kept)
    else:  # fewer images to drop than classes: no stratified choice exists, so a seeded random one
        drop = np.random.default_rng(seed).choice(len(labelled), drop_n, replace=False)
    if drop_n > 0:
        labels[torch.from_numpy(labelled[drop])] = UNLABELLED
    return dataset.with_labels(labels)


def labelled_only(dataset):
    """The images of ``dataset`` that have a label."""
    if bool((dataset.labels >= 0).all()):
        return dataset
    return dataset.subset(torch.nonzero(dataset.labels >= 0).squeeze(1))


def concat(first, second):
    """Two datasets of the same kind (in memory, or files) as one, ``first``'s samples first."""
    if isinstance(first, FileImageDataset):
        return FileImageDataset(first.paths + second.paths, torch.cat([first.labels, second.labels]),
                                first.channels, first.size)
    return ImageTensorDataset(torch.cat([first.images, second.images]), torch.cat([first.labels, second.labels]))


def _batch_collate(batch):
    # __getitems__ already returns a stacked batch.
    return batch


def create_loader(dataset: Dataset, batch_size: int, *, train: bool, seed: int = 0,
                  generator: torch.Generator | None = None, num_workers: int = 0, pin_memory: bool = False,
                  sampler=None) -> DataLoader:
    """A DataLoader over ``dataset``; shuffled by ``generator`` (or one seeded with ``seed``) when training.

    ``num_workers`` > 0 moves the batch gathering to worker processes (useful
    for datasets that read from disk); for in-memory data 0 is fastest.
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        drop_last=False,
        generator=generator,
        collate_fn=_batch_collate,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )


class BatchTransform(nn.Module):
    """uint8 batch -> normalised float batch, with random crop / flip (and Cutout) when training.

    Random crop: pad every image by ``crop_padding`` pixels (zeros) and cut out
    an ``H x W`` window at an offset drawn per image. Flip: mirror a random half
    of the batch left-right. Cutout (DeVries & Taylor, 2017; ``cutout`` > 0):
    after crop and flip, a ``cutout x cutout`` square centred on a pixel drawn
    per image, clipped at the borders, is set to the dataset mean (0 once
    normalised). All run as gathers and masks on the batch's device.
    """

    def __init__(self, mean, std, crop_padding: int = 0, hflip: bool = False, cutout: int = 0):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.crop_padding = crop_padding
        self.hflip = hflip
        self.cutout = cutout

    @classmethod
    def for_task(cls, spec: TaskSpec, cutout: int = 0) -> "BatchTransform":
        return cls(spec.mean, spec.std, spec.crop_padding, spec.hflip, cutout)

    def forward(self, images: torch.Tensor, augment: bool = False,
                generator: torch.Generator | None = None, params: dict | None = None) -> torch.Tensor:
        """Normalise; with ``augment``, first crop / flip with ``params`` (or fresh ones from ``generator``)."""
        x = images.float().div_(255)
        if augment:
            x = self.apply(x, params if params is not None else self.sample(len(x), generator))
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def sample(self, n: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Random augmentation parameters for ``n`` images: crop offsets ``dy``, ``dx`` and ``flip``; with Cutout
        also its centre ``cy``, ``cx`` as fractions of the height and width in [0, 1) (drawn last, so that the
        other parameters are those drawn without it)."""
        p = self.crop_padding
        zeros = torch.zeros(n, dtype=torch.long)
        dy = torch.randint(0, 2 * p + 1, (n,), generator=generator) if p > 0 else zeros
        dx = torch.randint(0, 2 * p + 1, (n,), generator=generator) if p > 0 else zeros
        flip = torch.rand(n, generator=generator) < 0.5 if self.hflip else torch.zeros(n, dtype=torch.bool)
        params = {"dy": dy, "dx": dx, "flip": flip}
        if self.cutout > 0:
            params["cy"] = torch.rand(n, generator=generator)
            params["cx"] = torch.rand(n, generator=generator)
        return params

    def apply(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Crop (offsets into the zero-padded image) and flip a float batch, as gathers on its device."""
        n, _, h, w = x.shape
        device = x.device
        if self.crop_padding > 0:
            p = self.crop_padding
            padded = F.pad(x, (p, p, p, p))
            dy, dx = params["dy"].to(device).long(), params["dx"].to(device).long()
            rows = (dy[:, None] + torch.arange(h, device=device))[:, None, :, None]
            cols = (dx[:, None] + torch.arange(w, device=device))[:, None, None, :]
            batch = torch.arange(n, device=device)[:, None, None, None]
            chans = torch.arange(x.shape[1], device=device)[None, :, None, None]
            x = padded[batch, chans, rows, cols]
        if self.hflip:
            flip = params["flip"].to(device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if self.cutout > 0:
            x = self._cut(x, params["cy"].to(device), params["cx"].to(device))
        return x

    def _cut(self, x: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor) -> torch.Tensor:
        """Set each image's Cutout square (centre at fractions ``cy``, ``cx``) to the mean."""
        _, _, h, w = x.shape
        device = x.device
        top = (cy * h).long().clamp_(max=h - 1) - self.cutout // 2
        left = (cx * w).long().clamp_(max=w - 1) - self.cutout // 2
        rows = torch.arange(h, device=device)[None, :]
        cols = torch.arange(w, device=device)[None, :]
        in_rows = (rows >= top[:, None]) & (rows < top[:, None] + self.cutout)
        in_cols = (cols >= left[:, None]) & (cols < left[:, None] + self.cutout)
        square = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]
        return torch.where(square, self.mean.to(device=device, dtype=x.dtype), x)

    def augment(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.apply(x, self.sample(len(x), generator))


@dataclass
class TaskData:
    """The three splits of a task (in memory, or image files) and the files that could not be read."""

    train: ImageTensorDataset | FileImageDataset
    val: ImageTensorDataset | FileImageDataset
    test: ImageTensorDataset | FileImageDataset
    skipped: list[str] = field(default_factory=list)

    def split(self, name: str) -> ImageTensorDataset:
        return getattr(self, name)


# A source turns (spec, data_root, download) into the three splits.
SOURCES: Registry = Registry("data source")


def load_task_data(spec: TaskSpec, data_root: str | Path = "data", download: bool = True) -> TaskData:
    return SOURCES.get(spec.source)(spec, Path(data_root), download)


def stratified_split(labels: np.ndarray, fraction: float, seed: int):
    """Indices (keep, held_out), ``fraction`` of each class held out, seeded."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    keep, held = train_test_split(idx, test_size=fraction, random_state=seed, stratify=labels)
    return np.sort(keep), np.sort(held)


def split_three(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int):
    """Indices (train, val, test): ``test_fraction`` of each class, then ``val_fraction`` of the whole, seeded."""
    rest, test = stratified_split(labels, test_fraction, seed)
    train, val = stratified_split(labels[rest], val_fraction / (1.0 - test_fraction), seed)
    return rest[train], rest[val], test


def _to_dataset(images: np.ndarray, labels: np.ndarray) -> ImageTensorDataset:
    return ImageTensorDataset(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels).long())


def _load_digits(spec: TaskSpec, data_root: Path, download: bool) -> TaskData:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are 0..16; scale to the full uint8 range.
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    names = [str(t) for t in digits.target_names]
    order = spec.class_indices(tuple(names))
    labels = np.asarray(order)[digits.target]
    splits = split_three(labels, spec.val_fraction, spec.test_fraction, spec.split_seed)
    return TaskData(*(_to_dataset(images[i], labels[i]) for i in splits))


class _CIFAR100(CIFAR100):
    # torchvision md5-checks all 180 MB on every construction. The archive is
    # checked when it is downloaded; at load time (md5 None) only presence is.
    train_list = [[name, None] for name, _ in CIFAR100.train_list]
    test_list = [[name, None] for name, _ in CIFAR100.test_list]
    meta = {**CIFAR100.meta, "md5": None}


def _open_cifar100(root: Path, train: bool, download: bool) -> CIFAR100:
    """torchvision's CIFAR100, downloading it when missing and allowed."""
    folder = root / CIFAR100.base_folder
    names = [name for name, _ in CIFAR100.train_list + CIFAR100.test_list] + [CIFAR100.meta["filename"]]

    def missing():
        return [str(folder / n) for n in names if not (folder / n).is_file()]

    if missing() and download:
        try:
            CIFAR100(str(root), train=train, download=True)
        except Exception as e:  # network errors come in many types
            raise UserError(
                f"CIFAR-100 is not under {folder} and downloading it failed ({type(e).__name__}: {e}).\n"
                f"Fix: download {CIFAR100.url} and extract it into {root} "
                f"(so that {folder}/train exists), or pass --data_root DIR where it already is."
            ) from None
    if missing():
        raise UserError(
            f"CIFAR-100 is missing under {root}: {', '.join(missing())}.\n"
            f"Fix: run with network access to download it, or extract {CIFAR100.url} into {root}."
        )
    try:
        return _CIFAR100(str(root), train=train, download=False)
    except Exception as e:
        raise UserError(f"could not read CIFAR-100 from {folder} ({type(e).__name__}: {e}).\n"
                        f"Fix: delete {folder} and let it download again.") from None


def _load_cifar100(spec: TaskSpec, data_root: Path, download: bool) -> TaskData:
    splits = {}
    for train in (True, False):
        ds = _open_cifar100(data_root, train, download)
        names = list(ds.classes)
        missing = [c for c in spec.class_names if c not in names]
        if missing:
            raise UserError(f"CIFAR-100 under {data_root} has no classes {missing}")
        # CIFAR-100 label id -> task class id (or -1 for the 85 other classes).
        lookup = np.full(len(names), -1, dtype=np.int64)
        for task_id, name in enumerate(spec.class_names):
            lookup[names.index(name)] = task_id
        labels = lookup[np.asarray(ds.targets)]
        keep = labels >= 0
        images = ds.data[keep].transpose(0, 3, 1, 2)  # NHWC -> NCHW
        splits[train] = (images, labels[keep])
    images, labels = splits[True]
    train, val = stratified_split(labels, spec.val_fraction, spec.split_seed)
    return TaskData(
        _to_dataset(images[train], labels[train]),
        _to_dataset(images[val], labels[val]),
        _to_dataset(*splits[False]),
    )


def load_transfer_images(spec: TaskSpec, data_root: str | Path, count: int,
                         download: bool = True) -> ImageTensorDataset:
    """A transfer set (Hinton et al. 2015): ``count`` training images of the dataset's classes outside the task,
    without labels (-1), for the teachers' soft losses only; a stratified choice over those classes, seeded by
    the task's ``split_seed`` (the same images for every run, so one teacher cache serves every seed). CIFAR-100
    tasks only: CIFAR-100's other classes (for Task A, Task A85's images)."""
    if spec.source != "cifar100":
        raise UserError(f"--transfer_images takes images of CIFAR-100's classes outside a CIFAR-100 task; task "
                        f"{spec.name} is not one. Fix: drop --transfer_images (an image-folder task adds unlabelled "
                        f"images with [dataset] unlabeled = \"DIR\" in its TOML file).")
    ds = _open_cifar100(Path(data_root), train=True, download=download)
    targets = np.asarray(ds.targets)
    outside = np.flatnonzero(~np.isin(targets, [ds.classes.index(c) for c in spec.class_names]))
    if count > len(outside):
        raise UserError(f"--transfer_images {count}: CIFAR-100 has {len(outside)} training images outside task "
                        f"{spec.name}'s classes. Fix: ask for at most {len(outside)}.")
    if count < len(np.unique(targets[outside])):  # fewer images than classes: no stratified choice exists
        outside = np.sort(np.random.default_rng(spec.split_seed).choice(outside, count, replace=False))
    elif count < len(outside):
        outside = outside[stratified_split(targets[outside], count, spec.split_seed)[1]]
    labels = np.full(len(outside), UNLABELLED, dtype=np.int64)
    return _to_dataset(ds.data[outside].transpose(0, 3, 1, 2), labels)


def read_image(path: str | Path, channels: int, size: int) -> np.ndarray:
    """One image file as ``uint8 (C, size, size)``: grey, RGBA and palette images are converted."""
    with Image.open(path) as img:
        img.load()  # decode now, so truncated files fail here
        if channels == 3 and img.mode in ("RGBA", "LA", "PA") or img.mode == "P" and "transparency" in img.info:
            # Composite transparent images onto black rather than keeping undefined colours.
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
        img = img.convert("L" if channels == 1 else "RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        # A contiguous, writable copy: PIL's buffer is read-only, which torch.from_numpy warns about.
        return np.asarray(img, dtype=np.uint8).reshape(size, size, channels).transpose(2, 0, 1).copy()


# Image folders whose decoded uint8 pixels exceed this are read from disk batch by batch.
IN_MEMORY_LIMIT = 2 * 2**30


def _list_folder(folder: Path, class_names) -> tuple[list[str], np.ndarray]:
    index = {c: i for i, c in enumerate(class_names)}
    present = {c: i for c, i in index.items() if (folder / c).is_dir()}
    samples = make_dataset(str(folder), present, extensions=IMG_EXTENSIONS, allow_empty=True)
    return [p for p, _ in samples], np.asarray([y for _, y in samples], dtype=np.int64)


def _check_file(path: str) -> None:
    """Open and verify an image without decoding its pixels (for the on-disk path)."""
    with Image.open(path) as img:
        img.verify()


def _list_unlabelled(folder: Path) -> tuple[list[str], np.ndarray]:
    """Every image file under ``folder`` (any depth, no class folders), each with label -1."""
    paths = sorted(str(p) for p in folder.rglob("*") if p.is_file() and p.name.lower().endswith(IMG_EXTENSIONS))
    return paths, np.full(len(paths), UNLABELLED, dtype=np.int64)


def _read_files(listing: tuple[list[str], np.ndarray], channels: int, size: int, skipped: list[str],
                in_memory: bool):
    """The listed images: decoded ``(images, labels)``, or ``(paths, labels)``.

    Unreadable files are listed in ``skipped`` and left out, never a crash later.
    """
    paths, labels = listing
    good, images = [], []
    for i, path in enumerate(paths):
        try:
            if in_memory:
                images.append(read_image(path, channels, size))
            else:
                _check_file(path)
            good.append(i)
        except READ_ERRORS as e:
            skipped.append(f"{path}: {type(e).__name__}: {e}")
    if not in_memory:
        return [paths[i] for i in good], labels[good]
    stack = np.stack(images) if images else np.zeros((0, channels, size, size), np.uint8)
    return stack, labels[good]


def _make_dataset(items, labels: np.ndarray, channels: int, size: int):
    if isinstance(items, list):
        return FileImageDataset(items, torch.from_numpy(labels), channels, size)
    return _to_dataset(items, labels)


def _take(items, idx: np.ndarray):
    return [items[i] for i in idx] if isinstance(items, list) else items[idx]


def _load_imagefolder(spec: TaskSpec, data_root: Path, download: bool) -> TaskData:
    """Class folders, either under train/, val/ and test/, or in one folder split by fractions (seeded).

    Decoded into memory when the pixels fit in ``IN_MEMORY_LIMIT`` bytes (or
    as the task's ``in_memory`` says), else read from disk batch by batch.
    """
    root = Path(spec.source_options["root"])
    size, channels, skipped = spec.image_size, spec.channels, []
    folders = [root / s for s in SPLITS] if spec.source_options["layout"] == "split" else [root]
    listings = [_list_folder(f, spec.class_names) for f in folders]
    extra = spec.source_options.get("unlabeled")
    unlabelled = _list_unlabelled(Path(extra)) if extra else ([], np.zeros(0, np.int64))
    in_memory = spec.source_options.get("in_memory", "auto")
    if in_memory == "auto":
        count = sum(len(paths) for paths, _ in listings) + len(unlabelled[0])
        in_memory = count * channels * size * size <= IN_MEMORY_LIMIT
    data = _split_imagefolder(spec, root, [_read_files(x, channels, size, skipped, in_memory) for x in listings])
    data.skipped = skipped
    if extra:  # the task's unlabelled images join the training split, with label -1
        data.train = concat(data.train, _make_dataset(*_read_files(unlabelled, channels, size, skipped, in_memory),
                                                      channels, size))
    return data


def _split_imagefolder(spec: TaskSpec, root: Path, read: list) -> TaskData:
    """The labelled splits: the three folders as they are, or one folder split by the task's fractions."""
    channels, size = spec.channels, spec.image_size
    if len(read) == len(SPLITS):
        return TaskData(*(_make_dataset(*s, channels, size) for s in read))
    items, labels = read[0]
    try:
        splits = split_three(labels, spec.val_fraction, spec.test_fraction, spec.split_seed)
    except ValueError as e:
        raise UserError(f"cannot split {root} into train/val/test ({e}). Fix: add images (at least a few "
                        "per class), or provide train/, val/ and test/ folders.") from None
    return TaskData(*(_make_dataset(_take(items, i), labels[i], channels, size) for i in splits))


SOURCES.register("digits", _load_digits)
SOURCES.register("imagefolder", _load_imagefolder)
SOURCES.register("cifar100", _load_cifar100)

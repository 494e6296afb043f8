"""Custom tasks from a TOML file: ``--task PATH.toml`` (read with ``tomllib``).

Example::

    name = "animals"
    image_size = 64          # images are resized to this square size
    channels = 3             # 1 or 3; images are converted
    [dataset]
    type = "imagefolder"
    root = "data/animals"    # relative paths are relative to this file
    [[teachers]]
    name = "mammals"
    architecture = "resnet34"
    classes = ["zebra", "lynx", "hyena"]
    weight = 1.0
    checkpoint = "teachers/mammals.pt"   # optional; trained when absent
    # A teacher trained elsewhere: a state dict (.pt / .safetensors) of its timm architecture, one output
    # per class above in that order, and the input it was trained on (default: the task's).
    # image_size = 224
    # mean = [0.485, 0.456, 0.406]
    # std = [0.229, 0.224, 0.225]
    # adapt_small_input = false    # default: true below 64 px
    # A teacher mtkd trains may start from pretrained weights, then be fine-tuned on its classes:
    # pretrained = true            # timm's own (downloaded), or a file: pretrained = "weights/resnet34.safetensors"

The task's classes are the class folders found under the dataset root.
``[dataset] unlabeled = "dir"`` adds every image file under ``dir`` (no class
folders) to the training split without a label.
"""
from __future__ import annotations

import tomllib
from pathlib import Path

from torchvision.datasets.folder import find_classes

from .errors import UserError
from .models import HUB
from .spec import TaskSpec, TeacherSpec, get_task

TOP_KEYS = {"name", "title", "image_size", "channels", "mean", "std", "crop_padding", "hflip", "dataset", "teachers"}
DATASET_KEYS = {"type", "root", "val_fraction", "test_fraction", "split_seed", "in_memory", "unlabeled"}
TEACHER_KEYS = {"name", "architecture", "classes", "weight", "checkpoint", "image_size", "mean", "std",
                "adapt_small_input", "pretrained"}
SPLIT_FOLDERS = ("train", "val", "test")


def is_task_file(text: str) -> bool:
    return str(text).endswith(".toml")


def resolve_task(text: str) -> TaskSpec:
    """A registered task by name, or a task defined by a ``.toml`` file."""
    return load_task_file(text) if is_task_file(text) else get_task(text)


def _check_keys(path: Path, table: dict, allowed: set, where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise UserError(f"{path}: unknown key {unknown[0]!r} in {where}. "
                        f"Fix: use only {', '.join(sorted(allowed))}.")


def _need(path: Path, table: dict, key: str, kind, where: str):
    if key not in table:
        raise UserError(f"{path}: {where} needs the key {key!r}.")
    value = table[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise UserError(f"{path}: {where} key {key!r} must be {getattr(kind, '__name__', kind)}, got {value!r}.")
    return value


def dataset_layout(root: Path) -> tuple[str, list[str]]:
    """('split', classes) when root holds train/val/test folders, else ('single', classes)."""
    if not root.is_dir():
        raise UserError(f"dataset folder {root} does not exist. Fix: set [dataset] root to a folder of class "
                        f"folders, or of train/, val/ and test/ folders of class folders.")
    present = [s for s in SPLIT_FOLDERS if (root / s).is_dir()]
    if present:
        missing = [s for s in SPLIT_FOLDERS if s not in present]
        if missing:
            raise UserError(f"dataset folder {root} has {', '.join(s + '/' for s in present)} but no "
                            f"{', '.join(s + '/' for s in missing)}. "
                            "Fix: provide all of train/, val/ and test/, or one folder of class folders.")
        classes = find_classes(str(root / "train"))[0] if any((root / "train").iterdir()) else []
        for s in ("val", "test"):
            extra = sorted(set(find_classes(str(root / s))[0]) - set(classes))
            if extra:
                raise UserError(f"{root / s} has class folders not in {root / 'train'}: {extra}.")
        layout = "split"
    else:
        try:
            classes = find_classes(str(root))[0]
        except FileNotFoundError:
            classes = []
        layout = "single"
    if not classes:
        raise UserError(f"no class folders under {root}. Fix: put each class's images in a folder named after it.")
    return layout, classes


def _teacher_input(path: Path, t: dict, name: str) -> dict:
    """A teacher's own input declaration (``image_size``, ``mean``, ``std``, ``adapt_small_input``) and its
    ``pretrained`` weights, checked."""
    where = f"teacher {name!r}"
    out = {}
    if "image_size" in t:
        out["image_size"] = _need(path, t, "image_size", int, where)
    for key in ("mean", "std"):
        if key in t:
            values = _need(path, t, key, list, where)
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise UserError(f"{path}: {where} key {key!r} must be a list of numbers, got {values!r}.")
            out[key] = tuple(float(v) for v in values)
    if "adapt_small_input" in t:
        out["adapt"] = _need(path, t, "adapt_small_input", bool, where)
    if "pretrained" in t:
        value = t["pretrained"]
        if isinstance(value, bool):
            out["pretrained"] = HUB if value else None
        elif isinstance(value, str):
            out["pretrained"] = str((path.parent / value).resolve())
        else:
            raise UserError(f"{path}: {where} key 'pretrained' must be true, false or the path of a weights file, "
                            f"got {value!r}.")
    return out


def load_task_file(path: str | Path) -> TaskSpec:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"task file {path} not found. Fix: check the path, or use a built-in task "
                        "(python train.py --help lists them).")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid TOML: {e}.") from None
    _check_keys(path, raw, TOP_KEYS, "the task")
    name = _need(path, raw, "name", str, "the task")
    image_size = _need(path, raw, "image_size", int, "the task")
    channels = _need(path, raw, "channels", int, "the task")
    if channels not in (1, 3):
        raise UserError(f"{path}: channels must be 1 or 3, got {channels}.")
    if image_size < 8:
        raise UserError(f"{path}: image_size must be at least 8, got {image_size}.")
    dataset = _need(path, raw, "dataset", dict, "the task")
    _check_keys(path, dataset, DATASET_KEYS, "[dataset]")
    if _need(path, dataset, "type", str, "[dataset]") != "imagefolder":
        raise UserError(f"{path}: [dataset] type {dataset['type']!r} is not supported. Fix: type = \"imagefolder\".")
    root = (path.parent / _need(path, dataset, "root", str, "[dataset]")).resolve()
    layout, classes = dataset_layout(root)
    in_memory = dataset.get("in_memory", "auto")
    if in_memory not in (True, False, "auto"):
        raise UserError(f"{path}: [dataset] in_memory must be true, false or \"auto\", got {in_memory!r}.")
    options = {"root": str(root), "layout": layout, "in_memory": in_memory}
    if "unlabeled" in dataset:
        unlabeled = (path.parent / _need(path, dataset, "unlabeled", str, "[dataset]")).resolve()
        if not unlabeled.is_dir():
            raise UserError(f"{path}: [dataset] unlabeled folder {unlabeled} does not exist. "
                            "Fix: point it at a folder of image files, or remove the key.")
        options["unlabeled"] = str(unlabeled)

    teachers_raw = _need(path, raw, "teachers", list, "the task")
    if not teachers_raw:
        raise UserError(f"{path}: no [[teachers]]. Fix: add at least one teacher.")
    teachers = []
    for i, t in enumerate(teachers_raw):  # the task's own checks (TaskSpec) follow
        where = f"[[teachers]] #{i + 1}"
        _check_keys(path, t, TEACHER_KEYS, where)
        tname = _need(path, t, "name", str, where)
        tclasses = _need(path, t, "classes", list, f"teacher {tname!r}")
        ckpt = t.get("checkpoint")
        teachers.append(TeacherSpec(tname, _need(path, t, "architecture", str, f"teacher {tname!r}"),
                                    tuple(str(c) for c in tclasses), float(t.get("weight", 1.0)),
                                    str((path.parent / ckpt).resolve()) if ckpt else None,
                                    **_teacher_input(path, t, tname)))
    try:
        return TaskSpec(
            name=name, title=raw.get("title", f"custom task from {path.name}"), source="imagefolder",
            class_names=tuple(classes), image_size=image_size, channels=channels,
            mean=tuple(raw.get("mean", [0.5] * channels)), std=tuple(raw.get("std", [0.5] * channels)),
            teachers=tuple(teachers), val_fraction=float(dataset.get("val_fraction", 0.1)),
            test_fraction=float(dataset.get("test_fraction", 0.1)) if layout == "single" else 0.0,
            split_seed=int(dataset.get("split_seed", 0)), crop_padding=int(raw.get("crop_padding", image_size // 8)),
            hflip=bool(raw.get("hflip", True)), source_options=options,
        )
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
import pytest
from PIL import Image

from mtkd.data import FileImageDataset, ImageTensorDataset, create_loader, load_task_data, read_image
from mtkd.errors import UserError
from mtkd.taskfile import load_task_file, resolve_task

CLASSES = ("hyena", "lynx", "zebra")


def write_images(folder, classes=CLASSES, per_class=6, size=20):
    """Class folders of small images in several modes: grey, RGB, RGBA, palette."""
    rng = np.random.default_rng(0)
    modes = ["L", "RGB", "RGBA", "P"]
    for c in classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            img = Image.fromarray(arr).convert(modes[i % len(modes)])
            img.save(folder / c / f"{i}.png")


TOML = """
name = "animals"
image_size = 16
channels = 3
[dataset]
type = "imagefolder"
root = "images"
val_fraction = 0.2
test_fraction = 0.2
[[teachers]]
name = "cats"
architecture = "resnet10t"
classes = ["lynx", "hyena"]
[[teachers]]
name = "stripes"
architecture = "resnet10t"
classes = ["zebra", "hyena"]
weight = 2.0
checkpoint = "teachers/stripes.pt"
"""


@pytest.fixture
def task_file(tmp_path):
    write_images(tmp_path / "images")
    path = tmp_path / "animals.toml"
    path.write_text(TOML)
    return path


def test_task_file_builds_a_task(task_file, tmp_path):
    task = resolve_task(str(task_file))
    assert task.name == "animals" and task.class_names == CLASSES and task.channels == 3
    assert [t.name for t in task.teachers] == ["cats", "stripes"]
    assert task.teachers[1].weight == 2.0 and task.teachers[1].checkpoint == str(tmp_path / "teachers" / "stripes.pt")
    assert task.teachers[0].checkpoint is None
    data = load_task_data(task)
    assert len(data.train) + len(data.val) + len(data.test) == 18
    assert data.train.images.shape[1:] == (3, 16, 16) and not data.skipped


def test_split_folders_layout(tmp_path):
    for split in ("train", "val", "test"):
        write_images(tmp_path / "images" / split, per_class=2)
    (tmp_path / "t.toml").write_text(TOML)
    data = load_task_data(load_task_file(tmp_path / "t.toml"))
    assert (len(data.train), len(data.val), len(data.test)) == (6, 6, 6)


def test_large_image_folders_are_read_from_disk_batch_by_batch(task_file, tmp_path):
    good = (tmp_path / "images" / "zebra" / "0.png").read_bytes()
    (tmp_path / "images" / "zebra" / "truncated.png").write_bytes(good[: len(good) // 2])
    decoded = load_task_data(resolve_task(str(task_file)))
    task_file.write_text(TOML.replace('type = "imagefolder"', 'type = "imagefolder"\nin_memory = false'))
    lazy = load_task_data(resolve_task(str(task_file)))
    assert isinstance(decoded.train, ImageTensorDataset) and isinstance(lazy.train, FileImageDataset)
    # The file that cannot be read is found when the task loads, on both paths.
    assert len(lazy.skipped) == len(decoded.skipped) == 1 and "truncated.png" in lazy.skipped[0]
    for split in ("train", "val", "test"):
        images, labels = lazy.split(split).__getitems__(range(len(lazy.split(split))))
        assert torch.equal(images, decoded.split(split).images) and torch.equal(labels, decoded.split(split).labels)
    # Worker processes decode the batches; the order is the loader's, as in memory.
    batches = [create_loader(d, 4, train=True, seed=3, num_workers=w) for d, w in ((lazy.train, 2), (decoded.train, 0))]
    for (a, ya), (b, yb) in zip(*batches):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    sub = lazy.train.select_classes([2, 0])
    assert set(sub.labels.tolist()) <= {0, 1} and len(sub) == int(torch.isin(lazy.train.labels, torch.tensor([0, 2])).sum())
    # The teacher cache's key follows the files: touching one changes it.
    def key(ds):
        h = hashlib.sha256()
        ds.fingerprint(h)
        return h.hexdigest()

    before = key(lazy.train)
    first = Path(lazy.train.paths[0])
    os.utime(first, ns=(1, 1))
    assert key(lazy.train) != before


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "LA", "I;16"])
@pytest.mark.parametrize("channels", [1, 3])
def test_images_in_any_mode_are_converted(tmp_path, mode, channels):
    arr = np.arange(24 * 24 * 3, dtype=np.uint8).reshape(24, 24, 3)
    Image.fromarray(arr).convert(mode).save(tmp_path / "x.png")
    out = read_image(tmp_path / "x.png", channels, 8)
    assert out.shape == (channels, 8, 8) and out.dtype == np.uint8
    # Writable and contiguous, so torch.from_numpy takes it as is (no read-only warning, no strided tensor).
    assert out.flags.writeable and out.flags.c_contiguous


def test_unreadable_and_truncated_files_are_skipped_and_reported(task_file, tmp_path):
    (tmp_path / "images" / "lynx" / "broken.png").write_bytes(b"not an image at all")
    good = (tmp_path / "images" / "zebra" / "0.png").read_bytes()
    (tmp_path / "images" / "zebra" / "truncated.png").write_bytes(good[: len(good) // 2])
    data = load_task_data(load_task_file(task_file))
    assert len(data.train) + len(data.val) + len(data.test) == 18
    assert len(data.skipped) == 2
    assert any("broken.png" in s for s in data.skipped) and any("truncated.png" in s for s in data.skipped)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace('channels = 3', 'channels = 3\ncolour = "red"'), "unknown key 'colour' in the task"),
    (lambda t: t.replace('val_fraction = 0.2', 'val_fraction = 0.2\nshuffle = true'), "unknown key 'shuffle' in \\[dataset\\]"),
    (lambda t: t.replace('classes = ["lynx", "hyena"]', 'classes = ["lynx", "hyena", "okapi"]'),
     r"teacher 'cats' names classes \['okapi'\] that are not in the task \(its classes: hyena, lynx, zebra\)"),
    (lambda t: t.replace('classes = ["zebra", "hyena"]', 'classes = ["hyena"]'),
     r"classes \['zebra'\] are covered by no teacher"),
    (lambda t: t.replace('classes = ["lynx", "hyena"]', 'classes = []'), "teacher 'cats' has no classes"),
    (lambda t: t.replace('name = "stripes"', 'name = "cats"'), "two teachers are named 'cats'"),
    (lambda t: t.replace('root = "images"', 'root = "nowhere"'), "dataset folder .*nowhere does not exist"),
    (lambda t: t.replace('channels = 3', 'channels = 2'), "channels must be 1 or 3"),
    (lambda t: t.replace('type = "imagefolder"', 'type = "lmdb"'), "type 'lmdb' is not supported"),
    (lambda t: t.replace('image_size = 16', 'image_size = "big"'), "'image_size' must be int"),
    (lambda t: t + "\n[[[", "is not valid TOML"),
    (lambda t: t.replace('weight = 2.0', 'weight = 2.0\npretrained = 3'),
     "teacher 'stripes' key 'pretrained' must be true, false or the path of a weights file"),
])
def test_invalid_task_files_get_one_clear_message(task_file, edit, message):
    task_file.write_text(edit(TOML))
    with pytest.raises(UserError, match=message):
        load_task_file(task_file)


def test_missing_split_folder(tmp_path):
    write_images(tmp_path / "images" / "train", per_class=2)
    write_images(tmp_path / "images" / "val", per_class=2)
    (tmp_path / "t.toml").write_text(TOML)
    with pytest.raises(UserError, match="has train/, val/ but no test/"):
        load_task_file(tmp_path / "t.toml")


def test_missing_task_file(tmp_path):
    with pytest.raises(UserError, match="task file .*nope.toml not found"):
        resolve_task(str(tmp_path / "nope.toml"))


@pytest.mark.slow
def test_custom_task_trains_and_evaluates_end_to_end(task_file, tmp_path, capsys):
    import evaluation
    import train

    write_images(tmp_path / "images", per_class=10)
    good = (tmp_path / "images" / "zebra" / "0.png").read_bytes()
    (tmp_path / "images" / "zebra" / "truncated.png").write_bytes(good[: len(good) // 2])
    out = tmp_path / "runs"
    assert train.main(["--task", str(task_file), "--teacher_epochs", "1", "--num_epochs", "1",
                       "--student_model", "MobileNetV3", "--output_dir", str(out)]) == 0
    assert "skipped 1 unreadable image file" in capsys.readouterr().out
    assert (tmp_path / "teachers" / "stripes.pt").is_file()  # the file's own checkpoint path
    assert (out / "Taskanimals" / "teachers" / "cats.pt").is_file()
    run_dir = next(p for p in (out / "Taskanimals").iterdir() if p.name != "teachers")
    assert "truncated.png" in (run_dir / "skipped_files.txt").read_text()
    assert evaluation.main(["--task", str(task_file), "--output_dir", str(out), "--eval_dir", str(tmp_path / "ev"),
                            "--speed_repeats", "1"]) == 0
    assert (tmp_path / "ev" / "Taskanimals" / "results.json").is_file()
    assert "animals" in capsys.readouterr().out
    # The task now declares another input for a teacher mtkd trained: its checkpoint is refused, not reused.
    task_file.write_text(TOML.replace('classes = ["lynx", "hyena"]', 'classes = ["lynx", "hyena"]\nmean = [0.4, 0.4, 0.4]'))
    flags = ["--task", str(task_file), "--teacher_epochs", "1", "--num_epochs", "1", "--student_model", "MobileNetV3",
             "--output_dir", str(out)]
    assert train.main(flags) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "cats.pt was trained on another input" in err and "mean [0.5, 0.5, 0.5] -> [0.4, 0.4, 0.4]" in err
    assert "--retrain_teachers" in err and "Traceback" not in err
    assert train.main(flags + ["--retrain_teachers"]) == 0


def test_a_teacher_declares_pretrained_weights(task_file, tmp_path):
    from mtkd.models import HUB

    task_file.write_text(TOML.replace('weight = 2.0', 'weight = 2.0\npretrained = "weights/r10.safetensors"')
                         .replace('classes = ["lynx", "hyena"]', 'classes = ["lynx", "hyena"]\npretrained = true'))
    cats, stripes = load_task_file(task_file).teachers
    assert cats.pretrained == HUB and stripes.pretrained == str(tmp_path / "weights" / "r10.safetensors")

"""Every row of the README's "When things go wrong" table: one message, exit code 2, nothing written."""
import shutil

import pytest
import torch

from conftest import run_script
from mtkd.checkpoint import save_checkpoint


def _student_ckpt(path, task="B", classes=10):
    save_checkpoint({"model": {"w": torch.zeros(1)}, "student_model": "ResNet18", "task": task,
                     "class_names": [str(i) for i in range(classes)], "args": {}}, path)


def _setup(case, tmp):
    """Files a case needs; returns the command line with {tmp} filled in."""
    if case == "corrupt checkpoint":
        (tmp / "bad.pt").write_bytes(b"\x80\x02garbage")
    if case == "checkpoint of another task":
        _student_ckpt(tmp / "b.pt")
    if case == "checkpoint of another architecture":
        _student_ckpt(tmp / "b.pt")
    if case in ("unknown architecture", "dataset folder missing"):
        (tmp / "imgs" / "a").mkdir(parents=True)
        (tmp / "imgs" / "b").mkdir(parents=True)
        arch = "resnet3" if case == "unknown architecture" else "resnet18"
        root = "imgs" if case == "unknown architecture" else "missing"
        (tmp / "t.toml").write_text(f'name = "t"\nimage_size = 8\nchannels = 1\n[dataset]\ntype = "imagefolder"\n'
                                    f'root = "{root}"\n[[teachers]]\nname = "x"\narchitecture = "{arch}"\n'
                                    'classes = ["a", "b"]\n')
        if case == "unknown architecture":
            from PIL import Image
            for c in "ab":
                for i in range(10):
                    Image.new("L", (8, 8), 40 * i).save(tmp / "imgs" / c / f"{i}.png")
    if case == "invalid task file":
        (tmp / "bad.toml").write_text('name = "t"\ncolour = "red"\n')
    if case == "--resume of a folder that is not a run":
        (tmp / "notarun").mkdir()
    if case == "unreadable image":
        (tmp / "x.png").write_text("text")


CASES = [
    ("flag out of range", ["train.py", "--alpha", "1.5"], "argument --alpha: 1.5 is out of range: must be between 0 and 1"),
    ("flag of the wrong type", ["train.py", "--batch_size", "many"], "argument --batch_size: 'many' is not a valid int"),
    ("unknown task", ["train.py", "--task", "C"], "unknown task 'C'; known: A, A85, B, or a PATH.toml task file"),
    ("unknown student", ["train.py", "--student_model", "VGG16"], "argument --student_model: invalid choice: 'VGG16'"),
    ("unknown architecture", ["train.py", "--task", "{tmp}/t.toml"], "unknown timm architecture 'resnet3'"),
    ("missing task file", ["train.py", "--task", "{tmp}/none.toml"], "task file {tmp}/none.toml not found"),
    ("invalid task file", ["train.py", "--task", "{tmp}/bad.toml"], "bad.toml: unknown key 'colour' in the task"),
    ("dataset folder missing", ["train.py", "--task", "{tmp}/t.toml"], "dataset folder {tmp}/missing does not exist"),
    ("Cutout as large as the images", ["train.py", "--teacher_cutout", "8"],
     "--teacher_cutout 8 is not smaller than task B's 8x8 images"),
    ("no such device", ["train.py", "--device", "tpu"], "--device 'tpu' is not a device"),
    ("student's start missing", ["train.py", "--pretrained", "{tmp}/none.pt"], "--pretrained {tmp}/none.pt: no such file"),
    ("teachers' start missing", ["train.py", "--teacher_pretrained", "{tmp}/none.pt"],
     "--teacher_pretrained {tmp}/none.pt: no such file"),
    ("missing checkpoint", ["evaluation_taskb.py", "--checkpoint", "{tmp}/none.pt"], "checkpoint not found: {tmp}/none.pt"),
    ("corrupt checkpoint", ["evaluation_taskb.py", "--checkpoint", "{tmp}/bad.pt"], "cannot load checkpoint {tmp}/bad.pt: it is corrupt"),
    ("checkpoint of another task", ["evaluation_taska.py", "--checkpoint", "{tmp}/b.pt"],
     "is a student of task 'B' with 10 classes, not of task A (15 classes)"),
    ("checkpoint of another architecture", ["evaluation_taskb.py", "--checkpoint", "{tmp}/b.pt"],
     "does not fit a ResNet18 for task B"),
    ("--resume of a folder that is not a run", ["train.py", "--resume", "{tmp}/notarun"],
     "--resume {tmp}/notarun: not a run folder (it needs last.pt and args.json)"),
    ("unreadable image", ["evaluation.py", "--task", "B", "--image", "{tmp}/x.png", "--checkpoint", "{tmp}/none.pt"],
     "cannot read image {tmp}/x.png"),
]


# These rows run as real processes (the exit code the shell sees); the others in this process.
SUBPROCESS = {"flag out of range", "missing checkpoint"}


def _main_in_process(argv, capsys):
    """A script's main(argv) as the command line would run it: (exit code, stderr)."""
    import evaluation
    import train
    from mtkd.evaluate import task_script_main

    script, args = argv[0], argv[1:]
    mains = {"train.py": train.main, "evaluation.py": evaluation.main,
             "evaluation_taska.py": lambda a: task_script_main("A", a),
             "evaluation_taskb.py": lambda a: task_script_main("B", a)}
    try:
        code = mains[script](args)
    except SystemExit as e:  # argparse errors
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case, argv, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_message_and_exit_2(case, argv, message, tmp_path, capsys):
    _setup(case, tmp_path)
    out = tmp_path / "runs"
    argv = [a.format(tmp=tmp_path) for a in argv]
    extra = ["--output_dir", str(out)] if argv[0] == "train.py" else ["--output_dir", str(out), "--eval_dir", str(tmp_path / "ev")]
    if case in SUBPROCESS:
        proc = run_script(*argv, *extra)
        code, stderr = proc.returncode, proc.stderr
    else:
        code, stderr = _main_in_process(argv + extra, capsys)
    assert code == 2, stderr
    # Argparse messages may wrap; compare with whitespace normalised.
    assert " ".join(message.format(tmp=tmp_path).split()) in " ".join(stderr.split())
    assert "Traceback" not in stderr
    assert not out.exists() and not (tmp_path / "ev").exists()


def test_mismatched_teacher_checkpoint_is_refused_and_kept(smoke_run, tmp_path):
    out = tmp_path / "runs"
    shutil.copytree(smoke_run["output_dir"] / "TaskB" / "teachers", out / "TaskB" / "teachers")
    # Swap two teachers' files: the architectures / classes no longer match the task.
    t = out / "TaskB" / "teachers"
    (t / "digits_0123.pt").replace(t / "tmp.pt")
    (t / "digits_3456.pt").replace(t / "digits_0123.pt")
    before = (t / "digits_0123.pt").read_bytes()
    proc = run_script("train.py", "--num_epochs", "1", "--output_dir", out)
    assert proc.returncode == 2 and "was trained as resnet50" in " ".join(proc.stderr.split())
    assert "--retrain_teachers" in proc.stderr and "Traceback" not in proc.stderr
    assert (t / "digits_0123.pt").read_bytes() == before
    assert [p.name for p in (out / "TaskB").iterdir()] == ["teachers"]

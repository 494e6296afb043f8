import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Under pytest-xdist the cores are shared out between the workers (and the scripts they start), as two
# study runs share them: more threads than cores only makes every worker wait.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))


def run_script(*args, cwd=ROOT, timeout=900):
    """Run a top-level script as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One short Task B run of train.py (teachers trained for 2 epochs), shared by the tests.

    Trained once per test session: under pytest-xdist the first worker to get here trains it (the others wait
    on a lock) into the folder the workers share, and each worker works on its own copy of it, so what one
    worker's tests add (a second run, evaluation files) never reaches another's.
    """
    shared = tmp_path_factory.getbasetemp().parent if "PYTEST_XDIST_WORKER" in os.environ else \
        tmp_path_factory.getbasetemp()
    built = shared / "smoke_run"
    with open(shared / "smoke_run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (built / "stdout.txt").exists():
            proc = run_script("train.py", "--task", "B", "--teacher_epochs", "2", "--num_epochs", "2",
                              "--student_model", "ResNet18", "--output_dir", built / "runs", "--run", "smoke")
            assert proc.returncode == 0, proc.stdout + proc.stderr
            (built / "stdout.txt").write_text(proc.stdout)
    out = tmp_path_factory.mktemp("runs")
    shutil.copytree(built / "runs", out, dirs_exist_ok=True)
    run_dirs = [p for p in (out / "TaskB").iterdir() if p.name != "teachers"]
    assert len(run_dirs) == 1
    return {"output_dir": out, "run_dir": run_dirs[0], "stdout": (built / "stdout.txt").read_text(),
            "summary": json.loads((run_dirs[0] / "summary.json").read_text())}


@pytest.fixture(scope="session")
def baseline_run(smoke_run):
    """A second, alpha = 0 run in the same output folder: it must reuse the smoke run's teachers."""
    out = smoke_run["output_dir"]
    teachers = out / "TaskB" / "teachers"
    before = {p.name: p.stat().st_mtime_ns for p in teachers.glob("*.pt")}
    proc = run_script("train.py", "--num_epochs", "2", "--student_model", "MobileNetV3", "--batch_size", "256",
                      "--alpha", "0", "--output_dir", out, "--run", "baseline")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    after = {p.name: p.stat().st_mtime_ns for p in teachers.glob("*.pt")}
    run_dir = next(p for p in (out / "TaskB").iterdir() if p.name.endswith("_baseline"))
    return {"run_dir": run_dir, "stdout": proc.stdout, "teachers_untouched": before == after}


SLOW_FIXTURES = {"smoke_run", "baseline_run"}


def pytest_collection_modifyitems(config, items):
    """Tests that need a trained run are ``slow`` too (``-m "not slow"`` leaves the end-to-end runs out)."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)

"""Study records (``mtkd.results``) and the script that records runs and renders the README's tables."""
import json

import pytest

from conftest import ROOT, run_script
from mtkd.config import get_args_parser
from mtkd.results import (COLUMNS, append_record, config_of, finished_config, is_recorded, load_records,
                          method_name, optimizer_steps, parse_pairs, record, results_table, selection_table)


def _args(**flags) -> dict:
    argv = [f"--{k}={v}" for k, v in flags.items()]
    return vars(get_args_parser().parse_args(["--task", "A", "--student_model", "MobileNetV3", *argv]))


def _summary(test_acc: float, seed: int) -> dict:
    return {"task": "A", "student_model": "MobileNetV3", "labelled_images": 6750, "unlabelled_images": 0,
            "best_epoch": 17, "best_val_acc": test_acc + 0.01, "test_acc": test_acc, "ensemble_test_acc": 0.3467,
            "teachers": [{"name": "trees", "test_acc": 0.662, "student_test_acc": 0.5, "precision": "bf16/NHWC"},
                         {"name": "flowers", "test_acc": 0.698, "student_test_acc": 0.6 + seed / 100,
                          "precision": "bf16/NHWC"}],
            "wall_time_s": 1234.56, "train_images_per_s": 98.7, "precision": "fp32/NHWC", "device": "cpu",
            "machine": {"cpu": "Some CPU", "bf16_units": "amx_bf16", "threads": 1, "torch": "2.x"},
            "commit": "abc1234", "run_dir": f"runs/TaskA/run{seed}", "finished": "2026-12-02T18:00:00Z"}


def test_a_record_holds_every_column_and_the_method_in_words():
    args = _args(alpha=0.5, temperature=4, aggregation="amalgamate", teacher_cache="cache", cache_views=8, seed=1)
    row = record(_summary(0.45, 1), args, selection=True)
    assert tuple(row) == COLUMNS
    assert row["method"] == "amalgamate/fixed/kl" and row["cache_views"] == 8 and row["selection"] is True
    assert parse_pairs(row["student_on_teachers"]) == {"trees": 0.5, "flowers": 0.61}
    assert row["cpu"] == "Some CPU" and row["commit"] == "abc1234" and row["threads"] == 1
    assert row["pseudo_label_acc"] == ""  # all labels kept: nothing to score
    assert record({**_summary(0.45, 1), "pseudo_label_acc": 0.0}, args)["pseudo_label_acc"] == 0.0
    labels = record(_summary(0.4, 0), _args(alpha=0, teacher_cache="cache"))
    assert labels["method"] == "labels" and labels["cache_views"] == 0  # labels only never reads the cache
    assert method_name(argparse_ns(alpha=0, feature_weight=0.1)) == "consensus/fixed/kl+feat(0.1@-1)"
    assert method_name(argparse_ns(alpha=0, embedding_weight=2)) == "consensus/fixed/kl+embed(2)"
    assert method_name(argparse_ns(alpha=0.5, embedding_weight=0)) == "consensus/fixed/kl"
    # Each method's own settings are part of its name, so two recipes never share a record's key.
    assert method_name(argparse_ns(kd_loss="dkd", dkd_beta=2)) == "consensus/fixed/dkd(a=1 b=2 warm=5)"
    assert config_of(_args(kd_loss="dkd")) != config_of(_args(kd_loss="dkd", dkd_beta=2))
    assert method_name(argparse_ns(attention_weight=50, feature_layers="2", temperature_final=1, ema_teacher=0.99,
                                   teacher_weights="0.5,0.3,0.2")) == \
        "consensus/fixed/kl+at(50@2)+T_final(1)+ema(0.99)+weights(0.5 0.3 0.2)"
    assert method_name(argparse_ns(aggregation="stacked", teacher_weighting="entropy")) == "stacked/kl"
    # Teachers of another architecture or start than the task's are another recipe.
    assert method_name(argparse_ns(teacher_architecture="resnet18", teacher_pretrained="runs/A85/teachers/others.pt")) \
        == "consensus/fixed/kl+teachers(resnet18 from others.pt)"
    assert method_name(argparse_ns(teacher_pretrained="w.safetensors")) \
        == "consensus/fixed/kl+teachers(from w.safetensors)"
    assert method_name(argparse_ns(alpha=0, teacher_architecture="resnet18")) == "labels"
    # A transfer set is more training images: another recipe, named with its size.
    assert method_name(argparse_ns(aggregation="amalgamate", transfer_images=6750)) \
        == "amalgamate/fixed/kl+transfer(6750)"
    assert config_of(_args(transfer_images=6750)) != config_of(_args())


def argparse_ns(**flags):
    import argparse

    return argparse.Namespace(**_args(**flags))


def test_records_are_appended_found_again_and_summarised_over_seeds(tmp_path):
    path = tmp_path / "study.csv"
    args = [_args(alpha=0, seed=s) for s in (0, 1, 2)]
    for a, acc in zip(args, (0.40, 0.42, 0.44)):
        append_record(path, record(_summary(acc, a["seed"]), a))
    rows = load_records(path)
    assert len(rows) == 3 and is_recorded(rows, config_of(args[1]))
    assert not is_recorded(rows, config_of(_args(alpha=0, seed=3)))
    assert not is_recorded(rows, config_of(_args(alpha=0, seed=1, lr=0.003)))
    assert not is_recorded(rows, config_of(args[1], selection=True))
    table = results_table(rows)
    assert "| MobileNetV3 | 1 | labels | lr 0.001, step 30/0.5 | 100 | CPU | 0 1 2 | 42.00 ± 2.00 |  |  | 43.00 |" in table
    assert "flowers 61.0 (69.8)" in table  # the student's mean on the teacher's classes, the teacher's own
    # A file with other columns is never appended to.
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="other columns"):
        append_record(other, record(_summary(0.4, 0), args[0]))


def test_selection_runs_are_listed_apart_by_validation_accuracy(tmp_path):
    path = tmp_path / "study.csv"
    for lr, acc in ((0.001, 0.40), (0.003, 0.45)):
        append_record(path, record(_summary(acc, 0), _args(alpha=0, lr=lr, scheduler="cosine"), selection=True))
    rows = load_records(path)
    assert results_table(rows).count("\n") == 1  # the header alone: selection runs are not main results
    table = selection_table(rows).splitlines()
    assert "lr 0.003, cosine" in table[2] and "46.00" in table[2] and "lr 0.001, cosine" in table[3]
    # Runs with fewer labels are told apart by their label fraction, after those with all labels.
    append_record(path, record(_summary(0.50, 0), _args(alpha=0, label_fraction=0.1), selection=True))
    table = selection_table(load_records(path)).splitlines()
    assert table[2].startswith("| MobileNetV3 | 1 | labels |") and table[4].startswith("| MobileNetV3 | 0.1 | labels |")
    assert "| 42 |  | 46.00 |" in table[2]  # labels only: taught by no teacher


def test_selection_runs_of_one_recipe_from_other_teachers_are_told_apart(tmp_path):
    path = tmp_path / "study.csv"
    args = _args(alpha=0.5, teacher_cache="cache", scheduler="cosine")
    retrained = _summary(0.47, 0)
    retrained["teachers"] = [{**t, "test_acc": acc} for t, acc in zip(retrained["teachers"], (0.72, 0.79))]
    for summary in (_summary(0.45, 0), retrained):
        append_record(path, record(summary, args, selection=True))
    table = selection_table(load_records(path)).splitlines()
    assert "| 42 | 72.0 / 79.0 | 48.00 | 17 |" in table[2] and "| 42 | 66.2 / 69.8 | 46.00 | 17 |" in table[3]


def test_study_script_records_runs_and_keeps_the_readme_in_step(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text(json.dumps(_summary(0.45, 0)))
    (run_dir / "args.json").write_text(json.dumps(_args(alpha=0.9, teacher_cache="c")))
    study = tmp_path / "results" / "demo.csv"
    assert run_script("benchmarks/study.py", "record", run_dir, "--to", study).returncode == 0
    proc = run_script("benchmarks/study.py", "record", run_dir, "--to", study)
    assert "already recorded" in proc.stdout and len(load_records(study)) == 1
    bad = run_script("benchmarks/study.py", "record", tmp_path, "--to", study)
    assert bad.returncode == 2 and "not a finished run folder" in bad.stderr and "Traceback" not in bad.stderr
    (tmp_path / "README.md").write_text("# x\n<!-- results: demo.csv -->\nold\n<!-- end results -->\nafter\n")
    check = run_script("benchmarks/study.py", "readme", "--check", "--root", tmp_path)
    assert check.returncode == 1 and "out of date" in check.stderr
    assert run_script("benchmarks/study.py", "readme", "--root", tmp_path).returncode == 0
    text = (tmp_path / "README.md").read_text()
    assert "consensus/fixed/kl" in text and "45.00 ± 0.00" in text and "old" not in text and text.endswith("after\n")
    assert run_script("benchmarks/study.py", "readme", "--check", "--root", tmp_path).returncode == 0


def test_the_readme_agrees_with_the_recorded_results():
    proc = run_script("benchmarks/study.py", "readme", "--check")
    assert proc.returncode == 0, proc.stderr
    assert (ROOT / "results" / "README.md").is_file()  # the study files' columns, documented


def test_the_selection_run_of_a_chosen_recipe_is_one_of_its_seeds(tmp_path):
    path = tmp_path / "study.csv"
    chosen, other = dict(alpha=0, scheduler="cosine"), dict(alpha=0, scheduler="cosine", lr=0.003)
    append_record(path, record(_summary(0.40, 0), _args(**chosen, seed=0), selection=True))
    append_record(path, record(_summary(0.30, 0), _args(**other, seed=0), selection=True))
    for seed, acc in ((1, 0.42), (2, 0.44)):
        append_record(path, record(_summary(acc, seed), _args(**chosen, seed=seed)))
    table = results_table(load_records(path))
    assert "| lr 0.001, cosine | 100 | CPU | 0 1 2 | 42.00 ± 2.00 |" in table
    assert "lr 0.003" not in table  # a recipe without main runs stays a selection run only
    # A main run of seed 0 wins over the selection run of seed 0.
    append_record(path, record(_summary(0.50, 0), _args(**chosen, seed=0)))
    assert "| 0 1 2 | 45.33 ± 4.16 |" in results_table(load_records(path))


def test_a_distilled_recipe_shows_its_gain_over_labels_only_paired_by_seed(tmp_path):
    path = tmp_path / "study.csv"
    for seed, acc in ((0, 0.40), (1, 0.42), (2, 0.44)):
        append_record(path, record(_summary(acc, seed), _args(alpha=0, seed=seed)))
    for seed, acc in ((0, 0.43), (1, 0.44), (2, 0.47), (3, 0.50)):  # seed 3 has no labels-only run to pair with
        append_record(path, record(_summary(acc, seed), _args(alpha=0.5, seed=seed)))
    table = results_table(load_records(path))
    # Differences 3, 2 and 3 points over seeds 0-2; with every label equal epochs are equal steps.
    assert "| 0 1 2 3 | 46.00 ± 3.16 | +2.67 ± 0.58 (3 seeds) | +2.67 ± 0.58 (3 seeds) |" in table
    # Another label fraction has no labels-only runs to compare with: no gain.
    append_record(path, record({**_summary(0.30, 0), "pseudo_label_acc": 0.6},
                               _args(alpha=0.5, seed=0, label_fraction=0.1)))
    rows = results_table(load_records(path)).splitlines()
    row = next(line for line in rows if "| 0.1 |" in line)
    assert "| 30.00 ± 0.00 |  |  |" in row
    # How right the teachers' labels for the images used without one were; nothing where all labels are kept.
    assert row.endswith("| 60.0 |") and all(line.endswith(" |  |") for line in rows[2:] if "| 0.1 |" not in line)


def test_few_labels_are_compared_with_labels_only_at_equal_epochs_and_at_equal_steps(tmp_path):
    path = tmp_path / "study.csv"
    few = {"labelled_images": 675, "unlabelled_images": 0}
    # Labels only on 675 images: 22 batches an epoch; 192 epochs = 4,224 steps.
    for epochs, accs in ((20, (0.38, 0.40)), (192, (0.50, 0.49))):
        for seed, acc in enumerate(accs):
            append_record(path, record({**_summary(acc, seed), **few},
                                       _args(alpha=0, seed=seed, label_fraction=0.1, num_epochs=epochs)))
    # Distilled on 675 labelled + 6,075 unlabelled images: 211 batches an epoch; 20 epochs = 4,220 steps.
    for seed, acc in enumerate((0.56, 0.57)):
        append_record(path, record({**_summary(acc, seed), "labelled_images": 675, "unlabelled_images": 6075},
                                   _args(alpha=0.9, seed=seed, label_fraction=0.1, num_epochs=20)))
    rows = load_records(path)
    assert sorted(optimizer_steps(r) for r in rows) == [440, 440, 4220, 4220, 4224, 4224]
    lines = results_table(rows).splitlines()
    # Labels only at 20 epochs, then at 192, then the distilled student.
    assert "| labels |" in lines[2] and "| 20 |" in lines[2] and "| 192 |" in lines[3]
    assert "| 56.50 ± 0.71 | +17.50 ± 0.71 (2 seeds) | +7.00 ± 1.41 (2 seeds) |" in lines[4]


def test_runs_on_a_gpu_are_rows_of_their_own_paired_with_labels_only_on_a_gpu(tmp_path):
    path = tmp_path / "study.csv"
    gpu = {"device": "cuda:0", "machine": {"cpu": "Host CPU", "bf16_units": "none", "threads": 2, "torch": "2.x",
                                           "gpu": "NVIDIA H200"}}
    for seed, acc in ((0, 0.40), (1, 0.42)):
        append_record(path, record(_summary(acc, seed), _args(alpha=0, seed=seed)))
        append_record(path, record({**_summary(acc + 0.10, seed), **gpu}, _args(alpha=0, seed=seed)))
        append_record(path, record({**_summary(acc + 0.13, seed), **gpu}, _args(alpha=0.5, seed=seed)))
    # The same recipe and seed on another platform is another run, recorded beside the first.
    rows = load_records(path)
    assert len(rows) == 6 and [r["device"] for r in rows[:2]] == ["cpu", "cuda (NVIDIA H200)"]
    lines = results_table(rows).splitlines()
    cpu = next(line for line in lines if "| CPU |" in line)
    gpu_labels, gpu_kd = (line for line in lines if "| GPU |" in line)
    assert "| 0 1 | 41.00 ± 1.41 |" in cpu and "| 0 1 | 51.00 ± 1.41 |" in gpu_labels
    # The distilled GPU runs gain 3 points over labels only on the GPU, not 13 over the CPU runs.
    assert "| 0 1 | 54.00 ± 1.41 | +3.00 ± 0.00 (2 seeds) |" in gpu_kd
    # A sweep or a record skips a recipe only where it already ran on the same platform.
    cpu_only = [r for r in rows if r["device"] == "cpu"]
    assert is_recorded(cpu_only, config_of(_args(alpha=0, seed=0)), "CPU")
    assert not is_recorded(cpu_only, config_of(_args(alpha=0, seed=0)), "GPU")


def test_runs_taught_by_other_teachers_are_rows_of_their_own(tmp_path):
    path = tmp_path / "study.csv"
    stronger = [{**t, "test_acc": t["test_acc"] + 0.1} for t in _summary(0.4, 0)["teachers"]]
    for seed in (0, 1):
        append_record(path, record(_summary(0.40 + seed / 100, seed), _args(alpha=0, seed=seed)))
        append_record(path, record(_summary(0.41 + seed / 100, seed), _args(alpha=0.5, seed=seed)))
    rows = load_records(path)
    assert is_recorded(rows, finished_config(_summary(0.3, 0), _args(alpha=0.5, seed=0)))
    assert not is_recorded(rows, finished_config({**_summary(0.3, 0), "teachers": stronger}, _args(alpha=0.5, seed=0)))
    # Labels only is the same run whichever teachers sat beside it: they teach it nothing.
    assert is_recorded(rows, finished_config({**_summary(0.3, 0), "teachers": stronger}, _args(alpha=0, seed=0)))
    for seed in (0, 1):
        append_record(path, record({**_summary(0.45 + seed / 100, seed), "teachers": stronger},
                                   _args(alpha=0.5, seed=seed)))
    lines = [line for line in results_table(load_records(path)).splitlines() if "| MobileNetV3 |" in line]
    assert len(lines) == 3  # labels only, and one distilled row per set of teachers
    assert "| 0 1 | 41.50 ± 0.71 | +1.00 ± 0.00 (2 seeds) |" in lines[1] and "trees 50.0 (66.2)" in lines[1]
    assert "| 0 1 | 45.50 ± 0.71 | +5.00 ± 0.00 (2 seeds) |" in lines[2] and "trees 50.0 (76.2)" in lines[2]


def test_the_teachers_table_says_what_each_teacher_started_from():
    from mtkd.results import TEACHER_COLUMNS, teacher_table

    base = {**{k: "" for k in TEACHER_COLUMNS}, "teacher": "trees", "architecture": "resnet18", "optimizer": "adam",
            "lr": "0.0003", "weight_decay": "0.0005", "batch_size": "32", "cutout": "0", "dustbin": "False",
            "epochs": "10", "seed": "42", "best_epoch": "9", "val_acc": "0.8", "test_acc": "0.79"}
    table = teacher_table([{**base, "init": "file /somewhere/TaskA85/teachers/others.pt"},
                           {**base, "init": "random", "val_acc": "0.7"},
                           {**base, "init": "plain teacher runs/TaskA/teachers/trees.pt", "dustbin": "True"}])
    lines = table.splitlines()[2:]
    assert "| adam lr 0.0003, wd 0.0005, batch 32, from others.pt | 10 |" in lines[0]  # the file's name, not where
    assert "| adam lr 0.0003, wd 0.0005, batch 32 | 10 |" in lines[1]
    assert "| adam lr 0.0003, wd 0.0005, batch 32, dustbin, from the plain teacher | 10 |" in lines[2]
    assert "/somewhere" not in table


def test_a_teacher_trained_again_with_the_same_recipe_is_recorded_again():
    from mtkd.results import TEACHER_COLUMNS, teacher_is_recorded

    row = {**{k: "" for k in TEACHER_COLUMNS}, "task": "A85", "teacher": "others", "architecture": "resnet18",
           "seed": "42", "epochs": "10", "test_acc": "0.674", "finished": "2026-12-06T20:00:00Z"}
    assert teacher_is_recorded([row], dict(row))  # the same checkpoint
    again = {**row, "test_acc": "0.676", "finished": "2026-12-07T10:54:38Z"}  # retrained on another machine
    assert not teacher_is_recorded([row], again)
    assert not teacher_is_recorded([row], {**row, "seed": "0"})


def test_a_marker_renders_the_part_of_the_main_table_its_filters_name(tmp_path):
    results = tmp_path / "results"
    for student, alpha, seed, acc in (("MobileNetV3", 0, 0, 0.40), ("MobileNetV3", 0.5, 0, 0.45),
                                      ("ResNet18", 0, 0, 0.50), ("ResNet18", 0.5, 0, 0.56)):
        append_record(results / "s.csv", record({**_summary(acc, seed), "student_model": student},
                                                {**_args(alpha=alpha, seed=seed), "student_model": student}))
    page = tmp_path / "README.md"
    page.write_text("<!-- results: s.csv student=ResNet18 -->\n<!-- end results -->\n"
                    "<!-- results: s.csv -->\n<!-- end results -->\n")
    assert run_script("benchmarks/study.py", "readme", "--root", tmp_path).returncode == 0
    filtered, whole = page.read_text().split("<!-- results: s.csv -->")
    # Only ResNet18's rows, its distilled run still paired with its labels-only run (+6 points).
    assert "| ResNet18 | 1 | labels |" in filtered and "MobileNetV3 |" not in filtered
    assert "| 56.00 ± 0.00 | +6.00 ± 0.00 (1 seed) |" in filtered
    assert "| MobileNetV3 | 1 | labels |" in whole and "| ResNet18 | 1 | labels |" in whole
    assert run_script("benchmarks/study.py", "readme", "--check", "--root", tmp_path).returncode == 0
    # A marker the script cannot read, or a column it cannot filter on: one message, exit 2, the page untouched.
    before = page.read_text()
    (results / "t.csv").write_text("teacher,val_acc\ntrees,0.7\n")  # a teachers' study file: no filters
    for marker in ("s.csv student ResNet18", "s.csv seed=0", "missing.csv", "t.csv student=trees"):
        page.write_text(f"<!-- results: {marker} -->\n<!-- end results -->\n" + before)
        proc = run_script("benchmarks/study.py", "readme", "--root", tmp_path)
        assert proc.returncode == 2 and "Fix:" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert page.read_text().startswith(f"<!-- results: {marker} -->\n<!-- end results -->\n")


def test_runs_taught_by_an_assistant_pool_over_seeds_though_each_seed_has_its_own(tmp_path):
    path = tmp_path / "study.csv"
    for seed, acc in ((0, 0.40), (1, 0.42), (2, 0.44)):
        append_record(path, record(_summary(acc, seed), _args(alpha=0, seed=seed)))
    # Each seed is taught by the earlier student of its own seed (here a file gone: named by its run folder).
    for seed, (acc, assistant) in enumerate(((0.43, 0.70), (0.46, 0.74), (0.46, 0.75))):
        summary = {**_summary(acc, seed), "teachers": [{"name": "assistant", "test_acc": assistant,
                                                       "student_test_acc": acc, "precision": "fp32/NHWC"}]}
        append_record(path, record(summary, _args(alpha=0.5, seed=seed, teacher_assistant=tmp_path / "r18" / "best.pt"),
                                   selection=seed == 0))
    rows = load_records(path)
    assert {r["method"] for r in rows if r["alpha"] == "0.5"} == {"consensus/fixed/kl+assistant(r18)"}
    lines = [line for line in results_table(rows).splitlines() if "| MobileNetV3 |" in line]
    assert len(lines) == 2  # labels only, and one row for the three assistants' runs
    # Gains 3, 4 and 2 points; the assistants' mean accuracy (73.0) beside the student's (45.0).
    assert "| 0 1 2 | 45.00 ± 1.73 | +3.00 ± 1.00 (3 seeds) |" in lines[1] and "assistant 45.0 (73.0)" in lines[1]

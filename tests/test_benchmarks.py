"""The benchmark scripts run and report what the README quotes (tiny sizes: behaviour, not speed)."""
import argparse
import importlib.util
import json

from conftest import ROOT


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_distill_reports_every_rate_as_json(capsys):
    bench = load("bench_distill")
    args = bench.get_args_parser().parse_args(["--task", "B", "--synthetic", "32", "--batch_size", "16",
                                               "--repeats", "1", "--cache_views", "1", "--student_model",
                                               "MobileNetV3", "--precision_compare", "--infer_batch_size", "16",
                                               "--json"])
    out = bench.main(args)
    for key in ("baseline_img_s", "online_kd_img_s", "cached_kd_img_s", "data_batched_img_s", "data_pil_img_s",
                "fp32_student_train_img_s", "auto_student_train_img_s", "fp32_teacher_infer_img_s",
                "auto_teacher_infer_img_s"):
        assert out[key] > 0
    assert out["auto_vs_fp32_student_train"] == out["auto_student_train_img_s"] / out["fp32_student_train_img_s"]
    assert set(out["auto_teacher_precisions"]) == {"digits_0123", "digits_3456", "digits_67890"}
    assert out["image_shape"] == [1, 8, 8] and out["images"] == 32 and out["device"].startswith("cpu")
    json.dumps(out)  # one JSON object


def test_bench_distill_compile_compare_times_the_compiled_student_against_eager(monkeypatch):
    import torch

    bench = load("bench_distill")
    compiled = []

    def fake_compile(model, *a, **kw):  # compiling for real takes minutes on a CPU: record the call instead
        compiled.append(type(model).__name__)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    args = bench.get_args_parser().parse_args(["--task", "B", "--synthetic", "32", "--batch_size", "16",
                                               "--repeats", "1", "--cache_views", "1", "--student_model",
                                               "MobileNetV3", "--compile_compare", "--json"])
    out = bench.main(args)
    assert compiled == ["MobileNetV3"]  # the compiled pass's student only, once
    assert out["eager_cached_kd_img_s"] > 0 and out["compiled_cached_kd_img_s"] > 0
    assert out["compiled_vs_eager"] == out["compiled_cached_kd_img_s"] / out["eager_cached_kd_img_s"]
    assert "fp32_student_train_img_s" not in out  # --precision_compare's passes only when asked


def test_sweep_grid_covers_every_method_alpha_temperature_and_seed():
    from mtkd.config import get_args_parser

    sweep = load("sweep_methods")
    own = argparse.Namespace(methods=["baseline", "consensus:fixed", "mixture:entropy+online"], seeds=[0, 1],
                             label_fractions=[1.0, 0.1], alphas=[0.5, 0.9], temperatures=[2.0, 4.0])
    runs = sweep.configurations(get_args_parser().parse_args(["--teacher_cache", "c"]), own)
    # baseline: 1 per seed; each distilled method: 2 alphas x 2 temperatures per seed; at 2 fractions.
    assert len(runs) == 2 * (2 + 2 * 2 * 2 * 2)
    baseline = [r for r in runs if r.alpha == 0]
    assert len(baseline) == 4 and {r.temperature for r in baseline} == {2.0}
    online = [r for r in runs if r.teacher_weighting == "entropy"]
    assert len(online) == 16 and all(r.teacher_cache is None and r.aggregation == "mixture" for r in online)
    assert {(r.alpha, r.temperature) for r in online} == {(0.5, 2.0), (0.5, 4.0), (0.9, 2.0), (0.9, 4.0)}
    assert sweep.method_flags("amalgamate:entropy+online") == {
        "aggregation": "amalgamate", "teacher_weighting": "entropy", "teacher_cache": None}


def test_stem_ablation_variants_differ_only_where_they_say():
    import math

    import torch

    import tasks

    ablation = load("stem_ablation")
    task = tasks.get_task("A")
    x = torch.randn(1, 3, 32, 32)
    size = {v: ablation.create_variant("EfficientNet", task, v).eval().forward_features(x).shape[-1]
            for v in ablation.VARIANTS}
    assert size == {"mtkd": 4, "timm_head": 4, "stride16": 2, "imagenet": 1}
    fan_in = 1 / math.sqrt(1280)
    assert ablation.create_variant("EfficientNet", task, "mtkd").get_classifier().weight.abs().max() <= fan_in
    assert ablation.create_variant("EfficientNet", task, "timm_head").get_classifier().weight.abs().max() > 5 * fan_in


def test_teacher_diagnostics_measure_the_trained_teachers(smoke_run):
    import pytest
    import torch

    import tasks
    from mtkd.cache import open_teacher_cache
    from mtkd.data import BatchTransform, count_labelled, keep_labels, load_task_data
    from mtkd.errors import UserError
    from mtkd.evaluate import load_ensemble
    from mtkd.specialists import PRECISION_RECORD, example_batch, teacher_dir, teacher_path, teacher_precisions

    diag = load("teacher_diagnostics")
    task, out_dir, cpu = tasks.get_task("B"), smoke_run["output_dir"], torch.device("cpu")
    data = load_task_data(task)
    # The cache train.py --teacher_cache DIR --cache_views 2 builds for these teachers.
    ensemble = load_ensemble(task, out_dir)[0]
    transform = BatchTransform.for_task(task)
    paths = [teacher_path(out_dir, task, t) for t in task.teachers]
    example = example_batch(data.train, transform, cpu, 32)
    ensemble.set_precisions(teacher_precisions(ensemble, paths, example, "auto", False,
                                               teacher_dir(out_dir, task) / PRECISION_RECORD))
    open_teacher_cache(out_dir / "cache", "B", ensemble, data.train, transform, 2, cpu)
    flags = ["--task", "B", "--output_dir", str(out_dir), "--train_images", "64", "--temperatures", "1", "4",
             "--teacher_cache", str(out_dir / "cache")]
    out = diag.main(diag.get_args_parser().parse_args(flags + ["--cache_views", "2", "--label_fractions", "0.5",
                                                               "--stack_seeds", "0", "1", "--stack_features",
                                                               "--stacker_priors", "zero", "combination"]))
    assert out["splits"]["train, 2 cached views"]["images"] == 2 * len(data.train)
    # The stacker of --aggregation stacked, fitted on the labels each seed's run keeps, read on the others,
    # shrunk toward zero and toward the teachers' combination.
    assert [(r["label_fraction"], r["seed"], r["prior"]) for r in out["stacked"]] == [
        (0.5, 0, "zero"), (0.5, 0, "combination"), (0.5, 1, "zero"), (0.5, 1, "combination")]
    half = count_labelled(keep_labels(data.train, 0.5, 0))[0]
    for r in out["stacked"]:
        assert r["labelled"] == half and r["l2"] > 0
        # A right class is always in the right group.
        assert 0 <= r["unlabelled_acc"] <= r["unlabelled_group_acc"] <= 1
        assert 0 <= r["combination_acc"] <= r["combination_group_acc"] <= 1 and 0 <= r["val_acc"] <= 1
        if r["prior"] == "zero":  # the same regression on the teachers' pooled features, from the wider grid
            assert r["features_l2"] in diag.FEATURE_L2_GRID
            assert 0 <= r["features_unlabelled_acc"] <= 1 and 0 <= r["features_val_acc"] <= 1
    with pytest.raises(UserError, match="needs --label_fractions"):
        diag.main(diag.get_args_parser().parse_args(flags + ["--stack_features"]))
    with pytest.raises(UserError, match="no cache of these teachers and data with 3 views"):
        diag.main(diag.get_args_parser().parse_args(flags + ["--cache_views", "3"]))
    val = out["splits"]["val"]
    assert set(val["own_classes"]) == {"digits_0123", "digits_3456", "digits_67890"}
    for by_t in val["own_classes"].values():
        assert by_t["T1"]["acc"] == by_t["T4"]["acc"] and by_t["T4"]["entropy"] > by_t["T1"]["entropy"]
    assert set(val["home_ground"]) == {"max_prob", "max_logit", "energy", "neg_entropy"}
    # Routing can never beat picking a right teacher: a wrong teacher cannot name the label.
    assert all(0 <= m["acc"] <= m["group_acc"] <= 1 for m in val["home_ground"].values())
    assert out["splits"]["train (64 images)"]["images"] == 64
    diag.print_tables(out)


def test_teacher_diagnostics_without_teachers_says_how_to_get_them(tmp_path):
    from conftest import run_script

    proc = run_script("benchmarks/teacher_diagnostics.py", "--task", "B", "--output_dir", tmp_path)
    assert proc.returncode == 2
    assert "teacher checkpoints not found" in proc.stdout + proc.stderr and "Traceback" not in proc.stderr


def test_teacher_diagnostics_read_a_dustbin_as_one_more_home_ground_score():
    import torch
    from torch import nn

    from mtkd.teachers import TeacherEnsemble

    diag = load("teacher_diagnostics")
    ens = TeacherEnsemble([nn.Identity(), nn.Identity()], [[0, 1], [2, 3]], [1.0, 1.0], 4, ["a", "b"],
                          dustbin=[True, True])
    # Image 0 (class 1) and image 1 (class 2): each teacher's dustbin says which group the image is in, while
    # the own-class logits alone point the other way (b is the more confident on image 0).
    raw = [torch.tensor([[0.0, 2.0, -3.0], [0.0, 1.0, 3.0]]), torch.tensor([[9.0, 0.0, 12.0], [6.0, 0.0, -3.0]])]
    out = diag.measure(ens, raw, torch.tensor([1, 2]), [1.0])
    assert out["home_ground"]["dustbin"] == {"group_acc": 1.0, "acc": 1.0}
    assert out["home_ground"]["max_prob"]["group_acc"] == 0.5  # without the dustbin, b wins image 0 too
    assert out["own_classes"]["a"]["T1"]["acc"] == 1.0  # own classes: the dustbin output left out


def test_teacher_ensemble_averages_members_that_err_on_different_images():
    import pytest
    import torch

    bench = load("teacher_ensemble")
    labels = torch.tensor([0, 1, 1])
    # Member 0 is confidently right on images 0 and 1 and narrowly wrong on 2; member 1 the reverse on 0.
    a = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.55, 0.45]])
    b = torch.tensor([[0.45, 0.55], [0.3, 0.7], [0.1, 0.9]])
    # Member 0 on the mirrored images: right on 2, narrowly wrong on 1; averaged with its plain reading, both right.
    a_mirror = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    out = bench.readings([(a, a_mirror), (b, b)], labels)
    assert [s["acc"] for s in out["single"]] == pytest.approx([2 / 3, 2 / 3])
    assert [s["flip_acc"] for s in out["single"]] == pytest.approx([1.0, 2 / 3])
    assert out["ensembles"] == [{"members": [0, 1], "acc": 1.0, "flip_acc": 1.0}]


def test_teacher_ensemble_reads_one_checkpoint_twice_as_itself(smoke_run):
    import tasks
    from mtkd.data import load_task_data
    from mtkd.specialists import teacher_path

    bench = load("teacher_ensemble")
    task = tasks.get_task("B")
    spec = task.teachers[0]
    path = teacher_path(smoke_run["output_dir"], task, spec)
    out = bench.main(bench.get_args_parser().parse_args([str(path), str(path), "--task", "B",
                                                        "--teacher", spec.name]))
    data = load_task_data(task)
    ids = task.class_indices(spec.classes)
    # The teacher's own classes' images only.
    assert out["images"] == {s: len(data.split(s).select_classes(ids)) for s in ("val", "test")}
    assert out["images"]["val"] < len(data.val)
    for r in out["splits"].values():
        first, second = r["single"]
        assert first == second and 0 < first["acc"] <= 1
        assert r["ensembles"] == [{"members": [0, 1], **first}]
    bench.print_tables(out)


def test_teacher_ensemble_names_a_wrong_teacher_or_missing_checkpoint(tmp_path):
    from conftest import run_script

    proc = run_script("benchmarks/teacher_ensemble.py", tmp_path / "none.pt", "--task", "B", "--teacher", "trees")
    assert proc.returncode == 2 and "has no teacher 'trees'" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_script("benchmarks/teacher_ensemble.py", tmp_path / "none.pt", "--task", "B",
                      "--teacher", "digits_0123")
    assert proc.returncode == 2 and "teacher checkpoints not found" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


def test_denormals_benchmark_makes_the_share_it_asks_and_times_both_settings(capsys):
    import torch

    bench = load("denormals")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 3))
    torch.set_flush_denormal(True)  # as an earlier resolve_device leaves it: the benchmark turns it off
    try:
        bench.make_denormal(model, 0.5)
        assert 0.4 < bench.denormal_share(model) < 0.6
        out = bench.main(bench.get_args_parser().parse_args(
            ["--architecture", "resnet18", "--classes", "3", "--batch_size", "2", "--repeats", "1"]))
    finally:
        torch.set_flush_denormal(False)
    assert set(out) == {(False, True), (False, False), (True, True), (True, False)}
    assert all(v > 0 for v in out.values())
    assert "90.0% of convolution weights denormal" in capsys.readouterr().out


def test_denormals_benchmark_names_a_missing_checkpoint(tmp_path):
    from conftest import run_script

    proc = run_script("benchmarks/denormals.py", "--checkpoint", tmp_path / "none.pt")
    assert proc.returncode == 2 and "is not a file" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr

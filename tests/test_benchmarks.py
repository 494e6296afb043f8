"""The benchmark scripts run and report what the README quotes (tiny sizes: behaviour, not speed)."""
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


def test_sweep_table_summarises_seeds(tmp_path):
    sweep = load("sweep_methods")
    rows = [{"method": "consensus:fixed", "seed": s, "test_acc": a, "best_val_acc": 0.9, "ensemble_test_acc": 0.7}
            for s, a in ((0, 0.97), (1, 0.99))]
    table = sweep.table(rows)
    assert "| 1 | consensus:fixed | ? / ? | 2 | 98.00 ± 1.41 | 90.00 |" in table and "| 70.00 |" in table
    rows = [{**r, "label_fraction": 0.1, "labelled_images": 117, "unlabelled_images": 1050} for r in rows]
    assert "| 0.1 | consensus:fixed | 117 / 1050 | 2 | 98.00 ± 1.41 | 90.00 |" in sweep.table(rows)
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

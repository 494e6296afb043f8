import json

import pytest
import torch
from torch import nn

from mtkd.precision import FP32, Precision, candidates, cpu_bf16_units, cpu_model, resolve_precision, time_precision

CPU = torch.device("cpu")


def _model():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))


def _fake_timer(speeds):
    """A timer that reports ``speeds[str(precision)]`` and records what it was asked."""
    asked = []

    def timer(model, example, precision, train, steps=3):
        asked.append((str(precision), train))
        return speeds[str(precision)]

    return timer, asked


@pytest.mark.parametrize("flags, expected", [
    ({"fpu", "avx2", "amx_bf16", "amx_tile", "avx512_bf16"}, "amx_bf16"),
    ({"avx2", "avx512f", "avx512_bf16"}, "avx512_bf16"),
    ({"fp", "asimd", "bf16", "sve"}, "bf16"),  # Arm
    ({"fpu", "avx", "avx2", "f16c"}, None),  # e.g. AMD Zen 3: no bf16 units
])
def test_cpu_bf16_units_from_flags(flags, expected):
    assert cpu_bf16_units(flags) == expected


ZEN4 = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n"
ZEN5 = ZEN4.replace("25", "26").replace(": 17", ": 2")


def test_the_cpu_model_tells_apart_cpus_a_virtual_machine_names_alike():
    assert cpu_model(ZEN4) == "AMD EPYC (family 25, model 17)"
    assert cpu_model(ZEN5 + "\nprocessor\t: 1\ncpu family\t: 99\n") == "AMD EPYC (family 26, model 2)"
    assert cpu_model("processor\t: 0\nmodel name\t: Some CPU\n") == "Some CPU"  # no family given: the name alone
    assert cpu_model("") != ""  # no /proc/cpuinfo: the platform's name


def test_a_cpu_without_bf16_units_keeps_fp32():
    """auto never tries bf16 where the CPU would emulate it, however fast a timer says it is."""
    speeds = {"fp32/NCHW": 100, "fp32/NHWC": 90, "bf16/NHWC": 1000, "bf16/NCHW": 1000}
    timer, asked = _fake_timer(speeds)
    p, measured = resolve_precision("auto", CPU, _model(), torch.randn(2, 3, 4, 4), timer=timer,
                                    bf16_units=lambda: None)
    assert p == FP32 and set(measured) == {"fp32/NCHW", "fp32/NHWC"}
    assert all(dtype.startswith("fp32") for dtype, _ in asked)


def test_auto_picks_the_fastest_measured_candidate_per_role():
    timer, asked = _fake_timer({"fp32/NCHW": 100, "fp32/NHWC": 120, "bf16/NHWC": 250, "bf16/NCHW": 200})
    p, _ = resolve_precision("auto", CPU, _model(), torch.randn(2, 3, 4, 4), train=False, timer=timer,
                             bf16_units=lambda: "amx_bf16")
    assert p == Precision("bf16", True) and {train for _, train in asked} == {False}
    # A model that trains faster in fp32 (MobileNetV3 on AMX, measured) keeps fp32, in the faster layout.
    timer, _ = _fake_timer({"fp32/NCHW": 250, "fp32/NHWC": 313, "bf16/NHWC": 179, "bf16/NCHW": 150})
    p, _ = resolve_precision("auto", CPU, _model(), torch.randn(2, 3, 4, 4), timer=timer, bf16_units=lambda: "amx_bf16")
    assert p == Precision("fp32", True)


def test_auto_keeps_the_reference_unless_a_candidate_is_clearly_faster():
    timer, _ = _fake_timer({"fp32/NCHW": 100, "fp32/NHWC": 103})
    p, _ = resolve_precision("auto", CPU, _model(), torch.randn(2, 3, 4, 4), timer=timer, bf16_units=lambda: None)
    assert p == FP32


def test_forced_modes_and_deterministic_runs_time_nothing():
    timer, asked = _fake_timer({})
    assert resolve_precision("off", CPU, _model(), torch.randn(2, 3, 4, 4), timer=timer)[0] == FP32
    assert resolve_precision("bf16", CPU, _model(), torch.randn(2, 3, 4, 4), timer=timer)[0] == Precision("bf16")
    assert resolve_precision("fp16", CPU, timer=timer)[0] == Precision("fp16")
    assert resolve_precision("auto", CPU, _model(), torch.randn(2, 3, 4, 4), deterministic=True, timer=timer,
                             bf16_units=lambda: "amx_bf16")[0] == FP32
    assert asked == []
    with pytest.raises(ValueError):
        resolve_precision("fp8", CPU)


def test_candidates_start_with_the_reference():
    assert [str(p) for p in candidates(CPU, None)] == ["fp32/NCHW", "fp32/NHWC"]
    assert [str(p) for p in candidates(CPU, "amx_bf16")] == ["fp32/NCHW", "fp32/NHWC", "bf16/NHWC", "bf16/NCHW"]


def test_precision_round_trips_and_prepares_layouts():
    for p in candidates(CPU, "amx_bf16"):
        assert Precision.parse(str(p)) == p
    model = Precision("fp32", True).prepare_model(_model())
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = Precision("bf16", True).prepare_input(torch.randn(2, 3, 4, 4))
    assert x.is_contiguous(memory_format=torch.channels_last)
    with Precision("bf16").autocast(CPU):
        assert model(x).dtype == torch.bfloat16
    with FP32.autocast(CPU):
        assert model(x).dtype == torch.float32
    with pytest.raises(ValueError):
        Precision.parse("fp32")


def test_auto_times_the_candidates_round_robin_so_a_burst_of_load_slows_no_one_candidate():
    from mtkd.precision import TIMING_ROUNDS

    speeds = {"fp32/NCHW": 20, "fp32/NHWC": 21, "bf16/NHWC": 38, "bf16/NCHW": 34}
    calls = []

    def timer(model, example, precision, train, steps=3):  # another process runs while calls 2-3 are timed
        calls.append((str(precision), steps))
        return speeds[str(precision)] / (4 if len(calls) in (3, 4) else 1)

    p, measured = resolve_precision("auto", CPU, _model(), torch.randn(2, 3, 4, 4), timer=timer,
                                    bf16_units=lambda: "avx512_bf16")
    assert p == Precision("bf16", True) and measured == speeds  # each candidate's best round
    assert len(calls) == 4 * TIMING_ROUNDS and all(steps == 1 for _, steps in calls)
    assert [name for name, _ in calls[:4]] == [name for name, _ in calls[4:8]]  # round robin


def test_timing_leaves_the_model_and_the_random_state_alone():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    example = torch.randn(4, 3, 4, 4)
    rng = torch.get_rng_state()
    speed = time_precision(model, example, Precision("fp32", True), train=True, steps=1)
    assert speed > 0 and torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN statistics untouched
    assert model[0].weight.is_contiguous() and model[0].weight.grad is None


from mtkd.precision import SavedPrecisions, keep_saved  # noqa: E402


@pytest.mark.parametrize("saved, amp_given, units, kept, says", [
    (SavedPrecisions("bf16/NHWC", device="cpu"), False, "amx_bf16", "bf16/NHWC", ""),
    (SavedPrecisions("fp32/NHWC", device="cpu"), False, None, "fp32/NHWC", ""),
    (SavedPrecisions("bf16/NHWC"), False, "amx_bf16", "bf16/NHWC", ""),  # older checkpoints: no device recorded
    # An explicit --amp wins over the saved choice.
    (SavedPrecisions("bf16/NHWC", device="cpu"), True, "amx_bf16", None, "--amp given again"),
    # A CUDA run (bf16) resumed on a CPU: the device changed.
    (SavedPrecisions("bf16/NHWC", device="cuda"), False, "amx_bf16", None, "chosen on cuda"),
    # bf16 without bf16 units would be emulated.
    (SavedPrecisions("bf16/NHWC"), False, None, None, "emulated"),
    (SavedPrecisions(None, device="cpu"), False, None, None, ""),
])
def test_a_resumed_run_keeps_its_precision_unless_the_flag_or_the_device_says_otherwise(saved, amp_given, units,
                                                                                       kept, says):
    saved = SavedPrecisions(saved.student, device=saved.device, amp_given=amp_given)
    precision, why = keep_saved(saved.student, saved, CPU, "student", bf16_units=lambda: units)
    assert (str(precision) if precision else None) == kept
    assert (says in why) if says else why == ""


def test_saved_precisions_read_from_a_checkpoint():
    state = {"precision": "fp32/NCHW", "teacher_precisions": ["bf16/NHWC", "fp32/NCHW"], "precision_device": "cpu"}
    saved = SavedPrecisions.from_checkpoint(state, amp_given=False)
    assert saved == SavedPrecisions("fp32/NCHW", ("bf16/NHWC", "fp32/NCHW"), "cpu", False)
    assert SavedPrecisions.from_checkpoint({"precision": "fp32/NCHW"}, True).teachers is None
    assert SavedPrecisions.from_checkpoint(None, False) == SavedPrecisions()


def test_a_recorded_choice_is_found_again_for_the_same_model_on_the_same_machine(tmp_path):
    from mtkd.precision import PrecisionRecord
    from mtkd.precision import recorded_choice

    path, cpu = tmp_path / "precisions.json", torch.device("cpu")
    timed = []

    def choose():
        timed.append(1)
        return Precision("bf16", True) if len(timed) % 2 else Precision("fp32", True)

    identity = {"batch": [32, 3, 32, 32]}
    first = recorded_choice(PrecisionRecord(path, cpu), "student S", identity, "auto", False, choose, "student S")
    # A later run (a new record object reads the file) times nothing and gets the same choice.
    again = recorded_choice(PrecisionRecord(path, cpu), "student S", identity, "auto", False, choose, "student S")
    assert first == again == Precision("bf16", True) and len(timed) == 1
    # Another batch shape, or a forced / deterministic run, is timed (and only auto writes the record).
    other = recorded_choice(PrecisionRecord(path, cpu), "student S", {"batch": [64, 3, 32, 32]}, "auto", False,
                            choose, "student S")
    assert other == Precision("fp32", True) and len(timed) == 2
    recorded_choice(PrecisionRecord(path, cpu), "student S", identity, "off", False, choose, "student S")
    recorded_choice(PrecisionRecord(path, cpu), "student S", identity, "auto", True, choose, "student S")
    assert len(timed) == 4
    # Another machine's entries are kept beside this one's.
    table = json.loads(path.read_text())
    table["cuda | Some GPU | torch 0"] = {"student S": {"batch": [1], "precision": "bf16/NHWC"}}
    path.write_text(json.dumps(table))
    PrecisionRecord(path, cpu).put("student T", identity, Precision("fp32", False))
    assert set(json.loads(path.read_text())) == {"cuda | Some GPU | torch 0", PrecisionRecord(path, cpu).machine}

import pytest

from mtkd.config import parse_args
from mtkd.trainer import write_run_args

TASKS = ["A", "B"]


def test_config_file_replaces_defaults_and_the_command_line_wins(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("alpha: 0.3\noptimizer: sgd\nteacher_weights: [1, 2, 3]\ncompile: true\nscheduler: cosine\n")
    args = parse_args(["--config", str(cfg), "--alpha", "0.2"], TASKS)
    assert args.alpha == 0.2 and args.optimizer == "sgd" and args.teacher_weights == [1.0, 2.0, 3.0]
    assert args.compile is True and args.scheduler == "cosine" and args.lr == 0.001  # untouched default


@pytest.mark.parametrize("text, message", [
    ("alpha: 0.5\ncolour: red\n", "unknown key(s) colour"),
    ("alpha: 2\n", "alpha: 2 is out of range: must be between 0 and 1"),
    ("optimizer: rmsprop\n", "optimizer: 'rmsprop' is not one of adam, adamw, sgd"),
    ("task: Z\n", "task: unknown task 'Z'"),
    ("- alpha\n", "expected a mapping"),
    ("alpha: [unclosed\n", "not valid YAML"),
])
def test_bad_config_files_exit_2_with_one_message(tmp_path, capsys, text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(SystemExit) as e:
        parse_args(["--config", str(cfg)], TASKS)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_missing_config_file_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--config", str(tmp_path / "none.yaml")], TASKS)
    assert e.value.code == 2 and "cannot read it" in capsys.readouterr().err


def test_a_runs_saved_config_feeds_back_to_the_same_arguments(tmp_path):
    args = parse_args(["--alpha", "0.7", "--teacher_weights", "1,2,3", "--temperature_final", "1",
                       "--aggregation", "amalgamate", "--save_top_k", "3", "--resume", "latest"], TASKS)
    write_run_args(tmp_path, args)
    again = parse_args(["--config", str(tmp_path / "config.yaml")], TASKS)
    expected = {**vars(args), "config": str(tmp_path / "config.yaml"), "resume": None}
    assert vars(again) == expected
    # args.json is JSON, which YAML reads too.
    assert vars(parse_args(["--config", str(tmp_path / "args.json")], TASKS))["alpha"] == 0.7


def test_training_and_dkd_flags_reach_their_settings():
    from mtkd.terms import KDConfig

    args = parse_args(["--amp", "bf16", "--compile", "--kd_loss", "dkd", "--dkd_alpha", "2", "--dkd_beta", "4",
                       "--weight_decay", "0", "--scheduler_step", "5", "--scheduler_gamma", "0.1", "--seed", "7",
                       "--num_workers", "2"], TASKS)
    assert (args.amp, args.compile, args.weight_decay, args.scheduler_step, args.scheduler_gamma, args.seed,
            args.num_workers) == ("bf16", True, 0.0, 5, 0.1, 7, 2)
    kd = KDConfig.from_args(args)
    assert (kd.kd_loss, kd.dkd_alpha, kd.dkd_beta, kd.dkd_warmup) == ("dkd", 2.0, 4.0, 5)


@pytest.mark.parametrize("flags, message", [
    (["--amp", "fp8"], "--amp: invalid choice: 'fp8'"),
    (["--dkd_alpha", "-1"], "--dkd_alpha: -1 is out of range"),
    (["--dkd_beta", "x"], "--dkd_beta: 'x' is not a valid float"),
])
def test_bad_training_and_dkd_flags_exit_2(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(flags, TASKS)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_documented_defaults():
    """The defaults of the documentation train.py implements (README flag table)."""
    args = parse_args([], TASKS)
    documented = {"task": "B", "lr": 0.001, "batch_size": 32, "num_epochs": 100, "weight_decay": 0.0005,
                  "temperature": 2.0, "alpha": 0.1, "scheduler_step": 30, "scheduler_gamma": 0.5,
                  "student_model": "EfficientNet", "seed": 42, "run": "", "amp": "auto"}
    assert {k: vars(args)[k] for k in documented} == documented


def test_shipped_config_files_are_valid():
    """Every file in configs/ parses and only sets known flags to valid values."""
    from conftest import ROOT

    files = sorted((ROOT / "configs").glob("*.yaml"))
    assert files
    for path in files:
        args = parse_args(["--config", str(path)], TASKS)
        assert args.task in TASKS and args.num_epochs >= 1


def test_every_flag_is_documented():
    """Every option of train.py appears in the README's flag table (or a page under docs/)."""
    from conftest import ROOT

    from mtkd.config import get_args_parser

    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    text = "\n".join(p.read_text() for p in pages)
    flags = [o for a in get_args_parser(TASKS)._actions for o in a.option_strings if o.startswith("--")]
    missing = [f for f in flags if f"`{f}`" not in text.split("## Flags")[-1] and f != "--help"]
    assert not missing, f"not in a flag table: {missing}"

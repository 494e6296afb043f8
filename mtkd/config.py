"""The command line: one argparse parser holding every default, and its validation.

Out-of-range values are rejected by the parser itself (exit code 2, one
message naming the flag) before any work starts.
"""
from __future__ import annotations

import argparse

from .terms import AGGREGATIONS, KD_LOSSES
from .losses import WEIGHTINGS
from .optim import OPTIMIZERS, SCHEDULERS
from .precision import AMP_MODES
from .stacking import PRIORS
from .models import HUB, list_students


def _ranged(kind, low=None, high=None, low_open=False, what="", high_open=False):
    """An argparse type that parses ``kind`` and checks ``low <= v <= high``."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {what}")
        return value

    return parse


positive_float = _ranged(float, 0.0, low_open=True, what="> 0")
unit_float = _ranged(float, 0.0, 1.0, what="between 0 and 1")
nonneg_float = _ranged(float, 0.0, what=">= 0")
positive_int = _ranged(int, 1, what=">= 1")
nonneg_int = _ranged(int, 0, what=">= 0")


def weights_list(text: str) -> list[float]:
    """``--teacher_weights 0.5,0.3,0.2``: positive numbers, one per teacher."""
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not weights or any(not w > 0 for w in weights):
        raise argparse.ArgumentTypeError(f"{text}: every weight must be > 0")
    return weights


def task_type(task_names: list[str] | None):
    """``--task``: a registered task name, or the path of a ``.toml`` task file."""

    def parse(text: str) -> str:
        if task_names is None or text in task_names or text.endswith(".toml"):
            return text
        raise argparse.ArgumentTypeError(
            f"unknown task {text!r}; known: {', '.join(task_names)}, or a PATH.toml task file")

    return parse


def get_args_parser(task_names: list[str] | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a task's specialist teachers (when missing) and distil them into one student.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--task", default="B", type=task_type(task_names),
                   help=f"task name ({', '.join(task_names or [])}) or a PATH.toml task file")
    p.add_argument("--lr", type=positive_float, default=0.001, help="learning rate (Adam)")
    p.add_argument("--batch_size", type=positive_int, default=32, help="batch size")
    p.add_argument("--num_epochs", type=positive_int, default=100, help="student training epochs")
    p.add_argument("--weight_decay", type=nonneg_float, default=0.0005, help="weight decay")
    p.add_argument("--temperature", type=positive_float, default=2.0, help="distillation temperature T")
    p.add_argument("--alpha", type=unit_float, default=0.1,
                   help="weight of the teachers' soft loss: 0 = labels only, 1 = teachers only")
    p.add_argument("--scheduler_step", type=positive_int, default=30, help="StepLR step size (epochs)")
    p.add_argument("--scheduler_gamma", type=_ranged(float, 0.0, 1.0, low_open=True, what="in (0, 1]"),
                   default=0.5, help="StepLR decay factor")
    p.add_argument("--student_model", default="EfficientNet", choices=list_students(), help="student architecture")
    p.add_argument("--seed", type=int, default=42, help="random seed")
    p.add_argument("--pretrained", nargs="?", const=HUB, default=None, metavar="PATH",
                   help="start the student from pretrained weights: timm's own for its architecture (downloaded "
                        "from the Hugging Face hub) without PATH, or a local file in timm's format (.safetensors, "
                        ".pth, .bin); the classifier is new, the first convolution adapted to the task's channels")
    p.add_argument("--run", "--run_name", dest="run", default="",
                   help="suffix appended to the run folder name (--run_name under torchrun, whose own parser "
                        "takes --run for its --run-path)")
    p.add_argument("--data_root", default="data", help="where datasets are found or downloaded")
    p.add_argument("--output_dir", default="runs", help="where run folders and teachers are written")
    p.add_argument("--device", default="auto", help="'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--label_fraction", type=_ranged(float, 0.0, 1.0, low_open=True, what="in (0, 1]"), default=1.0,
                   help="keep the labels of this stratified fraction of the training images (seeded by --seed); the "
                        "others are used without labels, by the teachers' losses only (not at all when alpha = 0 "
                        "and no feature or embedding term is on)")
    p.add_argument("--transfer_images", type=nonneg_int, default=0, metavar="N",
                   help="a transfer set: N more training images, of CIFAR-100's classes outside the task, without "
                        "labels (taught by the teachers' soft losses only; the same stratified choice for every "
                        "seed). CIFAR-100 tasks only; 0 = none")
    p.add_argument("--teacher_epochs", type=positive_int, default=30, help="epochs for each teacher trained")
    p.add_argument("--teacher_optimizer", default="adam", choices=OPTIMIZERS,
                   help="optimiser of each teacher trained (adam, adamw, or sgd)")
    p.add_argument("--teacher_lr", type=positive_float, default=None,
                   help="learning rate of each teacher trained (default: --lr)")
    p.add_argument("--teacher_weight_decay", type=nonneg_float, default=None,
                   help="weight decay of each teacher trained (default: --weight_decay)")
    p.add_argument("--teacher_cutout", type=nonneg_int, default=0, metavar="PX",
                   help="Cutout for each teacher trained: a PX x PX square of every training view, at a random "
                        "centre, set to the dataset mean (DeVries & Taylor 2017); 0 = off")
    p.add_argument("--teacher_architecture", default=None, metavar="ARCH",
                   help="every teacher of the task is this timm architecture instead of the task's (trained when "
                        "missing; a checkpoint of another architecture is an error, not overwritten)")
    p.add_argument("--teacher_pretrained", default=None, metavar="FILE",
                   help="every teacher mtkd trains starts from these weights and is fine-tuned on its classes: a "
                        "state dict in timm's format (.safetensors, .pth) or an mtkd teacher checkpoint (e.g. Task "
                        "A85's, trained on other classes), of the teachers' architecture; the classifier is new")
    p.add_argument("--retrain_teachers", action="store_true", help="train the teachers even if checkpoints exist")
    p.add_argument("--teacher_dustbin", action="store_true",
                   help="teachers with a dustbin (Hinton et al. 2015): one more output, 'other', trained on as many "
                        "images of the task's other classes; kept as <name>-dustbin.pt beside the plain teachers "
                        "(trained when missing); each weighs itself per image by its probability that the image is "
                        "its own")
    p.add_argument("--dustbin_from_plain", action="store_true",
                   help="with --teacher_dustbin: a dustbin teacher to be trained starts from the plain teacher beside "
                        "it (its weights and class outputs kept, the 'other' output new; Hinton et al. start each "
                        "specialist from the generalist) and is fine-tuned for --teacher_epochs at --teacher_lr")
    p.add_argument("--num_workers", type=nonneg_int, default=0,
                   help="DataLoader worker processes (in-memory tasks are fastest with 0)")
    kd = p.add_argument_group("distillation methods")
    kd.add_argument("--aggregation", default="consensus", choices=AGGREGATIONS,
                    help="how teachers with different class sets combine: mixture (label-blind weighted mixture), "
                         "consensus (only teachers that know the label), amalgamate (each teacher vs the student "
                         "renormalised over its classes), combination (Hinton's specialist combination, label-free), "
                         "stacked (the teachers calibrated into one classifier by the labelled images: a logistic "
                         "regression over all their outputs, fitted before training)")
    kd.add_argument("--stacker_prior", default="zero", choices=PRIORS,
                    help="with --aggregation stacked: what the stacker's L2 penalty shrinks its weights toward: zero, "
                         "or the teachers' specialist combination (with few labels it then falls back to the "
                         "combination where the labels cannot beat it; the cross-validation chooses how far)")
    kd.add_argument("--teacher_weighting", default="fixed", choices=WEIGHTINGS,
                    help="fixed (task or --teacher_weights), confidence (CA-MKD), entropy (EBKD), per sample")
    kd.add_argument("--teacher_weights", type=weights_list, default=None, metavar="W1,W2,...",
                    help="fixed teacher weights, one per teacher, normalised (default: the task's)")
    kd.add_argument("--kd_loss", default="kl", choices=KD_LOSSES,
                    help="kl (Hinton), shift (KL to the target with its top class moved to the label, Wen et al. "
                         "2019) or dkd (Decoupled KD)")
    kd.add_argument("--dkd_alpha", type=nonneg_float, default=1.0, help="DKD target-class (TCKD) weight")
    kd.add_argument("--dkd_beta", type=nonneg_float, default=8.0, help="DKD non-target-class (NCKD) weight")
    kd.add_argument("--dkd_warmup", type=nonneg_int, default=5,
                    help="DKD: epochs over which the soft term ramps up linearly (0 = none)")
    kd.add_argument("--feature_weight", type=nonneg_float, default=0.0,
                    help="weight of feature matching (MSE through 1x1 adapters); 0 = off")
    kd.add_argument("--attention_weight", type=nonneg_float, default=0.0,
                    help="weight of attention transfer (Zagoruyko & Komodakis) at --feature_layers; 0 = off")
    kd.add_argument("--embedding_weight", type=nonneg_float, default=0.0,
                    help="weight of embedding matching: the student's pooled features through a linear adapter per "
                         "teacher, matched in direction (2 - 2 cos) to the teacher's; kept in --teacher_cache; 0 = off")
    kd.add_argument("--feature_layers", default="-1", metavar="STAGES",
                    help="stages to match: comma-separated indices (-1 = last) or timm module names (layer3)")
    kd.add_argument("--temperature_final", type=positive_float, default=None,
                    help="temperature at the last epoch; linear schedule from --temperature (default: constant)")
    kd.add_argument("--ema_teacher", type=_ranged(float, 0.0, 1.0, what="in [0, 1)", high_open=True), default=0.0, metavar="DECAY",
                    help="> 0: an EMA of the student with this decay joins the teachers (self-distillation)")
    kd.add_argument("--teacher_assistant", default=None, metavar="CKPT",
                    help="teach with an earlier student of this task instead of its specialists (a teacher "
                         "assistant, Mirzadeh et al. 2020): that run's best.pt, one teacher over every class; the "
                         "specialist flags (--teacher_architecture, --teacher_pretrained) then go unused")
    kd.add_argument("--teacher_cache", default=None, metavar="DIR",
                    help="cache the teachers' logits on --cache_views augmented views under DIR and replay them")
    kd.add_argument("--cache_views", type=positive_int, default=8, help="augmented views per image in the cache")
    tr = p.add_argument_group("training options")
    tr.add_argument("--optimizer", default="adam", choices=OPTIMIZERS, help="adam, adamw, or sgd (Nesterov 0.9)")
    tr.add_argument("--scheduler", default="step", choices=SCHEDULERS,
                    help="step (--scheduler_step / --scheduler_gamma), cosine (to 0 at the last epoch), or plateau "
                         "(lr *= --scheduler_gamma after --scheduler_step epochs without a better val accuracy)")
    tr.add_argument("--warmup_epochs", type=nonneg_int, default=0, help="linear learning-rate warm-up epochs")
    tr.add_argument("--clip_grad", type=nonneg_float, default=0.0, metavar="NORM",
                    help="clip the gradients' global L2 norm to NORM; 0 = off")
    tr.add_argument("--grad_accum", type=positive_int, default=1, metavar="N",
                    help="accumulate the gradients of N batches per optimiser step")
    tr.add_argument("--amp", default="auto", choices=AMP_MODES,
                    help="precision and memory layout: auto (per model, what the device runs fastest: bf16 on CUDA "
                         "with bf16 and on CPUs with bf16 units, measured per model on the CPU, else fp32; "
                         "channels_last where faster), off (fp32), or force bf16 / fp16 (fp16 uses a GradScaler)")
    tr.add_argument("--compile", action="store_true", help="torch.compile the student")
    tr.add_argument("--deterministic", action="store_true",
                    help="deterministic algorithms only (bit-exact reruns and resumes; slower on GPU)")
    tr.add_argument("--eval_every", type=positive_int, default=1, metavar="N",
                    help="validate after every N-th epoch and the last (many short epochs: few labels); the best "
                         "checkpoint, top-k, early stopping and the plateau schedule see validated epochs only")
    tr.add_argument("--early_stopping", type=nonneg_int, default=0, metavar="PATIENCE",
                    help="stop after PATIENCE epochs without a better validation accuracy; 0 = off")
    tr.add_argument("--save_top_k", type=positive_int, default=1, metavar="K",
                    help="keep the K best checkpoints by validation accuracy (best.pt, and top/epoch_N.pt if K > 1)")
    p.add_argument("--config", default=None, metavar="FILE.yaml",
                   help="YAML (or JSON) file of flag values that replace the defaults; command-line flags win")
    p.add_argument("--resume", default=None, metavar="latest|RUN_DIR",
                   help="continue a run in its own folder from its last.pt, with its saved arguments "
                        "(flags given here override them, e.g. a larger --num_epochs)")
    return p


def explicit_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """Destinations of the options actually given in ``argv`` (not left at their defaults)."""
    probe = argparse.ArgumentParser(add_help=False)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            kwargs = {"dest": action.dest, "default": argparse.SUPPRESS}
            if action.nargs == 0:
                kwargs["action"] = "store_const"
                kwargs["const"] = True
            else:
                kwargs["nargs"] = action.nargs
            probe.add_argument(*action.option_strings, **kwargs)
    given, _ = probe.parse_known_args(argv)
    return set(vars(given))


# Not meaningful in a config file: they name this invocation, not a setting.
NOT_IN_CONFIG = ("config", "resume")


def apply_config(parser: argparse.ArgumentParser, argv: list[str] | None) -> None:
    """Make ``--config FILE``'s values the parser's defaults, checked like command-line values.

    Unknown keys and bad values end the program with exit code 2 and one
    message (``parser.error``). The run folder's ``config.yaml`` (and
    ``args.json``) can be fed back as they are.
    """
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--config")
    path = probe.parse_known_args(argv)[0].config
    if not path:
        return
    import yaml

    try:
        raw = yaml.safe_load(open(path)) or {}
    except OSError as e:
        parser.error(f"--config {path}: cannot read it ({e.strerror}). Fix: check the path.")
    except yaml.YAMLError as e:
        parser.error(f"--config {path}: not valid YAML ({str(e).splitlines()[0]}).")
    if not isinstance(raw, dict):
        parser.error(f"--config {path}: expected a mapping of flag names to values.")
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
    unknown = sorted(set(raw) - set(actions) - set(NOT_IN_CONFIG))
    if unknown:
        parser.error(f"--config {path}: unknown key(s) {', '.join(unknown)}. Fix: use flag names without "
                     f"dashes, e.g. alpha: 0.5 (python train.py --help lists them).")
    defaults = {}
    for key, value in raw.items():
        action = actions.get(key)
        if action is None or key in NOT_IN_CONFIG:
            continue
        if value is None or action.nargs == 0:
            defaults[key] = value if action.nargs != 0 else bool(value)
            continue
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        try:
            converted = action.type(text) if action.type else text
        except (argparse.ArgumentTypeError, ValueError) as e:
            parser.error(f"--config {path}: {key}: {e}")
        if action.choices is not None and converted not in action.choices:
            parser.error(f"--config {path}: {key}: {converted!r} is not one of {', '.join(map(str, action.choices))}")
        defaults[key] = converted
    parser.set_defaults(**defaults)


def parse_args(argv: list[str] | None = None, task_names: list[str] | None = None) -> argparse.Namespace:
    parser = get_args_parser(task_names)
    apply_config(parser, argv)
    return parser.parse_args(argv)


def get_eval_args_parser(task_names: list[str] | None = None, with_task: bool = True) -> argparse.ArgumentParser:
    """Flags of the evaluation scripts; ``with_task`` adds ``--task``, ``--image`` and ``--topk``."""
    p = argparse.ArgumentParser(
        description="Evaluate trained students on their task's test split and write reports.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    if with_task:
        p.add_argument("--task", type=task_type(task_names), action="append",
                       help="task name or PATH.toml to evaluate (repeatable; default: every built-in task)")
        p.add_argument("--image", help="predict one image file with the task's student instead (needs one --task)")
        p.add_argument("--topk", type=positive_int, default=3, help="classes to show with --image")
    p.add_argument("--checkpoint", help="student checkpoint to evaluate (default: the newest run's best.pt)")
    p.add_argument("--run_dir", help="run folder whose best.pt to evaluate")
    p.add_argument("--output_dir", default="runs", help="where train.py wrote its runs and teachers")
    p.add_argument("--eval_dir", default="evaluation", help="where reports are written")
    p.add_argument("--data_root", default="data", help="where datasets are found")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:N'")
    p.add_argument("--speed_repeats", type=positive_int, default=20,
                   help="timed forward passes per latency measurement (median)")
    return p

"""Task and teacher specifications, and the task registry they live in."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from .errors import UserError
from .registry import Registry


@dataclass(frozen=True)
class TeacherSpec:
    """One specialist teacher: a timm architecture trained on a subset of classes.

    ``classes`` are names from the task's ``class_names``; the teacher's output
    unit ``i`` stands for ``classes[i]``. ``weight`` scales its vote in the
    ensemble (weights are normalised over the teachers that take part).
    ``checkpoint`` is where its weights live (default: the task's teacher
    folder under ``--output_dir``); it is trained there when absent. It may
    also be a plain state dict of the architecture (``torch.save``d tensors or
    ``.safetensors``) trained elsewhere, one output per class in ``classes``.

    A teacher may declare its own input: ``image_size``, ``mean``, ``std``
    (default: the task's) and ``adapt`` (the small-input stem adaptation of
    ``models``; default: when its input is smaller than 64 px). The ensemble
    prepares each teacher's input from the student's batch. A teacher that mtkd
    trains starts from ``pretrained`` weights when it names them (``"hub"``:
    timm's own, downloaded; or a file) and is fine-tuned on its classes.
    """

    name: str
    architecture: str
    classes: tuple[str, ...]
    weight: float = 1.0
    checkpoint: str | None = None
    image_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    adapt: bool | None = None
    pretrained: str | None = None  # a teacher mtkd trains starts from these weights ("hub" or a file; None: random)
    # Hinton et al. 2015's dustbin: one more output, "other", trained on the task's images of other classes
    # (train.py --teacher_dustbin). Its checkpoint is <name>-dustbin.pt beside the plain teacher's.
    dustbin: bool = False


@dataclass(frozen=True)
class TaskSpec:
    """Everything mtkd needs to know about a task.

    ``source`` names a data source in ``mtkd.data.SOURCES``. The train / val /
    test split is a function of ``split_seed`` alone, never of the run's
    ``--seed``, so teachers and every student run share the same held-out data.
    """

    name: str
    title: str
    source: str
    class_names: tuple[str, ...]
    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    teachers: tuple[TeacherSpec, ...]
    val_fraction: float = 0.1
    test_fraction: float = 0.0  # 0: the source has its own test set
    split_seed: int = 0
    crop_padding: int = 0  # random-crop augmentation: pad by this much, crop back
    hflip: bool = False  # horizontal flips keep the label (not for digits)
    source_options: dict = field(default_factory=dict)

    def with_assistant(self, architecture: str, checkpoint: str) -> "TaskSpec":
        """The task taught by one network over every class instead of its specialists: an earlier student of
        the task (``--teacher_assistant``), ``architecture`` its timm name, ``checkpoint`` its weights."""
        return replace(self, teachers=(TeacherSpec("assistant", architecture, self.class_names,
                                                   checkpoint=str(checkpoint)),))

    def with_dustbins(self) -> "TaskSpec":
        """The task with a dustbin ("other" output) on every teacher (``--teacher_dustbin``)."""
        return replace(self, teachers=tuple(replace(t, dustbin=True) for t in self.teachers))

    def with_teachers(self, architecture: str | None = None, pretrained: str | None = None) -> "TaskSpec":
        """The task with every teacher of ``architecture`` and started from ``pretrained`` weights where given
        (``--teacher_architecture``, ``--teacher_pretrained``)."""
        return replace(self, teachers=tuple(replace(t, architecture=architecture or t.architecture,
                                                    pretrained=pretrained or t.pretrained) for t in self.teachers))

    def __post_init__(self):
        problems = []
        if len(set(self.class_names)) != len(self.class_names):
            problems.append("class names repeat")
        if not self.teachers:
            problems.append("no teachers. Fix: add at least one teacher")
        names = [t.name for t in self.teachers]
        for name in sorted({n for n in names if names.count(n) > 1}):
            problems.append(f"two teachers are named {name!r}. Fix: give each teacher its own name")
        known = set(self.class_names)
        covered = set()
        for t in self.teachers:
            if not t.classes:
                problems.append(f"teacher {t.name!r} has no classes. Fix: list the classes it knows")
            unknown = [c for c in t.classes if c not in known]
            if unknown:
                problems.append(f"teacher {t.name!r} names classes {unknown} that are not in the task "
                                f"(its classes: {', '.join(self.class_names)})")
            if len(set(t.classes)) != len(t.classes):
                problems.append(f"teacher {t.name!r} lists a class twice")
            if not t.weight > 0:
                problems.append(f"teacher {t.name!r} has weight {t.weight}; weights must be > 0")
            for key in ("mean", "std"):
                value = getattr(t, key)
                if value is not None and len(value) != self.channels:
                    problems.append(f"teacher {t.name!r}: {key} needs one value per channel ({self.channels})")
            if t.std is not None and not all(v > 0 for v in t.std):
                problems.append(f"teacher {t.name!r}: std values must be > 0")
            if t.image_size is not None and t.image_size < 8:
                problems.append(f"teacher {t.name!r}: image_size must be at least 8")
            covered.update(t.classes)
        uncovered = [c for c in self.class_names if c not in covered]
        if uncovered:
            problems.append(f"classes {uncovered} are covered by no teacher. Fix: add them to a teacher, or "
                            "remove them (for a task file: their folders)")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            problems.append("mean/std must have one value per channel")
        if problems:
            raise ValueError(f"task {self.name!r}: " + "; ".join(problems))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_indices(self, classes: tuple[str, ...]) -> list[int]:
        """Global class ids of ``classes`` (names), in the order given."""
        index = {c: i for i, c in enumerate(self.class_names)}
        return [index[c] for c in classes]


TASKS: Registry[TaskSpec] = Registry("task")


def register_task(spec: TaskSpec) -> TaskSpec:
    return TASKS.register(spec.name, spec)


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS.get(name)
    except KeyError as e:
        raise UserError(f"{e.args[0]}. Pick one with --task.") from None


def list_tasks() -> list[str]:
    return TASKS.list()

"""Students and teachers, built with timm and adapted to small inputs.

ImageNet stems shrink the input 4x (ResNet: stride-2 7x7 conv + max-pool) or
2x (EfficientNet / MobileNetV3: stride-2 3x3 conv) before any real feature
extraction. On 8x8 digits or 32x32 CIFAR images that throws away most of the
picture, so for inputs smaller than ``SMALL_INPUT`` pixels:

* ResNet: the stem becomes a stride-1 3x3 conv and the max-pool is dropped
  (the usual CIFAR ResNet; total stride 32 -> 8);
* EfficientNet / MobileNetV3: the stem conv and the first stride-2 block get
  stride 1 (total stride 32 -> 8, as the ResNet). With stride 16 an 8x8
  digit is one pixel from the fourth of seven stages on; every BatchNorm
  there normalises over the batch alone, and the network trains worse than it
  evaluates (Task B, EfficientNet, 20 epochs, labels only: best validation
  accuracy 94.1% -> 95.9%, last 87.8% -> 95.6%).

Other timm architectures (possible for custom teachers) are used unchanged.
"""
from __future__ import annotations

from contextlib import contextmanager

import timm
import torch
from torch import nn

from .errors import UserError
from .registry import Registry
from .spec import TaskSpec, TeacherSpec

# The student names of the command line and the timm models behind them.
STUDENTS: Registry[str] = Registry("student")
STUDENTS.register("MobileNetV3", "mobilenetv3_large_100")
STUDENTS.register("EfficientNet", "efficientnet_b0")
STUDENTS.register("ResNet18", "resnet18")
SMALL_INPUT = 64


def list_students() -> list[str]:
    return STUDENTS.list()


def adapt_to_small_inputs(model: nn.Module, first_block: bool = True, keep_weights: bool = False) -> bool:
    """Make a timm model keep the resolution of small images; True if it was changed.

    ``first_block=False`` leaves EfficientNet / MobileNetV3 at total stride 16
    (stem only; for the ablation in ``benchmarks/stem_ablation.py``).
    ``keep_weights`` (a pretrained model): strides only, so that every
    pretrained weight still fits; a ResNet keeps its 7x7 stem convolution at
    stride 1 (and loses the max-pool) instead of getting a new 3x3 one.
    """
    conv1 = getattr(model, "conv1", None)
    if isinstance(conv1, nn.Conv2d) and hasattr(model, "maxpool"):  # timm ResNet
        if keep_weights:
            conv1.stride = (1, 1)
        else:
            model.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
        return True
    stem = getattr(model, "conv_stem", None)
    if isinstance(stem, nn.Conv2d):  # timm EfficientNet / MobileNetV3
        stem.stride = (1, 1)
        for stage in getattr(model, "blocks", []) if first_block else []:
            conv = getattr(stage[0], "conv_dw", None)
            if isinstance(conv, nn.Conv2d) and conv.stride == (2, 2):
                conv.stride = (1, 1)  # the first downsampling block
                break
        return True
    return False


def check_architecture(architecture: str) -> None:
    """Raise a UserError naming similar timm models if ``architecture`` is not one."""
    if not timm.is_model(architecture):
        close = timm.list_models(f"*{architecture.split('_')[0]}*")[:8]
        hint = f" Similar timm names: {', '.join(close)}." if close else ""
        raise UserError(f"unknown timm architecture {architecture!r}.{hint}")


HUB = "hub"  # --pretrained without a path: timm's own pretrained weights, downloaded


def create_model(architecture: str, num_classes: int, in_chans: int, image_size: int,
                 adapt: bool | None = None, pretrained: str | None = None,
                 pretrained_layout: bool | None = None) -> nn.Module:
    """A timm model for ``image_size`` inputs, adapted to small inputs: ``adapt=None`` when ``image_size`` is
    smaller than ``SMALL_INPUT``, ``True`` always, ``False`` never.

    ``pretrained``: None (random weights), ``HUB`` (timm's default pretrained weights for the architecture,
    downloaded) or the path of a local file of weights in timm's format (``.safetensors``, ``.pth`` /
    ``.bin``, loaded with ``weights_only=True``). Then, as timm does, the classifier is new (for
    ``num_classes``) and the first convolution adapted to ``in_chans``; a small input changes strides only
    (``adapt_to_small_inputs(keep_weights=True)``), so every other pretrained weight is kept.
    ``pretrained_layout``: build that layout without loading weights (a checkpoint of such a model is about to
    be loaded); default: whether ``pretrained`` is given.
    """
    check_architecture(architecture)
    small = image_size < SMALL_INPUT if adapt is None else adapt
    state = _pretrained_state(pretrained, f"pretrained weights for {architecture}")  # read once
    if small and _small_stem(state):  # weights of an mtkd small-input network: its layout, whole
        model = _timm_model(architecture, num_classes, in_chans, None, None)
        reset_classifier_init(model)
        adapt_to_small_inputs(model)
        _load_backbone(model, state, pretrained, architecture)
        return model
    model = _timm_model(architecture, num_classes, in_chans, pretrained, state)
    reset_classifier_init(model)
    if small:
        adapt_to_small_inputs(model, keep_weights=pretrained is not None if pretrained_layout is None
                              else pretrained_layout)
    return model


def _timm_model(architecture: str, num_classes: int, in_chans: int, pretrained: str | None,
                state: dict | None) -> nn.Module:
    """The timm model, from ``pretrained`` weights where given (``state``: a file's weights, read already)."""
    if pretrained is None:
        return timm.create_model(architecture, pretrained=False, num_classes=num_classes, in_chans=in_chans)
    if pretrained == HUB:
        try:
            return timm.create_model(architecture, pretrained=True, num_classes=num_classes, in_chans=in_chans)
        except Exception as e:  # no network, no such weights on the hub, a broken download
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            raise UserError(f"could not get timm's pretrained weights for {architecture} from the Hugging Face hub "
                            f"({type(e).__name__}: {first}). Nothing was trained on random weights instead. Fix: "
                            f"download them where the hub is reachable and pass the file: --pretrained PATH (or "
                            f"pretrained = \"PATH\" for a teacher), a .safetensors, .pth or .bin of {architecture} "
                            "in timm's format.") from None
    def misfit(detail: str) -> UserError:
        return UserError(f"pretrained weights {pretrained} do not fit {architecture} ({detail}). Fix: pass the "
                         f"weights of exactly this timm architecture, in timm's format.")

    try:
        model = timm.create_model(architecture, pretrained=True, num_classes=num_classes, in_chans=in_chans,
                                  pretrained_cfg_overlay={"state_dict": dict(state)})
    except (RuntimeError, KeyError, ValueError) as e:  # a size mismatch; a key timm adapts is missing (older timm)
        raise misfit(" ".join(str(e).split())[:300] if not isinstance(e, KeyError) else f"no weight {e}") from None
    # With a new classifier timm loads non-strictly: a weight missing from the file would stay random, silently.
    head = model.pretrained_cfg.get("classifier") or ()
    head = (head,) if isinstance(head, str) else tuple(head)
    missing = [k for k in model.state_dict() if k not in state and not k.endswith("num_batches_tracked")
               and not any(k.startswith(h + ".") for h in head)]
    if missing:
        raise misfit(f"{len(missing)} weight(s) missing from the file, e.g. {', '.join(missing[:3])}")
    return model


def small_stem_weights(pretrained: str | None) -> bool:
    """Whether ``pretrained`` names a file of ResNet weights with mtkd's small-input stem (a 3x3 first
    convolution, ``stem_in_weights``): an mtkd network trained on small images, such as Task A85's teacher.
    ``create_model`` builds such a start in the small-input layout and loads every weight but the classifier;
    timm's own weights (7x7 stem) keep their layout with strides changed."""
    return _small_stem(_pretrained_state(pretrained, "pretrained weights"))


def _pretrained_state(pretrained: str | None, who: str) -> dict | None:
    """The weights of the file ``pretrained`` (None without one, or for the hub's)."""
    if pretrained in (None, HUB):
        return None
    from .checkpoint import load_weights_file

    return load_weights_file(pretrained, who)[0]


def _small_stem(state: dict | None) -> bool:
    found = stem_in_weights(state) if state is not None else None
    return found is not None and found[0]


def _load_backbone(model: nn.Module, state: dict, pretrained: str, architecture: str) -> None:
    """Every weight of ``state`` (the file ``pretrained``'s) but its classifier into ``model`` (same layout), or
    a UserError that says what does not fit."""
    head = set(classifier_keys(model, ("weight", "bias")))
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k not in head}
    missing = [k for k in own if k not in state and k not in head and not k.endswith("num_batches_tracked")]
    wrong = [k for k in state if k not in own or tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or wrong:
        first = (missing + wrong)[0]
        raise UserError(f"pretrained weights {pretrained} do not fit {architecture} ({len(missing)} weight(s) "
                        f"missing, {len(wrong)} unknown or of another shape, e.g. {first}). Fix: pass the weights "
                        f"of exactly this timm architecture.")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)


def init_description(pretrained: str | None) -> str:
    """Where a model's initial weights came from, as a run records it."""
    if pretrained is None:
        return "random"
    return "timm pretrained (hub)" if pretrained == HUB else f"file {pretrained}"


def reset_classifier_init(model: nn.Module) -> bool:
    """Give the classifier PyTorch's fan-in initialisation; True if there was a linear one.

    timm's EfficientNet and MobileNetV3 draw it from U(-1/sqrt(C), 1/sqrt(C)),
    C the number of classes (Google's initialisation, made for ImageNet's
    1000). With 10 or 15 classes that is 10x too large: on Task B the fresh
    EfficientNet's logits have a standard deviation of 4.2 and a
    cross-entropy of 6.4 instead of ln 10 = 2.3, and it learns from saturated
    softmaxes (20 epochs, labels only: 58.6% test accuracy; 85.8% with this
    initialisation). ResNets already use the fan-in one.
    """
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, nn.Linear):
        head.reset_parameters()
        return True
    return False


def create_student(name: str, task: TaskSpec, adapt: bool | None = None, pretrained: str | None = None,
                   pretrained_layout: bool | None = None) -> nn.Module:
    """The student ``name`` for the task's classes, channels and image size (``pretrained``,
    ``pretrained_layout``: see ``create_model``)."""
    if name not in STUDENTS:
        raise UserError(f"unknown student {name!r}; choose one of {', '.join(STUDENTS)}")
    if small_stem_weights(pretrained):  # its checkpoints record a pretrained start as timm's layout
        raise UserError(f"--pretrained {pretrained}: weights of an mtkd small-input network (a 3x3 first "
                        "convolution) start teachers only (--teacher_pretrained). Fix: give the student weights "
                        "in timm's own layout, or none.")
    return create_model(STUDENTS.get(name), task.num_classes, task.channels, task.image_size, adapt, pretrained,
                        pretrained_layout)


def create_teacher(teacher: TeacherSpec, task: TaskSpec, pretrained: bool = False,
                   layout_of_pretrained: bool = False) -> nn.Module:
    """The teacher's architecture for its own input size (default: the task's), adapted as it declares, with
    one output per class (and one more, "other", with a dustbin);
    with ``pretrained``, from the weights its spec names (to be fine-tuned on its classes);
    ``layout_of_pretrained``: the layout such a teacher has, without weights (its checkpoint is loaded next)."""
    return create_model(teacher.architecture, len(teacher.classes) + int(teacher.dustbin), task.channels,
                        teacher.image_size or task.image_size, teacher.adapt,
                        teacher.pretrained if pretrained else None,
                        True if layout_of_pretrained else None)


def stem_in_weights(state: dict) -> tuple[bool, int] | None:
    """Which stem a ResNet's weights were trained with: ``(adapted, kernel)`` from the first convolution's
    kernel (3x3: mtkd's small-input stem; 7x7: timm's ImageNet stem), or None where the weights cannot say
    (other architectures, deep stems, stride-only changes)."""
    w = state.get("conv1.weight")
    if torch.is_tensor(w) and w.ndim == 4 and w.shape[-1] in (3, 7):
        return w.shape[-1] == 3, w.shape[-1]
    return None


def classifier_keys(model: nn.Module, params: tuple[str, ...] = ("weight",)) -> list[str]:
    """The state-dict keys of the model's classifier (timm's ``get_classifier``): its ``params``."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    return [f"{n}.{p}" for n, m in model.named_modules() if m is head and n for p in params]


def load_fitting_state(model: nn.Module, state: dict, who: str, outputs: int) -> None:
    """Load ``state`` into ``model`` (strictly), or raise one ``UserError`` that says why it does not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or shapes):
        model.load_state_dict(state)
        return
    head_keys = classifier_keys(model)
    if len(missing) + len(unexpected) > len(own) // 2:
        raise UserError(f"{who}: the weights do not belong to {type(model).__name__} "
                        f"({len(missing)} of its {len(own)} keys missing, e.g. {missing[:2]}; {len(unexpected)} "
                        f"unexpected, e.g. {unexpected[:2]}). Fix: set the teacher's architecture to the timm "
                        "model the weights come from.")
    if shapes and shapes[0] in head_keys and not (missing or unexpected):
        got = state[shapes[0]].shape[0]
        raise UserError(f"{who}: the classifier has {got} outputs but the teacher lists {outputs} classes. "
                        "Fix: list exactly the classes it was trained on, in the order of its outputs.")
    parts = [f"missing keys {missing[:3]}" if missing else "", f"unexpected keys {unexpected[:3]}" if unexpected else "",
             "shapes differ at " + ", ".join(f"{k} ({tuple(state[k].shape)} vs {tuple(own[k].shape)})"
                                              for k in shapes[:3]) if shapes else ""]
    hint = (" The stem's shape differs: set adapt_small_input (and image_size) to how the teacher was built."
            if any(k.startswith(("conv1.", "conv_stem.")) for k in shapes) else "")
    raise UserError(f"{who}: the weights do not fit: {'; '.join(p for p in parts if p)}.{hint} "
                    "Fix: use the state dict of exactly this architecture.")


def feature_stages(model: nn.Module) -> list[dict]:
    """The stages timm can return features from: ``[{'module', 'num_chs', 'reduction'}, ...]``."""
    info = getattr(model, "feature_info", None)
    if not info or not hasattr(model, "forward_intermediates"):
        raise UserError(f"{type(model).__name__} cannot return intermediate features (timm's "
                        "forward_intermediates). Fix: use a timm CNN, or --feature_weight 0.")
    return list(info)


def resolve_stages(model: nn.Module, layers: list[str], who: str = "model") -> list[int]:
    """``--feature_layers`` entries (stage indices like ``-1`` or module names like ``layer3``) -> indices."""
    stages = feature_stages(model)
    names = [s["module"] for s in stages]
    out = []
    for layer in layers:
        try:
            i = int(layer)
        except ValueError:
            if layer not in names:
                raise UserError(f"--feature_layers: the {who} has no stage {layer!r}. "
                                f"Fix: use one of {', '.join(names)} or an index 0..{len(names) - 1}.") from None
            i = names.index(layer)
        if not -len(names) <= i < len(names):
            raise UserError(f"--feature_layers: stage {layer} is out of range for the {who} "
                            f"({len(names)} stages: {', '.join(names)}).")
        out.append(i % len(names))
    return sorted(set(out))


def forward_with_features(model: nn.Module, x, stages: list[int]):
    """``(logits, [features at each stage in stages])`` in one pass."""
    final, feats = model.forward_intermediates(x, indices=stages)
    return model.forward_head(final), feats


def embedding_size(model: nn.Module, who: str = "model") -> int:
    """How many features the model's classifier reads (its pooled features, ``capturing_embedding``)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Linear):
        raise UserError(f"--embedding_weight: the {who} ({type(model).__name__}) has no linear classifier to read "
                        "its pooled features from (timm's get_classifier). Fix: use a timm CNN, or "
                        "--embedding_weight 0.")
    return head.in_features


@contextmanager
def capturing_embedding(model: nn.Module):
    """Within the block, every forward pass of ``model`` appends to the yielded list what its classifier read
    (timm's ``get_classifier``), ``(B, embedding_size)``: the pooled features, after the head's dropout where
    the model has one."""
    seen = []
    handle = model.get_classifier().register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        yield seen
    finally:
        handle.remove()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

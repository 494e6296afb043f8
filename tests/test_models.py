import math

import pytest
import torch

import tasks
from mtkd.errors import UserError
from mtkd.models import STUDENTS, create_model, create_student, create_teacher


@pytest.mark.parametrize("task_name", tasks.list_tasks())
@pytest.mark.parametrize("student", list(STUDENTS))
def test_students_build_for_each_task(task_name, student):
    task = tasks.get_task(task_name)
    model = create_student(student, task)
    x = torch.randn(2, task.channels, task.image_size, task.image_size)
    assert model(x).shape == (2, task.num_classes)


@pytest.mark.parametrize("student", list(STUDENTS))
def test_small_input_adaptation_keeps_resolution(student):
    # At 32x32 the ImageNet stem leaves a 1x1 final feature map; the adapted one keeps more.
    arch = STUDENTS.get(student)
    x = torch.randn(1, 3, 32, 32)
    adapted = create_model(arch, 10, 3, 32, adapt=True).eval().forward_features(x)
    plain = create_model(arch, 10, 3, 32, adapt=False).eval().forward_features(x)
    assert adapted.shape[-1] >= 2 * plain.shape[-1]
    assert adapted.shape[-1] == 32 // 8  # every student: total stride 8, as the CIFAR ResNet
    assert plain.shape[-1] == 1  # total stride 32 crushes 32x32 to one pixel


@pytest.mark.parametrize("student", list(STUDENTS))
def test_every_student_has_a_linear_classifier_whose_input_capturing_embedding_reads(student):
    """--embedding_weight works for every student: its classifier is linear, and the captured input is the
    pooled features the classifier turns into the logits, of embedding_size."""
    from mtkd.models import capturing_embedding, embedding_size

    task = tasks.get_task("A")
    model = create_student(student, task).eval()
    d = embedding_size(model, "student")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), capturing_embedding(model) as seen:
        logits = model(x)
    assert len(seen) == 1 and seen[0].shape == (2, d)
    head = model.get_classifier()
    torch.testing.assert_close(head(seen[0]), logits)
    torch.testing.assert_close(seen[0], model.forward_head(model.forward_features(x), pre_logits=True))


def test_unknown_architecture_is_a_user_error():
    with pytest.raises(UserError, match="unknown timm architecture 'resnet3'"):
        create_model("resnet3", 10, 3, 32)


@pytest.mark.parametrize("student", list(STUDENTS))
def test_fresh_students_start_near_the_uniform_prediction(student):
    """A fresh classifier must not start saturated: cross-entropy near ln(C), not several times it."""
    task = tasks.get_task("B")
    torch.manual_seed(0)
    model = create_student(student, task).train()
    x = torch.randn(32, task.channels, task.image_size, task.image_size)
    y = torch.arange(32) % task.num_classes
    ce = torch.nn.functional.cross_entropy(model(x), y).item()
    assert ce < 1.5 * math.log(task.num_classes)
    head = model.get_classifier().weight
    bound = 1 / math.sqrt(head.shape[1])  # PyTorch's fan-in initialisation
    assert head.abs().max() <= bound


def _imagenet_weights(tmp_path, architecture="resnet18", suffix=".pth"):
    """A timm model's state dict in ImageNet's shape (1000 classes, RGB), as weights are shared."""
    import timm

    torch.manual_seed(0)
    state = timm.create_model(architecture, pretrained=False).state_dict()
    path = tmp_path / f"{architecture}{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return state, path


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_student_starts_from_pretrained_weights_in_a_local_file(tmp_path, suffix):
    """Task B (1 channel, 8 px): the weights load where they fit, the head is new, the first convolution is
    adapted to one channel, and the small-input rule changes strides only (the 7x7 stem is kept)."""
    task = tasks.get_task("B")
    state, path = _imagenet_weights(tmp_path, suffix=suffix)
    model = create_student("ResNet18", task, pretrained=str(path))
    own = model.state_dict()
    assert torch.equal(own["layer3.1.conv2.weight"], state["layer3.1.conv2.weight"])
    assert torch.equal(own["layer1.0.bn1.running_mean"], state["layer1.0.bn1.running_mean"])
    assert own["fc.weight"].shape == (10, 512) and not torch.equal(own["fc.weight"], state["fc.weight"][:10])
    assert own["conv1.weight"].shape == (64, 1, 7, 7)  # RGB summed into one channel, as timm adapts it
    assert torch.allclose(own["conv1.weight"][:, 0], state["conv1.weight"].sum(1))
    assert model.conv1.stride == (1, 1) and isinstance(model.maxpool, torch.nn.Identity)
    assert model.eval()(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    # The same layout without weights (to load a checkpoint of it) has the same keys and shapes.
    layout = create_student("ResNet18", task, pretrained_layout=True).state_dict()
    assert {k: v.shape for k, v in layout.items()} == {k: v.shape for k, v in own.items()}


def test_a_teacher_starts_from_pretrained_weights_named_in_its_spec(tmp_path):
    from dataclasses import replace

    task = tasks.get_task("A")
    state, path = _imagenet_weights(tmp_path, "resnet34")
    spec = replace(task.teachers[0], pretrained=str(path))
    model = create_teacher(spec, task, pretrained=True)
    assert torch.equal(model.state_dict()["layer4.2.conv2.weight"], state["layer4.2.conv2.weight"])
    assert model.get_classifier().out_features == 5 and model.conv1.kernel_size == (7, 7)
    assert not torch.equal(create_teacher(spec, task).state_dict()["layer4.2.conv2.weight"],
                           state["layer4.2.conv2.weight"])  # loading a checkpoint later: no pretrained weights


def test_pretrained_weights_that_do_not_fit_are_one_message(tmp_path):
    from mtkd.errors import UserError

    task = tasks.get_task("B")
    _, path = _imagenet_weights(tmp_path, "resnet10t")
    with pytest.raises(UserError, match="do not fit resnet18"):
        create_student("ResNet18", task, pretrained=str(path))
    # A file that lacks a weight is no fit either (timm loads non-strictly under a new classifier, and older timm
    # fails on the first convolution it adapts with a KeyError).
    state, path = _imagenet_weights(tmp_path, "resnet18")
    for name in ("conv1.weight", "layer3.0.bn1.running_mean"):
        torch.save({k: v for k, v in state.items() if k != name}, tmp_path / "partial.pth")
        with pytest.raises(UserError, match=f"do not fit resnet18 .*{name}"):
            create_student("ResNet18", task, pretrained=str(tmp_path / "partial.pth"))
    (tmp_path / "notes.pth").write_text("not weights")
    with pytest.raises(UserError, match="cannot load .*notes.pth"):
        create_student("ResNet18", task, pretrained=str(tmp_path / "notes.pth"))
    with pytest.raises(UserError, match="not found"):
        create_student("ResNet18", task, pretrained=str(tmp_path / "missing.pth"))


def test_pretrained_from_the_hub_without_a_network_is_one_message_and_exit_2(tmp_path):
    """No silent fall back to random weights: exit 2, what was tried, how to pass a file; nothing written."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # as a machine without a network, at once
    proc = subprocess.run([sys.executable, "train.py", "--pretrained", "--student_model", "ResNet18",
                           "--output_dir", str(tmp_path / "runs")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = " ".join(proc.stderr.split())
    assert "could not get timm's pretrained weights for resnet18 from the Hugging Face hub" in err
    assert "--pretrained PATH" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_a_teacher_fine_tuned_from_pretrained_weights_is_reloaded_with_their_layout(tmp_path):
    """Task A (32 px): the fine-tuned ResNet keeps the 7x7 stem at stride 1; its checkpoint reloads that way."""
    from dataclasses import replace

    from mtkd.checkpoint import CHECKPOINT_VERSION, save_checkpoint
    from mtkd.specialists import init_description, input_record, load_teacher

    task = tasks.get_task("A")
    _, path = _imagenet_weights(tmp_path, "resnet34")
    spec = replace(task.teachers[0], pretrained=str(path))
    model = create_teacher(spec, task, pretrained=True)
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (1, 1)
    checkpoint = save_checkpoint({"model": model.state_dict(), "architecture": spec.architecture,
                                  "classes": list(spec.classes), "task": "A", "metrics": {}, "epochs": 1,
                                  "input": input_record(spec, task), "init": init_description(spec.pretrained),
                                  "version": CHECKPOINT_VERSION}, tmp_path / "trees.pt")
    loaded, state = load_teacher(spec, task, checkpoint)
    assert state["init"] == f"file {path}"
    assert loaded.conv1.stride == (1, 1) and isinstance(loaded.maxpool, torch.nn.Identity)
    assert torch.equal(loaded.state_dict()["conv1.weight"], model.state_dict()["conv1.weight"])


def test_a_teacher_starts_from_an_mtkd_small_input_network_in_its_layout(tmp_path):
    """Task A85's teacher (a 3x3 small-input stem) starts Task A's teachers: every weight but the classifier,
    in the small-input layout (not timm's 7x7 one), recorded so that its checkpoint reloads that way."""
    from dataclasses import replace

    from mtkd.checkpoint import CHECKPOINT_VERSION, save_checkpoint
    from mtkd.models import small_stem_weights
    from mtkd.specialists import input_record, load_teacher

    others, task = tasks.get_task("A85"), tasks.get_task("A")
    source = create_teacher(others.teachers[0], others)  # resnet18, 85 outputs, 3x3 stem
    weights = {k: v.clone() for k, v in source.state_dict().items()}
    path = save_checkpoint({"model": weights, "architecture": "resnet18", "classes": list(others.class_names),
                            "task": "A85", "metrics": {"val_acc": 0.5, "test_acc": 0.5}, "epochs": 1,
                            "input": input_record(others.teachers[0], others), "init": "random",
                            "pretrained_layout": False, "version": CHECKPOINT_VERSION}, tmp_path / "others.pt")
    assert small_stem_weights(str(path)) and not small_stem_weights(None)
    spec = task.with_teachers("resnet18", str(path)).teachers[1]
    assert (spec.name, spec.architecture, spec.pretrained) == ("flowers", "resnet18", str(path))
    model = create_teacher(spec, task, pretrained=True)
    assert model.conv1.kernel_size == (3, 3) and isinstance(model.maxpool, torch.nn.Identity)
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in weights.items() if not k.startswith("fc."))
    assert model.fc.out_features == 5 and not torch.equal(own["fc.weight"], weights["fc.weight"][:5])
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model.eval().forward_features(x), source.eval().forward_features(x))
    # Fine-tuned and saved with the layout train_teacher records (not a pretrained model's), it reloads as it was.
    saved = save_checkpoint({"model": own, "architecture": "resnet18", "classes": list(spec.classes), "task": "A",
                             "metrics": {}, "epochs": 1, "input": input_record(spec, task), "init": f"file {path}",
                             "pretrained_layout": False, "version": CHECKPOINT_VERSION}, tmp_path / "flowers.pt")
    loaded, _ = load_teacher(spec, task, saved)
    assert torch.equal(loaded.eval()(x), model(x))
    # A student's checkpoint records a pretrained start as timm's layout: these weights start teachers only.
    with pytest.raises(UserError, match="start teachers only"):
        create_student("ResNet18", task, pretrained=str(path))
    # Weights of another architecture are one message.
    with pytest.raises(UserError, match="do not fit resnet34"):
        create_teacher(task.with_teachers(None, str(path)).teachers[0], task, pretrained=True)

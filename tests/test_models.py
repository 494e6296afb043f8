import math

import pytest
import torch

import tasks
from mtkd.errors import UserError
from mtkd.models import STUDENTS, create_model, create_student


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

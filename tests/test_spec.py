import pytest

import tasks
from mtkd.errors import UserError
from mtkd.spec import TaskSpec, TeacherSpec


def test_builtin_tasks_are_registered():
    assert tasks.list_tasks() == ["A", "A85", "B"]


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(UserError, match="unknown task 'Z'; known: A, A85, B"):
        tasks.get_task("Z")


def test_task_a_classes_and_disjoint_specialists():
    a = tasks.get_task("A")
    assert a.source == "cifar100" and a.num_classes == 15 and (a.image_size, a.channels) == (32, 3)
    by_name = {t.name: set(t.classes) for t in a.teachers}
    assert by_name == {
        "trees": {"maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"},
        "flowers": {"orchid", "poppy", "rose", "sunflower", "tulip"},
        "fruit_and_vegetables": {"apple", "mushroom", "orange", "pear", "sweet_pepper"},
    }
    subsets = list(by_name.values())
    assert all(not (x & y) for i, x in enumerate(subsets) for y in subsets[i + 1:])
    assert set().union(*subsets) == set(a.class_names)


def test_task_b_overlapping_specialists():
    b = tasks.get_task("B")
    assert b.source == "digits" and b.class_names == tuple("0123456789") and (b.image_size, b.channels) == (8, 1)
    assert [set(map(int, t.classes)) for t in b.teachers] == [{0, 1, 2, 3}, {3, 4, 5, 6}, {6, 7, 8, 9, 0}]


def test_task_a85_holds_cifar100s_other_classes_and_none_of_task_as():
    a, others = tasks.get_task("A"), tasks.get_task("A85")
    assert others.num_classes == 85 and not set(a.class_names) & set(others.class_names)
    assert len(set(a.class_names) | set(others.class_names)) == 100
    assert [(t.architecture, t.classes) for t in others.teachers] == [("resnet18", others.class_names)]
    assert (others.source, others.image_size, others.mean, others.std) == (a.source, a.image_size, a.mean, a.std)


# A85 is not distilled: its one network is the start of Task A's teachers (--teacher_pretrained).
@pytest.mark.parametrize("name", [n for n in tasks.list_tasks() if n != "A85"])
def test_teachers_are_larger_than_every_student(name):
    from mtkd.models import STUDENTS, count_parameters, create_student, create_teacher

    task = tasks.get_task(name)
    largest_student = max(count_parameters(create_student(s, task)) for s in STUDENTS)
    for t in task.teachers:
        assert count_parameters(create_teacher(t, task)) > largest_student


def _teacher(name, classes, weight=1.0):
    return TeacherSpec(name, "resnet34", tuple(classes), weight)


@pytest.mark.parametrize("teachers, message", [
    ((), "no teachers"),
    ((_teacher("x", "ab"), _teacher("x", "c")), "two teachers are named 'x'"),
    ((_teacher("x", "abz"), _teacher("y", "c")), r"names classes \['z'\] that are not in the task"),
    ((_teacher("x", "ab"),), r"classes \['c'\] are covered by no teacher"),
    ((_teacher("x", ""), _teacher("y", "abc")), "has no classes"),
    ((_teacher("x", "abc", weight=0.0),), "weights must be > 0"),
])
def test_invalid_specs_are_rejected(teachers, message):
    with pytest.raises(ValueError, match=message):
        TaskSpec(name="t", title="t", source="digits", class_names=("a", "b", "c"), image_size=8,
                 channels=1, mean=(0.5,), std=(0.5,), teachers=teachers)

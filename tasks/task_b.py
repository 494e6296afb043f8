"""Task B: scikit-learn's 8x8 handwritten digits, three overlapping specialists.

The digits ship with scikit-learn, so this task runs anywhere offline. The
specialists overlap on 3, 6 and 0, which is what makes their aggregation
interesting: a digit like 3 is seen by two teachers, a digit like 1 by one.
"""
from mtkd.spec import TaskSpec, TeacherSpec

DIGITS = tuple(str(d) for d in range(10))

TASK = TaskSpec(
    name="B",
    title="digits (scikit-learn), overlapping specialists",
    source="digits",
    class_names=DIGITS,
    image_size=8,
    channels=1,
    # Statistics of the digits' training split after scaling 0..16 to 0..1.
    mean=(0.3052,),
    std=(0.3758,),
    teachers=(
        TeacherSpec("digits_0123", "resnet34", ("0", "1", "2", "3")),
        TeacherSpec("digits_3456", "resnet50", ("3", "4", "5", "6")),
        TeacherSpec("digits_67890", "resnet34", ("6", "7", "8", "9", "0")),
    ),
    val_fraction=0.15,
    test_fraction=0.2,
    split_seed=0,
    crop_padding=1,
    hflip=False,
)

"""Task A: 15 CIFAR-100 classes, three disjoint specialists.

Trees, flowers, and fruit and vegetables, five fine classes each. The images
come from ``torchvision.datasets.CIFAR100`` under ``--data_root``.
"""
from mtkd.spec import TaskSpec, TeacherSpec

TREES = ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree")
FLOWERS = ("orchid", "poppy", "rose", "sunflower", "tulip")
FRUIT_AND_VEGETABLES = ("apple", "mushroom", "orange", "pear", "sweet_pepper")

TASK = TaskSpec(
    name="A",
    title="CIFAR-100 trees / flowers / fruit and vegetables",
    source="cifar100",
    class_names=TREES + FLOWERS + FRUIT_AND_VEGETABLES,
    image_size=32,
    channels=3,
    # The usual CIFAR-100 training-set statistics.
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
    teachers=(
        TeacherSpec("trees", "resnet34", TREES),
        TeacherSpec("flowers", "resnet50", FLOWERS),
        TeacherSpec("fruit_and_vegetables", "resnet34", FRUIT_AND_VEGETABLES),
    ),
    val_fraction=0.1,
    test_fraction=0.0,  # CIFAR-100's own test images of the 15 classes
    split_seed=0,
    crop_padding=4,
    hflip=True,
)

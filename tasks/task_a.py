"""Task A: 15 CIFAR-100 classes, three disjoint specialists.

Trees, flowers, and fruit and vegetables, five fine classes each. The images
come from ``torchvision.datasets.CIFAR100`` under ``--data_root``.

Task ``A85`` holds CIFAR-100's other 85 classes: no image of Task A's classes,
so a network trained on it (its one teacher, ``others``) can be the start of
Task A's teachers (``--teacher_pretrained``) without having seen an image
Task A validates or tests on.
"""
from dataclasses import replace

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

# CIFAR-100's fine classes, in its own label order.
CIFAR100 = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl", "boy",
    "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
    "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish",
    "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange",
    "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine",
    "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk",
    "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow_tree", "wolf", "woman", "worm",
)
OTHERS = tuple(c for c in CIFAR100 if c not in TASK.class_names)

# Validation: 5% of the training images (2,125); the test split is CIFAR-100's test images of these classes.
TASK_85 = replace(
    TASK, name="A85", title="CIFAR-100's 85 classes outside Task A (to pretrain Task A's teachers)",
    class_names=OTHERS, teachers=(TeacherSpec("others", "resnet18", OTHERS),), val_fraction=0.05,
)

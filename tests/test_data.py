import pickle

import numpy as np
import pytest
import torch

import tasks
from mtkd.data import BatchTransform, ImageTensorDataset, create_loader, load_task_data, load_transfer_images
from mtkd.errors import UserError

CIFAR100_NAMES = [f"other_{i}" for i in range(100)]
# Put the task's 15 classes at scattered CIFAR-100 ids, as in the real label list.
TASK_A = tasks.get_task("A")
for cifar_id, name in zip(range(3, 100, 6), TASK_A.class_names):
    CIFAR100_NAMES[cifar_id] = name


def write_mini_cifar100(root, per_class_train=10, per_class_test=4, names=None):
    """A miniature CIFAR-100 in torchvision's on-disk layout (pickled dicts); ``names``: its class names (default:
    ``CIFAR100_NAMES``)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)

    def batch(per_class):
        labels = np.repeat(np.arange(100), per_class)
        # Pixel (c, 0, 0) encodes the CIFAR label and the channel, to check layout and mapping.
        data = np.zeros((len(labels), 3, 32, 32), dtype=np.uint8)
        data[:, 0, 0, 0] = labels
        data[:, 1, 0, 0] = 200
        data[:, 2, 31, 31] = 7
        return {"data": data.reshape(len(labels), 3072), "fine_labels": labels.tolist(),
                "coarse_labels": (labels // 5).tolist(), "filenames": [f"{i}.png" for i in range(len(labels))],
                "batch_label": "mini"}

    for name, per_class in (("train", per_class_train), ("test", per_class_test)):
        with open(folder / name, "wb") as f:
            pickle.dump(batch(per_class), f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": list(names or CIFAR100_NAMES),
                     "coarse_label_names": [f"c{i}" for i in range(20)]}, f)


def test_task_a_loader_reads_cifar100_pickles(tmp_path):
    write_mini_cifar100(tmp_path)
    data = load_task_data(TASK_A, tmp_path, download=False)
    # 10 train images per class, 10% of each class carved out for validation.
    assert (len(data.train), len(data.val), len(data.test)) == (15 * 9, 15 * 1, 15 * 4)
    for split in (data.train, data.val, data.test):
        assert split.images.shape[1:] == (3, 32, 32) and split.images.dtype == torch.uint8
        # Each image's encoded CIFAR id maps to the task label of the same class name.
        cifar_ids = split.images[:, 0, 0, 0].long()
        names = [CIFAR100_NAMES[i] for i in cifar_ids]
        assert names == [TASK_A.class_names[y] for y in split.labels]
        assert (split.images[:, 1, 0, 0] == 200).all() and (split.images[:, 2, 31, 31] == 7).all()
    assert torch.bincount(data.val.labels, minlength=15).tolist() == [1] * 15


def test_task_a85_reads_the_other_85_classes_and_no_image_of_task_as(tmp_path):
    from tasks.task_a import CIFAR100

    write_mini_cifar100(tmp_path, per_class_train=20, per_class_test=2, names=CIFAR100)
    others = tasks.get_task("A85")
    data = load_task_data(others, tmp_path, download=False)
    assert (len(data.train), len(data.val), len(data.test)) == (85 * 19, 85 * 1, 85 * 2)  # 5% for validation
    for split in (data.train, data.val, data.test):
        names = [CIFAR100[i] for i in split.images[:, 0, 0, 0].long()]
        assert names == [others.class_names[y] for y in split.labels]
        assert not set(names) & set(TASK_A.class_names)


def test_transfer_images_are_unlabelled_images_of_the_other_classes_chosen_the_same_every_time(tmp_path):
    write_mini_cifar100(tmp_path, per_class_train=4)
    transfer = load_transfer_images(TASK_A, tmp_path, 170, download=False)
    assert len(transfer) == 170 and (transfer.labels == -1).all()
    names = [CIFAR100_NAMES[i] for i in transfer.images[:, 0, 0, 0].long()]
    assert not set(names) & set(TASK_A.class_names)
    # Stratified over the 85 other classes: 2 of each one's 4 images.
    assert sorted(set(names)) == sorted(set(CIFAR100_NAMES) - set(TASK_A.class_names))
    assert all(names.count(n) == 2 for n in set(names))
    again = load_transfer_images(TASK_A, tmp_path, 170, download=False)  # seeded by the task, not the run
    assert torch.equal(again.images, transfer.images)
    every = load_transfer_images(TASK_A, tmp_path, 340, download=False)
    assert len(every) == 340 and len({bytes(im.numpy()) for im in every.images[:, 0, 0, :1]}) == 85
    few = load_transfer_images(TASK_A, tmp_path, 10, download=False)  # fewer than the classes: a seeded choice
    few_names = {CIFAR100_NAMES[i] for i in few.images[:, 0, 0, 0].long()}
    assert len(few) == 10 and not few_names & set(TASK_A.class_names)


def test_transfer_images_bad_requests_are_clear_errors(tmp_path):
    write_mini_cifar100(tmp_path, per_class_train=4)
    with pytest.raises(UserError, match="(?s)--transfer_images 341: CIFAR-100 has 340 .*Fix: ask for at most 340"):
        load_transfer_images(TASK_A, tmp_path, 341, download=False)
    with pytest.raises(UserError, match="(?s)task B is not one.*Fix: drop --transfer_images"):
        load_transfer_images(tasks.get_task("B"), tmp_path, 10, download=False)


def test_task_a_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="(?s)CIFAR-100 is missing under .*nowhere.*Fix:"):
        load_task_data(TASK_A, tmp_path / "nowhere", download=False)


def test_task_b_split_is_stratified_and_deterministic():
    task = tasks.get_task("B")
    one, two = load_task_data(task), load_task_data(task)
    assert (len(one.train), len(one.val), len(one.test)) == (1167, 270, 360)
    total = sum(torch.bincount(one.split(n).labels, minlength=10) for n in ("train", "val", "test")).float()
    assert total.sum() == 1797
    for name in ("train", "val", "test"):
        a, b = one.split(name), two.split(name)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
        counts = torch.bincount(a.labels, minlength=10).float()
        # Stratified: each class's count is its share of the whole set, to within one image.
        assert (counts - total * len(a) / 1797).abs().max() <= 1.0
    assert one.train.images.max() == 255 and one.train.images.shape[1:] == (1, 8, 8)


def test_select_classes_relabels_to_local_ids():
    images = torch.arange(6, dtype=torch.uint8).view(6, 1, 1, 1)
    ds = ImageTensorDataset(images, torch.tensor([0, 3, 1, 3, 2, 0]))
    sub = ds.select_classes([3, 0])
    assert sub.labels.tolist() == [1, 0, 0, 1]
    assert sub.images.flatten().tolist() == [0, 1, 3, 5]


def test_loader_yields_whole_batches_and_is_seeded():
    ds = ImageTensorDataset(torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1), torch.arange(10))
    order = lambda seed: [y.tolist() for _, y in create_loader(ds, 4, train=True, seed=seed)]  # noqa: E731
    assert [len(b) for b in order(0)] == [4, 4, 2]
    assert order(0) == order(0) and order(0) != order(1)
    assert sorted(sum(order(0), [])) == list(range(10))
    assert [y.tolist() for _, y in create_loader(ds, 4, train=False)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_transform_normalises_without_augmentation():
    t = BatchTransform(mean=(0.5,), std=(0.25,))
    x = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1)
    assert t(x).flatten().tolist() == [-2.0, 2.0]


def test_random_crop_is_a_shifted_window_and_flip_mirrors():
    images = torch.randint(1, 256, (64, 2, 6, 6), dtype=torch.uint8)
    x = images.float() / 255
    crop = BatchTransform((0.0, 0.0), (1.0, 1.0), crop_padding=2)
    out = crop.augment(x, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    shifts = set()
    for img, src in zip(out, padded):
        hits = [(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(img, src[:, dy:dy + 6, dx:dx + 6])]
        assert hits, "every crop is a 6x6 window of the padded image"
        shifts.add(hits[0])
    assert len(shifts) > 5  # offsets are drawn per image

    flip = BatchTransform((0.0, 0.0), (1.0, 1.0), hflip=True)
    out = flip.augment(x, torch.Generator().manual_seed(0))
    same = [torch.equal(o, i) for o, i in zip(out, x)]
    mirrored = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x)]
    assert all(s or m for s, m in zip(same, mirrored))
    assert 10 < sum(mirrored) < 54


def test_cutout_sets_a_clipped_square_to_the_mean_after_crop_and_flip():
    mean, std = (0.25, 0.75), (0.5, 0.2)
    images = torch.randint(0, 256, (300, 2, 8, 8), dtype=torch.uint8)
    plain = BatchTransform(mean, std, crop_padding=2, hflip=True)
    cut = BatchTransform(mean, std, crop_padding=2, hflip=True, cutout=4)
    params = cut.sample(300, torch.Generator().manual_seed(0))
    # Cutout's centres are drawn last: the same generator gives the crops and flips of a run without it.
    without = plain.sample(300, torch.Generator().manual_seed(0))
    assert set(params) == set(without) | {"cy", "cx"}
    assert all(torch.equal(without[k], params[k]) for k in without)
    before, after = plain(images, augment=True, params=params), cut(images, augment=True, params=params)
    erased = (before != after).any(1)
    sizes = []
    for i in range(len(images)):
        cy, cx = int(params["cy"][i] * 8), int(params["cx"][i] * 8)
        square = torch.zeros(8, 8, dtype=torch.bool)
        square[max(cy - 2, 0):cy + 2, max(cx - 2, 0):cx + 2] = True
        assert torch.equal(erased[i], square), i  # only the square, centred where drawn, clipped at the borders
        assert torch.all(after[i][:, square] == 0)  # the mean, normalised
        sizes.append(int(square.sum()))
    assert max(sizes) == 16 and min(sizes) <= 4  # whole squares inside, corners clipped at the borders

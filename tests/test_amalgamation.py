"""Specialists trained elsewhere and images without labels (``--label_fraction``, a task's unlabelled folder)."""
import json

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import train
from mtkd import losses
from mtkd.data import ImageTensorDataset, count_labelled, keep_labels, labelled_only, load_task_data
from mtkd.errors import UserError
from mtkd.specialists import load_teacher
from mtkd.taskfile import load_task_file
from mtkd.teachers import TeacherInput
from test_taskfile import TOML as ANIMALS, write_images

# The animals task of test_taskfile, with a folder of unlabelled images and two teachers trained elsewhere.
TOML = ANIMALS.split("[[teachers]]")[0] + """unlabeled = "unlabelled"
[[teachers]]
name = "cats"
architecture = "resnet10t"
classes = ["lynx", "hyena"]
checkpoint = "cats.safetensors"
image_size = 24
mean = [0.485, 0.456, 0.406]
std = [0.229, 0.224, 0.225]
adapt_small_input = false
[[teachers]]
name = "stripes"
architecture = "resnet10t"
classes = ["zebra", "hyena"]
checkpoint = "stripes.pt"
"""


def _external_teacher(outputs: int, architecture: str = "resnet10t") -> dict:
    """A teacher built outside mtkd: a plain timm model, its state dict."""
    torch.manual_seed(outputs)
    return timm.create_model(architecture, pretrained=False, num_classes=outputs).state_dict()


@pytest.fixture
def amalgamation_task(tmp_path):
    write_images(tmp_path / "images", per_class=10)
    rng = np.random.default_rng(1)
    (tmp_path / "unlabelled" / "more").mkdir(parents=True)
    for i, name in enumerate(["a.png", "b.jpg", "c.png", "more/d.png", "more/e.png"]):
        Image.fromarray(rng.integers(0, 256, (20 + i, 20, 3), dtype=np.uint8)).save(tmp_path / "unlabelled" / name)
    (tmp_path / "unlabelled" / "notes.txt").write_text("not an image")
    save_file(_external_teacher(2), str(tmp_path / "cats.safetensors"))
    torch.save(_external_teacher(2), tmp_path / "stripes.pt")
    path = tmp_path / "animals.toml"
    path.write_text(TOML)
    return path


def test_keep_labels_is_stratified_seeded_and_keeps_the_images():
    labels = torch.arange(200) % 4
    data = ImageTensorDataset(torch.zeros(200, 1, 2, 2, dtype=torch.uint8), labels)
    kept = keep_labels(data, 0.1, seed=3)
    assert count_labelled(kept) == (20, 180) and kept.images is data.images
    assert torch.bincount(kept.labels[kept.labels >= 0]).tolist() == [5, 5, 5, 5]  # stratified
    assert torch.equal(keep_labels(data, 0.1, seed=3).labels, kept.labels)
    assert not torch.equal(keep_labels(data, 0.1, seed=4).labels, kept.labels)
    assert torch.equal(kept.labels[kept.labels >= 0], labels[kept.labels >= 0])  # kept labels are the true ones
    assert len(labelled_only(kept)) == 20 and keep_labels(data, 1.0, seed=3) is data
    # A specialist's view of the training set leaves the unlabelled images out.
    assert len(kept.select_classes([1, 2])) == 10
    with pytest.raises(UserError, match="keeps 2 of 200 labelled training images, fewer than the 4 classes"):
        keep_labels(data, 0.01, seed=0)


@pytest.mark.parametrize("fraction, kept", [(0.995, 995), (0.999, 999), (0.99, 990)])
def test_keep_labels_close_to_one_drops_the_few_labels_it_must(fraction, kept):
    labels = torch.arange(1000) % 10
    data = ImageTensorDataset(torch.zeros(1000, 1, 2, 2, dtype=torch.uint8), labels)
    out = keep_labels(data, fraction, seed=0)
    assert count_labelled(out) == (kept, 1000 - kept)
    assert torch.equal(out.labels[out.labels >= 0], labels[out.labels >= 0])
    assert torch.equal(keep_labels(data, fraction, seed=0).labels, out.labels)


def test_teacher_input_undoes_the_tasks_normalisation_and_applies_its_own():
    pixels = torch.rand(2, 3, 8, 8)
    task_mean, task_std, mean, std = [0.5] * 3, [0.25] * 3, [0.4, 0.5, 0.6], [0.2, 0.3, 0.4]
    x = (pixels - 0.5) / 0.25
    same_size = TeacherInput(task_mean, task_std, mean, std, 8)(x)
    expected = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(same_size, expected, atol=1e-6)
    bigger = TeacherInput(task_mean, task_std, mean, std, 24)(x)
    assert bigger.shape == (2, 3, 24, 24)
    assert torch.allclose(bigger, (F.interpolate(pixels, size=24, mode="bilinear") - expected.new_tensor(mean).view(
        1, 3, 1, 1)) / expected.new_tensor(std).view(1, 3, 1, 1), atol=1e-5)


def test_task_file_declares_unlabelled_images_and_teachers_inputs(amalgamation_task, tmp_path):
    task = load_task_file(amalgamation_task)
    cats = task.teachers[0]
    assert (cats.image_size, cats.mean, cats.adapt) == (24, (0.485, 0.456, 0.406), False)
    data = load_task_data(task)
    # 18 labelled training images (30 minus val and test) and the folder's 5 images, the text file left out.
    assert count_labelled(data.train) == (18, 5) and len(data.val) == len(data.test) == 6


def test_a_teacher_trained_elsewhere_is_distilled_from_at_its_own_input(amalgamation_task, tmp_path, monkeypatch,
                                                                         capsys):
    seen = []
    forward = TeacherInput.forward
    monkeypatch.setattr(TeacherInput, "forward", lambda self, x: seen.append(tuple(forward(self, x).shape[-2:]))
                        or forward(self, x))
    out = tmp_path / "runs"
    assert train.main(["--task", str(amalgamation_task), "--num_epochs", "1", "--student_model", "ResNet18",
                       "--alpha", "0.5", "--aggregation", "combination", "--output_dir", str(out)]) == 0
    summary = json.loads(next((out / "Taskanimals").glob("*/summary.json")).read_text())
    assert [t["status"] for t in summary["teachers"]] == ["external", "external"]
    assert all(0 <= t["val_acc"] <= 1 for t in summary["teachers"]) and summary["aggregation"] == "combination"
    assert seen and set(seen) == {(24, 24)}  # only the teacher that declared 24 px gets an input of its own
    printed = " ".join(capsys.readouterr().out.split())
    assert "measuring teacher cats" in printed and "measuring teacher stripes" in printed and "images/s" in printed
    # Nothing trained, the external files untouched; the teacher folder holds the machine's records only: the
    # precisions chosen and the accuracies measured.
    assert sorted(p.name for p in (out / "Taskanimals" / "teachers").iterdir()) == ["measured.json",
                                                                                    "precisions.json"]
    # --retrain_teachers never overwrites a teacher trained elsewhere; the next run does not measure it again.
    before = (tmp_path / "stripes.pt").read_bytes()
    assert train.main(["--task", str(amalgamation_task), "--num_epochs", "1", "--student_model", "ResNet18",
                       "--retrain_teachers", "--output_dir", str(out)]) == 0
    assert (tmp_path / "stripes.pt").read_bytes() == before
    printed = " ".join(capsys.readouterr().out.split())
    assert "measuring teacher" not in printed and "teacher cats: accuracy as measured before" in printed
    again = json.loads(sorted((out / "Taskanimals").glob("*/summary.json"))[-1].read_text())
    assert [t["val_acc"] for t in again["teachers"]] == [t["val_acc"] for t in summary["teachers"]]
    # A rewritten file (new weights, or the same ones saved again) is measured again.
    torch.save(_external_teacher(2), tmp_path / "stripes.pt")
    assert train.main(["--task", str(amalgamation_task), "--num_epochs", "1", "--student_model", "ResNet18",
                       "--output_dir", str(out)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "measuring teacher stripes" in printed and "measuring teacher cats" not in printed


def test_unlabelled_images_never_reach_the_cross_entropy(amalgamation_task, tmp_path, monkeypatch):
    calls = []
    original = losses.labelled_cross_entropy

    def spy(logits, labels):
        value = original(logits, labels)
        has = labels >= 0
        direct = F.cross_entropy(logits[has], labels[has]) if has.any() else logits.new_zeros(())
        assert value.item() == pytest.approx(direct.item(), rel=1e-5, abs=1e-7)
        grad, = torch.autograd.grad(value, logits, retain_graph=True)
        assert grad[~has].abs().sum() == 0  # no gradient reaches an unlabelled image's logits
        calls.append(labels.clone())
        return value

    monkeypatch.setattr(losses, "labelled_cross_entropy", spy)
    out = tmp_path / "runs"
    assert train.main(["--task", str(amalgamation_task), "--num_epochs", "2", "--student_model", "ResNet18",
                       "--label_fraction", "0.5", "--alpha", "0.5", "--batch_size", "8",
                       "--output_dir", str(out)]) == 0
    summary = json.loads(next((out / "Taskanimals").glob("*/summary.json")).read_text())
    # Half of the 18 labelled training images keep their label; the other 9 and the folder's 5 have none.
    assert (summary["labelled_images"], summary["unlabelled_images"]) == (9, 14)
    # The teachers' pseudo-labels are scored on the 9 images whose label was hidden (not the folder's 5).
    assert 0 <= summary["pseudo_label_acc"] <= 1 and (9 * summary["pseudo_label_acc"]) == pytest.approx(
        round(9 * summary["pseudo_label_acc"]), abs=1e-5)
    labels = torch.cat(calls)
    assert len(labels) == 2 * 23 and int((labels >= 0).sum()) == 2 * 9  # every image once per epoch
    # Labels only (alpha 0): the unlabelled images are left out altogether.
    calls.clear()
    assert train.main(["--task", str(amalgamation_task), "--num_epochs", "1", "--student_model", "ResNet18",
                       "--label_fraction", "0.5", "--alpha", "0", "--output_dir", str(out)]) == 0
    assert len(torch.cat(calls)) == 9 and bool((torch.cat(calls) >= 0).all())
    # Alpha 0 with feature matching still learns from the teachers (their features): every image stays in.
    calls.clear()
    assert train.main(["--task", str(amalgamation_task), "--num_epochs", "1", "--student_model", "ResNet18",
                       "--label_fraction", "0.5", "--alpha", "0", "--feature_weight", "0.1",
                       "--output_dir", str(out)]) == 0
    assert len(torch.cat(calls)) == 23 and int((torch.cat(calls) >= 0).sum()) == 9


def test_the_teachers_logits_for_the_report_are_kept_with_the_cache_and_read_back(amalgamation_task, tmp_path,
                                                                                  capsys):
    """With --teacher_cache the ensemble rows of the report (val, test, the images whose label was hidden)
    come from logits an earlier run kept: the same numbers, with no teacher run at the end."""
    out, cache = tmp_path / "runs", tmp_path / "cache"
    flags = ["--task", str(amalgamation_task), "--num_epochs", "1", "--student_model", "ResNet18", "--alpha", "0",
             "--label_fraction", "0.5", "--output_dir", str(out)]
    summaries = []
    for run, extra in (("plain", []), ("keeps", ["--teacher_cache", str(cache)]),
                       ("reads", ["--teacher_cache", str(cache)])):
        capsys.readouterr()
        assert train.main(flags + extra + ["--run", run]) == 0
        summaries.append((json.loads(next((out / "Taskanimals").glob(f"*_{run}/summary.json")).read_text()),
                          "teacher ensemble:" in " ".join(capsys.readouterr().out.split())))
    assert [ran for _, ran in summaries] == [True, True, False]
    assert len(list(cache.glob("Taskanimals-eval-*.pt"))) == 3  # val, test and the whole training set
    first = summaries[0][0]
    assert 0 <= first["pseudo_label_acc"] <= 1
    for summary, _ in summaries[1:]:
        assert summary["ensemble"] == first["ensemble"] and summary["pseudo_label_acc"] == first["pseudo_label_acc"]


@pytest.mark.parametrize("make, message", [
    (lambda: _external_teacher(3), "the classifier has 3 outputs but the teacher lists 2 classes"),
    (lambda: _external_teacher(2, "mobilenetv3_small_050"), "the weights do not belong to ResNet"),
    (lambda: {k: v for k, v in _external_teacher(2).items() if not k.startswith("layer4.0.conv1")},
     r"missing keys \['layer4.0.conv1.weight'\]"),
    (lambda: {**_external_teacher(2), "extra.weight": torch.zeros(1)}, r"unexpected keys \['extra.weight'\]"),
    (lambda: b"not safetensors", "cannot read .*cats.safetensors as safetensors"),
])
def test_a_checkpoint_that_does_not_fit_gets_one_message_and_exit_2(amalgamation_task, tmp_path, capsys,
                                                                     make, message):
    weights = make()
    if isinstance(weights, bytes):
        (tmp_path / "cats.safetensors").write_bytes(weights)
    else:
        save_file(weights, str(tmp_path / "cats.safetensors"))
    assert train.main(["--task", str(amalgamation_task), "--num_epochs", "1", "--output_dir",
                       str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "teacher 'cats'" in err and "Traceback" not in err
    import re
    assert re.search(message, " ".join(err.split())), err


def test_a_torch_file_that_is_not_a_state_dict_is_refused(amalgamation_task, tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "stripes.pt")
    task = load_task_file(amalgamation_task)
    with pytest.raises(UserError, match="neither an mtkd teacher checkpoint nor a state dict"):
        load_teacher(task.teachers[1], task, tmp_path / "stripes.pt")


@pytest.mark.parametrize("adapted_weights, image_size, kernel", [(False, 32, 7), (True, 64, 3)])
def test_a_resnets_stem_follows_its_weights(amalgamation_task, tmp_path, capsys, adapted_weights, image_size, kernel):
    """timm's own resnet18 (7x7 stem) declared at 32 px, and mtkd's small-input resnet18 (3x3) declared at
    64 px: each loads with the stem of its weights, and says so."""
    from dataclasses import replace

    from mtkd.models import create_model

    weights = create_model("resnet18", 2, 3, 16 if adapted_weights else 224).state_dict()
    assert weights["conv1.weight"].shape[-1] == kernel
    torch.save(weights, tmp_path / "plain.pt")
    task = load_task_file(amalgamation_task)
    spec = replace(task.teachers[1], architecture="resnet18", image_size=image_size, checkpoint=str(tmp_path / "plain.pt"))
    model, state = load_teacher(spec, task, tmp_path / "plain.pt")
    assert state is None and model.conv1.kernel_size == (kernel, kernel)
    assert torch.equal(model.state_dict()["conv1.weight"], weights["conv1.weight"])
    assert model.eval()(torch.zeros(1, 3, image_size, image_size)).shape == (1, 2)
    out = " ".join(capsys.readouterr().out.split())
    assert f"{kernel}x{kernel} first convolution" in out and f"adapt_small_input = {str(adapted_weights).lower()}" in out

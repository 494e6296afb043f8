import torch
from torch import nn

from mtkd.cache import CachedViews, TeacherCache, cache_key, open_teacher_cache
from mtkd.data import BatchTransform, ImageTensorDataset, create_loader, keep_labels
from mtkd.losses import mixture_targets
from mtkd.teachers import TeacherEnsemble


class ConvTeacher(nn.Module):
    def __init__(self, n_out, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, n_out)

    def forward(self, x):
        return self.fc(self.conv(x).relu().flatten(1))

    def get_classifier(self):  # as timm models name theirs: what --embedding_weight reads the features of
        return self.fc


def make_setup(seed=0):
    ens = TeacherEnsemble([ConvTeacher(2, seed), ConvTeacher(3, seed + 1)], [[0, 1], [1, 2, 3]], [1.0, 1.0], 4)
    g = torch.Generator().manual_seed(0)
    data = ImageTensorDataset(torch.randint(0, 256, (50, 1, 8, 8), dtype=torch.uint8, generator=g),
                              torch.randint(0, 4, (50,), generator=g))
    transform = BatchTransform([0.3], [0.4], crop_padding=2, hflip=True)
    return ens, data, transform


def test_cached_soft_targets_equal_the_online_teachers_on_the_replayed_views(tmp_path):
    ens, data, transform = make_setup()
    cache, _, status = open_teacher_cache(tmp_path, "T", ens, data, transform, 3, torch.device("cpu"))
    assert status == "built" and cache.num_views == 3
    views = CachedViews(data, cache)
    seen = []
    for epoch in (1, 2, 4):
        views.set_epoch(epoch)
        images, labels, extras = next(iter(create_loader(views, 16, train=True, seed=epoch)))
        x = transform(images, augment=True, params=extras["aug"])
        online = ens(x)
        for cached, live in zip(extras["teacher_logits"], online):
            assert cached.dtype == torch.float16
            assert torch.allclose(cached.float(), live, atol=2e-3, rtol=2e-3)
        q_cached = mixture_targets([z.float() for z in extras["teacher_logits"]], ens.class_ids, ens.weights, 4, 2.0)
        q_online = mixture_targets(online, ens.class_ids, ens.weights, 4, 2.0)
        assert torch.allclose(q_cached, q_online, atol=1e-3)
        seen.append(x)
    # Epoch 4 replays view 0 (as epoch 1) and differs from epoch 2's view.
    assert views.view == 0
    assert not torch.equal(cache.dx[0], cache.dx[1]) or not torch.equal(cache.flip[0], cache.flip[1])


def test_key_follows_teachers_data_and_augmentation_only():
    ens, data, transform = make_setup()
    key = cache_key(ens, data, transform, 4)
    assert cache_key(*make_setup(), 4) == key  # same contents, new objects
    assert cache_key(ens, data, transform, 5) != key
    assert cache_key(make_setup(seed=7)[0], data, transform, 4) != key  # other teacher weights
    other = ImageTensorDataset(data.images.clone(), data.labels.clone())
    other.images[0, 0, 0, 0] ^= 1
    assert cache_key(ens, other, transform, 4) != key  # one pixel of the data
    assert cache_key(ens, data, BatchTransform([0.3], [0.4], crop_padding=1, hflip=True), 4) != key
    assert cache_key(ens, data, BatchTransform([0.3], [0.4], crop_padding=2, hflip=True, cutout=2), 4) != key
    # Labels kept or dropped (--label_fraction) do not change what the teachers compute: one cache for all.
    assert cache_key(ens, keep_labels(data, 0.5, seed=1), transform, 4) == key
    # A teacher's own input does.
    from mtkd.teachers import TeacherInput

    ens.inputs[0] = TeacherInput([0.5], [0.5], [0.4], [0.3], 8)
    assert cache_key(ens, data, transform, 4) != key


def test_cache_is_reused_and_rebuilt_when_corrupt(tmp_path, monkeypatch):
    ens, data, transform = make_setup()
    cpu = torch.device("cpu")
    first, path, _ = open_teacher_cache(tmp_path, "T", ens, data, transform, 2, cpu)
    built = []
    original = TeacherCache.build.__func__

    def counting_build(cls, *a, **k):
        built.append(1)
        return original(cls, *a, **k)

    monkeypatch.setattr(TeacherCache, "build", classmethod(counting_build))
    again, path2, status = open_teacher_cache(tmp_path, "T", ens, data, transform, 2, cpu)
    assert (status, path2, built) == ("reused", path, [])
    assert all(torch.equal(a, b) for a, b in zip(first.logits, again.logits))

    # A truncated file (a killed writer that did not use the atomic rename) is rebuilt.
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    _, _, status = open_teacher_cache(tmp_path, "T", ens, data, transform, 2, cpu)
    assert status.startswith("rebuilt (unreadable") and built == [1]

    # Tampered values that still load: the checksum catches them.
    state = torch.load(path, weights_only=True)
    state["logits"][0][0, 0, 0] += 1
    torch.save(state, path)
    cache, _, status = open_teacher_cache(tmp_path, "T", ens, data, transform, 2, cpu)
    assert status == "rebuilt (checksum mismatch)" and built == [1, 1]
    assert torch.equal(cache.logits[0], first.logits[0])


def test_a_cache_with_the_teachers_embeddings_replays_them_beside_the_logits(tmp_path):
    ens, data, transform = make_setup()
    cpu = torch.device("cpu")
    plain, plain_path, _ = open_teacher_cache(tmp_path, "T", ens, data, transform, 2, cpu)
    cache, path, status = open_teacher_cache(tmp_path, "T", ens, data, transform, 2, cpu, embeddings=True)
    # Its own file (the key says so); the logits-only cache is left as it was.
    assert status == "built" and path != plain_path and plain_path.exists() and plain.embeddings is None
    assert cache_key(ens, data, transform, 2, embeddings=True) != cache_key(ens, data, transform, 2)
    assert [tuple(h.shape) for h in cache.embeddings] == [(2, 50, 256), (2, 50, 256)]
    assert all(torch.equal(a, b) for a, b in zip(cache.logits, plain.logits))
    again, _, status = open_teacher_cache(tmp_path, "T", ens, data, transform, 2, cpu, embeddings=True)
    assert status == "reused" and all(torch.equal(a, b) for a, b in zip(again.embeddings, cache.embeddings))
    views = CachedViews(data, again)
    views.set_epoch(2)
    images, _, extras = next(iter(create_loader(views, 16, train=True, seed=0)))
    x = transform(images, augment=True, params=extras["aug"])
    _, _, online = ens.outputs(x, embeddings=True)
    for cached, live in zip(extras["teacher_embeddings"], online):
        assert cached.dtype == torch.float16 and torch.allclose(cached.float(), live, atol=2e-3, rtol=2e-3)
    # Tampered embeddings are caught by the checksum.
    state = torch.load(path, weights_only=True)
    state["embeddings"][1][0, 0, 0] += 1
    torch.save(state, path)
    _, _, status = open_teacher_cache(tmp_path, "T", ens, data, transform, 2, cpu, embeddings=True)
    assert status == "rebuilt (checksum mismatch)"


def test_the_key_records_each_teachers_precision():
    from mtkd.precision import FP32, Precision

    ens, data, transform = make_setup()
    fp32 = cache_key(ens, data, transform, 2)
    ens.set_precisions([FP32, Precision("bf16", True)])
    bf16 = cache_key(ens, data, transform, 2)
    ens.set_precisions([FP32, Precision("fp32", True)])  # the layout alone does not change the logits' precision
    assert fp32 != bf16 and cache_key(ens, data, transform, 2) == fp32
    # A teacher run in bf16 does give other logits, hence another cache.
    x = transform(data.images[:4])
    z32 = ens(x)[1]
    ens.set_precisions([FP32, Precision("bf16", True)])
    assert not torch.equal(ens(x)[1], z32)


def test_building_the_cache_says_what_it_computes_and_shows_its_rate(tmp_path, capsys):
    ens, data, transform = make_setup()
    open_teacher_cache(tmp_path, "T", ens, data, transform, 3, torch.device("cpu"))
    out = " ".join(capsys.readouterr().out.split())
    assert "computing 3 views x 50 images x 2 teachers = 300 teacher forward passes" in out
    assert "teacher cache" in out and "150/150" in out and "images/s" in out


def test_in_a_log_a_long_step_prints_its_progress_as_it_goes(tmp_path, capsys, monkeypatch):
    from mtkd import report

    monkeypatch.setattr(report, "LOG_EVERY_S", 0.0)  # a line after every batch
    ens, data, transform = make_setup()
    TeacherCache.build("k", ens, data, transform, 3, torch.device("cpu"), batch_size=16)
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("teacher cache:")]
    assert len(lines) == 3 * 4  # 4 batches a view; the last batch's line is the closing one
    assert lines[0].startswith("teacher cache: 16/150 images (") and "eta" in lines[0]
    assert lines[-1].startswith("teacher cache: 150/150 images")


def test_teacher_logits_on_plain_images_are_kept_and_read_back(tmp_path, monkeypatch, capsys):
    from mtkd.cache import teacher_logits

    ens, data, transform = make_setup()
    cpu = torch.device("cpu")
    calls = []
    forward = TeacherEnsemble.forward
    monkeypatch.setattr(TeacherEnsemble, "forward", lambda self, x, *a: calls.append(len(x)) or forward(self, x, *a))
    splits = {"a": data, "b": data.subset(range(7))}
    first = teacher_logits(ens, splits, transform, cpu, tmp_path, "T")
    assert sum(calls) == 57 and len(list(tmp_path.glob("TaskT-eval-*.pt"))) == 2
    for z, live in zip(first["a"], forward(ens, transform(data.images))):
        assert z.dtype == torch.float32 and torch.equal(z, live)
    # The same images in another batch: equal up to the order of float sums (oneDNN picks kernels by batch size).
    assert all(torch.allclose(a[:7], b, rtol=1e-5, atol=1e-5) for a, b in zip(first["a"], first["b"]))
    # A later run (new objects, same teachers and images) reads them back: the teachers do not run.
    ens2, data2, _ = make_setup()
    again = teacher_logits(ens2, {"a": data2}, transform, cpu, tmp_path, "T")
    assert sum(calls) == 57 and all(torch.equal(a, b) for a, b in zip(first["a"], again["a"]))
    # Other teacher weights are another file; a tampered file is recomputed, with a message.
    teacher_logits(make_setup(seed=3)[0], {"a": data}, transform, cpu, tmp_path, "T")
    assert sum(calls) == 107 and len(list(tmp_path.glob("TaskT-eval-*.pt"))) == 3
    path = next(p for p in tmp_path.glob("TaskT-eval-*.pt") if torch.load(p, weights_only=True)["logits"][0].shape[0] == 7)
    state = torch.load(path, weights_only=True)
    state["logits"][1][0, 0] += 1
    torch.save(state, path)
    capsys.readouterr()
    fixed = teacher_logits(ens, {"b": data.subset(range(7))}, transform, cpu, tmp_path, "T")
    assert sum(calls) == 114 and "checksum mismatch" in capsys.readouterr().out
    assert all(torch.equal(a, b) for a, b in zip(fixed["b"], first["b"]))
    # Without a directory nothing is written.
    teacher_logits(ens, {"b": data}, transform, cpu)
    assert len(list(tmp_path.glob("TaskT-eval-*.pt"))) == 3


def test_ensemble_accuracy_reads_a_split_of_indices_alike_with_and_without_the_store(tmp_path):
    from mtkd.trainer import ensemble_accuracy

    ens, data, transform = make_setup()
    cpu = torch.device("cpu")
    hidden = torch.tensor([3, 5, 8, 13, 21, 34])
    splits = {"val": (data.subset(range(20)), None), "unlabelled": (data, hidden),
              "empty": (data.subset([]), None)}
    plain = ensemble_accuracy(ens, splits, transform, cpu)
    stored = ensemble_accuracy(ens, splits, transform, cpu, tmp_path, "T")
    again = ensemble_accuracy(ens, splits, transform, cpu, tmp_path, "T")
    assert plain.keys() == {"combination", "mixture"}
    for method, row in plain.items():
        assert row["val_acc"] == stored[method]["val_acc"] == again[method]["val_acc"]
        assert row["unlabelled_acc"] == stored[method]["unlabelled_acc"] == again[method]["unlabelled_acc"]
        assert row["empty_acc"] != row["empty_acc"]  # nan
    # By hand: the combination's class on the hidden images against their labels.
    pred = ens.combine(ens(transform(data.images[hidden]))).argmax(1)
    assert plain["combination"]["unlabelled_acc"] == (pred == data.labels[hidden]).float().mean().item()

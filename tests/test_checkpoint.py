import os
import pickle

import pytest
import torch

from mtkd.checkpoint import load_checkpoint, save_checkpoint
from mtkd.errors import UserError


def test_round_trip(tmp_path):
    state = {"model": {"w": torch.arange(3.0)}, "epoch": 4, "args": {"lr": 0.1}}
    save_checkpoint(state, tmp_path / "a" / "best.pt")
    loaded = load_checkpoint(tmp_path / "a" / "best.pt")
    assert torch.equal(loaded["model"]["w"], torch.arange(3.0)) and loaded["epoch"] == 4
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["best.pt"]  # no temporary left behind


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "best.pt"
    save_checkpoint({"model": {"w": torch.zeros(2)}}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint({"model": {"w": torch.ones(2)}}, path)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.zeros(2))
    assert os.listdir(tmp_path) == ["best.pt"]


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": _RunsCode(str(marker))}, f, protocol=2)
    with pytest.raises(UserError, match="holds more than weights"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("content, message", [
    (None, "checkpoint not found"),
    (b"not a checkpoint", "corrupt"),
])
def test_missing_or_corrupt_checkpoint(tmp_path, content, message):
    path = tmp_path / "x.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_checkpoint(path)


def test_checkpoint_without_model_is_rejected(tmp_path):
    torch.save({"epoch": 1}, tmp_path / "x.pt")
    with pytest.raises(UserError, match="not an mtkd checkpoint"):
        load_checkpoint(tmp_path / "x.pt")


def test_checkpoint_saver_keeps_best_top_k_and_last(tmp_path):
    from mtkd.checkpoint import STUDENT_KEYS, CheckpointSaver

    saver = CheckpointSaver(tmp_path, top_k=2)
    best = -1.0
    for epoch, acc in enumerate([0.5, 0.7, 0.6, 0.9], 1):
        state = {k: None for k in STUDENT_KEYS} | {"epoch": epoch, "val_acc": acc, "model": {"w": torch.ones(1)}}
        saver.save(state, is_best=acc > best)
        best = max(best, acc)
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 4 and load_checkpoint(tmp_path / "last.pt")["epoch"] == 4
    assert sorted(p.name for p in (tmp_path / "top").glob("*.pt")) == ["epoch_002.pt", "epoch_004.pt"]
    with pytest.raises(ValueError, match="needs"):
        saver.save({"model": {}}, is_best=False)


def test_an_epochs_state_is_written_once_and_linked_under_its_other_names(tmp_path):
    from mtkd.checkpoint import STUDENT_KEYS, CheckpointSaver

    saver = CheckpointSaver(tmp_path, top_k=2)

    def state(epoch, acc):
        model = {"w": torch.full((1,), epoch)}
        return {k: None for k in STUDENT_KEYS} | {"epoch": epoch, "val_acc": acc, "model": model}

    saver.save(state(1, 0.5), is_best=True)
    assert os.path.samefile(tmp_path / "best.pt", tmp_path / "last.pt")
    assert os.path.samefile(tmp_path / "best.pt", tmp_path / "top" / "epoch_001.pt")
    saver.save(state(2, 0.4), is_best=False)  # kept in the top 2, not the best: its own file, last.pt its link
    assert os.path.samefile(tmp_path / "top" / "epoch_002.pt", tmp_path / "last.pt")
    assert not os.path.samefile(tmp_path / "best.pt", tmp_path / "last.pt")
    saver.save(state(3, 0.3), is_best=False)  # neither best nor top 2
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 1
    assert load_checkpoint(tmp_path / "top" / "epoch_002.pt")["epoch"] == 2
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt", "top"]  # no temporary left


def test_a_file_system_without_hard_links_gets_copies(tmp_path, monkeypatch):
    from mtkd.checkpoint import link_checkpoint

    save_checkpoint({"model": {"w": torch.ones(2)}}, tmp_path / "best.pt")

    def no_links(src, dst):
        raise OSError("links not supported")

    monkeypatch.setattr(os, "link", no_links)
    link_checkpoint(tmp_path / "best.pt", tmp_path / "last.pt")
    assert not os.path.samefile(tmp_path / "best.pt", tmp_path / "last.pt")
    assert torch.equal(load_checkpoint(tmp_path / "last.pt")["model"]["w"], torch.ones(2))
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "last.pt"]

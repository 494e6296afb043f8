import pytest
import torch
from torch import nn

from mtkd.data import BatchTransform, ImageTensorDataset, create_loader
from mtkd.engine import NonFiniteLossError, TrainingInterrupted, evaluate, predict, train_one_epoch
from mtkd.precision import Precision


class Step(nn.Module):
    """A linear classifier whose loss turns NaN from the second batch on, if asked."""

    def __init__(self, nan_after=None):
        super().__init__()
        self.model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        self.calls = 0
        self.nan_after = nan_after
        self.seen = []  # (logits dtype, input is channels_last) per call

    def forward(self, x, y):
        self.calls += 1
        logits = self.model(x)
        self.seen.append((logits.dtype, x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1))
        loss = nn.functional.cross_entropy(logits, y)
        if self.nan_after is not None and self.calls > self.nan_after:
            loss = loss * float("nan")
        return {"loss": loss, "logits": logits, "loss_hard": loss.detach()}


def _loader(batch=8):
    g = torch.Generator().manual_seed(0)
    ds = ImageTensorDataset(torch.randint(0, 256, (40, 1, 2, 2), dtype=torch.uint8, generator=g), torch.arange(40) % 3)
    return create_loader(ds, batch, train=True)


def _params_after_epoch(batch, **kwargs):
    torch.manual_seed(0)
    step = Step()
    opt = torch.optim.SGD(step.parameters(), lr=0.5)
    train_one_epoch(step, _loader(batch), opt, BatchTransform((0.5,), (0.5,)), torch.device("cpu"), **kwargs)
    return step, torch.cat([p.detach().flatten() for p in step.parameters()])


def test_grad_accumulation_of_two_half_batches_is_one_full_batch():
    # The sampler's order does not depend on the batch size: two batches of 4 are one batch of 8.
    _, full = _params_after_epoch(8)
    step, accumulated = _params_after_epoch(4, grad_accum=2)
    assert step.calls == 10 and torch.allclose(full, accumulated, atol=1e-6)
    _, plain = _params_after_epoch(4)
    assert not torch.allclose(full, plain, atol=1e-4)


def test_clip_grad_bounds_every_update():
    torch.manual_seed(0)
    start = torch.cat([p.detach().flatten() for p in Step().parameters()])
    _, clipped = _params_after_epoch(8, clip_grad=0.01)
    # Plain SGD with lr 0.5: each of the 5 steps moves the parameters by at most 0.5 * 0.01.
    assert (clipped - start).norm() <= 5 * 0.5 * 0.01 + 1e-6
    _, free = _params_after_epoch(8)
    assert (free - start).norm() > 5 * 0.5 * 0.01


def test_stop_request_interrupts_before_the_next_step():
    step = Step()
    opt = torch.optim.SGD(step.parameters(), lr=0.1)
    asked = []

    def stop():
        asked.append(1)
        return len(asked) > 2

    with pytest.raises(TrainingInterrupted) as e:
        train_one_epoch(step, _loader(), opt, BatchTransform((0.5,), (0.5,)), torch.device("cpu"), epoch=4, stop=stop)
    assert (e.value.epoch, e.value.step, step.calls) == (4, 2, 2)


def test_bf16_autocast_on_cpu():
    step, params = _params_after_epoch(8, precision=Precision("bf16"))
    assert torch.isfinite(params).all()
    assert {dtype for dtype, _ in step.seen} == {torch.bfloat16}
    fp32, _ = _params_after_epoch(8)
    assert {dtype for dtype, _ in fp32.seen} == {torch.float32}


def test_channels_last_precision_hands_the_step_nhwc_batches():
    g = torch.Generator().manual_seed(0)
    ds = ImageTensorDataset(torch.randint(0, 256, (16, 3, 4, 4), dtype=torch.uint8, generator=g), torch.arange(16) % 3)
    step = Step()
    step.model = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
    opt = torch.optim.SGD(step.parameters(), lr=0.1)
    transform = BatchTransform((0.5,) * 3, (0.5,) * 3)
    train_one_epoch(step, create_loader(ds, 8, train=True), opt, transform, torch.device("cpu"),
                    precision=Precision("fp32", True))
    assert step.seen == [(torch.float32, True)] * 2


def test_train_one_epoch_averages_every_loss_part():
    step = Step()
    opt = torch.optim.SGD(step.parameters(), lr=0.1)
    out = train_one_epoch(step, _loader(), opt, BatchTransform((0.5,), (0.5,)), torch.device("cpu"))
    assert set(out) == {"loss", "loss_hard", "acc"} and step.calls == 5
    assert out["loss"] == pytest.approx(out["loss_hard"]) and 0 <= out["acc"] <= 1


def test_non_finite_loss_stops_with_epoch_and_step_and_no_update():
    step = Step(nan_after=1)
    opt = torch.optim.SGD(step.parameters(), lr=0.1)
    with pytest.raises(NonFiniteLossError, match="the loss became nan at epoch 3, step 1"):
        train_one_epoch(step, _loader(), opt, BatchTransform((0.5,), (0.5,)), torch.device("cpu"), epoch=3)
    assert all(torch.isfinite(p).all() for p in step.parameters())


def test_evaluate_top1_top3_and_loss():
    step = Step()
    out = evaluate(step.model, create_loader(_loader().dataset, 16, train=False), BatchTransform((0.5,), (0.5,)),
                   torch.device("cpu"))
    assert out["top3"] == 1.0 and 0 <= out["acc"] <= 1 and out["loss"] > 0


def test_evaluate_an_empty_shard_takes_part_in_the_reduction():
    """More ranks than validation images: a rank's shard is empty (it used to crash in torch.cat)."""
    empty = ImageTensorDataset(torch.zeros(0, 1, 2, 2, dtype=torch.uint8), torch.zeros(0, dtype=torch.long))
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    logits, labels = predict(model, create_loader(empty, 4, train=False), BatchTransform((0.5,), (0.5,)),
                             torch.device("cpu"))
    assert logits.numel() == 0 and labels.numel() == 0
    other_rank = {"n": 2, "top1": 1, "top3": 2, "loss": 1.0}
    reduced = evaluate(model, create_loader(empty, 4, train=False), BatchTransform((0.5,), (0.5,)),
                       torch.device("cpu"), reduce=lambda local: {k: local[k] + other_rank[k] for k in local})
    assert reduced == {"acc": 0.5, "top3": 1.0, "loss": 0.5}


@pytest.mark.parametrize("other_rank, expected", [
    ([15.0, 0.0, 0.0, 0.0], "SIGTERM"),   # the other process got SIGTERM; this one got nothing
    ([0.0, 1.0, 0.0, 0.0], "nan"),        # the other process's loss became NaN; this one's is finite
])
def test_every_process_stops_at_the_same_step_for_one_processs_signal_or_nan(other_rank, expected):
    """Under DDP the flags are reduced (max over ranks): here a fake reduction stands in for the other rank."""
    step = Step()
    opt = torch.optim.SGD(step.parameters(), lr=0.1)
    calls = []

    def agree(flags):
        calls.append(flags.tolist())
        other = torch.tensor(other_rank) if len(calls) == 2 else torch.zeros(4)
        return torch.maximum(flags, other)

    before = [p.detach().clone() for p in step.parameters()]
    kwargs = dict(epoch=3, stop=lambda: 0, agree=agree)
    if expected == "SIGTERM":
        with pytest.raises(TrainingInterrupted) as e:
            train_one_epoch(step, _loader(), opt, BatchTransform((0.5,), (0.5,)), torch.device("cpu"), **kwargs)
        assert (e.value.epoch, e.value.step, e.value.signum) == (3, 1, 15)
    else:
        with pytest.raises(NonFiniteLossError, match="the loss became nan at epoch 3, step 1"):
            train_one_epoch(step, _loader(), opt, BatchTransform((0.5,), (0.5,)), torch.device("cpu"), **kwargs)
    assert len(calls) == 2 and calls[0] == [0.0, 0.0, 0.0, 0.0]
    # Step 0 was applied, step 1 was not.
    assert any(not torch.equal(b, p) for b, p in zip(before, step.parameters()))


def test_accumulating_micro_batches_skip_the_gradient_all_reduce():
    """Like DDP's no_sync: only the micro-batch that steps synchronises gradients."""
    from contextlib import contextmanager

    class DDPLike(Step):
        def __init__(self):
            super().__init__()
            self.in_no_sync, self.synced = False, []

        @contextmanager
        def no_sync(self):
            self.in_no_sync = True
            yield
            self.in_no_sync = False

        def forward(self, x, y):
            self.synced.append(not self.in_no_sync)
            return super().forward(x, y)

    step = DDPLike()
    opt = torch.optim.SGD(step.parameters(), lr=0.1)
    train_one_epoch(step, _loader(8), opt, BatchTransform((0.5,), (0.5,)), torch.device("cpu"), grad_accum=2)
    assert step.synced == [False, True, False, True, True]  # 5 batches: the last, shorter group steps too


def test_a_part_that_is_a_mean_over_some_images_is_averaged_over_those_images():
    """``loss_hard`` of a batch is the mean over its labelled images: the epoch's value is the mean over every
    labelled image of the epoch, not over all images (a batch without a label adds nothing)."""

    class Labelled(Step):
        def forward(self, x, y):
            out = super().forward(x, y.clamp_min(0))
            per = torch.where(y >= 0, y.float(), 0.0)  # 'loss' of an image: its label
            has = (y >= 0).sum()
            out["loss_hard"] = per.sum() / has.clamp_min(1)
            out["counts"] = {"loss_hard": has}
            return out

    labels = torch.arange(40) % 3
    labels[:16] = -1  # the first two batches of 8 have no label at all
    ds = ImageTensorDataset(torch.zeros(40, 1, 2, 2, dtype=torch.uint8), labels)
    metrics = train_one_epoch(Labelled(), create_loader(ds, 8, train=False), torch.optim.SGD(Step().parameters(), 0.1),
                              BatchTransform((0.5,), (0.5,)), torch.device("cpu"))
    assert metrics["loss_hard"] == pytest.approx(labels[16:].float().mean().item())
    assert "counts" not in metrics

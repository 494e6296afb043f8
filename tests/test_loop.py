import random

import torch

from mtkd.loop import RunRng


def _draw(rng: RunRng):
    return (torch.randint(0, 10**6, (3,), generator=rng.loader).tolist(),
            torch.randint(0, 10**6, (3,), generator=rng.augment).tolist(),
            torch.randint(0, 10**6, (3,)).tolist(), random.random())


def test_each_rank_draws_its_own_augmentation_and_shares_the_batch_order():
    r0, r1 = RunRng(5, rank=0), RunRng(5, rank=1)
    loader0, aug0, *_ = _draw(r0)
    loader1, aug1, *_ = _draw(r1)
    assert loader0 == loader1 and aug0 != aug1
    assert _draw(RunRng(5))[1] == aug0  # rank 0 (and a single process) as before


def test_every_ranks_state_is_saved_and_each_rank_restores_its_own():
    ranks = [RunRng(5, rank=r) for r in range(2)]
    states = {"ranks": []}
    for rng in ranks:  # what gather_objects collects on rank 0, one rank after the other
        _draw(rng)
        states["ranks"].append(rng.local_state())
    expected = []
    for rng, state in zip(ranks, states["ranks"]):
        RunRng(0).load_state_dict({"ranks": [state]})  # restores the global generators too
        expected.append(_draw(rng))
    for r in (1, 0):
        resumed = RunRng(5, rank=r)
        resumed.load_state_dict(states)
        assert _draw(resumed) == expected[r]
    # A rank the checkpoint did not have (resumed on more processes) keeps its seeded stream.
    extra = RunRng(5, rank=2)
    extra.load_state_dict(states)
    assert _draw(extra)[1] == _draw(RunRng(5, rank=2))[1]


def test_a_checkpoint_written_before_per_rank_states_still_resumes():
    rng = RunRng(3)
    _draw(rng)
    legacy = {**rng.local_state(), "cuda": []}  # then: get_rng_state_all(), [] without CUDA
    after = _draw(rng)
    resumed = RunRng(0)
    resumed.load_state_dict(legacy)
    assert _draw(resumed) == after


def test_resolving_the_device_flushes_denormal_floats_to_zero():
    # Denormal weights (dead filters under Adam with L2 decay) run 30x slower on x86 unless flushed.
    from mtkd.loop import resolve_device

    torch.set_flush_denormal(False)
    assert torch.tensor([1e-39]).item() != 0.0  # stored as a denormal while the flush is off
    try:
        assert resolve_device("cpu") == torch.device("cpu")
        assert torch.tensor([1e-39]).item() == 0.0
        assert (torch.full((4,), 1e-20) * 1e-20).eq(0).all()  # a product that underflows is flushed too
    finally:
        torch.set_flush_denormal(False)

import numpy as np
import pytest

from loaders.samplers import EpochSampler, SlidingWindowSampler, batch_plan, num_batches


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n", [30, 31, 32])
@pytest.mark.parametrize("ownership", ["global", "local"])
def test_epoch_sampler_covers_once_without_overlap(world, n, ownership):
    for epoch in (0, 1, 5):
        shards = [EpochSampler(n, rank=r, world=world, seed=3, ownership=ownership).indices(epoch)
                  for r in range(world)]
        allidx = np.concatenate(shards)
        assert len(allidx) == n  # no duplicates, no padding
        assert np.array_equal(np.sort(allidx), np.arange(n))
        for a in range(world):
            for b in range(a + 1, world):
                assert not set(shards[a]) & set(shards[b])
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
        if ownership == "local":
            for r, s in enumerate(shards):
                assert np.all(s % world == r)


def test_epoch_sampler_deterministic_and_reshuffled():
    a = EpochSampler(100, rank=1, world=2, seed=7)
    b = EpochSampler(100, rank=1, world=2, seed=7)
    assert np.array_equal(a.indices(4), b.indices(4))
    assert not np.array_equal(a.indices(4), a.indices(5))
    assert not np.array_equal(a.indices(4), EpochSampler(100, rank=1, world=2, seed=8).indices(4))
    assert a.indices(0).dtype == np.int64


def test_batch_plan_equal_batch_counts_across_ranks():
    n, world, bs = 31, 3, 4  # shards of 11, 10, 10
    counts = {num_batches(EpochSampler(n, rank=r, world=world), bs, True) for r in range(world)}
    assert counts == {10 // 4}
    plans = [batch_plan(EpochSampler(n, rank=r, world=world), 0, bs, False) for r in range(world)]
    assert sum(len(b) for p in plans for b in p) == n


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sliding_window_visits_each_index_window_over_stride_times(world):
    n, window, stride = 96 * world, 24 * world, 6 * world
    counts = np.zeros(n, dtype=int)
    for r in range(world):
        s = SlidingWindowSampler(n, window=window, stride=stride, rank=r, world=world, seed=1)
        assert len(s) == window // world
        for epoch in range(n // stride):  # one pass of the window over the data
            idx = s.indices(epoch)
            assert len(set(idx.tolist())) == len(idx)  # no repeats inside a window
            counts[idx] += 1
    assert np.all(counts == window // stride)


@pytest.mark.parametrize("reshuffle", [False, True])
def test_sliding_window_global_batches_do_not_depend_on_world(reshuffle):
    """Global batch k (ranks' k-th batches interleaved back) is the same set of samples at
    world 1, 2 and 3 with the same global batch: what lets a checkpoint resume at another
    world size."""
    n, window, stride, gbatch = 120, 48, 18, 12

    def global_batches(world, epoch):
        plans = [batch_plan(SlidingWindowSampler(n, window=window, stride=stride, rank=r, world=world, seed=4,
                                                 reshuffle=reshuffle), epoch, gbatch // world, True)
                 for r in range(world)]
        assert len({len(p) for p in plans}) == 1  # equal batch counts on every rank
        return [sorted(np.concatenate([p[b] for p in plans]).tolist()) for b in range(len(plans[0]))]

    for epoch in (0, 3, 11):
        ref = global_batches(1, epoch)
        assert len(ref) == window // gbatch
        assert global_batches(2, epoch) == ref and global_batches(3, epoch) == ref


def test_sliding_window_consecutive_windows_overlap_and_resume_exact():
    s = SlidingWindowSampler(1000, window=100, stride=25, seed=2)
    w0, w1 = set(s.indices(0).tolist()), set(s.indices(1).tolist())
    assert len(w0 & w1) == 75  # overlap = window - stride
    again = SlidingWindowSampler(1000, window=100, stride=25, seed=2)
    assert np.array_equal(s.indices(17), again.indices(17))


@pytest.mark.parametrize("world,rank", [(1, 0), (2, 1)])
def test_sliding_window_reshuffle_follows_pics_shuffle_per_epoch(world, rank):
    """PIC's SubsetSlidingWindowSampler with shuffle_per_epoch, replayed statefully on the
    global order: a window whose range would run past the end first draws a new order (here
    order(k), k counting the draws), then takes positions start..start+window (mod n) of the
    current order; rank r reads every world-th entry of the window."""
    n, window, stride = 110, 40, 15  # stride does not divide n
    s = SlidingWindowSampler(n, window=window, stride=stride, rank=rank, world=world, seed=5, reshuffle=True)
    m, w, st = n, window, stride
    order, k, start = s.order(0), 0, 0
    crossings = 0
    for epoch in range(40):  # more than 5 passes
        if start + w > m:
            k += 1
            order = s.order(k)
            crossings += 1
        expected = order[(start + np.arange(w)) % m]
        got = s.window_indices(epoch)
        assert sorted(got.tolist()) == sorted(expected.tolist()), epoch
        assert np.array_equal(s.indices(epoch), got[rank::world])
        start = (start + st) % m
    assert crossings > 5 and s.reshuffles(39) == crossings
    orders = [s.order(i) for i in range(3)]
    for o in orders:  # each order is a permutation of all rows
        assert sorted(o.tolist()) == list(range(n))
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
    # pure function of (seed, rank, epoch): a fresh sampler gives the same windows (exact resume)
    again = SlidingWindowSampler(n, window=window, stride=stride, rank=rank, world=world, seed=5, reshuffle=True)
    assert all(np.array_equal(s.indices(e), again.indices(e)) for e in (0, 7, 23, 39))
    # without reshuffle the order never changes
    fixed = SlidingWindowSampler(n, window=window, stride=stride, rank=rank, world=world, seed=5)
    assert fixed.reshuffles(39) == 0
    assert sorted(fixed.window_indices(8).tolist()) == sorted(fixed.order(0)[(8 * st + np.arange(w)) % m].tolist())

"""Distributed samplers: the order of sample indices each rank reads, per epoch.

Both samplers are pure functions of (seed, epoch, rank, world): ``indices(epoch)`` can be
recomputed anywhere (the trainer, a DALI worker process) and a resume needs only the epoch
and the position inside it, so a resumed run reads exactly the samples the uninterrupted run
would have read. (PIC's sliding-window sampler saves only ``start_index`` and reshuffles with
the global numpy RNG, so its resume is not reproducible.)
"""
from __future__ import annotations

import numpy as np

from fastinst.runtime import derive_seed


def _rng(*key) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(derive_seed(*key)))


class EpochSampler:
    """Disjoint rank shards that together cover the dataset exactly once per epoch.

    ``ownership='global'``: one permutation of all N indices per epoch, rank r takes every
    world-th element from position r (best mixing across ranks).
    ``ownership='local'``: rank r always reads the rows it owns (i % world == r, what a
    ``cache=part`` RAM shard holds), in a fresh order each epoch.
    Shard lengths differ by at most one; ``min_len`` is the shortest, which the loader uses so
    that every rank runs the same number of batches.
    """

    kind = "epoch"

    def __init__(self, n: int, *, rank: int = 0, world: int = 1, seed: int = 0, shuffle: bool = True,
                 ownership: str = "global"):
        if n <= 0:
            raise ValueError("EpochSampler needs a non-empty dataset")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world size {world}")
        if ownership not in ("global", "local"):
            raise ValueError(f"ownership must be 'global' or 'local', got {ownership!r}")
        self.n, self.rank, self.world, self.seed = n, rank, world, seed
        self.shuffle, self.ownership = shuffle, ownership

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))

    @property
    def min_len(self) -> int:
        return self.n // self.world

    def indices(self, epoch: int) -> np.ndarray:  # (len(self),) int64
        if self.ownership == "global":
            order = _rng(self.seed, "epoch-order", epoch).permutation(self.n) if self.shuffle else np.arange(self.n)
            return order[self.rank::self.world].astype(np.int64)
        owned = np.arange(self.rank, self.n, self.world, dtype=np.int64)
        if self.shuffle:
            owned = owned[_rng(self.seed, "local-order", epoch, self.rank).permutation(len(owned))]
        return owned

    def describe(self) -> dict:
        return {"kind": self.kind, "n": self.n, "world": self.world, "seed": self.seed,
                "ownership": self.ownership, "shuffle": self.shuffle}


class SlidingWindowSampler:
    """PIC's sliding-window data scheduler (Cao et al. 2020, Sec. 3.2).

    Each rank owns the rows i % world == rank (PIC builds its sampler on that subset), put in
    a fixed random order once. "Epoch" k is one window of ``window // world`` of them starting
    at position ``k * (stride // world)`` (wrapping around), shuffled. Over ``n / stride``
    consecutive windows every index is therefore visited ``window / stride`` times, and
    consecutive windows overlap, so an instance is revisited while its classifier row is
    still fresh — the point of the scheduler.

    ``reshuffle=True`` is PIC's ``--shuffle-per-epoch`` (scripts/PIC.sh): a window that would
    run past the end of the order first draws a fresh order of the rank's rows, so instances
    meet different window-mates on every pass. As in PIC, every window that crosses the end
    redraws (window / stride of them per pass). Here the k-th order is a pure function of
    (seed, rank, k), k = the number of crossing windows so far, so resume stays exact.
    """

    kind = "sliding_window"

    def __init__(self, n: int, *, window: int, stride: int, rank: int = 0, world: int = 1, seed: int = 0,
                 reshuffle: bool = False):
        if n <= 0:
            raise ValueError("SlidingWindowSampler needs a non-empty dataset")
        if window < world or stride < world:
            raise ValueError(f"window ({window}) and stride ({stride}) must be >= world size ({world})")
        self.n, self.rank, self.world, self.seed, self.reshuffle = n, rank, world, seed, reshuffle
        self.rows = np.arange(rank, n, world, dtype=np.int64)  # the rows this rank owns
        self.owned = self.order(0)
        self.window_r = min(window // world, len(self.owned))
        self.stride_r = stride // world
        self.window, self.stride = window, stride

    def order(self, k: int) -> np.ndarray:
        """The k-th random order of this rank's rows (k = 0 throughout without reshuffle)."""
        return self.rows[_rng(self.seed, "window-order", self.rank, k).permutation(len(self.rows))]

    def reshuffles(self, epoch: int) -> int:
        """Orders drawn after the first one by window ``epoch``: windows 0..epoch that cross the end."""
        if not self.reshuffle:
            return 0
        starts = (np.arange(epoch + 1, dtype=np.int64) * self.stride_r) % len(self.rows)
        return int(np.count_nonzero(starts + self.window_r > len(self.rows)))

    def __len__(self) -> int:
        return self.window_r

    @property
    def min_len(self) -> int:
        return min(self.window // self.world, self.n // self.world)

    def indices(self, epoch: int) -> np.ndarray:  # (window_r,) int64
        m = len(self.owned)
        k = self.reshuffles(epoch)
        order = self.order(k) if k else self.owned
        pos = (epoch * self.stride_r + np.arange(self.window_r, dtype=np.int64)) % m
        win = order[pos]
        return win[_rng(self.seed, "window-shuffle", epoch, self.rank).permutation(len(win))]

    def epochs_per_pass(self) -> float:
        """Windows needed to advance once through the data: used to rescale PIC's epochs."""
        return self.n / self.stride

    def describe(self) -> dict:
        return {"kind": self.kind, "n": self.n, "world": self.world, "seed": self.seed,
                "window": self.window, "stride": self.stride, "reshuffle": self.reshuffle}


def build_sampler(cfg_sampler, n: int, *, rank: int, world: int, shuffle: bool = True, ownership: str = "global"):
    if cfg_sampler.kind == "sliding_window":
        return SlidingWindowSampler(n, window=cfg_sampler.window, stride=cfg_sampler.stride, rank=rank,
                                    world=world, seed=cfg_sampler.seed, reshuffle=cfg_sampler.reshuffle)
    return EpochSampler(n, rank=rank, world=world, seed=cfg_sampler.seed, shuffle=shuffle, ownership=ownership)


def batch_plan(sampler, epoch: int, batch_size: int, drop_last: bool):
    """This rank's batches for ``epoch``: a list of int64 index arrays.

    With ``drop_last`` every rank gets ``min_len // batch_size`` full batches (equal counts keep
    DDP collectives in step); otherwise the rank's whole shard, the last batch possibly short.
    """
    idx = sampler.indices(epoch)
    if drop_last:
        nb = sampler.min_len // batch_size
        return [idx[b * batch_size:(b + 1) * batch_size] for b in range(nb)]
    return [idx[s:s + batch_size] for s in range(0, len(idx), batch_size)]


def num_batches(sampler, batch_size: int, drop_last: bool) -> int:
    if drop_last:
        return sampler.min_len // batch_size
    return -(-len(sampler) // batch_size)

"""Distributed samplers: the order of sample indices each rank reads, per epoch.

Both samplers are pure functions of (seed, epoch, rank, world): ``indices(epoch)`` can be
recomputed anywhere (the trainer, a DALI worker process) and a resume needs only the epoch
and the position inside it, so a resumed run reads exactly the samples the uninterrupted run
would have read. (PIC's sliding-window sampler saves only ``start_index`` and reshuffles with
the global numpy RNG, so its resume is not reproducible.) Where ``world_independent`` holds,
rank r reads entries r, r + W, ... of one global sequence, so with a global batch G the k-th
global batch is entries [kG, (k+1)G) at every world size W: a run resumes at another world
size from the number of samples consumed.
"""
from __future__ import annotations

import numpy as np

from fastinst.core.runtime import derive_seed


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

    @property
    def world_independent(self) -> bool:
        """Whether global batch k holds the same samples at any world size (same global batch):
        true for 'global' ownership (one permutation, rank r takes every world-th entry), not
        for 'local' (rank r reads the rows i % world == r it caches)."""
        return self.ownership == "global"


class SlidingWindowSampler:
    """PIC's sliding-window data scheduler (Cao et al. 2020, Sec. 3.2).

    All N indices are put in a fixed random order. "Epoch" k is one window of ``window`` of
    them starting at position ``k * stride`` (wrapping around), shuffled; rank r reads every
    world-th index of it from position r, as `EpochSampler` does with a whole epoch. Over
    ``n / stride`` consecutive windows every index is therefore visited ``window / stride``
    times, and consecutive windows overlap, so an instance is revisited while its classifier
    row is still fresh — the point of the scheduler.

    PIC builds one such sampler per rank on the rank's own rows (i % world); here the window
    is global, which visits the same multiset of instances per pass but makes the global
    batch sequence independent of the world size (a checkpoint resumes at another world size
    with the same global batch). At world 1 both are the same sampler.

    ``reshuffle=True`` is PIC's ``--shuffle-per-epoch`` (scripts/PIC.sh): a window that would
    run past the end of the order first draws a fresh order, so instances meet different
    window-mates on every pass. As in PIC, every window that crosses the end redraws
    (window / stride of them per pass). The k-th order is a pure function of (seed, k),
    k = the number of crossing windows so far, so resume stays exact.
    """

    kind = "sliding_window"

    def __init__(self, n: int, *, window: int, stride: int, rank: int = 0, world: int = 1, seed: int = 0,
                 reshuffle: bool = False):
        if n <= 0:
            raise ValueError("SlidingWindowSampler needs a non-empty dataset")
        if window < world or stride < world:
            raise ValueError(f"window ({window}) and stride ({stride}) must be >= world size ({world})")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world size {world}")
        self.n, self.rank, self.world, self.seed, self.reshuffle = n, rank, world, seed, reshuffle
        self.owned = self.order(0)
        self.window_g = min(window, n)  # global window length
        self.window, self.stride = window, stride

    def order(self, k: int) -> np.ndarray:
        """The k-th random order of all N indices (k = 0 throughout without reshuffle)."""
        # Keyed as the per-rank sampler keyed rank 0, so world-1 runs keep their orders.
        return _rng(self.seed, "window-order", 0, k).permutation(self.n).astype(np.int64)

    def reshuffles(self, epoch: int) -> int:
        """Orders drawn after the first one by window ``epoch``: windows 0..epoch that cross the end."""
        if not self.reshuffle:
            return 0
        starts = (np.arange(epoch + 1, dtype=np.int64) * self.stride) % self.n
        return int(np.count_nonzero(starts + self.window_g > self.n))

    def __len__(self) -> int:
        return len(range(self.rank, self.window_g, self.world))

    @property
    def min_len(self) -> int:
        return self.window_g // self.world

    def window_indices(self, epoch: int) -> np.ndarray:  # (window_g,) int64, the global window
        k = self.reshuffles(epoch)
        order = self.order(k) if k else self.owned
        pos = (epoch * self.stride + np.arange(self.window_g, dtype=np.int64)) % self.n
        win = order[pos]
        return win[_rng(self.seed, "window-shuffle", epoch, 0).permutation(len(win))]

    def indices(self, epoch: int) -> np.ndarray:  # (len(self),) int64
        return self.window_indices(epoch)[self.rank::self.world]

    def epochs_per_pass(self) -> float:
        """Windows needed to advance once through the data: used to rescale PIC's epochs."""
        return self.n / self.stride

    def describe(self) -> dict:
        return {"kind": self.kind, "n": self.n, "world": self.world, "seed": self.seed,
                "window": self.window, "stride": self.stride, "reshuffle": self.reshuffle}

    @property
    def world_independent(self) -> bool:
        return True


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

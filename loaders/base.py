"""The loader contract shared by both backends.

A loader is an iterable of batch dicts::

    {"views": [Tensor(B, 3, H, W), ...],   # normalised; channels-last storage when asked
     "index": LongTensor(B,),              # dataset index, exact at any N (int64 end to end)
     "label": LongTensor(B,)}

plus ``len()`` (batches per epoch) and ``state_dict()/load_state_dict()``. Iterating runs the
current epoch from the current position and then moves to the next epoch; the state is
(epoch, next batch), so a resumed loader yields exactly the batches that remained.
"""
from __future__ import annotations

import os
from typing import Dict, Iterator, List

import numpy as np

from .samplers import batch_plan, num_batches
from .sources import DataError, PIL_decode_check, Source, log


class LoaderBase:
    backend = "base"

    def __init__(self, source: Source, sampler, *, batch_size: int, drop_last: bool, on_error: str = "raise",
                 seed: int = 0, rank: int = 0):
        self.source, self.sampler = source, sampler
        self.batch_size, self.drop_last = batch_size, drop_last
        self.on_error, self.seed, self.rank = on_error, seed, rank
        self.epoch, self.next_batch = 0, 0
        self.skipped: Dict[int, str] = {}  # dataset index -> reason, samples left out (on_error=skip)
        if len(self) == 0:
            raise DataError(
                f"{source.origin}: {len(sampler)} samples on this rank is less than one batch of {batch_size}; "
                "lower loader.batch_size or set loader.drop_last=false")

    def __len__(self) -> int:
        return num_batches(self.sampler, self.batch_size, self.drop_last)

    def plan(self, epoch: int) -> List[np.ndarray]:
        return batch_plan(self.sampler, epoch, self.batch_size, self.drop_last)

    # -- resumable state --------------------------------------------------------------
    def state_dict(self) -> dict:
        world = self.sampler.world
        return {"epoch": self.epoch, "next_batch": self.next_batch, "sampler": self.sampler.describe(),
                "batch_size": self.batch_size, "skipped": dict(self.skipped), "world": world,
                "samples": self.next_batch * self.batch_size * world}  # global samples read this epoch

    def load_state_dict(self, state: dict) -> None:
        """Resume at the saved position. At another world size (a resharded checkpoint) the
        position is the global samples read this epoch, which needs a world-independent
        sampler and the same global batch (per-rank batch × world)."""
        mine = self.sampler.describe()
        saved_world = int(state.get("sampler", {}).get("world", mine.get("world")))
        for key, val in state.get("sampler", {}).items():
            if key != "world" and mine.get(key) != val:
                raise ValueError(f"loader state: sampler {key}={val!r} in the checkpoint but {mine.get(key)!r} "
                                 "now; resume with the same dataset and seed")
        saved_batch = int(state.get("batch_size", self.batch_size))
        self.epoch, self.next_batch = int(state["epoch"]), int(state["next_batch"])
        if saved_world == self.sampler.world:
            if saved_batch != self.batch_size:
                raise ValueError(f"loader state: batch_size {saved_batch} in the checkpoint but "
                                 f"{self.batch_size} now")
        else:
            self.next_batch = self._position_at_world(state, saved_world, saved_batch)
        if self.next_batch >= len(self):  # saved after an epoch's last batch: the next one is due
            self.epoch, self.next_batch = self.epoch + 1, 0
        self.skipped = {int(k): v for k, v in state.get("skipped", {}).items()}
        self._restart()

    def _position_at_world(self, state: dict, saved_world: int, saved_batch: int) -> int:
        world = self.sampler.world
        if not getattr(self.sampler, "world_independent", False):
            raise ValueError(f"loader state: saved at world size {saved_world}, resumed at {world}, but this "
                             f"sampler ({self.sampler.describe()}) gives each rank its own rows (data.cache=part), "
                             f"so its order depends on the world size; resume with {saved_world} ranks")
        gbatch = saved_batch * saved_world
        if self.batch_size * world != gbatch:
            fix = f"loader.batch_size={gbatch // world}" if gbatch % world == 0 else \
                f"a world size that divides the global batch {gbatch}"
            raise ValueError(f"loader state: the checkpoint's global batch is {saved_batch} x {saved_world} ranks = "
                             f"{gbatch} but this run has {self.batch_size} x {world} = {self.batch_size * world}; a "
                             f"run resumes at another world size with the same global batch: use {fix}")
        samples = int(state.get("samples", int(state["next_batch"]) * gbatch))
        return samples // gbatch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch or self.next_batch != 0:
            self.epoch, self.next_batch = epoch, 0
            self._restart()

    def _restart(self) -> None:
        """Drop any prefetched state so the next iteration starts at (epoch, next_batch)."""

    def close(self) -> None:
        pass

    # -- iteration ---------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        n = len(self)
        if self.next_batch >= n:
            self.epoch, self.next_batch = self.epoch + 1, 0
        for batch in self._iter_epoch():
            self.next_batch += 1
            yield batch
        self.epoch, self.next_batch = self.epoch + 1, 0

    def _iter_epoch(self) -> Iterator[dict]:
        raise NotImplementedError

    # -- bad samples -------------------------------------------------------------------
    def _record_skips(self, expected: np.ndarray, got: np.ndarray) -> None:
        missing = np.setdiff1d(expected, got)
        for i in missing.tolist():
            if i not in self.skipped:
                self.skipped[i] = self.source.describe(i)
                log(f"skipped bad sample {self.source.describe(i)} (total skipped: {len(self.skipped)})")

    def find_undecodable(self, batches: List[np.ndarray]) -> List[int]:
        """Fully decode the samples of ``batches`` with PIL and return those that fail."""
        bad = []
        for b in batches:
            for i in b.tolist():
                if i in self.skipped:
                    continue
                try:
                    PIL_decode_check(self.source.read_checked(i), self.source.describe(i))
                except DataError:
                    bad.append(i)
        return bad


def default_threads(local_world: int) -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_world))

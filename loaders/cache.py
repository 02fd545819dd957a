"""RAM cache of encoded images in shared memory (``data.cache = part | full``).

The bytes live in one file under ``data.cache_dir`` (``/dev/shm`` by default: tmpfs, i.e.
RAM), mapped read-only by every process that reads samples: the trainer, DALI's Python
workers and torch's DataLoader workers all share one physical copy.

* ``full``: the whole split; local rank 0 of each node writes it, the other local ranks wait
  for its ready marker and map the same file: one copy per node.
* ``part``: only the rows this rank owns (``i % world == rank``, PIC's ``--cache-mode part``);
  each rank writes its own file. The samplers then draw this rank's batches from those rows.

The writer removes its files when the process exits.
"""
from __future__ import annotations

import atexit
import hashlib
import os
import time
from typing import Optional

import numpy as np

from .sources import DataError, Source, log


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def cache_key(source: Source, mode: str, rank: int, world: int) -> str:
    ident = getattr(source, "zip_path", None) or getattr(source, "root", "")
    st = os.stat(ident)
    run = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("MASTER_PORT") or f"pid{os.getppid()}"
    subset = getattr(source, "subset_tag", "")  # data.classes: another subset, another cache
    raw = f"{os.path.abspath(ident)}|{subset}|{st.st_size}|{st.st_mtime_ns}|{len(source)}|{mode}|{run}"
    if mode == "part":
        raw += f"|{rank}/{world}"
    return hashlib.sha1(raw.encode()).hexdigest()[:16]


class CachedSource(Source):
    """A source whose bytes for ``indices`` are held in a shared-memory file."""

    def __init__(self, base: Source, mode: str, *, rank: int = 0, world: int = 1, local_rank: int = 0,
                 cache_dir: str = "/dev/shm", timeout_s: float = 7200.0):
        if mode not in ("part", "full"):
            raise ValueError(f"cache mode must be 'part' or 'full', got {mode!r}")
        self.base, self.mode = base, mode
        self.labels, self.names, self.origin = base.labels, base.names, base.origin
        self.label_sets = getattr(base, "label_sets", None)
        n = len(base)
        self.indices = np.arange(n, dtype=np.int64) if mode == "full" else np.arange(rank, n, world, dtype=np.int64)
        # slot[i] = position of global index i in this cache, or -1 when not cached here
        self.slot = np.full(n, -1, dtype=np.int64)
        self.slot[self.indices] = np.arange(len(self.indices))
        key = cache_key(base, mode, rank, world)
        self.path = os.path.join(cache_dir, f"fastinst-{key}.bin")
        self.index_path = self.path + ".idx.npy"
        ready = self.path + ".ready"
        writer = mode == "part" or local_rank == 0
        if writer and not os.path.exists(ready):
            self._write(cache_dir, ready)
        else:
            self._wait(ready, timeout_s)
        self.offsets = np.load(self.index_path)  # (len(indices)+1,) int64 start of each item
        self._mm = None
        self.nbytes_total = int(self.offsets[-1])
        log(f"cache={mode}: {len(self.indices)} of {n} images, {_human(self.nbytes_total)} in {self.path}")

    def _write(self, cache_dir: str, ready: str) -> None:
        sizes = np.array([self.base.nbytes(int(i)) for i in self.indices], dtype=np.int64)
        total = int(sizes.sum())
        if not os.path.isdir(cache_dir):
            raise DataError(f"data.cache_dir {cache_dir} does not exist")
        st = os.statvfs(cache_dir)
        free = st.f_bavail * st.f_frsize
        if total > free:
            raise DataError(
                f"data.cache={self.mode} needs {_human(total)} in {cache_dir} but only {_human(free)} is free; "
                "enlarge it (docker run --shm-size=..., or point data.cache_dir at a larger tmpfs), "
                "use data.cache=part, or data.cache=none")
        offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        tmp = self.path + f".tmp{os.getpid()}"
        atexit.register(_remove, self.path, self.index_path, ready, tmp)
        t0, last = time.time(), time.time()
        with open(tmp, "wb") as f:
            for j, i in enumerate(self.indices):
                buf = self.base.read(int(i))
                if len(buf) != sizes[j]:
                    raise DataError(f"{self.base.describe(int(i))}: size changed while caching")
                f.write(memoryview(buf))
                if time.time() - last > 10:
                    last = time.time()
                    log(f"caching {j + 1}/{len(self.indices)} images ({_human(offsets[j + 1])}, "
                        f"{(j + 1) / (last - t0):.0f} img/s)")
        np.save(self.index_path + f".tmp{os.getpid()}.npy", offsets)
        os.replace(self.index_path + f".tmp{os.getpid()}.npy", self.index_path)
        os.replace(tmp, self.path)
        with open(ready, "w") as f:
            f.write(str(os.getpid()))

    def _wait(self, ready: str, timeout_s: float) -> None:
        t0 = time.time()
        while not os.path.exists(ready):
            if time.time() - t0 > timeout_s:
                raise DataError(f"timed out after {timeout_s:.0f}s waiting for local rank 0 to fill the "
                                f"shared-memory cache {self.path}")
            time.sleep(0.2)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_mm"] = None
        return state

    def read(self, i: int) -> np.ndarray:
        j = int(self.slot[i])
        if j < 0:
            raise DataError(f"{self.describe(i)}: index {i} is not in this rank's part cache "
                            "(rank r caches i % world == r; the sampler must draw from owned rows)")
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._mm[self.offsets[j]:self.offsets[j + 1]]

    def nbytes(self, i: int) -> int:
        j = int(self.slot[i])
        return int(self.offsets[j + 1] - self.offsets[j])

    def describe(self, i: int) -> str:
        return self.base.describe(i) + " [cached]"


def _remove(*paths: Optional[str]) -> None:
    for p in paths:
        try:
            if p:
                os.remove(p)
        except OSError:
            pass

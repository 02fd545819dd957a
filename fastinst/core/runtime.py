"""Where this process runs and how its randomness is derived: one `DistEnv` (rank, world, local
rank, local world, device) used by the trainer, the loaders and the probes; distributed
initialisation from torchrun's environment only; one seed-mixing function (`derive_seed`)
for every stream fastinst draws; the resumable RNG state of a process; rank-0 printing.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT; a plain
``python launch.py ...`` is one process with no process group.
"""
from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @staticmethod
    def from_env() -> "DistEnv":
        """torchrun's variables (1 process without them), on the CPU; no process group."""
        env = os.environ
        return DistEnv(rank=int(env.get("RANK", 0)), world=int(env.get("WORLD_SIZE", 1)),
                       local_rank=int(env.get("LOCAL_RANK", 0)), local_world=int(env.get("LOCAL_WORLD_SIZE", 1)))

    @property
    def device_id(self) -> Optional[int]:
        """CUDA device index (DALI's device_id, DDP's device_ids), None on the CPU."""
        return self.device.index if self.device.type == "cuda" else None

    def wrap_ddp(self, module: nn.Module) -> nn.Module:
        """``module`` in DistributedDataParallel when there is more than one rank."""
        if self.world == 1:
            return module
        ids = None if self.device_id is None else [self.device_id]
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def set_compute_threads(local_world: int) -> str:
    """torch's intra-op threads: this process's share of the cores it may use (its affinity
    divided by the ranks on this node), unless OMP_NUM_THREADS is set (by the user, or by
    torchrun, which sets 1 only when a node runs several processes: a node with one process
    would otherwise take every core however many nodes share a machine). The loader's own
    threads and worker processes are not in this budget: loader.num_threads / num_workers
    default to the same share each (loaders/base.py default_threads). Returns a log line."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if os.environ.get("OMP_NUM_THREADS"):
        return (f"torch threads: {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}; "
                f"{cores} cores available)")
    n = max(1, cores // max(1, local_world))
    torch.set_num_threads(n)
    return (f"torch threads: {n} = {cores} cores available / {local_world} local rank(s) (set OMP_NUM_THREADS to "
            "override; loader threads and workers are counted separately, the same share each)")


def init_distributed(timeout_minutes: float = 60.0) -> DistEnv:
    """torchrun's environment only. Under torchrun the process group is initialised even for
    one process (the same code path); without MASTER_ADDR the run is one process. Sets torch's
    intra-op threads (`set_compute_threads`) and logs the choice on rank 0.
    ``timeout_minutes``: how long a collective may wait for every rank (``dist.timeout_minutes``:
    the default 60 covers a kNN evaluation over 1.28M bank rows; NCCL's own default is 10)."""
    env = os.environ
    cuda = torch.cuda.is_available()
    base = DistEnv.from_env()
    threads = set_compute_threads(base.local_world)
    device = torch.device("cuda", base.local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if "MASTER_ADDR" in env and "WORLD_SIZE" in env and not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        backend = "nccl" if cuda else "gloo"
        if "TORCHELASTIC_RESTART_COUNT" in env:
            # Under torchrun the rendezvous store outlives a restart of the workers: prefix this
            # round's keys, or a restarted rank can read the previous round's peer addresses.
            hosted_by_agent = env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
            store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), int(env["WORLD_SIZE"]),
                                  is_master=not hosted_by_agent and int(env["RANK"]) == 0, timeout=timeout,
                                  wait_for_workers=False)
            store = dist.PrefixStore(f"fastinst/round{env['TORCHELASTIC_RESTART_COUNT']}/", store)
            dist.init_process_group(backend, store=store, rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
                                    timeout=timeout)
        else:
            dist.init_process_group(backend, init_method="env://", timeout=timeout)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (base.rank, base.world)
    if rank == 0:
        print(threads, flush=True)
    return DistEnv(rank, world, base.local_rank, base.local_world, device)


def main_guard(fn, *args, **kw):
    """Run ``fn`` and always tear the process group down (torchrun restarts cleanly)."""
    try:
        return fn(*args, **kw)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# --------------------------------------------------------------------------- randomness


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that is a pure function of ``keys`` (e.g. (seed, "what", epoch, index)):
    distinct keys give independent streams. Strings are hashed stably (not Python's hash)."""
    words = []
    for k in keys:
        if isinstance(k, str):
            words.extend(k.encode())
        else:
            k = int(k)
            words.extend(((k >> 32) & 0xFFFFFFFF, k & 0xFFFFFFFF, 1 if k < 0 else 0))
    hi, lo = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return ((int(hi) << 32) | int(lo)) & 0x7FFFFFFFFFFFFFFF


def generator(*keys: int, device=None) -> torch.Generator:
    """A torch generator seeded by ``derive_seed(*keys)``."""
    return torch.Generator(device=device or "cpu").manual_seed(derive_seed(*keys))


def seed_process(seed: int, rank: int) -> None:
    """Python's and NumPy's global streams for this rank (library code that draws from them)."""
    random.seed(derive_seed(seed, "python", rank))
    np.random.seed(derive_seed(seed, "numpy", rank) & 0xFFFFFFFF)


def rng_state() -> dict:
    """Every RNG's state as tensors and plain types only (checkpoints load with weights_only)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def log0(env: DistEnv, msg: str) -> None:
    if env.rank == 0:
        print(msg, flush=True)

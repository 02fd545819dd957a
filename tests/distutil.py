"""Shared helpers for the multi-process (gloo on 127.0.0.1) tests."""
import gc
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_and_collect(worker, world: int, out_dir) -> list:
    """Run ``worker(rank, port, out_path)`` on ``world`` processes; each saves its result to
    ``out_path.format(rank)``. Returns the results in rank order."""
    pattern = str(out_dir / "rank{}.pt")
    mp.spawn(worker, args=(free_port(), pattern), nprocs=world)
    return [torch.load(pattern.format(r)) for r in range(world)]


def in_gloo_group(rank: int, world: int, port: int, fn, *args):
    """``fn(*args)`` inside a gloo process group on 127.0.0.1:``port``; returns its result.

    Before the group is destroyed, ``fn``'s frame is gone and a garbage collection frees what
    it left in reference cycles (DDP models do that). Left to interpreter exit, they were
    torn down after the group and the worker sometimes aborted ("terminate called without an
    active exception": 3 of 38 runs of one test, 1 of 3 rounds of another).
    """
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        return fn(*args)
    finally:
        gc.collect()
        dist.destroy_process_group()

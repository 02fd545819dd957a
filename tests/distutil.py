"""Shared helpers for the multi-process (gloo on 127.0.0.1) tests."""
import socket

import torch
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

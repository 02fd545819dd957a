"""Shared helpers for the multi-process (gloo on 127.0.0.1) tests."""
import gc
import os
import signal
import socket
import subprocess
import sys

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


def run_on_ranks(world: int, argv: list, *, cwd: str, timeout: int = 240, what: str = "run") -> str:
    """``python argv`` as 1 plain process (world 1) or under ``torch.distributed.run`` with
    ``world`` local ranks, without the caller's torchrun variables and one OMP thread per rank.
    Fails the test on a non-zero exit or after ``timeout`` s (killing the launcher and its
    ranks); returns the combined output."""
    import pytest

    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    launcher = [sys.executable] if world == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
    proc = subprocess.Popen(launcher + list(argv), env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the ranks it started
        log, _ = proc.communicate()
        pytest.fail(f"{world}-process {what} timed out:\n{log[-3000:]}")
    assert proc.returncode == 0, log[-3000:]
    return log


def train_on_worlds(tmp_path, args: list, worlds, *, what: str = "run") -> dict:
    """tests/dist_train_worker.py (fastinst.train.engine.train with BatchNorm removed) with ``args``
    at each (world size, per-rank batch) of ``worlds``, into ``tmp_path / w<world>``:
    {world: (run directory, its newest complete checkpoint)}."""
    from fastinst.train.checkpoint import find_latest_complete

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    worker = os.path.join(root, "tests", "dist_train_worker.py")
    runs = {}
    for world, batch in worlds:
        out = str(tmp_path / f"w{world}")
        run_on_ranks(world, [worker, out] + list(args) + [f"loader.batch_size={batch}"], cwd=root, what=what)
        runs[world] = (out, find_latest_complete(os.path.join(out, "checkpoints")))
    return runs

"""Throughput, logs and progress lines: what a run prints and writes while it trains.

`Meter` measures images/s per rank and the fraction of wall time spent waiting for the
loader, leaving out the loader's start-up and the pauses between epochs (evaluation,
checkpoints); `MetricsLog` writes ``metrics.jsonl`` (one JSON object per logged step or
evaluation) and TensorBoard event files when tensorboard is installed, on rank 0 only;
`progress` formats the log line with the epoch's progress bar and the run's ETA.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any, Dict, Optional

import torch


class Meter:
    """Images/s per rank and the fraction of wall time spent waiting for the loader."""

    def __init__(self, images_per_step: int):
        self.images_per_step = images_per_step
        self.reset()
        self._waiting_since: Optional[float] = None

    def reset(self) -> None:
        self.t0, self.wait, self.steps, self.finite = time.perf_counter(), 0.0, 0, None
        self.loss_sum = None  # device tensors, summed without a host read until `read`

    def waiting(self) -> None:
        """The loop asks the loader for the next batch now."""
        self._waiting_since = time.perf_counter()

    def arrived(self) -> float:
        """The batch is here: returns and counts the wait."""
        dt = time.perf_counter() - (self._waiting_since or time.perf_counter())
        self.wait += dt
        return dt

    def step(self, loss: torch.Tensor, ok: Optional[torch.Tensor] = None) -> None:
        """Count a step; its loss (a device tensor) is summed where ``ok`` (a 0-dim bool
        tensor; None: finite), without a host read."""
        self.steps += 1
        loss = loss.detach().float()
        n = torch.ones_like(loss, dtype=torch.long) if ok is None else ok.long()
        if ok is not None:
            loss = torch.where(ok, loss, 0.0)
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.finite = n if self.finite is None else self.finite + n

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (evaluation, checkpoints) is not training throughput."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.t0 += time.perf_counter() - t

    def read(self) -> Dict[str, float]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        loss_sum, finite = (0.0, 0) if self.loss_sum is None else (float(self.loss_sum), int(self.finite))  # sync
        return {"images_per_s": self.steps * self.images_per_step / dt, "data_wait": self.wait / dt,
                "loss_avg": loss_sum / max(finite, 1)}


class MetricsLog:
    """metrics.jsonl (one JSON object per logged step / evaluation) + optional TensorBoard; rank 0."""

    def __init__(self, out_dir: str, rank: int, resume_step: Optional[int]):
        self.on = rank == 0
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.tb = None
        if not self.on:
            return
        if resume_step is not None and os.path.exists(self.path):
            # Drop records past the checkpoint we resume from (written by the interrupted run).
            with open(self.path) as f:
                keep = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(keep)
        elif resume_step is None and os.path.exists(self.path):
            os.remove(self.path)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(out_dir, "tb"))
        except Exception:  # tensorboard not installed: jsonl only
            self.tb = None

    def write(self, record: Dict[str, Any]) -> None:
        if not self.on:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "kind") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{record['kind']}/{k}", v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def duration(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.1f} min"


def progress(head: str, step: int, batch: int, batches: int, loss: float, rec: Dict[str, Any], batch_size: int,
             steps_left: int, evals_left: int, eval_s: Optional[float]):
    """The log line '<head> [####....] step s (b/n) loss .. lr .. img/s wait ETA epoch .. run ..',
    and the seconds the run has left: steps at this interval's throughput + evaluations at the
    last one's time."""
    per_step = batch_size / max(rec["images_per_s"], 1e-9)
    run_left = steps_left * per_step + evals_left * (eval_s or 0.0)
    done = batch / max(batches, 1)
    bar = "#" * int(20 * done) + "." * (20 - int(20 * done))  # progress through this epoch
    return (f"{head} [{bar}] step {step} ({batch}/{batches}) loss {loss:.4f} lr {rec['lr']:.4g} "
            f"{rec['images_per_s']:.0f} img/s/rank wait {100 * rec['data_wait']:.0f}% "
            f"ETA epoch {(batches - batch) * per_step:.0f}s run {duration(run_left)}"), run_left


def expected(run_left: float, steps_left: int, rec: Dict[str, Any], evals_left: int,
             eval_s: Optional[float]) -> str:
    """The one-time 'expected duration' line, from the first logged throughput."""
    ev = (f" + {evals_left} kNN evaluation(s) at ~{eval_s:.0f}s each" if evals_left and eval_s is not None
          else f" + {evals_left} kNN evaluation(s)" if evals_left else "")
    return (f"expected duration: ~{duration(run_left)} more ({steps_left} steps at "
            f"{rec['images_per_s']:.0f} img/s/rank{ev})")

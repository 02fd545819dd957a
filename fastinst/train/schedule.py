"""Learning-rate schedules and the training clock, shared by the trainer and the linear probe.

`LRSchedule` maps a step to a learning rate: linear warm-up, then a cosine to zero, step
decay at milestones (whole epochs, the seeds' MultiStepLR) or a constant. `Clock` turns the
configured lengths (in passes over the data) into loader epochs and steps, tells which stage
a loader epoch belongs to, and decides after each loader epoch whether to evaluate, save or
stop; it holds the epoch-scale arithmetic of PIC's sliding window (one loader epoch is one
window, N/window of them make a pass, and PIC's main_pretrain.py rounds epochs and warm-up up
to whole windows). `Preemption` adds the saves that are not on epoch boundaries: on SIGTERM /
SIGUSR1 (then stop) and every ``train.ckpt_minutes``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from ..core.runtime import DistEnv


@dataclass(frozen=True)
class LRSchedule:
    """lr(step) for ``steps_per_epoch`` steps per loader epoch; lengths are in loader epochs.

    Warm-up over ``warmup_epochs``: from ``base * warmup_start`` at step 0 (PIC's
    GradualWarmupScheduler, start 0.01), or with ``warmup_start=None`` from base/warm-up steps
    reaching ``base`` on the last warm-up step. Then ``kind``: 'cosine' to zero at ``epochs``,
    'step' (× gamma at each milestone reached), or 'constant'."""

    base: float
    steps_per_epoch: int
    epochs: float = 1.0
    warmup_epochs: float = 0.0
    kind: str = "constant"
    milestones: Tuple[float, ...] = ()
    gamma: float = 0.1
    warmup_start: Optional[float] = None

    def __post_init__(self):
        if self.kind not in ("cosine", "step", "constant"):
            raise ValueError(f"LRSchedule kind={self.kind!r}: use cosine, step or constant")

    @property
    def warmup_steps(self) -> int:
        return int(round(self.warmup_epochs * self.steps_per_epoch))

    def __call__(self, step: int) -> float:
        warm = self.warmup_steps
        if step < warm:
            if self.warmup_start is None:
                return self.base * (step + 1) / warm
            return self.base * (self.warmup_start + (1.0 - self.warmup_start) * step / warm)
        if self.kind == "cosine":
            total = self.epochs * self.steps_per_epoch
            p = min(1.0, (step - warm) / max(1, total - warm))
            return self.base * 0.5 * (1.0 + math.cos(math.pi * p))
        if self.kind == "step":  # whole loader epochs against milestones in loader epochs
            return self.base * self.gamma ** sum(step / self.steps_per_epoch >= m for m in self.milestones)
        return self.base

    @staticmethod
    def constant(lr: float) -> "LRSchedule":
        return LRSchedule(base=lr, steps_per_epoch=1)


@dataclass(frozen=True)
class Events:
    evaluate: bool
    save: bool
    last: bool


class Clock:
    """Where a run is, in loader epochs and passes, and what is due after a loader epoch.

    ``stage_passes``: the length of each stage in passes over the data (one stage for most
    methods). ``epoch_scale``: loader epochs per pass (1; N/window for the sliding window).
    ``eval_every`` / ``ckpt_every``: in passes, 0 = never (checkpoints: only at the end).
    ``max_steps`` > 0 stops the run early (a checkpoint and, with eval_every, an evaluation
    are still made)."""

    def __init__(self, steps_per_epoch: int, stage_passes: Sequence[float], *, epoch_scale: float = 1.0,
                 eval_every: int = 0, ckpt_every: int = 0, max_steps: int = 0):
        self.steps_per_epoch, self.epoch_scale = steps_per_epoch, epoch_scale
        self.eval_every, self.ckpt_every, self.max_steps = eval_every, ckpt_every, max_steps
        ends, total = [], 0
        for p in stage_passes:
            total += int(self.scaled(p))
            ends.append(total)
        self.stage_ends = ends  # loader epoch at which each stage ends

    def scaled(self, passes: float) -> float:
        """Loader epochs that make ``passes`` passes (whole windows, rounded up, when scaled)."""
        return passes if self.epoch_scale == 1.0 else math.ceil(passes * self.epoch_scale - 1e-9)

    @property
    def loader_epochs(self) -> int:
        return self.stage_ends[-1]

    @property
    def total_steps(self) -> int:
        full = self.loader_epochs * self.steps_per_epoch
        return min(self.max_steps, full) if self.max_steps else full

    def passes(self, loader_epochs: int) -> int:
        """Whole passes over the data after ``loader_epochs`` loader epochs."""
        return math.floor(loader_epochs / self.epoch_scale + 1e-9)

    def stage_start(self, index: int) -> int:
        """The loader epoch at which stage ``index`` starts."""
        return self.stage_ends[index - 1] if index > 0 else 0

    def stage(self, loader_epoch: int) -> int:
        """Index of the stage that loader epoch ``loader_epoch`` (0-based) belongs to."""
        for i, end in enumerate(self.stage_ends):
            if loader_epoch < end:
                return i
        return len(self.stage_ends) - 1

    def finished(self, loader_epoch: int, step: int) -> bool:
        return loader_epoch >= self.loader_epochs or (self.max_steps > 0 and step >= self.max_steps)

    def stops(self, step: int) -> bool:
        return self.max_steps > 0 and step >= self.max_steps

    def after_epoch(self, epoch: int, next_batch: int, step: int) -> Tuple[int, Events]:
        """Loader epochs completed after a pass of the loop over loader epoch ``epoch`` (it ran to
        batch ``next_batch``), and what is due now."""
        done = epoch + 1 if next_batch in (0, self.steps_per_epoch) else epoch
        last = self.stops(step) or done >= self.loader_epochs
        passed = self.passes(done) if self.passes(done) > self.passes(epoch) else 0  # a pass just ended
        evaluate = bool(self.eval_every) and (last or (passed > 0 and passed % self.eval_every == 0))
        save = last or (bool(self.ckpt_every) and passed > 0 and passed % self.ckpt_every == 0)
        return done, Events(evaluate, save, last)

    def evals_left(self, epoch: int) -> int:
        """Evaluations still to come while loader epoch ``epoch`` runs: at each pass that is a
        multiple of eval_every, and one at the end."""
        if not self.eval_every:
            return 0
        last = self.passes(self.loader_epochs)
        return len({p for p in range(self.passes(epoch) + 1, last + 1) if p % self.eval_every == 0} | {last})


class Preemption:
    """SIGTERM / SIGUSR1 (SLURM's preemption and time-limit signals) set a flag; at the next log
    step every rank learns whether any rank got one, or whether ``train.ckpt_minutes`` passed
    on rank 0 (one small all-reduce there, none per step), and the loop then saves; after a
    signal it also stops, and the process exits 0 with the run resumable from that step."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self, minutes: float):
        self.minutes, self.signalled, self.last_save = minutes, False, time.monotonic()
        self._old = {}

    def __enter__(self) -> "Preemption":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():  # handlers only install there
            for name in self.SIGNALS:
                if hasattr(signal, name):
                    sig = getattr(signal, name)
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum, frame) -> None:
        self.signalled = True

    def due(self, env: DistEnv) -> tuple:
        """(save now, stop after saving), the same on every rank."""
        timed = env.rank == 0 and self.minutes > 0 and time.monotonic() - self.last_save >= 60.0 * self.minutes
        flags = torch.tensor([float(self.signalled), float(timed)], device=env.device)
        if env.world > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        signalled, timed = (bool(v) for v in flags.tolist())  # host read: log steps only
        return signalled or timed, signalled

    def saved(self) -> None:
        self.last_save = time.monotonic()

"""The run's state and the step: `Trainer` (what a checkpoint holds), its builder, the step
every stage runs and the non-finite guard's host side.

- the method (fastinst/methods) declares what it trains: its modules (moved to the device
  and wrapped in DDP by fastinst/train/build.py), its optimisers with their lr schedules, and
  its stages;
- the non-finite guard, decided on the device with no host sync per step
  (fastinst/core/guard.py): a step whose loss is NaN/inf steps no optimiser, the BatchNorm
  statistics of the modules it trains are put back and the method's ``after_step(out, ok)``
  leaves its state (bank, Z, queue) as it was; the counts are read where the loop logs,
  evaluates or saves, and once ``train.max_nonfinite`` in a row are seen the run stops with
  `NonFiniteLossError` before writing anything, so the last good checkpoint stays intact;
- checkpoints (fastinst/train/checkpoint.py, per-rank atomic files) hold every module and
  optimiser, the schedules' positions, the scaler, step, loader position, method state, RNG
  states, the resolved config and the row manifest that reshards them to any world size.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from ..config import Config, to_dict
from ..core.guard import Guard, finite_and, gated_step, where_
from ..core.model import autocast_context, make_grad_scaler
from ..core.runtime import DistEnv, log0, rng_state, seed_process, set_rng_state
from ..methods.base import Method, Stage, default_step, unwrap
from .build import build_loaders, build_method, build_plan, loader_epoch_scale, resolve_amp
from .checkpoint import save_checkpoint
from .evaluation import EvalData
from .reshard import row_manifest
from .schedule import Clock


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses; the run stopped without saving."""


# --------------------------------------------------------------------------- the run's state


@dataclass
class Trainer:
    cfg: Config
    env: DistEnv
    out_dir: str
    method: Method
    optimizers: Dict[str, torch.optim.Optimizer]
    schedules: Dict[str, Callable[[int], float]]
    stages: List[Stage]
    clock: Clock
    scaler: Any
    amp: str
    loader: Any
    source: Any
    evals: EvalData
    lr0: float
    guard: Guard
    step: int = 0
    reported_skips: int = 0  # non-finite steps already warned about
    opt_steps: Dict[str, int] = field(default_factory=dict)  # steps of the stages using each optimiser
    eval_s: Optional[float] = None  # wall seconds of the last kNN evaluation (for the run's ETA)
    eta_printed: bool = False
    preempted: bool = False  # stopped by SIGTERM / SIGUSR1 after a checkpoint

    @property
    def ckpt_dir(self) -> str:
        return os.path.join(self.out_dir, "checkpoints")

    @property
    def model(self) -> nn.Module:
        """The primary trained module (`Method.primary`)."""
        return self.method.trained_modules()[self.method.primary]

    @property
    def nonfinite(self) -> int:
        """Consecutive non-finite steps up to now (a host sync)."""
        return self.guard.read()["streak"]

    @property
    def skipped(self) -> int:
        """Non-finite steps of the run (a host sync)."""
        return self.guard.read()["total"]

    @property
    def epoch_scale(self) -> float:
        return self.clock.epoch_scale

    @property
    def loader_epochs(self) -> int:
        return self.clock.loader_epochs

    def state_dict(self) -> dict:
        nets = {n: unwrap(m).state_dict() for n, m in self.method.trained_modules().items()}
        opts = {n: o.state_dict() for n, o in self.optimizers.items()}
        primary = self.method.primary
        guard = self.guard.read()  # one host read for both counts
        payload = {"modules": nets, "model": nets[primary], "optimizers": opts, "optimizer": next(iter(opts.values())),
                "opt_steps": dict(self.opt_steps), "scaler": self.scaler.state_dict(), "step": self.step,
                "nonfinite": guard["streak"], "skipped": guard["total"], "loader": self.loader.state_dict(),
                "method": self.method.state_dict(), "rng": rng_state(), "config": to_dict(self.cfg),
                "probe_trunks": [[n, None if c is None else list(c)] for n, c in self.method.probe_trunks()]}
        payload["row_shards"] = row_manifest(payload, [self.method], self.optimizers)  # resumes at any world
        return payload

    def load_state_dict(self, state: dict) -> None:
        for n, m in self.method.trained_modules().items():
            unwrap(m).load_state_dict(state["modules"][n])
        for n, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][n])
        self.opt_steps = {n: int(state["opt_steps"][n]) for n in self.optimizers}
        self.scaler.load_state_dict(state["scaler"])
        self.method.load_state_dict(state["method"])
        self.loader.load_state_dict(state["loader"])
        self.step = int(state["step"])
        self.guard.load(int(state["nonfinite"]), int(state["skipped"]))
        self.reported_skips = int(state["skipped"])
        if state["rng"] is not None:  # None: a rank beyond a resharded checkpoint's world keeps its seeded RNGs
            set_rng_state(state["rng"])

    def close_loaders(self) -> None:
        self.loader.close()
        self.evals.close()

    def save(self) -> str:
        check_guard(self)  # never save after max_nonfinite in a row
        self.method.flush()  # lazily-updated method state (PIC's skipped rows) made current
        return save_checkpoint(self.ckpt_dir, self.step, self.state_dict(), rank=self.env.rank,
                               world_size=self.env.world, keep=self.cfg.train.keep)


def build_trainer(cfg: Config, out_dir: str, env: DistEnv) -> Trainer:
    seed_process(cfg.seed, env.rank)
    source, loader = build_loaders(cfg, env)
    evals = EvalData(cfg, env)
    evals.check()
    labels = torch.as_tensor(np.asarray(source.labels), dtype=torch.long)
    method = build_method(cfg, env, len(source), labels)
    plan = build_plan(cfg, env, method, len(loader), loader_epoch_scale(loader, len(source), env.world))
    amp = resolve_amp(cfg, env.device)
    return Trainer(cfg=cfg, env=env, out_dir=out_dir, method=method, optimizers=plan.optimizers,
                   schedules=plan.schedules, stages=plan.stages, clock=plan.clock,
                   scaler=make_grad_scaler(amp, env.device.type), amp=amp, loader=loader, source=source,
                   evals=evals, lr0=plan.lr0, guard=Guard(env.device), opt_steps={n: 0 for n in plan.optimizers})


# --------------------------------------------------------------------------- the step


def train_step(method: Method, optimizers: Dict[str, torch.optim.Optimizer], scaler, amp: str, device_type: str,
               batch: dict, step: Optional[Callable] = None):
    """One training step (also what benchmarks/step_time.py times): the stage's ``step`` (None:
    forward + one backward) under autocast; each ``backward(loss, names)`` it makes zeroes those
    optimisers' gradients, back-propagates (through the grad scaler) and steps them where the
    loss, and every earlier one of the step, is finite (`fastinst.core.guard.gated_step`: decided on
    the device). Returns (out, the last loss detached, ok): ``ok`` a 0-dim bool tensor. Nothing
    here reads a tensor on the host."""
    oks: List[torch.Tensor] = []

    def backward(loss: torch.Tensor, names=None) -> torch.Tensor:
        opts = [optimizers[n] for n in (names or optimizers)]
        ok = finite_and(oks, loss)
        oks.append(ok)
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type, enabled=False):
            scaler.scale(loss).backward()  # a non-finite loss gives non-finite gradients: not applied
        for opt in opts:
            gated_step(opt, ok, scaler)
        scaler.update()
        return ok

    with autocast_context(device_type, amp):
        out = (step or default_step)(method, batch, backward)
    loss = out.get("loss")
    loss = loss.detach() if isinstance(loss, torch.Tensor) else torch.zeros(())
    ok = oks[-1] if oks else torch.isfinite(loss)
    return out, loss, ok


def _snapshot(tr: Trainer, stage: Stage) -> List[tuple]:
    """(buffers, copies) of the buffers (BatchNorm statistics and counts) of the modules ``stage`` trains."""
    nets = tr.method.trained_modules()
    bufs = [b for n in stage.trains for b in unwrap(nets[n]).buffers()]
    return bufs, [b.clone() for b in bufs]


def enter_stage(tr: Trainer, stage: Stage) -> None:
    """The stage's modules train; the others are frozen (eval mode, no gradients)."""
    for name, m in tr.method.trained_modules().items():
        m.train(name in stage.trains)
        if name not in stage.trains:
            m.requires_grad_(False)
        elif not any(p.requires_grad for p in m.parameters()):
            m.requires_grad_(True)


def run_step(tr: Trainer, stage: Stage, batch: dict, epoch: int):
    """One step of ``stage``: each optimiser's lr from its schedule, the step, then the method's
    state updates; a non-finite step changes nothing but the guard's counts, all decided on the
    device. Returns (loss, ok), both tensors: not read here."""
    for name in stage.optimizers:
        for g in tr.optimizers[name].param_groups:
            g["lr"] = tr.schedules[name](tr.opt_steps[name])
    tr.method.before_step(tr.step)
    bufs, copies = _snapshot(tr, stage)
    opts = {n: tr.optimizers[n] for n in stage.optimizers}
    out, loss, ok = train_step(tr.method, opts, tr.scaler, tr.amp, tr.env.device.type, batch, stage.step)
    with torch.no_grad():
        where_(bufs, ~ok, copies)  # BN statistics: the old ones back unless ok
    tr.method.after_step(out, ok)  # bank / queue / key-encoder updates, gated on ok
    tr.guard.record(ok)
    for name in stage.optimizers:
        tr.opt_steps[name] += 1
    tr.step += 1
    return loss, ok


def check_guard(tr: Trainer) -> None:
    """Read the non-finite counts (one host sync): warn about new skipped steps, and stop once
    ``train.max_nonfinite`` in a row were seen, before anything is written."""
    t, g = tr.cfg.train, tr.guard.read()
    if g["total"] > tr.reported_skips:
        log0(tr.env, f"warning: {g['total'] - tr.reported_skips} non-finite loss(es) by step {tr.step}, skipped "
                     f"(no weight, bank or BN update; {g['total']} in the run, longest streak {g['worst']}, "
                     f"limit train.max_nonfinite={t.max_nonfinite} in a row)")
        tr.reported_skips = g["total"]
    if g["worst"] >= t.max_nonfinite:
        raise NonFiniteLossError(
            f"{g['worst']} consecutive non-finite losses (train.max_nonfinite={t.max_nonfinite}) by step "
            f"{tr.step}; stopped without saving. The last complete checkpoint in {tr.ckpt_dir} is intact: "
            "lower train.lr, raise the method's temperature T or use model.amp=off, then resume")
    tr.guard.reset_worst()

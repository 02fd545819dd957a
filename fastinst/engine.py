"""Training engine: the run's state (`Trainer`), its builder, the step and the loop.

``train(cfg, out_dir, resume)`` is what ``launch.py train`` runs on every rank:

- the method (fastinst/methods) declares what it trains: its modules (moved to the device
  and wrapped in DDP here), its optimisers with their lr schedules, and its stages;
- `Clock` (fastinst/schedule.py) knows the stages' lengths in loader epochs and decides when
  to evaluate (weighted kNN, fastinst/evaluation.py) and checkpoint;
- the non-finite guard, decided on the device with no host sync per step (fastinst/guard.py):
  a step whose loss is NaN/inf steps no optimiser, the BatchNorm statistics of the modules it
  trains are put back and the method's ``after_step(out, ok)`` leaves its state (bank, Z,
  queue) as it was; the counts are read where the loop logs, evaluates or saves, and once
  ``train.max_nonfinite`` in a row are seen the run stops with `NonFiniteLossError` before
  writing anything, so the last good checkpoint stays intact;
- checkpoints (fastinst/checkpoint.py, per-rank atomic files) hold every module and
  optimiser, the schedules' positions, the scaler, step, loader position, method state, RNG
  states and the resolved config; ``resume: auto|none|PATH``.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from .build import build_loaders, build_method, build_plan, loader_epoch_scale, resolve_amp, resolve_resume
from .checkpoint import checkpoint_path, load_checkpoint, save_checkpoint, saved_world_size
from .config import Config, for_world, save_config, to_dict
from .evaluation import EvalData, evaluate
from .guard import Guard, finite_and, gated_step, where_
from .methods.base import Method, Stage, default_step, unwrap
from .metrics import Meter, MetricsLog, expected, progress
from .model import autocast_context, make_grad_scaler
from .runtime import DistEnv, init_distributed, log0, rng_state, seed_process, set_rng_state
from .reshard import row_manifest
from .schedule import Clock, Preemption


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
    loss, and every earlier one of the step, is finite (`fastinst.guard.gated_step`: decided on
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


def _enter(tr: Trainer, stage: Stage) -> None:
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


# --------------------------------------------------------------------------- the loop


def _log_step(tr: Trainer, log: MetricsLog, meter: Meter, stage: Stage, epoch: int, loss: torch.Tensor,
              ok: torch.Tensor) -> None:
    check_guard(tr)
    loss = float(loss) if bool(ok) else float("nan")  # host sync: a logged value
    spe, batch = len(tr.loader), tr.loader.next_batch
    lrs = {n: tr.optimizers[n].param_groups[0]["lr"] for n in stage.optimizers}
    rec = {"kind": "train", "step": tr.step, "epoch": epoch + batch / spe, "stage": stage.name,
           "loss": loss if loss == loss else None, "lr": next(iter(lrs.values()), 0.0), "lrs": lrs,
           **meter.read(), "skipped": tr.reported_skips}
    log.write(rec)
    steps_left, evals = max(tr.clock.total_steps - tr.step, 0), tr.clock.evals_left(epoch)
    line, left = progress(f"ep {epoch + 1}/{tr.loader_epochs}", tr.step, batch, spe, loss, rec,
                          tr.cfg.loader.batch_size, steps_left, evals, tr.eval_s)
    log0(tr.env, line)
    if not tr.eta_printed:  # once, from the first logged throughput
        tr.eta_printed = True
        log0(tr.env, expected(left, steps_left, rec, evals, tr.eval_s))
    meter.reset()


def _evaluate(tr: Trainer, log: MetricsLog, epoch: int, init: bool = False) -> None:
    t0 = time.perf_counter()
    res = evaluate(tr.method, tr.evals, tr.amp, int(tr.source.num_classes), "recompute" if init else None)
    tr.eval_s = time.perf_counter() - t0
    log.write({"kind": "eval", "step": tr.step, "epoch": epoch, **({"init": True} if init else {}), **res})
    what = "random init:" if init else f"ep {epoch}/{tr.loader_epochs}"
    log0(tr.env, f"{what} kNN top1 {res['knn_top1']:.2f} top5 {res['knn_top5']:.2f}"
                 + (" (recomputed features)" if init else ""))


def _train_loop(tr: Trainer, log: MetricsLog, pre: Optional[Preemption] = None) -> None:
    clock, loader, meter = tr.clock, tr.loader, Meter(tr.cfg.loader.batch_size)
    pre = pre or Preemption(0.0)
    if tr.cfg.eval.at_start and tr.step == 0:
        _evaluate(tr, log, 0, init=True)  # the bank is still random: the network itself
    started = False
    while not clock.finished(loader.epoch, tr.step):
        epoch, idx = loader.epoch, clock.stage(loader.epoch)
        stage = tr.stages[idx]
        if loader.next_batch == 0 and epoch == clock.stage_start(idx):
            tr.method.stage_start(stage)
        if loader.next_batch == 0 and tr.method.stage_done(stage):  # the method ends its stage early
            end = clock.stage_ends[idx]
            log0(tr.env, f"stage {stage.name} done at loader epoch {epoch}: {end - epoch} of its epochs skipped")
            log.write({"kind": "stage", "step": tr.step, "epoch": epoch, "stage": stage.name, "skipped_epochs": end - epoch})
            loader.set_epoch(end)
            _after_epoch(tr, log, pre, meter, end - 1, 0)
            continue
        _enter(tr, stage)
        meter.waiting()
        deferred = None  # a save due on the epoch's last batch: made after the epoch's bookkeeping
        for batch in loader:
            meter.arrived()
            if not started:  # the loader's start-up is not throughput: time from the first batch on
                started = True
                log0(tr.env, f"first batch after {meter.wait:.1f}s (loader start-up)")
                meter.reset()
            loss, ok = run_step(tr, stage, batch, epoch)
            meter.step(loss, ok)
            if tr.step % tr.cfg.train.log_every == 0:
                _log_step(tr, log, meter, stage, epoch, loss, ok)
                save, stop = pre.due(tr.env)
                if save and loader.next_batch >= len(loader):
                    deferred = stop  # a checkpoint written before end_epoch would resume without it
                elif save and _mid_epoch_save(tr, pre, meter, epoch, stop):
                    return
            if clock.stops(tr.step):
                break
            meter.waiting()
        if loader.next_batch in (0, len(loader)):  # a whole loader epoch: the method's bookkeeping
            with meter.paused():
                rec = tr.method.end_epoch(stage, epoch + 1 == clock.stage_ends[idx])
            if rec:
                log.write({"kind": "method", "step": tr.step, "epoch": epoch + 1, "stage": stage.name, **rec})
                log0(tr.env, f"ep {epoch + 1}/{tr.loader_epochs} {stage.name}: "
                             + " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()))
        saved = _after_epoch(tr, log, pre, meter, epoch, loader.next_batch)
        if deferred is not None and _mid_epoch_save(tr, pre, meter, epoch, deferred, saved):
            return


def _mid_epoch_save(tr: Trainer, pre: Preemption, meter: Meter, epoch: int, stop: bool, saved: bool = False) -> bool:
    """A time-based or preemption save (``saved``: the epoch end just wrote this step's
    checkpoint); returns whether the run stops here (a signal)."""
    with meter.paused():
        path = tr.save() if not saved else checkpoint_path(tr.ckpt_dir, tr.step)
        pre.saved()
    log0(tr.env, f"{'preempted (signal)' if stop else 'time-based save'}: checkpoint {path} at step "
                 f"{tr.step} (epoch {epoch}, batch {tr.loader.next_batch})")
    tr.preempted = stop
    return stop


def _after_epoch(tr: Trainer, log: MetricsLog, pre: Preemption, meter: Meter, epoch: int, next_batch: int) -> bool:
    """What is due after loader epoch ``epoch`` ran to batch ``next_batch``: evaluation, a save
    (returns whether it saved)."""
    done, due = tr.clock.after_epoch(epoch, next_batch, tr.step)
    with meter.paused():  # evaluation and checkpoint time is not training throughput
        check_guard(tr)
        if due.evaluate:
            _evaluate(tr, log, done)
        if due.save:
            tr.save()
            pre.saved()
    return due.save


def train(cfg: Config, out_dir: str, resume: Optional[str] = None) -> Trainer:
    """Train on this rank (call on every rank); returns the trainer (tests inspect its state)."""
    env = init_distributed(cfg.dist.timeout_minutes)
    cfg = for_world(cfg, env.world)
    os.makedirs(out_dir, exist_ok=True)
    tr = build_trainer(cfg, out_dir, env)
    path = resolve_resume(resume or cfg.train.resume, tr.ckpt_dir)
    if path is not None:
        saved_world = saved_world_size(path)
        tr.load_state_dict(load_checkpoint(path, rank=env.rank, world_size=env.world, any_world=True))  # CPU
        log0(env, f"resumed from {path} at step {tr.step} (epoch {tr.loader.epoch}, batch {tr.loader.next_batch})"
                  + (f", resharded from {saved_world} to {env.world} ranks" if saved_world != env.world else ""))
    if env.rank == 0:
        save_config(cfg, os.path.join(out_dir, "config.yaml"))
        stages = "" if len(tr.stages) == 1 else f", stages {[s.name for s in tr.stages]}"
        log0(env, f"fastinst train: {cfg.method.name} {cfg.model.arch} N={len(tr.source)} world={env.world} "
                  f"batch {cfg.loader.batch_size}/rank lr {tr.lr0:.4g} amp={tr.amp} device={env.device} "
                  f"{len(tr.loader)} steps/epoch, {tr.loader_epochs} epochs{stages}"
                  + (f" ({tr.epoch_scale:.3g} loader epochs per pass over the data)" if tr.epoch_scale != 1 else ""))
    log = MetricsLog(out_dir, env.rank, tr.step if path is not None else None)
    try:
        with Preemption(cfg.train.ckpt_minutes) as pre:
            _train_loop(tr, log, pre)
    finally:
        log.close()
        tr.close_loaders()  # stop loader worker processes now, not at garbage collection
    return tr


def evaluate_checkpoint(cfg: Config, path: str) -> Dict[str, float]:
    """kNN accuracy of a saved checkpoint (``launch.py eval``), at any world size."""
    env = init_distributed(cfg.dist.timeout_minutes)
    cfg = for_world(cfg, env.world)
    tr = build_trainer(cfg, os.path.dirname(os.path.abspath(path)), env)
    try:
        state = load_checkpoint(path, rank=env.rank, world_size=env.world, any_world=True)
        for n, m in tr.method.trained_modules().items():
            unwrap(m).load_state_dict(state["modules"][n])
        tr.method.load_state_dict(state["method"])
        tr.step = int(state["step"])
        res = evaluate(tr.method, tr.evals, tr.amp, int(tr.source.num_classes))
    finally:
        tr.close_loaders()
    return {"step": tr.step, **res}

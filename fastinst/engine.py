"""Training engine: the run's state (`Trainer`), its builder, the step and the loop.

``train(cfg, out_dir, resume)`` is what ``launch.py train`` runs on every rank:

- the method (fastinst/methods) declares what it trains: its modules (moved to the device
  and wrapped in DDP here), its optimisers with their lr schedules, and its stages;
- `Clock` (fastinst/schedule.py) knows the stages' lengths in loader epochs and decides when
  to evaluate (weighted kNN, fastinst/evaluation.py) and checkpoint;
- the non-finite guard: a step whose loss is NaN/inf gets no backward and no optimiser step,
  the BatchNorm statistics of the modules it trains are put back and the method's
  ``on_skip`` undoes its forward (the bank and Z stay as they were); after
  ``train.max_nonfinite`` in a row the run stops with `NonFiniteLossError` before writing
  anything, so the last good checkpoint stays intact;
- checkpoints (fastinst/checkpoint.py, per-rank atomic files) hold every module and
  optimiser, the schedules' positions, the scaler, step, loader position, method state, RNG
  states and the resolved config; ``resume: auto|none|PATH``.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from .checkpoint import find_latest_complete, load_checkpoint, save_checkpoint
from .config import Config, ConfigError, save_config, to_dict
from .evaluation import EvalData, evaluate
from .methods import method_class
from .methods.base import BuildContext, Method, Stage, default_step, unwrap
from .metrics import Meter, MetricsLog, expected, progress
from .model import autocast_context, build_model, make_grad_scaler
from .optim import OptimFactory, scaled_lr
from .runtime import DistEnv, derive_seed, init_distributed, log0, rng_state, seed_process, set_rng_state
from .schedule import Clock, LRSchedule


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses; the run stopped without saving."""


# --------------------------------------------------------------------------- set-up builders


def resolve_amp(cfg: Config, device: torch.device) -> str:
    """'auto' -> bf16 on CUDA (fp16 where bf16 is missing), off on the CPU."""
    amp = cfg.model.amp
    if amp == "auto":
        if device.type != "cuda":
            return "off"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("config key 'model.amp': fp16 needs CUDA (its loss scaler is CUDA-only); "
                          "use model.amp=off or bf16 on the CPU")
    return amp


def build_encoder(cfg: Config, env: DistEnv, name: str = "encoder", **overrides) -> nn.Module:
    """An encoder from ``model.*`` (``overrides`` replace build_model arguments), on the CPU and
    not yet in DDP, with the same initial weights on every rank."""
    m = cfg.model
    sync_bn = m.sync_bn and env.world > 1
    if sync_bn and env.device.type != "cuda":
        raise ConfigError("config key 'model.sync_bn': SyncBatchNorm needs CUDA; set model.sync_bn=false on CPU")
    torch.manual_seed(cfg.seed if name == "encoder" else derive_seed(cfg.seed, "encoder", name))
    kw = dict(stem=m.stem, embed_dim=m.embed_dim, head=m.head, hidden_dim=m.hidden_dim,
              zero_init_residual=m.zero_init_residual, width=m.width,
              channels_last=m.channels_last and env.device.type == "cuda", sync_bn=sync_bn, compile=m.compile)
    kw.update(overrides)
    return build_model(kw.pop("arch", m.arch), **kw)


def loader_epoch_scale(loader, num_samples: int, world: int) -> float:
    """Loader epochs per pass over the data, from the sampler's per-rank epoch length
    (``min_len``: n/world for the epoch sampler -> 1.0; window/world for the sliding window
    -> N/window). The same for every method and sampler: no branch on either's name."""
    per_epoch = getattr(getattr(loader, "sampler", None), "min_len", None)
    if not per_epoch:
        return 1.0
    return (num_samples // world) / per_epoch


def build_loaders(cfg: Config, env: DistEnv):
    """Train loader plus its source (N and labels for the bank); fails early on bad layouts."""
    from loaders import build_loader, build_source

    if cfg.data.on_error == "skip" and env.world > 1:
        raise ConfigError("config key 'data.on_error': 'skip' shortens batches unevenly across ranks, which "
                          "the all-gathered loss does not support; use data.on_error=raise with >1 rank")
    source = build_source(cfg, cfg.data.train_split, env)
    return source, build_loader(cfg, cfg.data.train_split, mode="train", env=env, source=source)


def resolve_resume(resume: str, ckpt_dir: str) -> Optional[str]:
    if resume == "none":
        return None
    if resume == "auto":
        return find_latest_complete(ckpt_dir)
    return resume


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
    step: int = 0
    nonfinite: int = 0  # consecutive non-finite steps
    skipped: int = 0  # all non-finite steps of the run
    opt_steps: Dict[str, int] = field(default_factory=dict)  # steps of the stages using each optimiser
    eval_s: Optional[float] = None  # wall seconds of the last kNN evaluation (for the run's ETA)
    eta_printed: bool = False

    @property
    def ckpt_dir(self) -> str:
        return os.path.join(self.out_dir, "checkpoints")

    @property
    def model(self) -> nn.Module:
        """The primary trained module (``encoder``, the one linear probes and exports read)."""
        nets = self.method.trained_modules()
        return nets.get("encoder", next(iter(nets.values())))

    @property
    def epoch_scale(self) -> float:
        return self.clock.epoch_scale

    @property
    def loader_epochs(self) -> int:
        return self.clock.loader_epochs

    def state_dict(self) -> dict:
        nets = {n: unwrap(m).state_dict() for n, m in self.method.trained_modules().items()}
        opts = {n: o.state_dict() for n, o in self.optimizers.items()}
        primary = "encoder" if "encoder" in nets else next(iter(nets))
        return {"modules": nets, "model": nets[primary], "optimizers": opts, "optimizer": next(iter(opts.values())),
                "opt_steps": dict(self.opt_steps), "scaler": self.scaler.state_dict(), "step": self.step,
                "nonfinite": self.nonfinite, "skipped": self.skipped, "loader": self.loader.state_dict(),
                "method": self.method.state_dict(), "rng": rng_state(), "config": to_dict(self.cfg)}

    def load_state_dict(self, state: dict) -> None:
        for n, m in self.method.trained_modules().items():
            unwrap(m).load_state_dict(state["modules"][n])
        for n, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][n])
        self.opt_steps = {n: int(state["opt_steps"][n]) for n in self.optimizers}
        self.scaler.load_state_dict(state["scaler"])
        self.method.load_state_dict(state["method"])
        self.loader.load_state_dict(state["loader"])
        self.step, self.nonfinite, self.skipped = int(state["step"]), int(state["nonfinite"]), int(state["skipped"])
        set_rng_state(state["rng"])

    def close_loaders(self) -> None:
        self.loader.close()
        self.evals.close()

    def save(self) -> str:
        self.method.flush()  # lazily-updated method state (PIC's skipped rows) made current
        return save_checkpoint(self.ckpt_dir, self.step, self.state_dict(), rank=self.env.rank,
                               world_size=self.env.world, keep=self.cfg.train.keep)


def train_schedule(cfg: Config, lr0: float, steps_per_epoch: int, clock: Clock) -> LRSchedule:
    """``train.*``'s schedule: passes converted to loader epochs by the clock."""
    t = cfg.train
    return LRSchedule(base=lr0, steps_per_epoch=steps_per_epoch, epochs=clock.scaled(t.epochs),
                      warmup_epochs=clock.scaled(t.warmup_epochs), kind=t.schedule, gamma=t.gamma,
                      milestones=tuple(m * clock.epoch_scale for m in t.milestones))


def build_method(cfg: Config, env: DistEnv, num_samples: int, labels: Optional[torch.Tensor] = None) -> Method:
    """``method.name`` built from its config section and an encoder from ``model.*``; its
    trained modules on the device, in DDP when there is more than one rank."""
    ctx = BuildContext(env=env, num_samples=num_samples, labels=labels, seed=cfg.seed,
                       global_batch=cfg.loader.batch_size * env.world,
                       view_groups=tuple(c.count for c in cfg.aug.crops), embed_dim=cfg.model.embed_dim,
                       dataset=f"{cfg.data.path}:{cfg.data.train_split}", build_encoder=partial(build_encoder, cfg, env))
    method = method_class(cfg.method.name).from_config(cfg.method.section, build_encoder(cfg, env), ctx)
    method = method.to(env.device)
    method.wrap(lambda m: env.wrap_ddp(m.to(env.device)))
    return method


@dataclass
class Plan:
    """What a method trains with: named optimisers and schedules, stages, the clock."""

    optimizers: Dict[str, torch.optim.Optimizer]
    schedules: Dict[str, Callable[[int], float]]
    stages: List[Stage]
    clock: Clock
    lr0: float


def build_plan(cfg: Config, env: DistEnv, method: Method, steps_per_epoch: int, epoch_scale: float = 1.0) -> Plan:
    t = cfg.train
    lr0 = scaled_lr(t.lr, t.lr_batch, cfg.loader.batch_size, env.world)
    schedule = train_schedule(cfg, lr0, steps_per_epoch, Clock(steps_per_epoch, [t.epochs], epoch_scale=epoch_scale))
    make = OptimFactory(kind=t.optimizer, lr=lr0, momentum=t.momentum, weight_decay=t.weight_decay,
                        lars_eta=t.lars_eta, schedule=schedule, cuda=env.device.type == "cuda")
    pairs = method.optimizers(make)
    stages = method.stages(t.epochs, list(pairs))
    clock = Clock(steps_per_epoch, [s.passes for s in stages], epoch_scale=epoch_scale, eval_every=t.eval_every,
                  ckpt_every=t.ckpt_every, max_steps=t.max_steps)
    return Plan({n: o for n, (o, _) in pairs.items()}, {n: sch for n, (_, sch) in pairs.items()}, stages, clock, lr0)


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
                   evals=evals, lr0=plan.lr0, opt_steps={n: 0 for n in plan.optimizers})


# --------------------------------------------------------------------------- the step


def train_step(method: Method, optimizers: Dict[str, torch.optim.Optimizer], scaler, amp: str, device_type: str,
               batch: dict, step: Optional[Callable] = None):
    """One training step (also what benchmarks/step_time.py times): the stage's ``step`` (None:
    forward + one backward) under autocast; each ``backward(loss, names)`` it makes zeroes those
    optimisers' gradients and, for a finite loss, back-propagates (through the grad scaler)
    and steps them. Returns (out, loss as a float: NaN/inf when a backward was skipped)."""
    seen: Dict[int, float] = {}
    skipped = []

    def backward(loss: torch.Tensor, names=None) -> bool:
        opts = [optimizers[n] for n in (names or optimizers)]
        value = float(loss.detach())  # host sync: the non-finite guard needs it every step
        seen[id(loss)] = value
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        if skipped or not math.isfinite(value):
            skipped.append(value)
            return False
        with torch.autocast(device_type, enabled=False):
            scaler.scale(loss).backward()
        for opt in opts:
            scaler.step(opt)
        scaler.update()
        return True

    with autocast_context(device_type, amp):
        out = (step or default_step)(method, batch, backward)
    if skipped:
        return out, next((v for v in skipped if not math.isfinite(v)), float("nan"))
    loss = out.get("loss")
    return out, (seen[id(loss)] if id(loss) in seen else float(loss.detach()) if loss is not None else 0.0)


def _snapshot(tr: Trainer, stage: Stage) -> List[tuple]:
    """(buffer, copy) of the float buffers (BatchNorm statistics) of the modules ``stage`` trains."""
    nets = tr.method.trained_modules()
    return [(b, b.clone()) for n in stage.trains for b in unwrap(nets[n]).buffers() if b.is_floating_point()]


def _enter(tr: Trainer, stage: Stage) -> None:
    """The stage's modules train; the others are frozen (eval mode, no gradients)."""
    for name, m in tr.method.trained_modules().items():
        m.train(name in stage.trains)
        if name not in stage.trains:
            m.requires_grad_(False)
        elif not any(p.requires_grad for p in m.parameters()):
            m.requires_grad_(True)


def run_step(tr: Trainer, stage: Stage, batch: dict, epoch: int) -> float:
    """One step of ``stage``: each optimiser's lr from its schedule, the step, then the method's
    state updates for a finite loss, or the non-finite guard."""
    for name in stage.optimizers:
        for g in tr.optimizers[name].param_groups:
            g["lr"] = tr.schedules[name](tr.opt_steps[name])
    tr.method.before_step(tr.step)
    snap = _snapshot(tr, stage)
    opts = {n: tr.optimizers[n] for n in stage.optimizers}
    out, loss = train_step(tr.method, opts, tr.scaler, tr.amp, tr.env.device.type, batch, stage.step)
    if math.isfinite(loss):
        tr.nonfinite = 0
        tr.method.after_step(out)  # bank / queue / key-encoder updates
    else:
        for buf, copy in snap:
            buf.copy_(copy)
        tr.method.on_skip(out)
        _skipped(tr, epoch)
    for name in stage.optimizers:
        tr.opt_steps[name] += 1
    tr.step += 1
    return loss


def _skipped(tr: Trainer, epoch: int) -> None:
    t = tr.cfg.train
    tr.nonfinite, tr.skipped = tr.nonfinite + 1, tr.skipped + 1
    log0(tr.env, f"warning: non-finite loss at step {tr.step} (epoch {epoch}); step skipped, bank unchanged "
                 f"({tr.nonfinite} in a row, limit train.max_nonfinite={t.max_nonfinite})")
    if tr.nonfinite >= t.max_nonfinite:
        raise NonFiniteLossError(
            f"{tr.nonfinite} consecutive non-finite losses (train.max_nonfinite={t.max_nonfinite}) at step "
            f"{tr.step}; stopped without saving. The last complete checkpoint in {tr.ckpt_dir} is intact: "
            "lower train.lr, raise the method's temperature T or use model.amp=off, then resume")


# --------------------------------------------------------------------------- the loop


def _log_step(tr: Trainer, log: MetricsLog, meter: Meter, stage: Stage, epoch: int, loss: float) -> None:
    spe, batch = len(tr.loader), tr.loader.next_batch
    lrs = {n: tr.optimizers[n].param_groups[0]["lr"] for n in stage.optimizers}
    rec = {"kind": "train", "step": tr.step, "epoch": epoch + batch / spe, "stage": stage.name,
           "loss": loss if math.isfinite(loss) else None, "lr": next(iter(lrs.values()), 0.0), "lrs": lrs,
           **meter.read(), "skipped": tr.skipped}
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


def _train_loop(tr: Trainer, log: MetricsLog) -> None:
    clock, loader, meter = tr.clock, tr.loader, Meter(tr.cfg.loader.batch_size)
    if tr.cfg.eval.at_start and tr.step == 0:
        _evaluate(tr, log, 0, init=True)  # the bank is still random: the network itself
    started = False
    while not clock.finished(loader.epoch, tr.step):
        epoch, stage = loader.epoch, tr.stages[clock.stage(loader.epoch)]
        _enter(tr, stage)
        meter.waiting()
        for batch in loader:
            meter.arrived()
            if not started:  # the loader's start-up is not throughput: time from the first batch on
                started = True
                log0(tr.env, f"first batch after {meter.wait:.1f}s (loader start-up)")
                meter.reset()
            loss = run_step(tr, stage, batch, epoch)
            meter.step(loss)
            if tr.step % tr.cfg.train.log_every == 0:
                _log_step(tr, log, meter, stage, epoch, loss)
            if clock.stops(tr.step):
                break
            meter.waiting()
        done, due = clock.after_epoch(epoch, loader.next_batch, tr.step)
        with meter.paused():  # evaluation and checkpoint time is not training throughput
            if due.evaluate:
                _evaluate(tr, log, done)
            if due.save:
                tr.save()


def train(cfg: Config, out_dir: str, resume: Optional[str] = None) -> Trainer:
    """Train on this rank (call on every rank); returns the trainer (tests inspect its state)."""
    env = init_distributed()
    os.makedirs(out_dir, exist_ok=True)
    tr = build_trainer(cfg, out_dir, env)
    path = resolve_resume(resume or cfg.train.resume, tr.ckpt_dir)
    if path is not None:
        tr.load_state_dict(load_checkpoint(path, rank=env.rank, world_size=env.world))  # CPU; copied in
        log0(env, f"resumed from {path} at step {tr.step} (epoch {tr.loader.epoch}, batch {tr.loader.next_batch})")
    if env.rank == 0:
        save_config(cfg, os.path.join(out_dir, "config.yaml"))
        stages = "" if len(tr.stages) == 1 else f", stages {[s.name for s in tr.stages]}"
        log0(env, f"fastinst train: {cfg.method.name} {cfg.model.arch} N={len(tr.source)} world={env.world} "
                  f"batch {cfg.loader.batch_size}/rank lr {tr.lr0:.4g} amp={tr.amp} device={env.device} "
                  f"{len(tr.loader)} steps/epoch, {tr.loader_epochs} epochs{stages}"
                  + (f" ({tr.epoch_scale:.3g} loader epochs per pass over the data)" if tr.epoch_scale != 1 else ""))
    log = MetricsLog(out_dir, env.rank, tr.step if path is not None else None)
    try:
        _train_loop(tr, log)
    finally:
        log.close()
        tr.close_loaders()  # stop loader worker processes now, not at garbage collection
    return tr


def evaluate_checkpoint(cfg: Config, path: str) -> Dict[str, float]:
    """kNN accuracy of a saved checkpoint (``launch.py eval``); same world size as the save."""
    env = init_distributed()
    tr = build_trainer(cfg, os.path.dirname(os.path.abspath(path)), env)
    try:
        state = load_checkpoint(path, rank=env.rank, world_size=env.world)
        for n, m in tr.method.trained_modules().items():
            unwrap(m).load_state_dict(state["modules"][n])
        tr.method.load_state_dict(state["method"])
        tr.step = int(state["step"])
        res = evaluate(tr.method, tr.evals, tr.amp, int(tr.source.num_classes))
    finally:
        tr.close_loaders()
    return {"step": tr.step, **res}

"""The training loop: ``train(cfg, out_dir, resume)`` is what ``launch.py train`` runs on every
rank, ``evaluate_checkpoint`` what ``launch.py eval`` runs.

The run's state, its builder and the step are fastinst/train/trainer.py; `Clock`
(fastinst/train/schedule.py) knows the stages' lengths in loader epochs and decides when to
evaluate (weighted kNN, fastinst/train/evaluation.py) and checkpoint; a time-based or
preemption save (`Preemption`) is written at a log step; ``resume: auto|none|PATH``, at any
world size.
"""
from __future__ import annotations

import os
import time
from typing import Dict, Optional

import torch

from ..config import Config, for_world, save_config
from ..core.runtime import init_distributed, log0
from ..methods.base import Stage, unwrap
from .build import resolve_resume
from .checkpoint import checkpoint_path, load_checkpoint, saved_world_size
from .evaluation import evaluate
from .metrics import Meter, MetricsLog, expected, progress
from .schedule import Preemption
from .trainer import Trainer, build_trainer, check_guard, enter_stage, run_step


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
        enter_stage(tr, stage)
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

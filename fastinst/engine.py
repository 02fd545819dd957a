"""Training engine: small set-up builders, the train loop, checkpoints and kNN evaluation.

``train(cfg, out_dir, resume)`` is what ``launch.py train`` runs on every rank. The loop
(`_train_loop`) fits on one screen; everything else is a builder or a helper:

- distributed init from torchrun's environment only (gloo on CPU, nccl on GPU);
- model (torchvision ResNet, channels-last, AMP), DDP when world > 1;
- SGD with momentum / weight decay (fused on CUDA, foreach elsewhere), lr scaled by the
  global batch (``train.lr`` is quoted for ``train.lr_batch`` images), step or cosine
  schedule with linear warm-up, set per step;
- the method (registry, fastinst/methods), which owns its state (NPID: bank shard, Z);
- throughput meter (images/s per rank, fraction of wall time waiting for data), a progress
  line from rank 0, ``metrics.jsonl`` and TensorBoard when it is installed;
- the non-finite guard: a step whose loss is NaN/inf gets no backward, no optimiser step
  and no bank update; after ``train.max_nonfinite`` in a row the run stops with
  `NonFiniteLossError` before writing anything, so the last good checkpoint stays intact;
- a checkpoint every ``train.ckpt_every`` epochs (fastinst/checkpoint.py, per-rank atomic
  files) holding model, optimiser, scaler, step, loader position, method state, RNG states
  and the resolved config; ``resume: auto|none|PATH``.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import find_latest_complete, load_checkpoint, save_checkpoint
from .config import Config, ConfigError, save_config, to_dict
from .knn import knn_classify
from .methods import build_method
from .methods.base import unwrap
from .model import autocast_context, build_model, make_grad_scaler
from .runtime import DistEnv, init_distributed, log0, main_guard, rng_state, seed_process, set_rng_state  # noqa: F401


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


def build_train_model(cfg: Config, env: DistEnv) -> nn.Module:
    m = cfg.model
    sync_bn = m.sync_bn and env.world > 1
    if sync_bn and env.device.type != "cuda":
        raise ConfigError("config key 'model.sync_bn': SyncBatchNorm needs CUDA; set model.sync_bn=false on CPU")
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts them)
    model = build_model(m.arch, stem=m.stem, embed_dim=m.embed_dim, head=m.head, hidden_dim=m.hidden_dim,
                        zero_init_residual=m.zero_init_residual, width=m.width,
                        channels_last=m.channels_last and env.device.type == "cuda", sync_bn=sync_bn,
                        compile=m.compile)
    return env.wrap_ddp(model.to(env.device))


def scaled_lr(lr: float, lr_batch: int, cfg: Config, world: int) -> float:
    """Linear scaling (Goyal et al. 2017): lr for the global batch from ``lr`` quoted at ``lr_batch``."""
    return lr * cfg.loader.batch_size * world / lr_batch


def base_lr(cfg: Config, world: int) -> float:
    return scaled_lr(cfg.train.lr, cfg.train.lr_batch, cfg, world)


def sgd(params, lr: float, momentum: float, weight_decay: float, cuda: bool) -> torch.optim.SGD:
    """torch SGD with the fused kernel on CUDA and the foreach one elsewhere."""
    fast = {"fused": True} if cuda else {"foreach": True}
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, **fast)


def build_optimizer(cfg: Config, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "lars":
        # SimCLR / PIC --optimizer lars: biases and BN parameters get neither decay nor adaptation.
        from .simclr import LARS

        return LARS(model.parameters(), lr=lr, momentum=t.momentum, weight_decay=t.weight_decay, eta=t.lars_eta)
    # Weight decay on every parameter, as lemniscate / PIC do.
    return sgd(model.parameters(), lr, t.momentum, t.weight_decay, next(model.parameters()).is_cuda)


def scaled_epochs(epochs: float, epoch_scale: float) -> float:
    """Loader epochs that make ``epochs`` passes over the data. With PIC's sliding window one
    loader epoch is one window, epoch_scale = N/window, and PIC's main_pretrain.py rounds
    epochs and warm-up up to whole windows (math.ceil); scale 1 leaves them untouched."""
    return epochs if epoch_scale == 1.0 else math.ceil(epochs * epoch_scale - 1e-9)


def loader_epoch_scale(loader, num_samples: int, world: int) -> float:
    """Loader epochs per pass over the data, from the sampler's per-rank epoch length
    (``min_len``: n/world for the epoch sampler -> 1.0; window/world for the sliding window
    -> N/window). The same for every method and sampler: no branch on either's name."""
    per_epoch = getattr(getattr(loader, "sampler", None), "min_len", None)
    if not per_epoch:
        return 1.0
    return (num_samples // world) / per_epoch


def lr_at(step: int, cfg: Config, steps_per_epoch: int, lr0: float, epoch_scale: float = 1.0) -> float:
    """Per-step learning rate: linear warm-up, then step decay (by whole epochs, as the
    seeds' MultiStepLR) or a cosine to zero over the remaining steps. ``steps_per_epoch`` is
    per loader epoch; train.epochs / warmup_epochs / milestones count passes over the data,
    ``epoch_scale`` loader epochs per pass (see `loader_epoch_scale`)."""
    t = cfg.train
    warm = int(round(scaled_epochs(t.warmup_epochs, epoch_scale) * steps_per_epoch))
    if step < warm:
        return lr0 * (step + 1) / warm
    if t.schedule == "cosine":
        total = scaled_epochs(t.epochs, epoch_scale) * steps_per_epoch
        p = min(1.0, (step - warm) / max(1, total - warm))
        return lr0 * 0.5 * (1.0 + math.cos(math.pi * p))
    epoch = step // steps_per_epoch if epoch_scale == 1.0 else step / (steps_per_epoch * epoch_scale)
    return lr0 * t.gamma ** sum(epoch >= m for m in t.milestones)


def build_loaders(cfg: Config, env: DistEnv):
    """Train loader plus its source (N and labels for the bank); fails early on bad layouts."""
    from loaders import build_loader, build_source

    if cfg.data.on_error == "skip" and env.world > 1:
        raise ConfigError("config key 'data.on_error': 'skip' shortens batches unevenly across ranks, which "
                          "the all-gathered loss does not support; use data.on_error=raise with >1 rank")
    source = build_source(cfg, cfg.data.train_split, env)
    loader = build_loader(cfg, cfg.data.train_split, mode="train", env=env, source=source)
    return source, loader


class EvalData:
    """Eval-transform loaders, built on first use: val queries and (for features=recompute)
    the train split in eval mode."""

    def __init__(self, cfg: Config, env: DistEnv):
        self.cfg, self.env, self._loaders = cfg, env, {}

    def check(self) -> None:
        if self.cfg.train.eval_every > 0:
            self.loader(self.cfg.data.val_split)  # start-up: the val split exists and is readable

    def close(self) -> None:
        for ld in self._loaders.values():
            ld.close()

    def loader(self, split: str):
        if split not in self._loaders:
            from loaders import build_loader

            self._loaders[split] = build_loader(self.cfg, split, mode="eval", env=self.env)
        return self._loaders[split]


# --------------------------------------------------------------------------- metrics


class Meter:
    """Images/s per rank and the fraction of wall time spent waiting for the loader."""

    def __init__(self, images_per_step: int):
        self.images_per_step = images_per_step
        self.reset()

    def reset(self) -> None:
        self.t0, self.wait, self.steps, self.loss_sum = time.perf_counter(), 0.0, 0, 0.0

    def read(self) -> Dict[str, float]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        return {"images_per_s": self.steps * self.images_per_step / dt, "data_wait": self.wait / dt,
                "loss_avg": self.loss_sum / max(self.steps, 1)}


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


# --------------------------------------------------------------------------- state


@dataclass
class Trainer:
    cfg: Config
    env: DistEnv
    out_dir: str
    model: nn.Module
    method: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Any
    amp: str
    loader: Any
    source: Any
    evals: EvalData
    lr0: float
    step: int = 0
    nonfinite: int = 0  # consecutive non-finite steps
    skipped: int = 0  # all non-finite steps of the run
    extra_optimizers: List[torch.optim.Optimizer] = field(default_factory=list)  # method-owned (PIC's LazySGD)
    epoch_scale: float = 1.0  # loader epochs per pass over the data (sliding window: N/window)
    eval_s: Optional[float] = None  # wall seconds of the last kNN evaluation (for the run's ETA)
    eta_printed: bool = False

    @property
    def ckpt_dir(self) -> str:
        return os.path.join(self.out_dir, "checkpoints")

    @property
    def optimizers(self) -> List[torch.optim.Optimizer]:
        return [self.optimizer] + list(self.extra_optimizers)

    @property
    def loader_epochs(self) -> int:
        """Loader epochs the run lasts: train.epochs passes over the data."""
        return int(scaled_epochs(self.cfg.train.epochs, self.epoch_scale))

    def passes(self, loader_epochs: int) -> int:
        """Whole passes over the data after ``loader_epochs`` loader epochs."""
        return math.floor(loader_epochs / self.epoch_scale + 1e-9)

    def state_dict(self) -> dict:
        return {"model": unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "step": self.step, "nonfinite": self.nonfinite,
                "skipped": self.skipped, "loader": self.loader.state_dict(), "method": self.method.state_dict(),
                "rng": rng_state(), "config": to_dict(self.cfg),
                "extra_optimizers": [o.state_dict() for o in self.extra_optimizers]}

    def load_state_dict(self, state: dict) -> None:
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.method.load_state_dict(state["method"])
        for opt, st in zip(self.extra_optimizers, state.get("extra_optimizers", [])):
            opt.load_state_dict(st)
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


def build_trainer(cfg: Config, out_dir: str, env: DistEnv) -> Trainer:
    seed_process(cfg.seed, env.rank)
    source, loader = build_loaders(cfg, env)
    evals = EvalData(cfg, env)
    evals.check()
    model = build_train_model(cfg, env)
    labels = torch.as_tensor(np.asarray(source.labels), dtype=torch.long)
    method = build_method(cfg, model, len(source), env, labels=labels, device=env.device)
    lr0 = base_lr(cfg, env.world)
    amp = resolve_amp(cfg, env.device)
    return Trainer(cfg=cfg, env=env, out_dir=out_dir, model=model, method=method,
                   optimizer=build_optimizer(cfg, model, lr0), scaler=make_grad_scaler(amp, env.device.type),
                   amp=amp, loader=loader, source=source, evals=evals, lr0=lr0,
                   extra_optimizers=list(method.extra_optimizers(lr0)),
                   epoch_scale=loader_epoch_scale(loader, len(source), env.world))


def resolve_resume(resume: str, ckpt_dir: str) -> Optional[str]:
    if resume == "none":
        return None
    if resume == "auto":
        return find_latest_complete(ckpt_dir)
    return resume


# --------------------------------------------------------------------------- evaluation


def gather_rows(x: torch.Tensor, world: int) -> torch.Tensor:
    """Concatenate every rank's rows (row counts may differ by rank) on every rank."""
    if world == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(counts, n)
    counts = [int(c) for c in counts]
    pad = x.new_zeros((max(counts),) + tuple(x.shape[1:]))
    pad[:x.shape[0]] = x
    parts = [torch.empty_like(pad) for _ in range(world)]
    dist.all_gather(parts, pad)
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


@torch.no_grad()
def embed_split(tr: Trainer, split: str):
    """Eval-transform embeddings of this rank's rows of ``split``: (feats [n, D], labels [n])."""
    model, feats, labels = unwrap(tr.model), [], []
    loader = tr.evals.loader(split)
    loader.set_epoch(0)
    for batch in loader:
        with autocast_context(tr.env.device.type, tr.amp):
            feats.append(model(batch["views"][0].to(tr.env.device, non_blocking=True)).float())
        labels.append(batch["label"].to(tr.env.device))
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def evaluate(tr: Trainer, features: Optional[str] = None) -> Dict[str, float]:
    """Weighted kNN (NPID protocol): val embeddings vs bank rows or recomputed train embeddings."""
    cfg, env = tr.cfg, tr.env
    features = features or cfg.eval.features
    tr.method.flush()  # e.g. PIC's classifier rows, read as kNN train features
    model = unwrap(tr.model)
    was_training = model.training
    model.eval()
    try:
        q, ql = embed_split(tr, cfg.data.val_split)
        q, ql = gather_rows(q, env.world), gather_rows(ql, env.world)  # every rank: all queries
        train = tr.method.train_features() if features == "bank" else None
        if train is None:
            train = embed_split(tr, cfg.data.train_split)
        num_classes = cfg.data.num_classes or max(int(tr.source.num_classes), int(ql.max()) + 1)
        res = knn_classify(q, ql, train[0], train[1], num_classes, k=cfg.eval.knn_k, sigma=cfg.eval.knn_sigma,
                           distributed=env.world > 1)
    finally:
        model.train(was_training)
    return {"knn_top1": res["top1"], "knn_top5": res["top5"]}


# --------------------------------------------------------------------------- the loop


def _float_buffers(model: nn.Module) -> List[torch.Tensor]:
    return [b for b in unwrap(model).buffers() if b.is_floating_point()]


def train_step(method: nn.Module, optimizers, scaler, amp: str, device_type: str, batch: dict):
    """One step of any method, the loop's core (also what benchmarks/step_time.py times):
    forward under autocast; for a finite loss, backward and a step of every optimiser.
    Returns (out, loss as a float); ``method.after_step(out)`` and the non-finite bookkeeping
    are the caller's."""
    with autocast_context(device_type, amp):
        out = method(batch)
    loss = float(out["loss"].detach())  # host sync: the non-finite guard needs it every step
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    if math.isfinite(loss):
        scaler.scale(out["loss"]).backward()
        for opt in optimizers:
            scaler.step(opt)
        scaler.update()
    return out, loss


def _skip_step(tr: Trainer, snap, bufs, epoch: int) -> None:
    """A non-finite loss: no backward, no optimiser step; BN running stats put back (the forward
    already moved them); the bank and Z are left alone by ``method.after_step``."""
    t = tr.cfg.train
    tr.nonfinite, tr.skipped = tr.nonfinite + 1, tr.skipped + 1
    for s, b in zip(snap, bufs):
        b.copy_(s)
    log0(tr.env, f"warning: non-finite loss at step {tr.step} (epoch {epoch}); step skipped, bank unchanged "
                 f"({tr.nonfinite} in a row, limit train.max_nonfinite={t.max_nonfinite})")
    if tr.nonfinite >= t.max_nonfinite:
        raise NonFiniteLossError(
            f"{tr.nonfinite} consecutive non-finite losses (train.max_nonfinite={t.max_nonfinite}) at step "
            f"{tr.step}; stopped without saving. The last complete checkpoint in {tr.ckpt_dir} is intact: "
            "lower train.lr, raise the method's temperature T or use model.amp=off, then resume")


def _evals_left(tr: Trainer, epoch: int) -> int:
    """kNN evaluations still to come after loader epoch ``epoch`` (0-based, in progress): one
    at each pass that is a multiple of train.eval_every, and one at the end."""
    every = tr.cfg.train.eval_every
    if not every:
        return 0
    last = tr.passes(tr.loader_epochs)
    return len({p for p in range(tr.passes(epoch) + 1, last + 1) if p % every == 0} | {last})


def _duration(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _log_step(tr: Trainer, log: MetricsLog, meter: Meter, epoch: int, loss: float, lr: float) -> None:
    spe = len(tr.loader)
    rec = {"kind": "train", "step": tr.step, "epoch": epoch + tr.loader.next_batch / spe,
           "loss": loss if math.isfinite(loss) else None, "lr": lr, **meter.read(), "skipped": tr.skipped}
    log.write(rec)
    done = tr.loader.next_batch / max(spe, 1)
    bar = "#" * int(20 * done) + "." * (20 - int(20 * done))  # progress through this epoch
    per_step = tr.cfg.loader.batch_size / max(rec["images_per_s"], 1e-9)  # seconds
    total = tr.loader_epochs * spe if not tr.cfg.train.max_steps else min(tr.cfg.train.max_steps,
                                                                            tr.loader_epochs * spe)
    evals = _evals_left(tr, epoch)
    run_left = max(total - tr.step, 0) * per_step + evals * (tr.eval_s or 0.0)
    log0(tr.env, f"ep {epoch + 1}/{tr.loader_epochs} [{bar}] step {tr.step} ({tr.loader.next_batch}/{spe}) "
                 f"loss {loss:.4f} lr {lr:.4g} {rec['images_per_s']:.0f} img/s/rank "
                 f"wait {100 * rec['data_wait']:.0f}% ETA epoch {(spe - tr.loader.next_batch) * per_step:.0f}s "
                 f"run {_duration(run_left)}")
    if not tr.eta_printed:  # once, from the first logged throughput
        tr.eta_printed = True
        ev = (f" + {evals} kNN evaluation(s) at ~{tr.eval_s:.0f}s each" if evals and tr.eval_s is not None
              else f" + {evals} kNN evaluation(s)" if evals else "")
        log0(tr.env, f"expected duration: ~{_duration(run_left)} more ({total - tr.step} steps at "
                     f"{rec['images_per_s']:.0f} img/s/rank{ev})")
    meter.reset()


def _train_loop(tr: Trainer, log: MetricsLog) -> None:
    cfg, t, env, loader = tr.cfg, tr.cfg.train, tr.env, tr.loader
    spe = len(loader)
    bufs = _float_buffers(tr.model)  # BN running stats, snapshot per step (~100 small copies for R50)
    snap = [b.clone() for b in bufs]
    meter, stop, started = Meter(cfg.loader.batch_size), False, False
    if cfg.eval.at_start and tr.step == 0:
        t0 = time.perf_counter()
        res = evaluate(tr, features="recompute")  # the bank is still random: use the network itself
        tr.eval_s = time.perf_counter() - t0
        log.write({"kind": "eval", "step": 0, "epoch": 0, "init": True, **res})
        log0(env, f"random init: kNN top1 {res['knn_top1']:.2f} top5 {res['knn_top5']:.2f} (recomputed features)")
    tr.model.train()
    while loader.epoch < tr.loader_epochs and not stop:
        epoch, meter_t = loader.epoch, time.perf_counter()
        for batch in loader:
            meter.wait += time.perf_counter() - meter_t
            if not started:  # the loader's start-up is not throughput: time from the first batch on
                started = True
                log0(env, f"first batch after {meter.wait:.1f}s (loader start-up)")
                meter.reset()
            lr = lr_at(tr.step, cfg, spe, tr.lr0, tr.epoch_scale)
            for opt in tr.optimizers:  # the model's and the method's (same schedule)
                for g in opt.param_groups:
                    g["lr"] = lr
            tr.method.before_step(tr.step, lr)
            for s, b in zip(snap, bufs):
                s.copy_(b)
            out, loss = train_step(tr.method, tr.optimizers, tr.scaler, tr.amp, env.device.type, batch)
            if math.isfinite(loss):
                tr.nonfinite = 0
            else:
                _skip_step(tr, snap, bufs, epoch)
            tr.method.after_step(out)  # bank / queue / key-encoder updates, only for a finite loss
            tr.step, meter.steps = tr.step + 1, meter.steps + 1
            meter.loss_sum += loss if math.isfinite(loss) else 0.0
            if tr.step % t.log_every == 0:
                _log_step(tr, log, meter, epoch, loss, lr)
            stop = t.max_steps > 0 and tr.step >= t.max_steps
            if stop:
                break
            meter_t = time.perf_counter()
        done = epoch + 1 if loader.next_batch in (0, spe) else epoch  # epochs completed
        last = stop or done >= tr.loader_epochs
        passed = tr.passes(done) if tr.passes(done) > tr.passes(epoch) else 0  # a pass over the data ended
        pause = time.perf_counter()
        if t.eval_every and (last or (passed and passed % t.eval_every == 0)):
            res = evaluate(tr)
            tr.eval_s = time.perf_counter() - pause
            log.write({"kind": "eval", "step": tr.step, "epoch": done, **res})
            log0(env, f"ep {done}/{tr.loader_epochs} kNN top1 {res['knn_top1']:.2f} top5 {res['knn_top5']:.2f}")
        if last or (t.ckpt_every and passed and passed % t.ckpt_every == 0):
            tr.save()
        meter.t0 += time.perf_counter() - pause  # evaluation and checkpoint time is not training throughput


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
        log0(env, f"fastinst train: {cfg.method.name} {cfg.model.arch} N={len(tr.source)} world={env.world} "
                  f"batch {cfg.loader.batch_size}/rank lr {tr.lr0:.4g} amp={tr.amp} device={env.device} "
                  f"{len(tr.loader)} steps/epoch, {tr.loader_epochs} epochs"
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
    state = load_checkpoint(path, rank=env.rank, world_size=env.world)
    unwrap(tr.model).load_state_dict(state["model"])
    tr.method.load_state_dict(state["method"])
    tr.step = int(state["step"])
    res = evaluate(tr)
    return {"step": tr.step, **res}

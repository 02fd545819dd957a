"""Builders of a training run: amp mode, encoders, loaders, the method, and its plan
(optimisers, schedules, stages and the clock). ``engine.build_trainer`` puts them together;
``benchmarks/step_time.py`` uses them without loaders.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from ..config import Config, ConfigError
from ..core.model import build_model
from ..core.runtime import DistEnv, derive_seed
from ..methods.base import BuildContext, Method, Stage
from ..methods.registry import method_class
from .checkpoint import find_latest_complete
from .optim import OptimFactory, scaled_lr
from .schedule import Clock, LRSchedule


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
    if env.device.type == "cuda":
        torch.backends.cudnn.benchmark = m.cudnn_benchmark
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



"""Linear probe on frozen backbone features.

``linear_probe(cfg, checkpoint, out_dir)`` is what ``launch.py linear`` runs on every rank:
the ImageNet linear-classification protocol as PIC's ``main_linear.py`` runs it (MoCo's
``main_lincls.py`` is the same up to its step schedule):

- the pretrained trunk comes from a fastinst checkpoint (model state under ``"model"``);
  the model is replicated by DDP, so ``rank0.pt`` is read at any world size;
- the trunk is frozen: eval mode (BatchNorm uses its running statistics) and no gradients;
  the probe reads the pooled pre-head features (2048-d for ResNet-50), never the projection
  head. PIC leaves the frozen network in train mode, so its BN statistics keep moving on
  the probe's augmented crops; fastinst freezes them, which makes the probe a pure
  function of the exported weights (and identical at any world size);
- one ``nn.Linear(feature_dim, num_classes)`` trained by SGD (lr 30 for a batch of 256,
  momentum 0.9, no weight decay, 5-epoch warm-up from lr/100, cosine, 100 epochs:
  ``linear.*`` in the config), under DDP, on random-resized crops of scale (0.08, 1) plus a
  flip (PIC's 'NULL' augmentation); validation uses the eval transform (resize 256, centre
  crop 224), each rank its shard, with correct counts all-reduced, so top-1 / top-5 are
  exact over the whole split at any world size;
- features in channels-last / AMP like the trainer; the classifier itself in fp32;
- atomic checkpoints of the head, its optimiser, the loader position and RNG
  (fastinst/train/checkpoint.py), ``linear.resume: auto|none|PATH``; ``metrics.jsonl`` gets
  ``linear_train`` records every ``linear.log_every`` steps and one ``linear_eval`` record
  per evaluated epoch.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Dict, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import Config, ConfigError, CropConfig, MixConfig, SamplerConfig, save_config, to_dict
from ..core.runtime import DistEnv, init_distributed, log0, rng_state, seed_process, set_rng_state
from ..methods.base import unwrap
from ..train.build import resolve_amp, resolve_resume
from ..train.checkpoint import load_checkpoint, save_checkpoint
from ..train.metrics import Meter, MetricsLog
from ..train.optim import scaled_lr, sgd
from ..train.schedule import Clock, LRSchedule
from .frozen import build_frozen_backbone, frozen_features

__all__ = ["linear_probe", "LinearProbe"]


# --------------------------------------------------------------------------- set-up


def probe_data_config(cfg: Config) -> Config:
    """The config the probe's loaders see: one train view of PIC's 'NULL' augmentation
    (random-resized crop + flip, no colour, no mixture), an epoch sampler over the whole split."""
    lin = cfg.linear
    size = lin.crop_size or cfg.aug.eval_crop
    aug = dataclasses.replace(cfg.aug, crops=(CropConfig(count=1, size=size, scale=lin.crop_scale),),
                              flip_p=lin.flip_p, jitter_p=0.0, grey_p=0.0, blur_p=0.0, solarize_p=0.0,
                              mix=MixConfig())
    return dataclasses.replace(cfg, aug=aug, sampler=SamplerConfig(kind="epoch", seed=cfg.sampler.seed))


def build_probe_loaders(cfg: Config, env: DistEnv):
    from loaders import build_loader, build_source

    pcfg = probe_data_config(cfg)
    source = build_source(pcfg, cfg.data.train_split, env)
    train = build_loader(pcfg, cfg.data.train_split, mode="train", env=env, source=source)
    val = build_loader(pcfg, cfg.data.val_split, mode="eval", env=env)
    return source, train, val


def probe_schedule(cfg: Config, steps_per_epoch: int, lr0: float) -> LRSchedule:
    """Per-step lr: linear warm-up from lr0 * warmup_start (PIC's GradualWarmupScheduler with
    multiplier 100), then a cosine to zero over the remaining steps or step decay by epoch."""
    lin = cfg.linear
    return LRSchedule(base=lr0, steps_per_epoch=steps_per_epoch, epochs=lin.epochs, warmup_epochs=lin.warmup_epochs,
                      kind=lin.schedule, milestones=tuple(lin.milestones), gamma=lin.gamma,
                      warmup_start=lin.warmup_start)


class ProbeHeads(nn.Module):
    """The probe's linear heads, each on its own features: ``avgpool`` (the globally pooled
    trunk features, one nn.Linear) or ``feat<k>`` (stage k's map pooled as the trunk's
    ``stage_pool`` says, BatchNorm without affine, flattened, nn.Linear: MMSelfSup's multi-head
    benchmark). Linear weights N(0, 0.01), zero bias (MoCo's main_lincls / MMSelfSup)."""

    def __init__(self, inputs: Dict[str, Tuple[int, int]], num_classes: int):
        super().__init__()
        self.heads = nn.ModuleDict()
        for name, (channels, pool) in inputs.items():
            fc = nn.Linear(channels * pool * pool, num_classes)
            nn.init.normal_(fc.weight, std=0.01)
            nn.init.zeros_(fc.bias)
            self.heads[name] = fc if pool == 1 and name == "avgpool" else nn.Sequential(
                nn.BatchNorm2d(channels, affine=False), nn.Flatten(), fc)

    def forward(self, feats: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {name: head(feats[name]) for name, head in self.heads.items()}  # {name: [B, C] fp32}


def head_inputs(cfg: Config, backbone: nn.Module) -> Dict[str, Tuple[int, int]]:
    """{head name: (channels, pooled size)} for ``linear.stages`` (empty: the global pool)."""
    if not cfg.linear.stages:
        return {"avgpool": (backbone.feature_dim, 1)}
    channels, pools = backbone.stage_channels(), backbone.stage_pool()
    return {f"feat{s}": (channels[s], pools[s][0]) for s in sorted(cfg.linear.stages)}


@dataclass
class LinearProbe:
    cfg: Config
    env: DistEnv
    out_dir: str
    backbone: nn.Module  # frozen: an EmbeddingNet, or FrozenTrunks (several trunks)
    head: nn.Module  # nn.Linear, DDP-wrapped when world > 1
    optimizer: torch.optim.Optimizer
    amp: str
    loader: Any
    val_loader: Any
    num_classes: int
    lr0: float
    pretrained: str
    pretrained_step: int
    step: int = 0
    best_top1: float = 0.0

    @property
    def ckpt_dir(self) -> str:
        return os.path.join(self.out_dir, "checkpoints")

    def state_dict(self) -> dict:
        return {"linear": unwrap(self.head).state_dict(), "optimizer": self.optimizer.state_dict(),
                "step": self.step, "best_top1": self.best_top1, "loader": self.loader.state_dict(),
                "rng": rng_state(), "config": to_dict(self.cfg), "num_classes": self.num_classes,
                "pretrained": os.path.abspath(self.pretrained), "pretrained_step": self.pretrained_step}

    def load_state_dict(self, state: dict, path: str) -> None:
        if (os.path.realpath(state["pretrained"]), state["pretrained_step"]) != \
                (os.path.realpath(self.pretrained), self.pretrained_step):
            raise ConfigError(f"config key 'linear.resume': {path} is a probe of {state['pretrained']} (step "
                              f"{state['pretrained_step']}), not of {self.pretrained}; use another --out or "
                              "linear.resume=none")
        unwrap(self.head).load_state_dict(state["linear"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.loader.load_state_dict(state["loader"])
        self.step, self.best_top1 = int(state["step"]), float(state["best_top1"])
        set_rng_state(state["rng"])

    def save(self) -> str:
        return save_checkpoint(self.ckpt_dir, self.step, self.state_dict(), rank=self.env.rank,
                               world_size=self.env.world, keep=self.cfg.linear.keep)

    def features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """What each head reads (`frozen_features`)."""
        names = [f"feat{s}" for s in self.cfg.linear.stages] or ["avgpool"]
        return frozen_features(self.backbone, x.to(self.env.device, non_blocking=True), names, self.amp)


def build_probe(cfg: Config, checkpoint: str, out_dir: str, env: DistEnv) -> LinearProbe:
    seed_process(cfg.seed, env.rank)
    source, loader, val_loader = build_probe_loaders(cfg, env)  # data problems first, before weights load
    num_classes = cfg.data.num_classes or int(source.num_classes)
    if num_classes < 2:
        raise ConfigError(f"config key 'data.num_classes': the train split {cfg.data.train_split!r} has "
                          f"{num_classes} class(es); a linear probe needs labelled data with >= 2 classes")
    val_classes = int(val_loader.source.num_classes)
    if val_classes > num_classes:
        raise ConfigError(f"config key 'data.num_classes': the val split {cfg.data.val_split!r} has label "
                          f"{val_classes - 1} but the train split only {num_classes} classes; set "
                          f"data.num_classes={val_classes}")
    backbone, path, pstep = build_frozen_backbone(cfg, checkpoint, env)
    torch.manual_seed(cfg.seed)  # the same initial heads on every rank (DDP broadcasts them too)
    head = env.wrap_ddp(ProbeHeads(head_inputs(cfg, backbone), num_classes).to(env.device))
    lin = cfg.linear
    lr0 = scaled_lr(lin.lr, lin.lr_batch, cfg.loader.batch_size, env.world)  # linear scaling, as train.lr
    optimizer = sgd(head.parameters(), lr0, lin.momentum, lin.weight_decay, env.device.type == "cuda")
    return LinearProbe(cfg=cfg, env=env, out_dir=out_dir, backbone=backbone, head=head, optimizer=optimizer,
                       amp=resolve_amp(cfg, env.device), loader=loader, val_loader=val_loader,
                       num_classes=num_classes, lr0=lr0, pretrained=path, pretrained_step=pstep)


# --------------------------------------------------------------------------- evaluation


def _all_reduce(x: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(x)
    return x


@torch.no_grad()
def validate(p: LinearProbe) -> Dict[str, float]:
    """Top-1 / top-5 (top-min(5, C)) and mean loss over the whole val split: each rank its
    shard (eval loaders read every sample once), counts summed over ranks."""
    head = unwrap(p.head)
    head.eval()
    k = min(5, p.num_classes)
    names = list(head.heads)
    sums = torch.zeros(len(names), 4, dtype=torch.float64, device=p.env.device)  # per head: c@1, c@k, n, loss
    p.val_loader.set_epoch(0)
    for batch in p.val_loader:
        y = batch["label"].to(p.env.device, non_blocking=True)  # [B]
        out = head(p.features(batch["views"][0]))  # {name: [B, C] fp32}
        for i, name in enumerate(names):
            hit = out[name].topk(k, dim=1).indices.eq(y[:, None])  # [B, k]
            sums[i] += torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum(), y.new_tensor(len(y)),
                                    F.cross_entropy(out[name], y, reduction="sum")]).double()
    per = {}
    for name, (c1, ck, n, loss) in zip(names, _all_reduce(sums, p.env.world).tolist()):
        per[name] = {"top1": 100.0 * c1 / max(n, 1), "top5": 100.0 * ck / max(n, 1), "val_loss": loss / max(n, 1),
                     "val_n": int(n)}
    head.train()
    return {**per[names[-1]], **({"heads": per} if len(names) > 1 else {})}  # the deepest head's, and each


# --------------------------------------------------------------------------- the loop


def _probe_loop(p: LinearProbe, log: MetricsLog) -> Dict[str, float]:
    cfg, lin, env, loader = p.cfg, p.cfg.linear, p.env, p.loader
    spe, res = len(loader), {}
    clock = Clock(spe, [lin.epochs], eval_every=lin.eval_every, ckpt_every=lin.ckpt_every, max_steps=lin.max_steps)
    schedule, meter, head = probe_schedule(cfg, spe, p.lr0), Meter(cfg.loader.batch_size), p.head
    head.train()
    while not clock.finished(loader.epoch, p.step):
        epoch = loader.epoch
        tsum = torch.zeros(3, dtype=torch.float64, device=env.device)  # loss sum, correct@1, n (this epoch)
        meter.waiting()
        for batch in loader:
            meter.arrived()
            lr = schedule(p.step)
            for g in p.optimizer.param_groups:
                g["lr"] = lr
            y = batch["label"].to(env.device, non_blocking=True)  # [B]
            out = head(p.features(batch["views"][0]))  # {name: [B, C] fp32}; grads reach the heads only
            losses = {name: F.cross_entropy(o, y) for name, o in out.items()}
            deepest = next(reversed(out))  # its train loss / accuracy are the ones reported
            logits = out[deepest]
            loss = sum(losses.values())  # each head gets its own gradient (logged: the sum over heads)
            p.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            p.optimizer.step()
            with torch.no_grad():
                tsum += torch.stack([losses[deepest].detach() * len(y), logits.argmax(1).eq(y).sum(),
                                     y.new_tensor(len(y))]).double()
            meter.step(loss)
            p.step += 1
            if p.step % lin.log_every == 0:
                lval = float(loss.detach())  # host sync: logged steps only
                rec = {"kind": "linear_train", "step": p.step, "epoch": epoch + loader.next_batch / spe,
                       "loss": lval, "lr": lr, **meter.read()}
                log.write(rec)
                log0(env, f"linear ep {epoch + 1}/{lin.epochs} step {p.step} ({loader.next_batch}/{spe}) "
                          f"loss {lval:.4f} lr {lr:.4g} {rec['images_per_s']:.0f} img/s/rank "
                          f"wait {100 * rec['data_wait']:.0f}%")
                meter.reset()
            if clock.stops(p.step):
                break
            meter.waiting()
        done, due = clock.after_epoch(epoch, loader.next_batch, p.step)
        with meter.paused():
            if due.evaluate:
                res = _validate_epoch(p, log, tsum, done)
            if due.save:
                p.save()
    return res


def _validate_epoch(p: LinearProbe, log: MetricsLog, tsum: torch.Tensor, done: int) -> Dict[str, float]:
    tl, tc, tn = _all_reduce(tsum, p.env.world).tolist()
    res = validate(p)
    p.best_top1 = max(p.best_top1, res["top1"])
    res.update(train_loss=tl / max(tn, 1), train_top1=100.0 * tc / max(tn, 1), best_top1=p.best_top1)
    log.write({"kind": "linear_eval", "step": p.step, "epoch": done, **res})
    log0(p.env, f"linear ep {done}/{p.cfg.linear.epochs} val top-1 {res['top1']:.2f}% top-5 {res['top5']:.2f}% "
                f"(best top-1 {p.best_top1:.2f}%) train loss {res['train_loss']:.4f} "
                f"train top-1 {res['train_top1']:.2f}%")
    if "heads" in res:
        log0(p.env, "  per stage: " + ", ".join(f"{n} top-1 {r['top1']:.2f}% top-5 {r['top5']:.2f}%"
                                                 for n, r in res["heads"].items()))
    return res


def linear_probe(cfg: Config, checkpoint: str, out_dir: str) -> Dict[str, Any]:
    """Train and evaluate a linear classifier on the frozen trunk of ``checkpoint`` (every rank).
    Returns the last evaluation: top1, top5 (percent), val_loss, val_n, train_loss, train_top1,
    best_top1, epoch (fractional after a max_steps stop), step."""
    env = init_distributed(cfg.dist.timeout_minutes)
    os.makedirs(out_dir, exist_ok=True)
    p = build_probe(cfg, checkpoint, out_dir, env)
    try:
        path = resolve_resume(cfg.linear.resume, p.ckpt_dir)
        if path is not None:
            p.load_state_dict(load_checkpoint(path, rank=env.rank, world_size=env.world), path)
            log0(env, f"linear: resumed from {path} at step {p.step} (epoch {p.loader.epoch})")
        if env.rank == 0:
            save_config(cfg, os.path.join(out_dir, "config.yaml"))
            log0(env, f"fastinst linear: {p.pretrained} (step {p.pretrained_step}) {cfg.model.arch} "
                      f"{p.backbone.feature_dim}-d features -> {p.num_classes} classes, world={env.world} "
                      f"batch {cfg.loader.batch_size}/rank lr {p.lr0:.4g} amp={p.amp} device={env.device} "
                      f"{len(p.loader)} steps/epoch")
        log = MetricsLog(out_dir, env.rank, p.step if path is not None else None)
        try:
            res = _probe_loop(p, log) or validate(p)  # resumed after the last epoch: evaluate only
        finally:
            log.close()
    finally:
        for ld in (p.loader, p.val_loader):  # stop loader workers now, not in a later GC pass
            ld.close()
    spe = len(p.loader)
    done = p.loader.epoch + (p.loader.next_batch / spe if p.loader.next_batch < spe else 1)
    return {**res, "epoch": done, "step": p.step, "best_top1": p.best_top1}

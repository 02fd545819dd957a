"""MoCo v2 (He et al. 2020; Chen et al. 2020; reference code facebookresearch/moco
``moco/builder.py``): the building blocks are in fastinst/methods/moco/keys.py.

- query encoder: the engine's model (ResNet + MLP head, MoCo v2 ``--mlp``), trained by SGD;
- key encoder: a deep copy, never given gradients, moved by θk ← m θk + (1 − m) θq with
  m = 0.999 in ``after_step`` (MoCo does it at the start of the next forward: the same
  sequence of values);
- keys of view 2 computed on a batch shuffled across ranks (shuffling BN, MoCo Sec. 3.3) or,
  with ``model.sync_bn``, on SyncBN statistics;
- InfoNCE over [q·k⁺, q·queue] / T (T = 0.2), the positive in column 0;
- a FIFO queue of K = 65536 keys, identical on every rank, enqueued with the all-gathered
  keys after a finite step; K must be a multiple of the global batch (checked at start-up).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ...config import ConfigError, check
from ...core import dist as fdist
from ...core.runtime import generator
from ..base import BuildContext, Method, unwrap
from ..registry import register
from .keys import KeyQueue, batch_shuffle, batch_unshuffle, moco_loss, momentum_update


@dataclass(frozen=True, kw_only=True)
class MoCoConfig:
    """MoCo v2 (Chen et al. 2020; facebookresearch/moco main_moco.py --moco-k/-m/-t, --mlp)."""

    K: int = 65536  # queue size; a multiple of the global batch (checked at start-up)
    m: float = 0.999  # key-encoder momentum
    T: float = 0.2
    # Shuffling BN across ranks for the key encoder (MoCo Sec. 3.3); set false when
    # model.sync_bn=true (statistics over all ranks need no shuffle).
    shuffle_bn: bool = True

    def __post_init__(self):
        check(self.K >= 1, "method.moco.K", "must be >= 1 (MoCo v2 uses 65536)")
        check(0.0 <= self.m < 1.0, "method.moco.m", "must lie in [0, 1) (MoCo uses 0.999)")
        check(self.T > 0, "method.moco.T", "temperature must be > 0 (MoCo v2 uses 0.2)")


@register("moco")
class MoCo(Method):
    """Key encoder + queue (both in this state_dict); trains the query ``encoder``."""

    Config = MoCoConfig
    needs_views, views_are = 2, "a query/key pair"

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        if cfg.method.moco.shuffle_bn and cfg.model.sync_bn:
            raise ConfigError("config key 'method.moco.shuffle_bn': and model.sync_bn are both true; SyncBN "
                              "already mixes statistics over all ranks, set method.moco.shuffle_bn=false (or "
                              "model.sync_bn=false)")

    def __init__(self, encoder: nn.Module, *, K: int = 65536, m: float = 0.999, T: float = 0.2,
                 shuffle_bn: bool = True, global_batch: int, embed_dim: int = 128, seed: int = 0, device=None):
        super().__init__(encoder=encoder)
        self.key_encoder = copy.deepcopy(unwrap(encoder))  # same initial weights (MoCo copies θq to θk)
        for p in self.key_encoder.parameters():
            p.requires_grad_(False)
        self.queue = KeyQueue(embed_dim, K, global_batch=global_batch, seed=seed, device=device)
        self.m, self.T, self.shuffle_bn, self.seed = m, T, shuffle_bn, seed
        self._step = 0

    @classmethod
    def from_config(cls, c: MoCoConfig, encoder: nn.Module, ctx: BuildContext) -> "MoCo":
        if c.K % ctx.global_batch != 0:  # start-up, not MoCo's mid-run assert
            lo = c.K // ctx.global_batch * ctx.global_batch
            raise ConfigError(
                f"config key 'method.moco.K': queue size K={c.K} is not a multiple of the global batch "
                f"{ctx.global_batch} (loader.batch_size={ctx.global_batch // ctx.env.world} x {ctx.env.world} "
                f"ranks); every enqueue writes one whole batch. Set method.moco.K={lo or ctx.global_batch} or "
                f"{lo + ctx.global_batch}, or change loader.batch_size / the number of ranks")
        return cls(encoder, K=c.K, m=c.m, T=c.T, shuffle_bn=c.shuffle_bn, global_batch=ctx.global_batch,
                   embed_dim=ctx.embed_dim, seed=ctx.seed, device=ctx.env.device)

    def before_step(self, step: int) -> None:
        self._step = step  # seeds the BN shuffle: a resumed run draws the same permutations

    def forward(self, batch: dict) -> dict:
        device = self.queue.queue.device
        x_q, x_k = (v.to(device, non_blocking=True) for v in batch["views"])  # [B, 3, H, W] each
        q = self.nets["encoder"](x_q)  # [B, D] unit rows (query encoder, with gradient)
        with torch.no_grad():
            if self.shuffle_bn:
                g = generator(self.seed, "moco-shuffle", self._step)  # a resumed run repeats it
                x_k, unshuffle = batch_shuffle(x_k, generator=g)  # [B, 3, H, W], [W*B]
                k = batch_unshuffle(self.key_encoder(x_k), unshuffle)  # [B, D]
            else:
                k = self.key_encoder(x_k)  # [B, D]
        loss = moco_loss(q, k, self.queue.queue, self.T)  # global-batch mean, same on every rank
        return {"loss": loss, "keys": k}

    @torch.no_grad()
    def after_step(self, out: dict, ok: torch.Tensor) -> None:
        """Momentum update of the key encoder and enqueue of this step's keys, where ``ok``."""
        momentum_update(unwrap(self.nets["encoder"]), self.key_encoder, self.m, ok)
        self.queue.enqueue(fdist.all_gather_no_grad(out["keys"]), ok)  # [B_global, D]

    def extra_repr(self) -> str:
        return f"K={self.queue.size}, m={self.m}, T={self.T}, shuffle_bn={self.shuffle_bn}"

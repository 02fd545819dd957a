"""MoCo v2 (He et al. 2020; Chen et al. 2020; reference code facebookresearch/moco
``moco/builder.py``): the building blocks are in fastinst/moco.py.

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

import torch

from .. import dist as fdist
from ..config import ConfigError
from ..moco import KeyQueue, batch_shuffle, batch_unshuffle, moco_loss, momentum_update
from . import register
from ..runtime import generator
from .base import Method, unwrap


@register("moco")
class MoCo(Method):
    """Key encoder + queue (both in this state_dict); the query encoder is the engine's model."""

    needs_views, views_are = 2, "a query/key pair"

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        if cfg.method.moco.shuffle_bn and cfg.model.sync_bn:
            raise ConfigError("config key 'method.moco.shuffle_bn': and model.sync_bn are both true; SyncBN "
                              "already mixes statistics over all ranks, set method.moco.shuffle_bn=false (or "
                              "model.sync_bn=false)")

    def __init__(self, model, *, K: int = 65536, m: float = 0.999, T: float = 0.2, shuffle_bn: bool = True,
                 global_batch: int, embed_dim: int = 128, seed: int = 0, device=None):
        super().__init__()
        object.__setattr__(self, "model", model)  # plain attribute: the engine saves its weights
        self.key_encoder = copy.deepcopy(unwrap(model))  # same initial weights (MoCo copies θq to θk)
        for p in self.key_encoder.parameters():
            p.requires_grad_(False)
        self.queue = KeyQueue(embed_dim, K, global_batch=global_batch, seed=seed, device=device)
        self.m, self.T, self.shuffle_bn, self.seed = m, T, shuffle_bn, seed
        self._step = 0

    @classmethod
    def from_config(cls, cfg, model, num_samples: int, ranks, *, labels=None, device=None) -> "MoCo":
        c = cfg.method.moco
        global_batch = cfg.loader.batch_size * ranks.world
        if c.K % global_batch != 0:  # start-up, not MoCo's mid-run assert
            lo = c.K // global_batch * global_batch
            raise ConfigError(
                f"config key 'method.moco.K': queue size K={c.K} is not a multiple of the global batch "
                f"{global_batch} (loader.batch_size={cfg.loader.batch_size} x {ranks.world} ranks); every "
                f"enqueue writes one whole batch. Set method.moco.K={lo or global_batch} or {lo + global_batch}, "
                "or change loader.batch_size / the number of ranks")
        return cls(model, K=c.K, m=c.m, T=c.T, shuffle_bn=c.shuffle_bn, global_batch=global_batch,
                   embed_dim=cfg.model.embed_dim, seed=cfg.seed, device=device)

    def before_step(self, step: int, lr: float) -> None:
        self._step = step  # seeds the BN shuffle: a resumed run draws the same permutations

    def forward(self, batch: dict) -> dict:
        device = self.queue.queue.device
        x_q, x_k = (v.to(device, non_blocking=True) for v in batch["views"])  # [B, 3, H, W] each
        q = self.model(x_q)  # [B, D] unit rows (query encoder, with gradient)
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
    def after_step(self, out: dict) -> bool:
        """Momentum update of the key encoder and enqueue of this step's keys (finite steps only)."""
        if not bool(torch.isfinite(out["loss"])):  # host sync (the engine already synced on it)
            return False
        momentum_update(unwrap(self.model), self.key_encoder, self.m)
        self.queue.enqueue(fdist.all_gather_no_grad(out["keys"]))  # [B_global, D]
        return True

    def extra_repr(self) -> str:
        return f"K={self.queue.size}, m={self.m}, T={self.T}, shuffle_bn={self.shuffle_bn}"

"""CMC, Contrastive Multiview Coding (Tian, Krishnan, Isola 2019; reference code
HobbitLong/CMC), with two views of one image: its L and ab channels (Lab) or Y and CbCr
(YCbCr), ``aug.colorspace`` (loaders/colour.py).

- Two independent trunks, ``l`` on the 1-channel view and ``ab`` on the 2-channel one (ResNet
  stems with 1 / 2 input channels, stage widths from ``model.width``: 0.5 / 1 / 2 for CMC's
  resnet50v1 / v2 / v3), each ending in a linear layer to 128 and L2 normalisation.
- Two memory banks of N rows (`ShardedMemoryBank`, sharded by rank, initialised like NPID's).
- Per step the same K noise rows serve both directions: the L feature is scored against the
  **ab** bank and the ab feature against the **L** bank, the positive being that bank's row
  of the sample read before the update (CMC's ``NCEAverage``). Loss L_l + L_ab: NCE with one
  Z per direction (set on the first batch, or an EMA), softmax-CE over 1 + K, or the full
  softmax when K = 0 (fastinst/methods/npid/nce.py, as NPID).
- After the step each bank gets NPID's momentum update (m = 0.5) with its own view's feature,
  gated on the device by the finite flag (no update, Z put back, on a non-finite step).
- kNN evaluation (fastinst's own choice: the CMC repository has none): the concatenation of
  the two unit embeddings divided by √2, so the cosine is the mean of the two views'
  cosines; without a recompute pass, the concatenated bank rows the same way.
- Linear probe: both trunks frozen, the classifier on their concatenated pooled features
  (``probe_trunks``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from ...config import ConfigError
from ..base import BuildContext, Method, check_row_layout, unwrap
from ..npid.bank import ShardedMemoryBank
from ..npid.method import check_bank_loss_keys
from ..npid.nce import NPIDLoss
from ..registry import register


@dataclass(frozen=True, kw_only=True)
class CMCConfig:
    """CMC (HobbitLong/CMC). Defaults: its released ImageNet models (K = 4096; the code's
    default is 16384)."""

    K: int = 4096  # noise rows per example, shared by the two directions; 0 = full softmax
    T: float = 0.07
    momentum: float = 0.5  # each bank: v <- normalise(m v + (1 - m) x)
    loss: Literal["nce", "softmax"] = "nce"
    # per_sample: K fresh noise rows per example (the seed); shared: one set per global batch
    # (fastinst's option, as for NPID: the loss then does not depend on the batch's order).
    negatives: Literal["per_sample", "shared"] = "per_sample"
    z: Literal["once", "ema"] = "once"  # NCE partition Z of each direction
    z_ema: float = 0.99

    def __post_init__(self):
        check_bank_loss_keys(self, "cmc", "CMC")


@register("cmc")
class CMC(Method):
    """Two trunks (``l``, ``ab``) and two sharded banks; cross-view NPID losses."""

    Config = CMCConfig
    needs_views = 1
    views_are = "one crop, whose colour channels are CMC's two views"
    CHANNELS = {"l": (0, 1), "ab": (1, 3)}  # channel slices of the Lab / YCbCr view

    def __init__(self, enc_l, enc_ab, num_samples: int, *, embed_dim: int = 128, K: int = 4096, T: float = 0.07,
                 momentum: float = 0.5, loss: str = "nce", shared_negatives: bool = False,
                 z_momentum: Optional[float] = None, rank: int = 0,
                 world_size: int = 1, seed: int = 0, device=None, labels: Optional[torch.Tensor] = None):
        super().__init__(l=enc_l, ab=enc_ab)
        bank = dict(rank=rank, world_size=world_size, device=device)
        self.bank_l = ShardedMemoryBank(num_samples, embed_dim, momentum, seed=seed, **bank)
        self.bank_ab = ShardedMemoryBank(num_samples, embed_dim, momentum, seed=seed + 1, **bank)
        crit = dict(loss=loss, num_negatives=K, shared_negatives=shared_negatives, temperature=T,
                    z_momentum=z_momentum, seed=seed)
        self.crit_l, self.crit_ab = NPIDLoss(num_samples, **crit), NPIDLoss(num_samples, **crit)
        self.labels = None if labels is None else labels[self.bank_l.start:self.bank_l.end].clone()

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        if cfg.aug.colorspace == "rgb":
            raise ConfigError("config key 'aug.colorspace': method.name=cmc trains on L/ab or Y/CbCr views; "
                              "set aug.colorspace=lab or aug.colorspace=ycbcr")

    @classmethod
    def from_config(cls, c: CMCConfig, encoder, ctx: BuildContext) -> "CMC":
        check_row_layout(ctx, key="method.cmc.K", k=c.K, rows="noise rows",
                         fix="lower method.cmc.K (or K=0 with loss=softmax for the full softmax)",
                         sharded="the memory banks")
        trunks = {n: ctx.build_encoder(name=n, in_channels=b - a) for n, (a, b) in cls.CHANNELS.items()}
        return cls(trunks["l"], trunks["ab"], ctx.num_samples, embed_dim=ctx.embed_dim, K=c.K, T=c.T,
                   momentum=c.momentum, loss=c.loss, shared_negatives=c.negatives == "shared", z_momentum=c.z_ema if c.z == "ema" else None,
                   rank=ctx.env.rank, world_size=ctx.env.world, seed=ctx.seed, device=ctx.env.device,
                   labels=ctx.labels)

    def probe_trunks(self):
        return [(n, self.CHANNELS[n]) for n in ("l", "ab")]

    # ---- training ------------------------------------------------------------------------
    def _split(self, x: torch.Tensor):
        return [x[:, a:b] for a, b in self.CHANNELS.values()]  # [B, 1, H, W], [B, 2, H, W]

    def forward(self, batch: dict) -> dict:
        device = self.bank_l.shard.device
        index = batch["index"].to(device, non_blocking=True)  # [B] dataset rows
        x_l, x_ab = self._split(batch["views"][0].to(device, non_blocking=True))
        f_l, f_ab = self.nets["l"](x_l), self.nets["ab"](x_ab)  # [B, D] unit rows each
        noise = self.crit_l.draw_noise(index.shape[0] * self.bank_l.world_size, device)  # shared
        out_l = self.crit_l(f_l, index, self.bank_ab, noise)  # L scored against the ab bank
        out_ab = self.crit_ab(f_ab, index, self.bank_l, noise)  # ab scored against the L bank
        return {"loss": out_l.loss + out_ab.loss, "loss_l": out_l.loss.detach(), "loss_ab": out_ab.loss.detach(),
                "feats_l": out_l.feats, "feats_ab": out_ab.feats, "index": out_l.index}

    @torch.no_grad()
    def after_step(self, out: dict, ok: torch.Tensor) -> None:
        """Each bank's momentum update with its own view's feature, where ``ok``; else the
        banks stay and both Z are put back."""
        self.bank_l.update(out["index"], out["feats_l"], ok)  # [B_global], [B_global, D]
        self.bank_ab.update(out["index"], out["feats_ab"], ok)
        for crit in (self.crit_l, self.crit_ab):
            crit.keep_z_if(ok)

    # ---- evaluation ----------------------------------------------------------------------
    @torch.no_grad()
    def train_features(self):
        if self.labels is None:
            return None
        rows = torch.cat([self.bank_l.shard.float(), self.bank_ab.shard.float()], 1) / math.sqrt(2.0)
        return rows, self.labels.to(rows.device)  # [rows_local, 2D]

    def knn_embed(self, x: torch.Tensor) -> torch.Tensor:
        x_l, x_ab = self._split(x)
        z = torch.cat([unwrap(self.nets["l"])(x_l), unwrap(self.nets["ab"])(x_ab)], 1)  # [B, 2D]
        return z / math.sqrt(2.0)

    def extra_repr(self) -> str:
        c = self.crit_l
        return f"loss={c.kind}, K={c.k}, T={c.temperature}"

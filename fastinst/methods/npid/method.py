"""NPID / InstDisc (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric
Instance Discrimination"; reference code lemniscate.pytorch).

Every training image is its own class, represented by one L2-normalised 128-d row of a
memory bank. Per step:

1. embed the view(s) of the local batch (model -> L2-normalised fp32 rows);
2. all-gather features and indices (inside `NPIDLoss`), so each rank computes the loss of
   the global batch against the rows of the bank shard it owns;
3. the positive is the sample's own bank row *before* this step's update (lemniscate reads
   the memory in forward and writes it in backward);
4. loss: NCE with K noise rows (Pn = 1/N, Z estimated once or as an EMA), softmax-CE over
   1 + K sampled rows, or the full softmax over all N rows when K = 0 (fastinst/methods/npid/nce.py);
5. `after_step` (``@torch.no_grad``, after the optimiser step) writes
   v <- normalise(m v + (1 - m) x) into the owned rows, only when the loss was finite.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import nn

from ...config import check
from ..base import BuildContext, Method, check_row_layout, embed_views
from ..registry import register
from .bank import ShardedMemoryBank
from .nce import NPIDLoss

_BANK_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True, kw_only=True)
class NPIDConfig:
    """NPID / InstDisc (Wu et al. 2018; lemniscate.pytorch). Defaults: the ImageNet run."""

    # Noise samples per example; 0 = full softmax over all N bank rows (CIFAR-style).
    K: int = 4096
    T: float = 0.07
    momentum: float = 0.5  # bank update v <- normalise(m v + (1 - m) x)
    # nce: lemniscate NCECriterion with Pn = 1/N; softmax: cross-entropy over 1 + K (or all N).
    loss: Literal["nce", "softmax"] = "nce"
    # per_sample: K fresh noise rows per example (the seeds); shared: one set per global batch.
    negatives: Literal["per_sample", "shared"] = "per_sample"
    # NCE partition Z: once = estimated on the first batch (lemniscate); ema = running estimate.
    z: Literal["once", "ema"] = "once"
    z_ema: float = 0.99
    bank_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    # auto: fused Triton update on CUDA, torch elsewhere.
    bank_kernel: Literal["auto", "triton", "torch"] = "auto"

    def __post_init__(self):
        check_bank_loss_keys(self, "npid", "NPID")


def check_bank_loss_keys(c, name: str, seed: str) -> None:
    """The keys of an NPID-style loss over memory banks (NPID's, CMC's): K, loss, T, momentum,
    z_ema of section ``method.<name>``; ``seed`` names the seed system in the hints."""
    key = f"method.{name}"
    check(c.K >= 0, f"{key}.K", "must be >= 0 (0 = full softmax)")
    check(not (c.loss == "nce" and c.K == 0), f"{key}.K",
          f"is 0 (full softmax) but {key}.loss=nce; set {key}.loss=softmax or K > 0")
    check(c.T > 0, f"{key}.T", f"temperature must be > 0 ({seed} uses 0.07)")
    check(0.0 <= c.momentum < 1.0, f"{key}.momentum", f"must lie in [0, 1) ({seed} uses 0.5)")
    check(0.0 <= c.z_ema < 1.0, f"{key}.z_ema", "must lie in [0, 1)")


@torch.no_grad()
def bank_features(bank: ShardedMemoryBank, labels: Optional[torch.Tensor]):
    """(bank shard [rows_local, D], labels [rows_local]) for weighted kNN on a method's memory
    bank (NPID's, ISL's); None without labels. ``labels``: those of the rows the shard owns."""
    if labels is None:
        return None
    return bank.shard, labels.to(bank.shard.device)


@register("npid", default=True)
class NPID(Method):
    """NPID objective + sharded memory bank; trains ``encoder``. This module's state_dict is
    the bank and the loss state (Z, noise RNG)."""

    Config = NPIDConfig

    def __init__(self, encoder: nn.Module, num_samples: int, *, embed_dim: int = 128, K: int = 4096,
                 T: float = 0.07, momentum: float = 0.5, loss: str = "nce", shared_negatives: bool = False,
                 z_momentum: Optional[float] = None, bank_dtype: torch.dtype = torch.float32,
                 bank_kernel: str = "auto", rank: int = 0, world_size: int = 1, seed: int = 0,
                 device=None, labels: Optional[torch.Tensor] = None):
        super().__init__(encoder=encoder)
        self.bank = ShardedMemoryBank(num_samples, embed_dim, momentum, rank=rank, world_size=world_size,
                                      dtype=bank_dtype, device=device, seed=seed, kernel=bank_kernel)
        self.criterion = NPIDLoss(num_samples, loss=loss, num_negatives=K, shared_negatives=shared_negatives,
                                  temperature=T, z_momentum=z_momentum, seed=seed)
        # Labels of the rows this rank owns, for kNN on bank features (never used in training).
        self.labels = None if labels is None else labels[self.bank.start:self.bank.end].clone()

    @classmethod
    def from_config(cls, c: NPIDConfig, encoder: nn.Module, ctx: BuildContext) -> "NPID":
        check_row_layout(ctx, key="method.npid.K", k=c.K, rows="noise rows",
                         fix="lower method.npid.K (or K=0 with loss=softmax for the full softmax)",
                         sharded="the memory bank")
        return cls(encoder, ctx.num_samples, embed_dim=ctx.embed_dim, K=c.K, T=c.T, momentum=c.momentum,
                   loss=c.loss, shared_negatives=c.negatives == "shared",
                   z_momentum=c.z_ema if c.z == "ema" else None, bank_dtype=_BANK_DTYPES[c.bank_dtype],
                   bank_kernel=c.bank_kernel, rank=ctx.env.rank, world_size=ctx.env.world, seed=ctx.seed,
                   device=ctx.env.device, labels=ctx.labels)

    # ---- training ------------------------------------------------------------------------
    def forward(self, batch: dict) -> dict:
        device = self.bank.shard.device
        index = batch["index"].to(device, non_blocking=True)  # [B] int64 dataset rows
        views = [v.to(device, non_blocking=True) for v in batch["views"]]
        feats = torch.cat(embed_views(self.nets["encoder"], views))  # [V*B, D], view-major
        index_v = index.repeat(len(views))  # [V*B]
        out = self.criterion(feats, index_v, self.bank)  # global-batch loss, same on every rank
        return {"loss": out.loss, "feats": out.feats, "index": out.index}

    @torch.no_grad()
    def after_step(self, out: dict, ok: torch.Tensor) -> None:
        """Momentum update of the owned bank rows; on a non-finite step no row moves and Z
        (updated inside the loss) is put back."""
        self.bank.update(out["index"], out["feats"], ok)  # [B_global], [B_global, D]
        self.criterion.keep_z_if(ok)

    # ---- evaluation ----------------------------------------------------------------------
    def train_features(self):
        """(bank shard [rows_local, D], labels [rows_local]) of this rank, for weighted kNN."""
        return bank_features(self.bank, self.labels)

    def extra_repr(self) -> str:
        c = self.criterion
        return f"loss={c.kind}, K={c.k}, T={c.temperature}, shared_negatives={c.shared}"

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
   1 + K sampled rows, or the full softmax over all N rows when K = 0 (fastinst/nce.py);
5. `after_step` (``@torch.no_grad``, after the optimiser step) writes
   v <- normalise(m v + (1 - m) x) into the owned rows, only when the loss was finite.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from ..memory import ShardedMemoryBank
from ..nce import NPIDLoss
from . import register
from .base import Method, check_row_layout

_BANK_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@register("npid")
class NPID(Method):
    """NPID objective + sharded memory bank. ``model`` is used but not owned (not a submodule):
    the engine saves and restores the weights, this module's state_dict is bank + loss state."""

    def __init__(self, model: nn.Module, num_samples: int, *, embed_dim: int = 128, K: int = 4096,
                 T: float = 0.07, momentum: float = 0.5, loss: str = "nce", shared_negatives: bool = False,
                 z_momentum: Optional[float] = None, bank_dtype: torch.dtype = torch.float32,
                 bank_kernel: str = "auto", rank: int = 0, world_size: int = 1, seed: int = 0,
                 device=None, labels: Optional[torch.Tensor] = None):
        super().__init__()
        object.__setattr__(self, "model", model)  # plain attribute: not in this state_dict
        self.bank = ShardedMemoryBank(num_samples, embed_dim, momentum, rank=rank, world_size=world_size,
                                      dtype=bank_dtype, device=device, seed=seed, kernel=bank_kernel)
        self.criterion = NPIDLoss(num_samples, loss=loss, num_negatives=K, shared_negatives=shared_negatives,
                                  temperature=T, z_momentum=z_momentum, seed=seed)
        # Labels of the rows this rank owns, for kNN on bank features (never used in training).
        self.labels = None if labels is None else labels[self.bank.start:self.bank.end].clone()
        self._z_before: Optional[torch.Tensor] = None

    @classmethod
    def from_config(cls, cfg, model, num_samples: int, ranks, *, labels=None, device=None) -> "NPID":
        c = cfg.method.npid
        check_row_layout(cfg, model, num_samples, ranks, key="method.npid.K", k=c.K, rows="noise rows",
                         fix="lower method.npid.K (or K=0 with loss=softmax for the full softmax)",
                         sharded="the memory bank")
        return cls(model, num_samples, embed_dim=cfg.model.embed_dim, K=c.K, T=c.T, momentum=c.momentum,
                   loss=c.loss, shared_negatives=c.negatives == "shared",
                   z_momentum=c.z_ema if c.z == "ema" else None, bank_dtype=_BANK_DTYPES[c.bank_dtype],
                   bank_kernel=c.bank_kernel, rank=ranks.rank, world_size=ranks.world, seed=cfg.seed,
                   device=device, labels=labels)

    # ---- training ------------------------------------------------------------------------
    def embed(self, views) -> tuple:
        """Embeddings of all views, [V*B, D] fp32 unit rows, and the view order's index repeat
        count. Views of equal size go through the model in one call (one BN batch, one DDP
        forward per size)."""
        groups: Dict[tuple, list] = {}
        for v in views:
            groups.setdefault(tuple(v.shape[1:]), []).append(v)
        feats, counts = [], []
        for vs in groups.values():
            x = vs[0] if len(vs) == 1 else torch.cat(vs)  # [n*B, 3, H, W]
            feats.append(self.model(x))  # [n*B, D]
            counts.append(len(vs))
        return (feats[0] if len(feats) == 1 else torch.cat(feats)), sum(counts)

    def forward(self, batch: dict) -> dict:
        device = self.bank.shard.device
        index = batch["index"].to(device, non_blocking=True)  # [B] int64 dataset rows
        feats, n_views = self.embed([v.to(device, non_blocking=True) for v in batch["views"]])  # [V*B, D]
        index_v = index.repeat(n_views)  # [V*B]; views concatenated view-major, like feats
        nce = self.criterion.nce
        # Z is updated inside the loss; keep the old value so a non-finite step leaves no trace.
        self._z_before = None if nce is None else nce.z.detach().clone()
        out = self.criterion(feats, index_v, self.bank)  # global-batch loss, same on every rank
        return {"loss": out.loss, "feats": out.feats, "index": out.index}

    @torch.no_grad()
    def after_step(self, out: dict) -> bool:
        """Momentum update of the owned bank rows; skipped (and Z restored) for a non-finite loss."""
        finite = bool(torch.isfinite(out["loss"]))  # host sync (the engine already synced on it)
        if not finite:
            if self._z_before is not None:
                self.criterion.nce.z.copy_(self._z_before)
            return False
        self.bank.update(out["index"], out["feats"])  # [B_global], [B_global, D]
        return True

    # ---- evaluation ----------------------------------------------------------------------
    @torch.no_grad()
    def train_features(self):
        """(bank shard [rows_local, D], labels [rows_local]) of this rank, for weighted kNN."""
        if self.labels is None:
            return None
        return self.bank.shard, self.labels.to(self.bank.shard.device)

    def extra_repr(self) -> str:
        c = self.criterion
        return f"loss={c.kind}, K={c.k}, T={c.temperature}, shared_negatives={c.shared}"


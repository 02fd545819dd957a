"""SimCLR (Chen et al. 2020; reference code google-research/simclr): two views per image through
the engine's model (ResNet + MLP projection head), NT-Xent over the 2N samples of all ranks
(fastinst/methods/simclr/ntxent.py ``nt_xent``) at temperature T (0.1 in PIC's scripts/SimCLR.sh, 0.1-0.5
in the paper). Train with ``train.optimizer=lars`` (LARS, lr 0.3 per 256, wd 1e-6) as SimCLR.
No state besides the model: the base class's no-op hooks do the rest.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...config import check
from ..base import BuildContext, Method, embed_views
from ..registry import register
from .ntxent import nt_xent


@dataclass(frozen=True, kw_only=True)
class SimCLRConfig:
    """SimCLR (Chen et al. 2020; NT-Xent over all ranks' samples)."""

    T: float = 0.1  # PIC scripts/SimCLR.sh --contrast-temperature 0.1; the paper sweeps 0.1-0.5

    def __post_init__(self):
        check(self.T > 0, "method.simclr.T", "temperature must be > 0 (SimCLR uses 0.1-0.5)")


@register("simclr")
class SimCLR(Method):
    """Trains ``encoder``; no state of its own."""

    Config = SimCLRConfig
    needs_views, views_are = 2, "a positive pair"

    def __init__(self, encoder: nn.Module, *, T: float = 0.1, device=None):
        super().__init__(encoder=encoder)
        self.T, self.device = T, torch.device(device or "cpu")

    @classmethod
    def from_config(cls, c: SimCLRConfig, encoder: nn.Module, ctx: BuildContext) -> "SimCLR":
        return cls(encoder, T=c.T, device=ctx.env.device)

    def forward(self, batch: dict) -> dict:
        views = [v.to(self.device, non_blocking=True) for v in batch["views"]]  # 2 x [B, 3, H, W]
        z1, z2 = embed_views(self.nets["encoder"], views)  # [B, D] each; equal sizes share one forward / BN batch
        return {"loss": nt_xent([z1, z2], self.T)}  # global-batch loss, same on every rank

    def extra_repr(self) -> str:
        return f"T={self.T}"

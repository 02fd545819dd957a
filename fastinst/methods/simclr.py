"""SimCLR (Chen et al. 2020; reference code google-research/simclr): two views per image through
the engine's model (ResNet + MLP projection head), NT-Xent over the 2N samples of all ranks
(fastinst/simclr.py ``nt_xent``) at temperature T (0.1 in PIC's scripts/SimCLR.sh, 0.1-0.5
in the paper). Train with ``train.optimizer=lars`` (LARS, lr 0.3 per 256, wd 1e-6) as SimCLR.
No state besides the model: the base class's no-op hooks do the rest.
"""
from __future__ import annotations

import torch

from ..simclr import nt_xent
from . import register
from .base import Method, embed_views


@register("simclr")
class SimCLR(Method):
    needs_views, views_are = 2, "a positive pair"

    def __init__(self, model, *, T: float = 0.1, device=None):
        super().__init__()
        object.__setattr__(self, "model", model)  # plain attribute: the engine saves its weights
        self.T, self.device = T, torch.device(device or "cpu")

    @classmethod
    def from_config(cls, cfg, model, num_samples: int, ranks, *, labels=None, device=None) -> "SimCLR":
        return cls(model, T=cfg.method.simclr.T, device=device)

    def forward(self, batch: dict) -> dict:
        views = [v.to(self.device, non_blocking=True) for v in batch["views"]]  # 2 x [B, 3, H, W]
        z1, z2 = embed_views(self.model, views)  # [B, D] each; equal sizes share one forward / BN batch
        return {"loss": nt_xent([z1, z2], self.T)}  # global-batch loss, same on every rank

    def extra_repr(self) -> str:
        return f"T={self.T}"

"""NPID's memory bank: one L2-normalised row per training image, sharded across ranks (the
sharded-rows block, fastinst/core/rows.py), with the fused in-place momentum update.

NPID (Wu et al. 2018, lemniscate `NCEAverage`/`LinearAverage`) keeps one 128-d row per
training image. The seeds hold the whole N×D bank on every GPU and, per step, gather
B×(K+1)×D rows; here rank r of W owns only the rows [start, end) and updates only those.

Update rule (lemniscate, m = 0.5): v ← normalise(m·v + (1−m)·x), computed in fp32 whatever
the storage dtype: one Triton kernel on CUDA, a torch path elsewhere (`rows.momentum_update_`).
"""

from __future__ import annotations

from typing import Optional

import torch

from ...core.rows import ShardedRows, momentum_update_, shard_bounds  # noqa: F401  (shard_bounds: public API)


class ShardedMemoryBank(ShardedRows):
    """Rank `rank`'s block of an N×D NPID memory bank (buffer `shard`, [end−start, D]).

    Methods that change the bank are the named `@torch.no_grad()` ones (`update`,
    `load_state_dict`).  `num_updates` counts updates so losses holding a view of the shard
    for their backward can detect an update made between forward and backward.
    """

    what, short = "memory bank", "bank"

    def __init__(self, num_rows: int, dim: int = 128, momentum: float = 0.5, *, rank: int = 0,
                 world_size: int = 1, dtype=torch.float32, device=None, seed: int = 0,
                 kernel: str = "auto"):
        super().__init__(num_rows, dim, rank=rank, world_size=world_size)
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype={dtype}: the bank stores float32, bfloat16 or float16")
        if kernel not in ("auto", "triton", "torch"):
            raise ValueError(f"kernel={kernel!r}: use 'auto', 'triton' or 'torch'")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum={momentum} must be in [0, 1) (NPID uses 0.5)")
        self.momentum, self.kernel = float(momentum), kernel
        self.num_updates = 0
        self.register_buffer("shard", self.init_table(seed).to(device=device, dtype=dtype))  # [rows_local, D]

    @property
    def table(self) -> torch.Tensor:
        return self.shard

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, momentum={self.momentum}, dtype={self.shard.dtype}, "
                f"kernel={self.kernel}")

    @torch.no_grad()
    def update(self, index: torch.Tensor, feats: torch.Tensor, ok: Optional[torch.Tensor] = None) -> None:
        """v ← normalise(m·v + (1−m)·x) for this rank's rows among the global batch.

        index [B] and feats [B, D] are already all-gathered over ranks; repeated indices are
        averaged first. Call after loss.backward(): lemniscate also updates the memory inside
        backward. ``ok`` (0-dim bool tensor): update only if it holds (no host sync).
        """
        momentum_update_(self.shard, self.start, index, feats, self.momentum, self.kernel, ok)
        self.num_updates += 1

    @torch.no_grad()
    def full_bank(self) -> torch.Tensor:
        """The whole N×D bank on every rank (storage dtype), for tests and evaluation."""
        return self.gather_full()

    def get_extra_state(self) -> dict:
        return dict(self.layout(), num_updates=self.num_updates)

    def set_extra_state(self, state: dict) -> None:
        self.num_updates = int(state.get("num_updates", 0))

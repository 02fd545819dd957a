"""SimCLR's loss (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
Representations"; reference code google-research/simclr): NT-Xent over the samples of all
ranks. The LARS optimiser it is trained with is in fastinst/train/optim.py.

Distributed convention of `nt_xent` (see fastinst/core/dist.py and fastinst/methods/npid/nce.py): every rank
passes its *local* projections; they are all-gathered with gradient, so the 2N×2N problem is
the one of the global batch and every rank returns the same value, the single-process loss L.
Each rank only forms the rows of its own 2B samples (2B × 2N logits, as SimCLR's TPU code
does), and the per-rank sums are combined with a differentiable all-reduce; backward gives the
local projections W·∂L/∂z_local, so DDP's ÷W averaging reproduces the single-process
gradient.  Without DDP, divide by W.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ...core import dist as fdist

__all__ = ["nt_xent"]


# ---- NT-Xent -------------------------------------------------------------------------------------
def nt_xent(z_local_views: Sequence[torch.Tensor], T: float = 0.1, *,
            normalize: bool = True) -> torch.Tensor:
    """NT-Xent (SimCLR eq. 1) of the global batch, averaged over its 2N anchors.

    z_local_views: two tensors [B, D], the projections of the two views of this rank's B images
    (same B on every rank).  Similarity is cosine (rows are L2-normalised here unless
    ``normalize=False``; normalising unit rows again changes neither value nor the gradient
    that reaches the network).  For each anchor the other view of the same image is the
    positive and the remaining 2N − 2 samples of all ranks are negatives; self-similarity is
    masked out.  SimCLR's TF code reports loss_a + loss_b, i.e. 2× this value.
    """
    if len(z_local_views) != 2:
        raise ValueError(f"nt_xent takes exactly 2 views per image, got {len(z_local_views)}")
    z1, z2 = z_local_views
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"nt_xent: views must both be [B, D], got {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}")
    b = z1.shape[0]
    # fp32 outside autocast: cosine similarities are divided by T as low as 0.1.
    with torch.autocast(device_type=z1.device.type, enabled=False):
        local = torch.cat([z1, z2], 0).float()  # [2B, D]: view 1 rows, then view 2 rows
        if normalize:
            local = F.normalize(local, dim=1)  # [2B, D]
        # One collective for both views; column order is rank-major: [r0 v1, r0 v2, r1 v1, ...].
        cols = fdist.all_gather_with_grad(local)  # [2N, D]
        logits = local @ cols.t() / T  # [2B, 2N]: only this rank's anchors
        j = torch.arange(2 * b, device=local.device)  # [2B] local anchor rows
        base = fdist.get_rank() * 2 * b  # first column of this rank's block
        self_col = base + j  # [2B]
        pos_col = base + (j + b) % (2 * b)  # [2B]: the other view of the same image
        col = torch.arange(cols.shape[0], device=local.device)  # [2N]
        is_self = col == self_col.unsqueeze(1)  # [2B, 2N]
        logits = logits.masked_fill(is_self, float("-inf"))  # [2B, 2N]
        total = F.cross_entropy(logits, pos_col, reduction="sum")  # [] sum over local anchors
        world = fdist.get_world_size()
        if world > 1:
            total = fdist.all_reduce_sum_with_grad(total)  # [] sum over all 2N anchors
        return total / (2 * b * world)

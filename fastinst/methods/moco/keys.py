"""MoCo v2 pieces (He et al. 2020 "Momentum Contrast"; Chen et al. 2020 "Improved Baselines
with Momentum Contrastive Learning"; reference code facebookresearch/moco ``moco/builder.py``):
momentum (EMA) key encoder, a FIFO queue of keys, the InfoNCE loss with the positive in column
0, and shuffling BN (the key encoder sees a batch permuted across ranks, so BN statistics
cannot leak which key belongs to which query).

Distributed conventions (see fastinst/core/dist.py):
  * every rank holds an *identical* queue: keys are all-gathered from every rank before
    `KeyQueue.enqueue`, and the initial queue is drawn from a seeded generator, so no rank ever
    has to broadcast queue contents;
  * `moco_loss` takes the *local* queries and returns the global-batch loss (the same value
    on every rank); local queries receive W·∂L/∂q_local, so DDP's ÷W averaging gives the
    single-process gradient, as in fastinst.methods.npid.nce.  (The queue is shared and keys carry no
    gradient, so this equals MoCo's per-rank mean loss in gradient; only the reported value
    differs: ours is the global mean.)
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ...core import dist as fdist
from ...core.guard import where_
from ...core.runtime import generator

__all__ = ["momentum_update", "KeyQueue", "moco_loss", "batch_shuffle", "batch_unshuffle"]


# ---- momentum (key) encoder ----------------------------------------------------------------------
@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, m: float, ok: Optional[torch.Tensor] = None) -> None:
    """target ← m·target + (1 − m)·online for every parameter (in place); buffers are copied.

    MoCo's ``_momentum_update_key_encoder`` uses this arithmetic form.  Buffers (BN running
    statistics) are copied rather than averaged so that the key encoder in eval mode matches
    the query encoder's statistics; note facebookresearch/moco leaves the key encoder's
    buffers to its own forward passes instead (it only ever runs in train mode, so either
    choice leaves training unchanged).
    """
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"momentum m={m} must be in [0, 1] (MoCo v2 uses 0.999)")
    src = list(online.named_parameters())
    dst = list(target.named_parameters())
    if [n for n, _ in src] != [n for n, _ in dst]:
        raise ValueError("momentum_update: online and target modules have different parameters; "
                         "build the target as copy.deepcopy(online) before wrapping in DDP")
    tp, op = [p for _, p in dst], [p for _, p in src]
    if tp:
        # One multi-tensor kernel per op instead of 2 launches per parameter (ResNet-50 has
        # ~160 parameter tensors); torch.optim uses the same _foreach ops internally.
        if ok is None:
            torch._foreach_mul_(tp, m)
            torch._foreach_add_(tp, op, alpha=1.0 - m)
        else:  # gated on the device: the target stays put unless ok
            new = torch._foreach_mul(tp, m)
            torch._foreach_add_(new, op, alpha=1.0 - m)
            where_(tp, ok, new)
    src_b, dst_b = list(online.buffers()), list(target.buffers())
    if len(src_b) != len(dst_b):
        raise ValueError("momentum_update: online and target modules have different buffers")
    for t, s in zip(dst_b, src_b):  # also on a skipped step: the engine has put the online
        t.copy_(s)  # encoder's back, which undoes the key encoder's own forward


# ---- the key queue -------------------------------------------------------------------------------
class KeyQueue(nn.Module):
    """FIFO dictionary of K keys of size D (MoCo's ``queue`` / ``queue_ptr`` buffers).

    Stored as rows, (K, D), so that ``q @ queue.T`` is a plain matmul and ``enqueue`` writes
    contiguous rows.  The queue is identical on every rank: it starts from the same seeded
    draw and is only ever changed by `enqueue` with the all-gathered keys of the global batch.
    K must be a multiple of the global batch so that every enqueue writes one whole block and
    the pointer never splits a batch (MoCo asserts the same, mid-run; we check at start-up).
    """

    def __init__(self, dim: int, size: int = 65536, *, global_batch: int, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if dim <= 0 or size <= 0 or global_batch <= 0:
            raise ValueError(f"KeyQueue: dim={dim}, size={size} and global_batch={global_batch} "
                             "must be positive")
        if size % global_batch != 0:
            lo = size // global_batch * global_batch
            raise ValueError(
                f"moco queue size K={size} is not a multiple of the global batch {global_batch} "
                f"(= per-rank batch × world size); every enqueue must write one whole batch. "
                f"Fix: set the moco queue size to a multiple of {global_batch} (e.g. "
                f"{lo or global_batch} or {lo + global_batch}), or change the batch size / "
                "number of ranks so that the global batch divides it")
        self.dim, self.size, self.global_batch = dim, size, global_batch
        g = generator(seed, "moco-queue")  # same draw on every rank: no broadcast needed
        init = F.normalize(torch.randn(size, dim, generator=g), dim=1)  # [K, D] unit rows
        self.register_buffer("queue", init.to(device=device, dtype=dtype))  # [K, D]
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long, device=device))  # []

    @torch.no_grad()
    def enqueue(self, keys_global: torch.Tensor, ok: Optional[torch.Tensor] = None) -> None:
        """Replace the oldest global-batch block by ``keys_global`` [global_batch, D]: the keys of
        *every* rank, in rank order (``fastinst.core.dist.all_gather_no_grad(k)``)."""
        if keys_global.shape != (self.global_batch, self.dim):
            raise ValueError(
                f"KeyQueue.enqueue expects the all-gathered keys of the global batch, shape "
                f"({self.global_batch}, {self.dim}), got {tuple(keys_global.shape)}; pass "
                "fastinst.core.dist.all_gather_no_grad(keys), not this rank's keys")
        # Row indices computed on the device from the pointer buffer: no .item() host sync.
        step = torch.arange(self.global_batch, device=self.ptr.device)  # [B]
        rows = (self.ptr + step) % self.size  # [B]
        keys = keys_global.detach().to(self.queue.dtype)  # [B, D]
        if ok is None:
            self.queue.index_copy_(0, rows, keys)  # [K, D]
            self.ptr.copy_((self.ptr + self.global_batch) % self.size)
        else:  # gated on the device: the old rows and pointer unless ok
            self.queue.index_copy_(0, rows, torch.where(ok, keys, self.queue.index_select(0, rows)))
            self.ptr.copy_(torch.where(ok, (self.ptr + self.global_batch) % self.size, self.ptr))


def moco_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor,
              T: float = 0.2) -> torch.Tensor:
    """InfoNCE (MoCo eq. 1): cross-entropy of [q·k⁺, q·queue] / T, the positive at column 0.

    q [B_local, D]: this rank's queries (with gradient); k [B_local, D]: their keys from the
    momentum encoder (no gradient); queue [K, D]: the negatives (``KeyQueue.queue``, read
    before this step's enqueue).  Returns the mean over the *global* batch, identical on every
    rank (one scalar all-reduce); see the module docstring for the gradient convention.
    """
    with torch.autocast(device_type=q.device.type, enabled=False):
        # fp32: logits are divided by T = 0.2 (0.07 in MoCo v1); keep AMP out of the loss.
        qf = q.float()
        l_pos = (qf * k.detach().float()).sum(1, keepdim=True)  # [B, 1]
        l_neg = qf @ queue.detach().float().t()  # [B, K]
        logits = torch.cat([l_pos, l_neg], 1) / T  # [B, 1+K]
        target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)  # [B] positive = 0
        total = F.cross_entropy(logits, target, reduction="sum")  # [] sum over local queries
        world = fdist.get_world_size()
        if world > 1:
            total = fdist.all_reduce_sum_with_grad(total)  # [] sum over the global batch
        return total / (q.shape[0] * world)


# ---- shuffling BN --------------------------------------------------------------------------------
def _randperm(n: int, generator: Optional[torch.Generator], device) -> torch.Tensor:
    # A generator draws on its own device; the result moves to the batch's device.
    dev = device if generator is None else generator.device
    return torch.randperm(n, generator=generator, device=dev).to(device)  # [n]


@torch.no_grad()
def batch_shuffle(x: torch.Tensor, generator: Optional[torch.Generator] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Shuffle the global batch across ranks for the key encoder (MoCo ``_batch_shuffle_ddp``).

    x [B_local, ...] (same B_local on every rank) → (this rank's slice of the permuted global
    batch [B_local, ...], idx_unshuffle [B_global]) to pass to `batch_unshuffle`.  The
    permutation is drawn on rank 0 (``generator`` is used there) and broadcast, so all ranks
    agree.  At world size 1 the batch is shuffled locally; BN statistics over one whole batch
    do not depend on its order, so this only keeps one code path (a single-GPU run that needs
    the effect must split the batch into BN sub-batches instead).
    """
    world, b = fdist.get_world_size(), x.shape[0]
    if world == 1:
        perm = _randperm(b, generator, x.device)  # [B]
        return x[perm], torch.argsort(perm)
    x_all = fdist.all_gather_no_grad(x)  # [W*B, ...]
    n = x_all.shape[0]
    if fdist.get_rank() == 0:
        perm = _randperm(n, generator, x.device)  # [W*B]
    else:
        perm = torch.empty(n, dtype=torch.long, device=x.device)  # [W*B], filled by broadcast
    dist.broadcast(perm, src=0)
    idx_unshuffle = torch.argsort(perm)  # [W*B]
    r = fdist.get_rank()
    return x_all[perm[r * b:(r + 1) * b]], idx_unshuffle  # [B, ...], [W*B]


@torch.no_grad()
def batch_unshuffle(x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
    """Inverse of `batch_shuffle`: x [B_local, ...] computed on the shuffled slice → this rank's
    outputs in the original order [B_local, ...] (MoCo ``_batch_unshuffle_ddp``)."""
    world, b = fdist.get_world_size(), x.shape[0]
    if world == 1:
        return x[idx_unshuffle.to(x.device)]
    x_all = fdist.all_gather_no_grad(x)  # [W*B, ...] in shuffled order
    r = fdist.get_rank()
    return x_all[idx_unshuffle[r * b:(r + 1) * b].to(x.device)]  # [B, ...]

"""Rank/world helpers and the few differentiable collectives fastinst needs.

Gradient convention of the collectives (the only one used in fastinst): every collective is
differentiated as the adjoint of its forward *for the objective Σ_r L_r*, the sum over ranks
of the loss each rank returns (the Megatron tensor-parallel convention):

  * all_gather (cat of every rank's x)  ↔  backward: sum the gradient over ranks, keep own slice
  * all_reduce(sum)                      ↔  backward: all_reduce(sum) of the gradient

fastinst's losses return the *same* value on every rank (the single-process loss of the
global batch, L), so Σ_r L_r = W·L and each rank's local features receive W·∂L/∂x_local.
DDP then averages parameter gradients over the W ranks (÷W), which gives exactly the
single-process gradient.  The same holds whether a loss is computed replicated on every rank
or split across rank-owned bank shards (each shard's part is computed by one rank only).

All helpers degrade to identities when torch.distributed is not initialised, so world size 1
is simply one shard.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


class _AllGather(torch.autograd.Function):
    """cat([x_0, ..., x_{W-1}]) along dim 0; every rank must pass the same shape."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)  # [W*B, ...]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Adjoint of a gather is a reduce-scatter; all_reduce + slice does the same on every
        # backend (gloo has no reduce_scatter) and the tensor is small (global batch × 128).
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        lo = ctx.rank * ctx.rows
        return grad[lo:lo + ctx.rows]


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Every rank consumed the same sum, so ∂(Σ_r L_r)/∂x_s = Σ_r ∂L_r/∂sum.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `x` (same shape on all ranks) along dim 0, differentiably."""
    if get_world_size() == 1:
        return x
    return _AllGather.apply(x)


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `x` (same shape on all ranks) along dim 0; no autograd."""
    if get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over ranks, differentiable with the convention in the module docstring."""
    if get_world_size() == 1:
        return x
    return _AllReduceSum.apply(x)


@torch.no_grad()
def all_reduce_no_grad(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Out-of-place all_reduce ('sum' or 'max') without autograd."""
    if get_world_size() == 1:
        return x
    out = x.clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return out

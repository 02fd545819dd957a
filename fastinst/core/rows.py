"""The sharded-rows block: an N×D table of rows (NPID's memory bank, PIC's classifier, CMC's
two banks, ISL's neighbour table) split across ranks, and the operations every such table
needs.

With W ranks, rank r owns the contiguous block [start, end) of `shard_bounds` (W = 1 is one
shard holding everything; N·D·bytes/W per GPU). Features and indices are all-gathered by the
caller, so every rank sees the global batch and works on the rows it owns:

- `ShardedRows`: the layout (global ranges, owner mask, local index), row init that does not
  depend on W, reads of owned rows, gathering all shards, and a layout record checked before
  a checkpoint's rows are copied in (a shard saved at another rank or world size is refused);
- `momentum_update_`: v ← normalise(m·v + (1−m)·x) of the owned rows in place (lemniscate's
  bank update), fused in one Triton kernel on CUDA (testable on the CPU under
  ``TRITON_INTERPRET=1``, set before triton is first imported), a torch path elsewhere;
- `sharded_exp_sums`: the row maxima and sums of exponentials of log-sum-exps over all N rows
  from each rank's [B, rows_local] scores, only [B]-sized values crossing ranks (the
  InsightFace Partial-FC recipe), so no rank ever holds B×N logits; `partial_fc_cross_entropy`
  (NPID's full softmax, PIC) and ISL's neighbour loss are built on it.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from . import dist as fdist
from .runtime import generator

_INIT_CHUNK = 16384  # rows per independently seeded init chunk (makes init W-independent)
_NORM_EPS = 1e-12  # same floor as F.normalize; lemniscate divides by the bare norm


def shard_bounds(num_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of rank's block: as even as possible, first N % W ranks get one more row."""
    base, extra = divmod(num_rows, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def init_rows(start: int, end: int, dim: int, seed: int) -> torch.Tensor:
    """Rows [start, end) of an initial table, uniform in ±1/sqrt(dim/3) (lemniscate's bank
    init, `stdv = 1/math.sqrt(dim/3)`), fp32 on CPU.  Rows are drawn in fixed chunks seeded by
    (seed, chunk), so a row's value does not depend on how the table is sharded."""
    stdv = 1.0 / math.sqrt(dim / 3)
    out = torch.empty(end - start, dim)  # [rows_local, D]
    first, last = start // _INIT_CHUNK, (end - 1) // _INIT_CHUNK
    for c in range(first, last + 1) if end > start else ():
        g = generator(seed, "rows", c)
        chunk = torch.rand(_INIT_CHUNK, dim, generator=g).mul_(2 * stdv).sub_(stdv)  # [C, D]
        lo, hi = max(start, c * _INIT_CHUNK), min(end, (c + 1) * _INIT_CHUNK)
        out[lo - start:hi - start] = chunk[lo - c * _INIT_CHUNK:hi - c * _INIT_CHUNK]
    return out


def average_duplicates(index: torch.Tensor, feats: torch.Tensor):
    """Average the features of repeated indices (several views of one image), without a host
    sync: returns (rows[B], mean[B, D] fp32) where segment s holds the s-th distinct index in
    sorted order and unused trailing segments have row −1 (skipped by the update)."""
    b = index.shape[0]
    order = torch.argsort(index)  # [B]
    srt = index[order]  # [B] sorted global rows
    first = torch.ones_like(srt, dtype=torch.bool)  # [B]
    first[1:] = srt[1:] != srt[:-1]
    seg = torch.cumsum(first.long(), 0) - 1  # [B] segment id of each sorted entry
    sums = torch.zeros(b, feats.shape[1], dtype=torch.float32, device=feats.device)
    sums.index_add_(0, seg, feats[order].float())  # [B, D]
    counts = torch.zeros(b, dtype=torch.float32, device=feats.device)
    counts.index_add_(0, seg, torch.ones(b, dtype=torch.float32, device=feats.device))  # [B]
    rows = torch.full_like(srt, -1).scatter_(0, seg, srt)  # [B]; equal values per segment
    return rows, sums / counts.clamp_min(1.0).unsqueeze(1)


@torch.no_grad()
def torch_momentum_update(shard, rows, feats, start: int, momentum: float) -> None:
    """Plain torch path: shard[rows − start] ← normalise(m·old + (1−m)·feats), owned rows.
    The boolean selection is a host sync on CUDA, which is why CUDA uses the Triton kernel."""
    owned = (rows >= start) & (rows < start + shard.shape[0])  # [B]
    local = rows[owned] - start  # [B_own]
    old = shard.index_select(0, local).float()  # [B_own, D]
    v = old.mul_(momentum).add_(feats[owned].float(), alpha=1.0 - momentum)  # [B_own, D]
    v = v / v.norm(dim=1, keepdim=True).clamp_min(_NORM_EPS)
    shard.index_copy_(0, local, v.to(shard.dtype))


_KERNEL = None


def _get_kernel():
    """Define the Triton kernel on first use (so this module imports without triton, and so
    TRITON_INTERPRET set by the caller before first use is honoured)."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def momentum_update_kernel(bank_ptr, rows_ptr, x_ptr, start, end, momentum,
                               stride_bank, stride_x, dim, BLOCK_D: tl.constexpr):
        # One program per (deduplicated) updated row: gather → blend → renormalise → scatter.
        pid = tl.program_id(0)
        row = tl.load(rows_ptr + pid)  # global row; −1 or another rank's row → no-op
        owned = (row >= start) & (row < end)
        local = (row - start).to(tl.int64)  # int64: N·D can exceed 2**31
        offs = tl.arange(0, BLOCK_D)
        mask = (offs < dim) & owned
        old = tl.load(bank_ptr + local * stride_bank + offs, mask=mask, other=0.0).to(tl.float32)
        new = tl.load(x_ptr + pid.to(tl.int64) * stride_x + offs, mask=mask,
                      other=0.0).to(tl.float32)
        v = momentum * old + (1.0 - momentum) * new  # fp32 accumulate for bf16/fp16 storage
        norm = tl.sqrt(tl.sum(v * v, axis=0))
        v = v / tl.maximum(norm, 1e-12)
        # fp32 → storage dtype rounds to nearest even on GPU (Triton's default); note the CPU
        # interpreter truncates fp32 → bf16, so interpreter results may differ by one bf16 ulp.
        tl.store(bank_ptr + local * stride_bank + offs, v.to(bank_ptr.dtype.element_ty), mask=mask)

    _KERNEL = momentum_update_kernel
    return _KERNEL


@torch.no_grad()
def triton_momentum_update(shard, rows, feats, start: int, momentum: float) -> None:
    """Fused Triton path (same contract as `torch_momentum_update`, no host sync)."""
    import triton

    kernel = _get_kernel()
    feats = feats.float().contiguous()  # [B, D]
    rows = rows.contiguous()  # [B]
    if rows.numel() == 0:
        return
    kernel[(rows.shape[0],)](shard, rows, feats, start, start + shard.shape[0], float(momentum),
                             shard.stride(0), feats.stride(0), shard.shape[1],
                             BLOCK_D=triton.next_power_of_2(shard.shape[1]))


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def gather_row_shards(local: torch.Tensor, num_rows: int, world_size: int) -> torch.Tensor:
    """All ranks' contiguous row blocks (``shard_bounds`` layout) concatenated: [N, D] on every
    rank. Blocks differ by at most one row, so each is padded to ceil(N/W) for all_gather."""
    pad = -(-num_rows // world_size)
    padded = local.new_zeros(pad, local.shape[1])  # [ceil(N/W), D]
    padded[:local.shape[0]] = local
    gathered = fdist.all_gather_no_grad(padded)  # [W*ceil(N/W), D]
    blocks = []
    for r in range(world_size):
        s, e = shard_bounds(num_rows, r, world_size)
        blocks.append(gathered[r * pad:r * pad + (e - s)])
    return torch.cat(blocks, 0)  # [N, D]


def check_shard_layout(saved: dict, mine: dict, what: str, short: str) -> None:
    """A shard saved at another rank / world size would load someone else's rows silently
    when block sizes happen to match: refuse it, naming every field that differs."""
    bad = [f"{k}: saved {saved.get(k)} vs this {short} {v}" for k, v in mine.items() if saved.get(k) != v]
    if bad:
        raise ValueError(f"{what} shard layout mismatch (" + "; ".join(bad) + "); load each shard on "
                         "the same rank and world size it was saved with")



def use_triton(table: torch.Tensor, kernel: str) -> bool:
    """Whether ``kernel`` ('auto' | 'triton' | 'torch') runs the fused Triton update on ``table``."""
    if kernel == "torch":
        return False
    if kernel == "triton":
        if not table.is_cuda and not _interpreting():
            raise RuntimeError("kernel='triton' on a CPU table needs TRITON_INTERPRET=1 set "
                               "before triton is imported; use kernel='torch' otherwise")
        return True
    return table.is_cuda and _triton_available()


@torch.no_grad()
def momentum_update_(table: torch.Tensor, start: int, index: torch.Tensor, feats: torch.Tensor,
                     momentum: float, kernel: str = "auto", ok: Optional[torch.Tensor] = None) -> None:
    """table[i − start] ← normalise(m·table[i − start] + (1 − m)·x) for the rows i of the global
    batch ``index`` [B] that this shard owns, in place (fp32 arithmetic whatever the storage
    dtype). Repeated indices (several views of one image) are averaged first, so the result
    does not depend on write order (lemniscate's index_copy_ keeps an arbitrary one). With
    ``ok`` (0-dim bool tensor) nothing changes unless it holds."""
    rows, mean = average_duplicates(index.to(table.device), feats.detach().to(table.device))  # [B], [B, D]
    if ok is not None:  # a gated update: every row −1 (no-op) unless ok, decided on the device
        rows = torch.where(ok, rows, -1)
    if use_triton(table, kernel):
        triton_momentum_update(table, rows, mean, start, momentum)
    else:
        torch_momentum_update(table, rows, mean, start, momentum)


def sharded_exp_sums(logits: Sequence[torch.Tensor], terms: Sequence[Tuple[int, Optional[torch.Tensor]]],
                     world: int, extra: Sequence[torch.Tensor] = ()) -> Tuple[torch.Tensor, torch.Tensor]:
    """The pieces of log-sum-exps over the columns of all ranks, each rank holding its own
    columns (the InsightFace Partial-FC recipe; the one place fastinst all-reduces a row max for a
    log-sum-exp).

    ``logits``: K score matrices, this rank's columns of each, [B, C_local]. Returns (m, sums):

    - m [K, B]: each row's max over every rank's columns, no gradient (a constant shift,
      whose gradient cancels in any log-sum-exp);
    - sums [B, S + E]: for each (k, w) of ``terms``, Σ_j w_bj·exp(logits[k]_bj − m_kb) over
      every rank's columns (w None: 1; any [B, C_local] weight, itself differentiable or not),
      then the [B] tensors of ``extra``; summed over ranks in one collective, with gradient
      (fastinst.core.dist's convention).

    So log(sums[:, s]) + m[k] is the global log-sum-exp of logits[k] for a term (k, None).
    Two collectives in all, of [K, B] and [B, S + E]: no rank ever holds B×N scores."""
    b = logits[0].shape[0]
    if logits[0].shape[1] > 0:
        m = torch.stack([x.detach().amax(1) for x in logits])  # [K, B]
    else:  # this rank owns none of the columns
        m = logits[0].new_full((len(logits), b), torch.finfo(logits[0].dtype).min)  # [K, B]
    if world > 1:
        m = fdist.all_reduce_no_grad(m, "max")
    e = [torch.exp(x - m[k].unsqueeze(1)) for k, x in enumerate(logits)]  # K x [B, C_local]
    sums = torch.stack([(e[k] if w is None else e[k] * w).sum(1) for k, w in terms] + list(extra), 1)  # [B, S + E]
    if world > 1:
        sums = fdist.all_reduce_sum_with_grad(sums)
    return m, sums


def partial_fc_cross_entropy(logits: torch.Tensor, pos: torch.Tensor, world: int) -> torch.Tensor:
    """mean_b(logsumexp over all ranks' columns of ``logits`` [B, C_local] − the positive logit),
    where ``pos`` [B] holds the positive logit on the rank owning it and 0 elsewhere: the
    global sum-exp and the positive cross ranks in one collective (`sharded_exp_sums`)."""
    m, stats = sharded_exp_sums([logits], [(0, None)], world, extra=[pos])  # [1, B], [B, 2]
    return (stats[:, 0].log() + m[0] - stats[:, 1]).mean()


class ShardedRows(nn.Module):
    """Rank ``rank``'s block [start, end) of an N×D row table. A subclass keeps the rows in a
    buffer or a parameter of its own name and returns it from `table`; this base holds the
    layout, the index helpers, reads, gathering and the checked checkpoint layout."""

    what = "row table"  # names the table in errors (subclasses: "memory bank", "PIC classifier")
    short = "table"

    def __init__(self, num_rows: int, dim: int, *, rank: int = 0, world_size: int = 1):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if num_rows < world_size:
            raise ValueError(f"num_rows={num_rows} < world_size={world_size}: every rank needs at least one row "
                             f"of the {self.what}")
        self.num_rows, self.dim, self.rank, self.world_size = num_rows, dim, rank, world_size
        self.start, self.end = shard_bounds(num_rows, rank, world_size)

    @property
    def table(self) -> torch.Tensor:  # [rows_local, D]
        raise NotImplementedError

    def row_tensors(self) -> list:
        """Every tensor of this module with one row per owned table row (first dim rows_local):
        what a checkpoint reshards (`fastinst.train.reshard`). The table; a subclass adds its others."""
        return [self.table]

    @property
    def rows_local(self) -> int:
        return self.end - self.start

    def init_table(self, seed: int) -> torch.Tensor:
        """This shard's initial rows (`init_rows`: the same values at any world size)."""
        return init_rows(self.start, self.end, self.dim, seed)

    # ---- index helpers -------------------------------------------------------------------
    def owner_mask(self, index: torch.Tensor) -> torch.Tensor:
        """True where a global row index is owned by this rank."""
        return (index >= self.start) & (index < self.end)

    def local_index(self, index: torch.Tensor) -> torch.Tensor:
        """Global → local row index (meaningful only where `owner_mask` is True)."""
        return index - self.start

    def owned_logit(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """logits[b, index[b] − start] ([B, rows_local] logits over this shard) where this rank
        owns row index[b], 0 elsewhere: [B] (the positive of `partial_fc_cross_entropy`)."""
        local = self.local_index(index).clamp(0, self.rows_local - 1)  # [B]
        return torch.where(self.owner_mask(index), logits.gather(1, local.unsqueeze(1)).squeeze(1), 0.0)

    # ---- reads -----------------------------------------------------------------------------
    def owned_rows(self, index: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """fp32 rows of ``index`` this rank owns, zeros elsewhere: [*index.shape, D]. Sync-free
        (a clamped gather of index.numel() rows); for small index sets. ``rows`` replaces the
        table (e.g. a differentiable view of it)."""
        rows = self.table if rows is None else rows
        if self.world_size == 1:
            return rows[index].float()
        local = self.local_index(index).clamp(0, self.rows_local - 1)
        return torch.where(self.owner_mask(index).unsqueeze(-1), rows[local].float(), 0.0)

    @torch.no_grad()
    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """fp32 copy of arbitrary global rows on every rank, [*index.shape, D]: each rank fills
        the rows it owns and an all_reduce(sum) combines them (index.numel()·D·4 bytes over the
        network: for small reads such as positives and tests, not K×B negatives)."""
        out = self.owned_rows(index)
        return out if self.world_size == 1 else fdist.all_reduce_no_grad(out, "sum")

    @torch.no_grad()
    def gather_full(self) -> torch.Tensor:
        """The whole N×D table on every rank (storage dtype), for evaluation and tests."""
        if self.world_size == 1:
            return self.table.detach().clone()
        if fdist.get_world_size() != self.world_size:
            raise RuntimeError(f"gathering the {self.what} needs torch.distributed with world size "
                               f"{self.world_size}, found {fdist.get_world_size()}")
        return gather_row_shards(self.table.detach(), self.num_rows, self.world_size)  # [N, D]

    # ---- checkpointing (per shard) ------------------------------------------------------------
    def layout(self) -> dict:
        return dict(num_rows=self.num_rows, dim=self.dim, rank=self.rank, world_size=self.world_size,
                    start=self.start, end=self.end)

    def get_extra_state(self) -> dict:
        return self.layout()

    def set_extra_state(self, state: dict) -> None:
        pass  # checked in _load_from_state_dict, before any tensor is copied

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Validate the layout before any tensor is copied, so a shard saved at another
        # rank / world size fails loudly instead of loading someone else's rows.
        meta = state_dict.get(prefix + "_extra_state")
        if meta is None and any(k.startswith(prefix) and k != prefix + "_extra_state" for k in state_dict):
            raise ValueError(f"{prefix or self.short} has no {prefix}_extra_state layout record: not a "
                             f"{self.what} checkpoint")
        if meta is not None:
            check_shard_layout(meta, self.layout(), self.what, self.short)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (f"num_rows={self.num_rows}, dim={self.dim}, rank={self.rank}/{self.world_size}, "
                f"rows=[{self.start}, {self.end})")

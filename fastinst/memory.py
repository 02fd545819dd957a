"""Sharded NPID memory bank with a fused, in-place momentum update.

NPID (Wu et al. 2018, lemniscate `NCEAverage`/`LinearAverage`) keeps one 128-d row per
training image.  The seeds hold the whole N×D bank on every GPU and, per step, gather
B×(K+1)×D rows.  Here rank r of W owns only the contiguous block of rows [start, end)
(N·D·bytes/W per GPU); features and indices are all-gathered by the caller and each rank
updates only the rows it owns.  World size 1 is simply one shard.

Update rule (lemniscate, m = 0.5):  v ← normalise(m·v + (1−m)·x), computed in fp32 whatever
the storage dtype.  On CUDA a Triton kernel does gather → blend → L2-renormalise → scatter in
one pass (one program per updated row); elsewhere a plain torch path (index_select /
index_copy_) does the same.  The kernel also runs on CPU tensors under Triton's interpreter:

    TRITON_INTERPRET=1 python -c "...ShardedMemoryBank(..., kernel='triton')..."

(the variable must be set before `triton` is first imported; the kernel itself is defined
lazily on first use so importing this module never imports triton).
"""

from __future__ import annotations

import math
import os

import torch

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
    """Rows [start, end) of the NPID initial bank, uniform in ±1/sqrt(dim/3) (lemniscate's
    `stdv = 1/math.sqrt(dim/3)`), fp32 on CPU.  Rows are drawn in fixed chunks seeded by
    (seed, chunk), so a row's value does not depend on how the bank is sharded."""
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


class ShardedMemoryBank(torch.nn.Module):
    """Rank `rank`'s block of an N×D NPID memory bank (buffer `shard`, [end−start, D]).

    Methods that change the bank are the named `@torch.no_grad()` ones (`update`,
    `load_state_dict`).  `num_updates` counts updates so losses holding a view of the shard
    for their backward can detect an update made between forward and backward.
    """

    def __init__(self, num_rows: int, dim: int = 128, momentum: float = 0.5, *, rank: int = 0,
                 world_size: int = 1, dtype=torch.float32, device=None, seed: int = 0,
                 kernel: str = "auto"):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if num_rows < world_size:
            raise ValueError(f"num_rows={num_rows} < world_size={world_size}: "
                             "every rank needs at least one row")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype={dtype}: the bank stores float32, bfloat16 or float16")
        if kernel not in ("auto", "triton", "torch"):
            raise ValueError(f"kernel={kernel!r}: use 'auto', 'triton' or 'torch'")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum={momentum} must be in [0, 1) (NPID uses 0.5)")
        self.num_rows, self.dim, self.momentum = num_rows, dim, float(momentum)
        self.rank, self.world_size, self.kernel = rank, world_size, kernel
        self.start, self.end = shard_bounds(num_rows, rank, world_size)
        self.num_updates = 0
        shard = init_rows(self.start, self.end, dim, seed).to(device=device, dtype=dtype)
        self.register_buffer("shard", shard)  # [rows_local, D]

    @property
    def rows_local(self) -> int:
        return self.end - self.start

    def extra_repr(self) -> str:
        return (f"num_rows={self.num_rows}, dim={self.dim}, momentum={self.momentum}, "
                f"rank={self.rank}/{self.world_size}, rows=[{self.start}, {self.end}), "
                f"dtype={self.shard.dtype}, kernel={self.kernel}")

    # ---- index helpers -------------------------------------------------------------------
    def owner_mask(self, index: torch.Tensor) -> torch.Tensor:
        """True where a global row index is owned by this rank."""
        return (index >= self.start) & (index < self.end)

    def local_index(self, index: torch.Tensor) -> torch.Tensor:
        """Global → local row index (meaningful only where `owner_mask` is True)."""
        return index - self.start

    def _use_triton(self) -> bool:
        if self.kernel == "torch":
            return False
        if self.kernel == "triton":
            if not self.shard.is_cuda and not _interpreting():
                raise RuntimeError("kernel='triton' on a CPU bank needs TRITON_INTERPRET=1 set "
                                   "before triton is imported; use kernel='torch' otherwise")
            return True
        return self.shard.is_cuda and _triton_available()

    # ---- mutation --------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, index: torch.Tensor, feats: torch.Tensor) -> None:
        """v ← normalise(m·v + (1−m)·x) for this rank's rows among the global batch.

        index [B] and feats [B, D] are already all-gathered over ranks.  Repeated indices
        (several views of one image) are averaged first, so the result does not depend on
        write order (lemniscate's index_copy_ with duplicates keeps an arbitrary one).
        Call after loss.backward(): lemniscate also updates the memory inside backward.
        """
        rows, mean = average_duplicates(index.to(self.shard.device),
                                        feats.detach().to(self.shard.device))  # [B], [B, D]
        if self._use_triton():
            triton_momentum_update(self.shard, rows, mean, self.start, self.momentum)
        else:
            torch_momentum_update(self.shard, rows, mean, self.start, self.momentum)
        self.num_updates += 1

    # ---- reads -----------------------------------------------------------------------------
    @torch.no_grad()
    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """fp32 copy of arbitrary global rows, shape [*index.shape, D].

        With W > 1 each rank fills the rows it owns (zeros elsewhere) and an all_reduce(sum)
        combines them: index.numel()·D·4 bytes over the network on every rank, so use it
        for small reads (positives, tests), not for K×B negatives.
        """
        if self.world_size == 1:
            return self.shard[index].float()
        local = self.local_index(index).clamp(0, self.rows_local - 1)
        own = self.owner_mask(index).unsqueeze(-1)  # [..., 1]
        out = torch.where(own, self.shard[local].float(), 0.0)  # [..., D]
        return fdist.all_reduce_no_grad(out, "sum")

    @torch.no_grad()
    def full_bank(self) -> torch.Tensor:
        """The whole N×D bank on every rank (storage dtype), for tests and evaluation.
        Blocks differ by at most one row, so each is padded to ceil(N/W) for all_gather."""
        if self.world_size == 1:
            return self.shard.clone()
        if fdist.get_world_size() != self.world_size:
            raise RuntimeError(f"full_bank needs torch.distributed with world size "
                               f"{self.world_size}, found {fdist.get_world_size()}")
        return gather_row_shards(self.shard, self.num_rows, self.world_size)  # [N, D]

    # ---- checkpointing (per shard) ------------------------------------------------------------
    def _layout(self) -> dict:
        return dict(num_rows=self.num_rows, dim=self.dim, rank=self.rank,
                    world_size=self.world_size, start=self.start, end=self.end)

    def get_extra_state(self) -> dict:
        return dict(self._layout(), num_updates=self.num_updates)

    def set_extra_state(self, state: dict) -> None:
        self.num_updates = int(state.get("num_updates", 0))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Validate the layout before any tensor is copied, so a shard saved at another
        # rank / world size fails loudly instead of loading someone else's rows.
        meta = state_dict.get(prefix + "_extra_state")
        if meta is None and prefix + "shard" in state_dict:
            raise ValueError(f"{prefix}shard has no {prefix}_extra_state layout record: not a "
                             "ShardedMemoryBank checkpoint")
        if meta is None:  # bank absent from this checkpoint: let strict/missing_keys decide
            return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                                 missing_keys, unexpected_keys, error_msgs)
        check_shard_layout(meta, self._layout(), "memory bank", "bank")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

"""NPID losses over a (sharded) memory bank: NCE, softmax-CE with K sampled negatives, and
the full softmax over all N rows when K = 0.

Semantics follow the NPID seed code (lemniscate `NCEAverage` / `NCECriterion` /
`LinearAverage`): features and bank rows are L2-normalised, s = f·v, the positive is the bank
row of the sample's own index read *before* this step's update, noise indices are drawn
uniformly (Pn = 1/N, with replacement, possibly equal to the positive, as in the seed).

Distributed convention (world size W, torch.distributed initialised; see fastinst/core/dist.py):
  * every rank passes its *local* features and indices (same local batch size on all ranks);
    they are all-gathered, so each rank returns the same value: the single-process loss L
    of the global batch;
  * backward gives each rank's local features W·∂L/∂x_local (the gradient of Σ_r L_r), so
    DDP's ÷W averaging of parameter gradients reproduces the single-process gradient
    exactly.  At W = 1 this is the plain single-process gradient.  Without DDP, divide by W.
  * bank rows are never moved between ranks: each rank computes the logits of the rows it
    owns and only small tensors are all-reduced (B×(1+K) logits for sampled losses; B-sized
    max and sum-exp for the full softmax, the InsightFace Partial-FC recipe).

Ordering: call `bank.update(...)` *after* `loss.backward()` (lemniscate also updates the
memory inside backward).  The backward reads the bank; an update in between is detected and
raises instead of silently using the updated rows.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ...core import dist as fdist
from ...core.rows import partial_fc_cross_entropy
from ...core.runtime import generator
from .bank import ShardedMemoryBank

NCE_EPS = 1e-7  # lemniscate NCECriterion's eps in both denominators
_PAIR_CHUNK = 1 << 18  # (sample, row) pairs gathered at once: bounds temporaries to ~128 MB
_ROW_CHUNK = 1 << 16  # bank rows multiplied at once in the full softmax (fp32 copy of bf16)


# ---- shard-local logits ------------------------------------------------------------------------
def _check_unchanged(ctx) -> None:
    if ctx.bank.num_updates != ctx.version:
        raise RuntimeError("memory bank was updated between the loss forward and backward; call "
                           "bank.update() after loss.backward()")


class _OwnedDots(torch.autograd.Function):
    """dots[b, j] = feats[b]·bank[index[b, j]] for rows this rank owns, 0 elsewhere.

    Only owned pairs are gathered (≈ B·M/W rows per rank instead of the seeds' B·M on every
    GPU), in chunks, and nothing row-sized is saved: backward gathers again.
    """

    @staticmethod
    def forward(ctx, feats, bank: ShardedMemoryBank, index):
        b, m = index.shape
        flat = index.reshape(-1)  # [B*M]
        if bank.world_size == 1:
            sel = torch.arange(b * m, device=flat.device)  # all owned; no host sync
        else:
            sel = bank.owner_mask(flat).nonzero().squeeze(1)  # host sync: owned count varies
        who, rows = sel // m, bank.local_index(flat[sel])  # [S] sample, [S] local row
        out = torch.zeros(b * m, dtype=torch.float32, device=feats.device)  # [B*M]
        for lo in range(0, sel.numel(), _PAIR_CHUNK):
            c = slice(lo, lo + _PAIR_CHUNK)
            out[sel[c]] = (feats[who[c]].float() * bank.shard[rows[c]].float()).sum(1)
        ctx.bank, ctx.version, ctx.dtype = bank, bank.num_updates, feats.dtype
        ctx.save_for_backward(sel, who, rows)
        ctx.shape = feats.shape
        return out.view(b, m)

    @staticmethod
    def backward(ctx, grad):
        _check_unchanged(ctx)
        sel, who, rows = ctx.saved_tensors
        g = grad.reshape(-1)[sel]  # [S]
        out = torch.zeros(ctx.shape, dtype=torch.float32, device=grad.device)  # [B, D]
        for lo in range(0, sel.numel(), _PAIR_CHUNK):
            c = slice(lo, lo + _PAIR_CHUNK)
            out.index_add_(0, who[c], g[c].unsqueeze(1) * ctx.bank.shard[rows[c]].float())
        return out.to(ctx.dtype), None, None


class _ShardLogits(torch.autograd.Function):
    """feats @ shard.T → [B, rows_local] in fp32, in row chunks (no fp32 copy of a bf16 bank)."""

    @staticmethod
    def forward(ctx, feats, bank: ShardedMemoryBank):
        f = feats.float()  # [B, D]
        out = torch.cat([f @ blk.float().t() for blk in bank.shard.split(_ROW_CHUNK)], 1)
        ctx.bank, ctx.version, ctx.dtype = bank, bank.num_updates, feats.dtype
        return out  # [B, rows_local]

    @staticmethod
    def backward(ctx, grad):
        _check_unchanged(ctx)
        out, lo = None, 0
        for blk in ctx.bank.shard.split(_ROW_CHUNK):
            part = grad[:, lo:lo + blk.shape[0]] @ blk.float()  # [B, D]
            out = part if out is None else out + part
            lo += blk.shape[0]
        return out.to(ctx.dtype), None


def sampled_dots(bank: ShardedMemoryBank, feats: torch.Tensor, index: torch.Tensor,
                 noise: torch.Tensor) -> torch.Tensor:
    """Inner products [B, 1+K] of global features with bank rows; column 0 is the positive
    (the sample's own row), then the K noise rows.

    feats [B, D] and index [B] are the all-gathered global batch; noise is [B, K] (per-sample
    negatives, as in the seeds) or [K] (one set shared by the batch: a single matmul).
    Identical on every rank (all-reduced); differentiable w.r.t. feats.
    """
    if noise.dim() == 2:
        both = torch.cat([index.unsqueeze(1), noise], 1)  # [B, 1+K]
        partial = _OwnedDots.apply(feats, bank, both)  # [B, 1+K]
    else:
        f = feats.float()
        pos = (f * bank.owned_rows(index)).sum(1, keepdim=True)  # [B, 1]
        neg = f @ bank.owned_rows(noise).t()  # [B, K]; other ranks' columns are 0
        partial = torch.cat([pos, neg], 1)  # [B, 1+K]
    return fdist.all_reduce_sum_with_grad(partial) if bank.world_size > 1 else partial


# ---- losses ------------------------------------------------------------------------------------
def softmax_ce(dots: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy with the positive in column 0 (lemniscate's softmax variant, as CPC/MoCo)."""
    target = torch.zeros(dots.shape[0], dtype=torch.long, device=dots.device)
    return F.cross_entropy(dots / temperature, target)


@torch.no_grad()
def estimate_z(dots: torch.Tensor, temperature: float, num_rows: int) -> torch.Tensor:
    """lemniscate's partition estimate: Z = N · mean(exp(s/T)) over all B×(1+K) logits."""
    return torch.exp(dots.float() / temperature).mean() * num_rows


def nce_loss(dots: torch.Tensor, temperature: float, z: torch.Tensor, num_rows: int,
             eps: float = NCE_EPS) -> torch.Tensor:
    """NCE (lemniscate NCECriterion): P = exp(s/T)/Z, h = P/(P + K·Pn), Pn = 1/N,
    loss = −(Σ_b log h(pos_b) + Σ_{b,k} log(1 − h(neg_bk))) / B.
    Z is a constant (no gradient), as in the seed's hand-written backward."""
    k = dots.shape[1] - 1
    kpn = k / num_rows
    z = z.detach().clone()  # a copy: the buffer may be re-estimated before this backward
    p = torch.exp(dots.float() / temperature) / z  # [B, 1+K]
    log_h_pos = torch.log(p[:, 0] / (p[:, 0] + kpn + eps))  # [B]
    log_1m_h_neg = torch.log(kpn / (p[:, 1:] + kpn + eps))  # [B, K]
    return -(log_h_pos.sum() + log_1m_h_neg.sum()) / dots.shape[0]


class NCECriterion(torch.nn.Module):
    """NCE loss holding the partition constant Z as a buffer (in state_dict).

    z_momentum=None: Z is estimated once, on the first call (lemniscate; a known complaint,
    since Z then reflects the random initial bank).  z_momentum=d: after the first call,
    Z ← d·Z + (1−d)·Z_batch before the loss is computed.  Sync-free (no .item()).
    """

    def __init__(self, num_rows: int, temperature: float = 0.07, *,
                 z_momentum: Optional[float] = None, eps: float = NCE_EPS):
        super().__init__()
        if z_momentum is not None and not 0.0 <= z_momentum < 1.0:
            raise ValueError(f"z_momentum={z_momentum} must be in [0, 1) or None (one-shot Z)")
        self.num_rows, self.temperature = num_rows, temperature
        self.z_momentum, self.eps = z_momentum, eps
        self.register_buffer("z", torch.tensor(-1.0))  # < 0: not estimated yet (seed's sentinel)

    @torch.no_grad()
    def update_z(self, dots: torch.Tensor) -> None:
        est = estimate_z(dots, self.temperature, self.num_rows).to(self.z)
        later = self.z if self.z_momentum is None else \
            self.z * self.z_momentum + est * (1.0 - self.z_momentum)
        self.z.copy_(torch.where(self.z < 0, est, later))

    def forward(self, dots: torch.Tensor) -> torch.Tensor:
        self.update_z(dots)
        return nce_loss(dots, self.temperature, self.z, self.num_rows, self.eps)


def full_softmax_loss(bank: ShardedMemoryBank, feats: torch.Tensor, index: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """Cross-entropy over all N bank rows (lemniscate LinearAverage, K = 0), shard-locally:
    each rank forms only its [B, rows_local] logits; an all-reduced row max and sum-exp give
    the global log-sum-exp (Partial-FC), and the positive logit comes from its owner."""
    logits = _ShardLogits.apply(feats, bank) / temperature  # [B, rows_local]
    return partial_fc_cross_entropy(logits, bank.owned_logit(logits, index), bank.world_size)


# ---- the NPID objective as one module ------------------------------------------------------------
def sample_noise(num_rows: int, shape, generator: torch.Generator, device) -> torch.Tensor:
    """Uniform noise indices (lemniscate's AliasMethod over a uniform Pn is plain randint)."""
    return torch.randint(0, num_rows, tuple(shape), generator=generator, device=device)


class NPIDLossOutput(NamedTuple):
    loss: torch.Tensor  # [], the global-batch loss (same on every rank)
    feats: torch.Tensor  # [B_global, D], gathered, detached: pass to bank.update after backward
    index: torch.Tensor  # [B_global]


class NPIDLoss(torch.nn.Module):
    """NPID objective on a ShardedMemoryBank.

    loss='nce' (K > 0) or 'softmax' (K > 0 sampled negatives, K = 0 full softmax).
    shared_negatives=True draws one set of K negatives for the whole global batch.
    Noise is drawn from a generator seeded with `seed` on every rank, so ranks draw the same
    indices in lockstep without communication; its state is saved in state_dict.
    """

    def __init__(self, num_rows: int, *, loss: str = "nce", num_negatives: int = 4096,
                 shared_negatives: bool = False, temperature: float = 0.07,
                 z_momentum: Optional[float] = None, seed: int = 0):
        super().__init__()
        if loss not in ("nce", "softmax"):
            raise ValueError(f"loss={loss!r}: use 'nce' or 'softmax'")
        if num_negatives < 0 or (loss == "nce" and num_negatives == 0):
            raise ValueError(f"num_negatives={num_negatives}: NCE needs K > 0; K = 0 means full "
                             "softmax, so set loss='softmax'")
        self.num_rows, self.kind, self.k = num_rows, loss, num_negatives
        self.shared, self.temperature, self.seed = shared_negatives, temperature, seed
        self.nce = NCECriterion(num_rows, temperature, z_momentum=z_momentum) \
            if loss == "nce" else None
        self._gen: Optional[torch.Generator] = None
        self._pending_rng: Optional[torch.Tensor] = None
        self._z_before: Optional[torch.Tensor] = None  # Z before this step's update (NCE)

    def _generator(self, device: torch.device) -> torch.Generator:
        if self._gen is None or self._gen.device != device:
            self._gen = generator(self.seed, "npid-noise", device=device)
            if self._pending_rng is not None:
                self._gen.set_state(self._pending_rng)
                self._pending_rng = None
        return self._gen

    def get_extra_state(self) -> dict:
        return {"rng": None if self._gen is None else self._gen.get_state()}

    def set_extra_state(self, state: dict) -> None:
        self._gen, self._pending_rng = None, state.get("rng")

    @torch.no_grad()
    def keep_z_if(self, ok: torch.Tensor) -> None:
        """Keep the Z this step's forward estimated only where the 0-dim bool ``ok`` holds; else
        put the previous one back (a non-finite step leaves no trace), on the device."""
        if self.nce is not None and self._z_before is not None:
            self.nce.z.copy_(torch.where(ok, self.nce.z, self._z_before))

    def draw_noise(self, global_batch: int, device) -> Optional[torch.Tensor]:
        """This step's noise rows ([K] shared or [B_global, K]; None for the full softmax), the
        same on every rank. A loss over two banks (CMC) draws once and passes them to both."""
        if self.k == 0:
            return None
        shape = (self.k,) if self.shared else (global_batch, self.k)
        return sample_noise(self.num_rows, shape, self._generator(torch.device(device)), device)

    def forward(self, feats: torch.Tensor, index: torch.Tensor, bank: ShardedMemoryBank,
                noise: Optional[torch.Tensor] = None) -> NPIDLossOutput:
        """feats [B_local, D] (L2-normalised, requires grad), index [B_local] → global loss.
        The positives are rows ``index`` of ``bank``; ``noise``: rows drawn by `draw_noise`
        (None: drawn here)."""
        device = bank.shard.device
        feats_g = fdist.all_gather_with_grad(feats.float())  # [B, D]
        index_g = fdist.all_gather_no_grad(index.to(device))  # [B]
        # Logits divided by T = 0.07 need fp32: keep autocast (AMP) out of the loss.
        with torch.autocast(device_type=device.type, enabled=False):
            if self.k == 0:
                loss = full_softmax_loss(bank, feats_g, index_g, self.temperature)
            else:
                if noise is None:
                    noise = self.draw_noise(index_g.shape[0], device)
                dots = sampled_dots(bank, feats_g, index_g, noise)  # [B, 1+K]
                if self.nce is not None:
                    self._z_before = self.nce.z.detach().clone()  # Z moves inside the loss
                loss = self.nce(dots) if self.nce is not None \
                    else softmax_ce(dots, self.temperature)
        return NPIDLossOutput(loss, feats_g.detach(), index_g)

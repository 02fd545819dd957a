"""ISL's pieces (Wang et al. 2021, "Instance Similarity Learning for Unsupervised Feature
Representation"; reference code ZiweiWangTHU/ISL): the neighbour loss over a sharded memory
bank, the feature-space GAN, the mining rule and the GAN's stopping rule. The method that
puts them into stages is fastinst/methods/isl.py.

The loss of a global batch of B samples, with p_i = softmax_j(f_i·M_j / T) over all N rows
and A(i) the sample's neighbour set (i included):

    L = (1/B) Σ_i [ −log Σ_{j∈A(i)} p_ij  +  ½·KL(p_i ‖ q_i)·[|A(i)| > 1] ]

q_i = softmax_j(M_h·M_j / T) without gradient, h the member of A(i)∖{i} whose memory row is
nearest M_i (dot product). Every N-wide quantity is a sum over the bank's columns, so each
rank sums over the columns it owns and only [B]-sized sums cross ranks (the row maxima, then
one all_reduce of [B, 3] with gradient), as `fastinst.rows.partial_fc_cross_entropy` does:

    KL(p‖q) = E_p[l − l_q] − lse(l) + lse(l_q),   E_p[l − l_q] = Σ_j e^{l_j − m}(l_j − l_qj) / Σ_j e^{l_j − m}
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import dist as fdist
from .memory import ShardedMemoryBank


# ---- the loss --------------------------------------------------------------------------------
def _owned_mask(index: torch.Tensor, nbrs: torch.Tensor, start: int, rows_local: int) -> torch.Tensor:
    """[B, rows_local] bool: column j (owned) is in A(i) = {index[i]} ∪ nbrs[i] (−1 = empty)."""
    members = torch.cat([index.unsqueeze(1), nbrs], 1)  # [B, 1 + C]
    owned = (members >= start) & (members < start + rows_local)  # [B, 1 + C]
    local = (members - start).clamp(0, max(rows_local - 1, 0))  # [B, 1 + C]
    b = torch.arange(members.shape[0], device=members.device).unsqueeze(1).expand_as(members)
    hits = torch.zeros(members.shape[0], rows_local, device=members.device)  # [B, R]
    hits.index_put_((b.reshape(-1), local.reshape(-1)), owned.reshape(-1).float(), accumulate=True)
    return hits > 0


def nearest_neighbour(bank: ShardedMemoryBank, index: torch.Tensor, nbrs: torch.Tensor):
    """(h [B], has [B] bool): the member of nbrs[i] whose row is nearest M_index[i] (dot
    product; ties: the first), and whether sample i has any neighbour. Each rank scores the
    neighbours it owns; one [B, C] all_reduce combines them."""
    mi = bank.rows(index)  # [B, D] fp32 on every rank
    valid = nbrs >= 0  # [B, C]
    safe = nbrs.clamp_min(0)
    dots = (bank.owned_rows(safe) * mi.unsqueeze(1)).sum(-1)  # [B, C], zeros where not owned
    if bank.world_size > 1:
        dots = fdist.all_reduce_no_grad(dots, "sum")
    dots = dots.masked_fill(~valid, float("-inf"))
    best = dots.argmax(1)  # [B]
    return safe.gather(1, best.unsqueeze(1)).squeeze(1), valid.any(1)


def isl_loss(feats: torch.Tensor, index: torch.Tensor, nbrs: torch.Tensor, bank: ShardedMemoryBank,
             T: float, kl_weight: float = 0.5) -> Dict[str, torch.Tensor]:
    """feats [B, D]: the global batch's L2-normalised features (all-gathered with gradient),
    index [B], nbrs [B, C] (global ids of A(i)∖{i}, −1 padded; the same on every rank) →
    {"loss": [] (same on every rank), "nbr": [B] the neighbour term, "kl": [B] KL(p‖q)}."""
    world = bank.world_size
    shard = bank.shard.detach().float()  # [R, D]
    logits = feats.float() @ shard.t() / T  # [B, R]
    h, has = nearest_neighbour(bank, index, nbrs)
    with torch.no_grad():
        lq = bank.rows(h) @ shard.t() / T  # [B, R], q's logits (no gradient)
        maxes = torch.stack([logits.amax(1), lq.amax(1)], 1) if logits.shape[1] else \
            torch.full((logits.shape[0], 2), torch.finfo(torch.float32).min, device=logits.device)
        if world > 1:
            maxes = fdist.all_reduce_no_grad(maxes, "max")  # [B, 2]
        m, mq = maxes[:, 0], maxes[:, 1]
        sum_q = torch.exp(lq - mq.unsqueeze(1)).sum(1)  # [B]
        if world > 1:
            sum_q = fdist.all_reduce_no_grad(sum_q, "sum")
    e = torch.exp(logits - m.unsqueeze(1))  # [B, R]
    member = _owned_mask(index, nbrs, bank.start, bank.rows_local)  # [B, R]
    stats = torch.stack([e.sum(1), (e * member).sum(1), (e * (logits - lq)).sum(1)], 1)  # [B, 3]
    if world > 1:
        stats = fdist.all_reduce_sum_with_grad(stats)
    total, in_a, cross = stats.unbind(1)
    nbr = total.log() - in_a.log()  # −log Σ_{A(i)} p_ij
    kl = cross / total - (total.log() + m) + (sum_q.log() + mq)  # KL(p_i ‖ q_i)
    per = nbr + kl_weight * kl * has.float()
    return {"loss": per.mean(), "nbr": nbr.detach(), "kl": kl.detach()}


# ---- the GAN ---------------------------------------------------------------------------------
class Generator(nn.Module):
    """G(a, p, n) → p′: 3d → 2d → d → d with LeakyReLU (slope 0.01), output L2-normalised."""

    def __init__(self, dim: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3 * dim, 2 * dim), nn.LeakyReLU(0.01), nn.Linear(2 * dim, dim),
                                 nn.LeakyReLU(0.01), nn.Linear(dim, dim))

    def forward(self, a: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(torch.cat([a, p, n], 1)), dim=1)  # [B, d]


class Discriminator(nn.Module):
    """D(x, y, z) → logit that (x, y, z) is a real (anchor, positive, negative) triplet:
    3d → d → d/2 → 1 with LeakyReLU; the score is its sigmoid."""

    def __init__(self, dim: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3 * dim, dim), nn.LeakyReLU(0.01), nn.Linear(dim, dim // 2),
                                 nn.LeakyReLU(0.01), nn.Linear(dim // 2, 1))

    def forward(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, y, z], 1)).squeeze(1)  # [B] logits


def _bce(logit: torch.Tensor, target: float) -> torch.Tensor:
    # BCE on sigmoid(logit), in its stable form (autocast refuses BCE on probabilities)
    return F.binary_cross_entropy_with_logits(logit.float(), torch.full_like(logit.float(), target))


def triplet_logits(disc: nn.Module, a, p, n, fake) -> torch.Tensor:
    """D's logits of (a,p,n), (a,p,p′), (a,p′,n) in ONE call (one DDP forward): [3, B]."""
    x = torch.cat([a, a, a]), torch.cat([p, p, fake]), torch.cat([n, fake, n])
    return disc(*x).view(3, -1)


def d_loss(logits: torch.Tensor) -> torch.Tensor:
    """L_D = ½[BCE(D(a,p,n), 1) + ½BCE(D(a,p,p′), 0) + ½BCE(D(a,p′,n), 0)] (p′ detached)."""
    real, fake_p, fake_pn = logits
    return 0.5 * (_bce(real, 1.0) + 0.5 * _bce(fake_p, 0.0) + 0.5 * _bce(fake_pn, 0.0))


def g_loss(logits: torch.Tensor) -> torch.Tensor:
    """L_G = ½BCE(D(a,p,p′), 1) + ½BCE(D(a,p′,n), 1) (logits of the fakes: rows 1 and 2)."""
    return 0.5 * _bce(logits[1], 1.0) + 0.5 * _bce(logits[2], 1.0)


def mining_radius(score: torch.Tensor, R: float) -> torch.Tensor:
    """r = R + (1 − s)(1 − R): a confident D (s → 1) accepts neighbours down to cosine R."""
    return R + (1.0 - score) * (1.0 - R)


# ---- the GAN's stopping rule -----------------------------------------------------------------
class StoppingRule:
    """A GAN epoch budget plus an optional patience on an EMA of the per-epoch mean G loss.

    ``update(mean_g_loss)`` after each GAN epoch: ema ← β·ema + (1 − β)·loss (the first epoch
    sets it); an improvement of more than ``min_delta`` below the best EMA so far makes this
    epoch the best (the caller keeps that G) and resets the count; otherwise the count grows,
    and ``patience`` epochs without improvement stop the stage (``patience`` 0: budget only).
    Returns (is_best, stop). State is plain numbers (checkpointed by the method)."""

    def __init__(self, patience: int = 0, beta: float = 0.5, min_delta: float = 0.0):
        self.patience, self.beta, self.min_delta = patience, beta, min_delta
        self.reset()

    def reset(self) -> None:
        self.ema: Optional[float] = None
        self.best = math.inf
        self.bad = 0
        self.stopped = False

    def update(self, loss: float):
        self.ema = loss if self.ema is None else self.beta * self.ema + (1.0 - self.beta) * loss
        is_best = self.ema < self.best - self.min_delta
        if is_best:
            self.best, self.bad = self.ema, 0
        else:
            self.bad += 1
        self.stopped = self.patience > 0 and self.bad >= self.patience
        return is_best, self.stopped

    def state(self) -> dict:
        return {"ema": self.ema, "best": self.best, "bad": self.bad, "stopped": self.stopped}

    def load(self, s: dict) -> None:
        self.ema, self.best, self.bad, self.stopped = s["ema"], float(s["best"]), int(s["bad"]), bool(s["stopped"])

"""ISL's neighbour loss (Wang et al. 2021, "Instance Similarity Learning for Unsupervised Feature
Representation"; reference code ZiweiWangTHU/ISL) over a sharded memory bank. The GAN, the
mining radius and the stopping rule are fastinst/methods/isl/gan.py; the method that puts them
into stages is fastinst/methods/isl/method.py.

The loss of a global batch of B samples, with p_i = softmax_j(f_i·M_j / T) over all N rows
and A(i) the sample's neighbour set (i included):

    L = (1/B) Σ_i [ −log Σ_{j∈A(i)} p_ij  +  ½·KL(p_i ‖ q_i)·[|A(i)| > 1] ]

q_i = softmax_j(M_h·M_j / T) without gradient, h the member of A(i)∖{i} whose memory row is
nearest M_i (dot product). Every N-wide quantity is a sum over the bank's columns, so each
rank sums over the columns it owns and only [B]-sized sums cross ranks (the row maxima of p's
and q's logits, then one all_reduce of [B, 4] with gradient): `fastinst.core.rows.sharded_exp_sums`,
the primitive `partial_fc_cross_entropy` is built on too:

    KL(p‖q) = E_p[l − l_q] − lse(l) + lse(l_q),   E_p[l − l_q] = Σ_j e^{l_j − m}(l_j − l_qj) / Σ_j e^{l_j − m}
"""
from __future__ import annotations

from typing import Dict

import torch

from ...core import dist as fdist
from ...core.rows import sharded_exp_sums
from ..npid.bank import ShardedMemoryBank


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
    member = _owned_mask(index, nbrs, bank.start, bank.rows_local)  # [B, R]
    # p's and q's row maxima; Σ_j e^{l_j − m} over all columns, over A(i), weighted by l − l_q; Σ_j e^{l_qj − m_q}
    (m, mq), sums = sharded_exp_sums([logits, lq], [(0, None), (0, member), (0, logits - lq), (1, None)], world)
    total, in_a, cross, sum_q = sums.unbind(1)  # [B] each
    nbr = total.log() - in_a.log()  # −log Σ_{A(i)} p_ij
    kl = cross / total - (total.log() + m) + (sum_q.log() + mq)  # KL(p_i ‖ q_i)
    per = nbr + kl_weight * kl * has.float()
    return {"loss": per.mean(), "nbr": nbr.detach(), "kl": kl.detach()}

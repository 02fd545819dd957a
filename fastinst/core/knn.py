"""Weighted kNN classifier: the NPID evaluation protocol.

Follows lemniscate.pytorch ``test.py::kNN`` (Wu et al., 2018, Sec. 3.4): for every query
embedding take the k most cosine-similar training embeddings, weight each neighbour by
exp(s / sigma), sum the weights per class and rank classes by that vote; report top-1
and top-5 accuracy in percent. Defaults k = 200, sigma = 0.07 as in the paper.

Memory stays bounded by processing ``chunk`` queries at a time: one [chunk, N_local]
similarity block plus [chunk, k] candidates.

Sharded training features (the memory bank owns a contiguous block of rows per rank):
each rank takes its local top-k per query, the (similarity, label) candidates of all
ranks are all-gathered, and the global top-k is the top-k of those W*k candidates, which
equals the single-process top-k (up to the order of exact ties). Every rank must pass
the same queries and ends up with the same result.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = ["knn_classify"]


def _gather_candidates(
    vals: Tensor, labels: Tensor, k: int, group: Optional[dist.ProcessGroup]
) -> tuple[Tensor, Tensor]:
    """All-gather per-rank top-k candidates, padded to exactly k columns."""
    c, kk = vals.shape  # [chunk, k_local], k_local = min(k, N_local)
    if kk < k:
        # Shards smaller than k: pad with -inf similarity so padding is never selected
        # ahead of a real neighbour (and weighs exp(-inf) = 0 if it ever were).
        vals = torch.cat([vals, vals.new_full((c, k - kk), float("-inf"))], dim=1)  # [c, k]
        labels = torch.cat([labels, labels.new_zeros((c, k - kk))], dim=1)  # [c, k]
    world = dist.get_world_size(group)
    all_vals = [torch.empty_like(vals) for _ in range(world)]
    all_labels = [torch.empty_like(labels) for _ in range(world)]
    dist.all_gather(all_vals, vals.contiguous(), group=group)
    dist.all_gather(all_labels, labels.contiguous(), group=group)
    return torch.cat(all_vals, dim=1), torch.cat(all_labels, dim=1)  # [c, W*k] each


def _global_count(n: int, device: torch.device, group: Optional[dist.ProcessGroup]) -> Tensor:
    """[W] tensor of every rank's value of ``n``."""
    t = torch.tensor([n], dtype=torch.long, device=device)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t, group=group)
    return torch.cat(out)  # [W]


@torch.no_grad()
def knn_classify(
    query_feats: Tensor,
    query_labels: Tensor,
    train_feats: Tensor,
    train_labels: Tensor,
    num_classes: int,
    k: int = 200,
    sigma: float = 0.07,
    chunk: int = 1024,
    distributed: bool = False,
    group: Optional[dist.ProcessGroup] = None,
) -> Dict[str, float]:
    """Weighted-kNN top-1 / top-5 accuracy (%) of ``query_feats`` against ``train_feats``.

    query_feats [Q, D], query_labels [Q]: identical on every rank when distributed.
    train_feats [N_local, D], train_labels [N_local]: this rank's rows (all rows when not
        distributed). Rows need not be unit length: similarities are exact cosines
        (queries are normalised; train rows are divided by their norms on the fly, which
        avoids copying an N x D bank).
    Returns dict(top1=%, top5=%, n=Q). With fewer than 5 classes top-5 is over all classes.
    """
    if query_feats.dim() != 2 or train_feats.dim() != 2:
        raise ValueError("query_feats and train_feats must be 2-D [rows, dim]")
    if query_feats.shape[1] != train_feats.shape[1]:
        raise ValueError(
            f"feature dims differ: queries {query_feats.shape[1]}, train {train_feats.shape[1]}"
        )
    if k < 1 or chunk < 1 or sigma <= 0:
        raise ValueError(
            f"need k >= 1, chunk >= 1, sigma > 0 (got k={k}, chunk={chunk}, sigma={sigma})"
        )
    device = train_feats.device
    n_query = query_feats.shape[0]

    if distributed:
        # Collectives must be entered the same number of times on every rank; check the
        # query count up front so a mismatch fails loudly on all ranks instead of hanging.
        counts = _global_count(n_query, device, group)  # [W]
        if not bool((counts == n_query).all()):
            raise ValueError(
                "distributed kNN needs the same queries on every rank; "
                f"query counts per rank: {counts.tolist()}"
            )
        n_train = int(_global_count(train_feats.shape[0], device, group).sum())
    else:
        n_train = train_feats.shape[0]
    if n_train == 0:
        raise ValueError("knn_classify needs at least one training row")
    k_global = min(k, n_train)
    k_local = min(k, train_feats.shape[0])

    train_labels = train_labels.to(device=device, dtype=torch.long)  # [N_local]
    # 1/|t| per train row, so q . t / |t| is the cosine without normalising a copy.
    # dtype= accumulates in fp32 without materialising an fp32 copy of an fp16 bank.
    norms = torch.linalg.vector_norm(train_feats, dim=1, dtype=torch.float32)  # [N_local]
    inv_norm = norms.clamp_min(1e-12).reciprocal()  # [N_local]
    n_top5 = min(5, num_classes)
    correct1 = torch.zeros((), dtype=torch.long, device=device)
    correct5 = torch.zeros((), dtype=torch.long, device=device)

    for start in range(0, n_query, chunk):
        q = query_feats[start : start + chunk].to(device)  # [c, D]
        target = query_labels[start : start + chunk].to(device=device, dtype=torch.long)  # [c]
        q = F.normalize(q.float(), dim=1).to(train_feats.dtype)  # [c, D] unit rows
        sims = (q @ train_feats.t()).float() * inv_norm  # [c, N_local] cosines
        vals, idx = sims.topk(k_local, dim=1)  # [c, k_local]
        labels = train_labels[idx]  # [c, k_local]
        del sims

        if distributed:
            vals, labels = _gather_candidates(vals, labels, k, group)  # [c, W*k]
            vals, pos = vals.topk(k_global, dim=1)  # [c, k_global] global top-k
            labels = labels.gather(1, pos)  # [c, k_global]

        # exp(s/sigma) up to a per-query factor exp(-s_max/sigma): the vote ranking is
        # unchanged, and small sigma cannot overflow fp32 (exp(1/0.01) would).
        weights = ((vals - vals[:, :1]) / sigma).exp()  # [c, k], vals sorted descending
        votes = torch.zeros(q.shape[0], num_classes, device=device)  # [c, C]
        votes.scatter_add_(1, labels, weights)  # [c, C] summed weight per class
        # Stable sort: classes with equal votes (typically zero votes when k is small)
        # rank by class index, so top-5 is deterministic rather than kernel-dependent.
        pred = votes.sort(dim=1, descending=True, stable=True).indices[:, :n_top5]  # [c, n_top5]
        hit = pred == target[:, None]  # [c, n_top5]
        correct1 += hit[:, 0].sum()
        correct5 += hit.any(dim=1).sum()

    # One host sync at the end, not per chunk.
    denom = max(n_query, 1)
    return {
        "top1": 100.0 * correct1.item() / denom,
        "top5": 100.0 * correct5.item() / denom,
        "n": n_query,
    }

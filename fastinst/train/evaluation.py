"""kNN evaluation during training (NPID's weighted-kNN protocol) on the eval transform.

`EvalData` builds the eval loaders on first use; `evaluate` embeds the val split with the
method's ``knn_embed`` and classifies it against the method's own training rows (NPID's
bank, PIC's classifier: ``train_features()``) or recomputed train embeddings.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.distributed as dist

from ..core.knn import knn_classify
from ..core.model import autocast_context
from ..core.runtime import DistEnv


class EvalData:
    """Eval-transform loaders, built on first use: val queries and (for features=recompute)
    the train split in eval mode."""

    def __init__(self, cfg, env: DistEnv):
        self.cfg, self.env, self._loaders = cfg, env, {}

    def check(self) -> None:
        if self.cfg.train.eval_every > 0:
            self.loader(self.cfg.data.val_split)  # start-up: the val split exists and is readable

    def close(self) -> None:
        for ld in self._loaders.values():
            ld.close()

    def loader(self, split: str):
        if split not in self._loaders:
            from loaders import build_loader

            self._loaders[split] = build_loader(self.cfg, split, mode="eval", env=self.env)
        return self._loaders[split]


def gather_rows(x: torch.Tensor, world: int) -> torch.Tensor:
    """Concatenate every rank's rows (row counts may differ by rank) on every rank."""
    if world == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(counts, n)
    counts = [int(c) for c in counts]
    pad = x.new_zeros((max(counts),) + tuple(x.shape[1:]))
    pad[:x.shape[0]] = x
    parts = [torch.empty_like(pad) for _ in range(world)]
    dist.all_gather(parts, pad)
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


@torch.no_grad()
def embed_split(method, data: EvalData, split: str, amp: str):
    """Eval-transform embeddings of this rank's rows of ``split``: (feats [n, D], labels [n])."""
    device, feats, labels = data.env.device, [], []
    loader = data.loader(split)
    loader.set_epoch(0)
    for batch in loader:
        with autocast_context(device.type, amp):
            feats.append(method.knn_embed(batch["views"][0].to(device, non_blocking=True)).float())
        labels.append(batch["label"].to(device))
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def evaluate(method, data: EvalData, amp: str, num_classes: int, features: Optional[str] = None) -> Dict[str, float]:
    """Weighted kNN (NPID protocol): val embeddings vs the method's training rows or recomputed
    train embeddings; the method's modules are evaluated in eval mode and put back after."""
    cfg, env = data.cfg, data.env
    features = features or cfg.eval.features
    method.flush()  # e.g. PIC's classifier rows, read as kNN train features
    nets = list(method.trained_modules().values())
    modes = [m.training for m in nets]
    for m in nets:
        m.eval()
    try:
        q, ql = embed_split(method, data, cfg.data.val_split, amp)
        q, ql = gather_rows(q, env.world), gather_rows(ql, env.world)  # every rank: all queries
        train = method.train_features() if features == "bank" else None
        if train is None:
            train = embed_split(method, data, cfg.data.train_split, amp)
        classes = cfg.data.num_classes or max(num_classes, int(ql.max()) + 1)
        res = knn_classify(q, ql, train[0], train[1], classes, k=cfg.eval.knn_k, sigma=cfg.eval.knn_sigma,
                           distributed=env.world > 1)
    finally:
        for m, mode in zip(nets, modes):
            m.train(mode)
    return {"knn_top1": res["top1"], "knn_top5": res["top5"]}

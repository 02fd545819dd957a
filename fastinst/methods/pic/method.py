"""PIC: parametric instance classification (Cao et al. 2020; reference code bl0/PIC,
``contrast/models/PIC.py``, ``scripts/PIC.sh``).

Every training image is a class with one learnable 128-d row of an N×128 classifier
(`fastinst.methods.pic.classifier.ShardedClassifier`: rows sharded by rank, cosine logits / T = 0.2, a
Partial-FC cross-entropy). Per step:

1. embed the views (the engine's model: ResNet + MLP head, PIC ``--mlp-head``); one forward
   per crop size;
2. the first crop group (1×160 in PIC's multi-crop) is classified against the weight with
   gradient; the other (small, 3×96) crops against the *detached* weight — PIC blocks the
   classifier gradient of small crops (``sim_matrix_detach``); the loss is the mean
   cross-entropy over all views' rows, as PIC's single ``F.cross_entropy`` over the
   concatenated logits;
3. optional negative sampling (``method.pic.negatives`` = K > 0): the softmax covers the
   batch's positives plus K rows shared by the global batch — the K most recently visited
   instances or K uniform rows — and `LazySGD` applies the skipped momentum / weight-decay
   steps of the other rows in closed form when they are next read (exactly dense SGD).

The classifier is not part of the DDP model (DDP would average gradients of different rows)
and has its own `LazySGD` with the model's lr schedule, momentum and weight decay: the second
entry of ``optimizers``. The sliding-window sampler (``sampler.kind=
sliding_window``) rescales epochs and warm-up by N/window in the engine, as PIC's
main_pretrain.py does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import nn

from ...config import check
from ...core import dist as fdist
from ...core.runtime import generator
from ..base import BuildContext, Method, check_row_layout, embed_views
from ..registry import register
from .classifier import ShardedClassifier
from .lazysgd import LazySGD


@dataclass(frozen=True, kw_only=True)
class PICConfig:
    """PIC (Cao et al. 2020; bl0/PIC scripts/PIC.sh). Window / stride live in sampler.*."""

    T: float = 0.2  # --contrast-temperature 0.2 (cosine logits / T)
    # 0 = full softmax over all N classifier rows (the released PIC); K > 0 = softmax over the
    # batch's positives plus K sampled rows shared by the global batch, with the lazy
    # weight-update correction for rows not sampled (the paper's unreleased variant).
    negatives: int = 0
    # recent: the K most recently visited instances (a FIFO of global batch indices; with the
    # sliding-window sampler these are rows of the current window); uniform: K rows drawn
    # uniformly from all N each step.
    sampling: Literal["recent", "uniform"] = "recent"
    # Per-element std of the initial classifier rows (PIC: nn.init.normal_(sim_matrix, 0, 0.01)).
    # Rows are normalised in the logits, so |w| only sets the effective step size (~1/|w|^2):
    # unit-norm rows would learn ~100x slower than PIC's.
    init_std: float = 0.01

    def __post_init__(self):
        check(self.T > 0, "method.pic.T", "temperature must be > 0 (PIC uses 0.2)")
        check(self.init_std > 0, "method.pic.init_std", "must be > 0 (PIC uses 0.01)")
        check(self.negatives >= 0, "method.pic.negatives", "must be >= 0 (0 = full softmax)")


@register("pic")
class PIC(Method):
    """PIC objective + this rank's classifier shard (state and its own optimiser); trains
    ``encoder`` and the classifier."""

    Config = PICConfig

    def __init__(self, encoder: nn.Module, num_samples: int, *, embed_dim: int = 128, T: float = 0.2,
                 large_views: int = 1, negatives: int = 0, sampling: str = "recent", init_std: float = 0.01,
                 rank: int = 0, world_size: int = 1, seed: int = 0, device=None,
                 labels: Optional[torch.Tensor] = None):
        super().__init__(encoder=encoder)
        self.classifier = ShardedClassifier(num_samples, embed_dim, T, rank=rank, world_size=world_size,
                                            device=device, seed=seed)
        with torch.no_grad():  # init_rows has unit-variance rows (|w| ~ 1): rescale to std init_std
            self.classifier.weight.mul_(init_std * math.sqrt(embed_dim))
        self.num_samples, self.large_views, self.seed = num_samples, large_views, seed
        self.num_negatives, self.sampling = negatives, sampling
        self.optimizer: Optional[LazySGD] = None  # built by optimizers() / make_optimizer()
        self._step = 0
        # Labels of the rows this rank owns, for kNN on the classifier rows (never trained on).
        c = self.classifier
        self.labels = None if labels is None else labels[c.start:c.end].clone()
        if negatives > 0 and sampling == "recent":
            # FIFO of the global indices visited last (same on every rank: filled with the
            # all-gathered batch indices). Starts as a uniform draw, so the first K/B steps
            # sample uniformly; afterwards the negatives are the K latest instances.
            g = generator(seed, "pic-recent")
            self.register_buffer("recent", torch.randint(num_samples, (negatives,), generator=g).to(device))  # [K]
            self.register_buffer("recent_ptr", torch.zeros((), dtype=torch.long, device=device))  # []

    @classmethod
    def from_config(cls, c: PICConfig, encoder: nn.Module, ctx: BuildContext) -> "PIC":
        check_row_layout(ctx, key="method.pic.negatives", k=c.negatives, rows="sampled rows",
                         fix="lower it, or use 0 for the full softmax", sharded="the PIC classifier")
        return cls(encoder, ctx.num_samples, embed_dim=ctx.embed_dim, T=c.T, large_views=ctx.view_groups[0],
                   negatives=c.negatives, sampling=c.sampling, init_std=c.init_std, rank=ctx.env.rank,
                   world_size=ctx.env.world, seed=ctx.seed, device=ctx.env.device, labels=ctx.labels)

    # ---- protocol --------------------------------------------------------------------------
    def optimizers(self, make):
        """The encoder's ``train.optimizer``, and the classifier's LazySGD with the same schedule,
        momentum and weight decay, like PIC's one SGD over model + sim_matrix."""
        opts = super().optimizers(make)
        opts["classifier"] = (self.make_optimizer(make.lr, make.momentum, make.weight_decay), make.schedule)
        return opts

    def make_optimizer(self, lr: float, momentum: float, weight_decay: float) -> LazySGD:
        self.optimizer = self.classifier.make_optimizer(lr, momentum, weight_decay)
        return self.optimizer

    def before_step(self, step: int) -> None:
        self._step = step  # seeds the uniform negatives: a resumed run draws the same rows

    def _negatives(self, device) -> Optional[torch.Tensor]:
        """[K] global row indices shared by the global batch (identical on every rank), or None."""
        if self.num_negatives == 0:
            return None
        if self.sampling == "recent":
            return self.recent.clone()  # [K]; a copy: after_step overwrites the buffer
        g = generator(self.seed, "pic-negatives", self._step)
        return torch.randint(self.num_samples, (self.num_negatives,), generator=g).to(device)  # [K]

    def forward(self, batch: dict) -> dict:
        device = self.classifier.weight.device
        index = batch["index"].to(device, non_blocking=True)  # [B] dataset rows
        views = [v.to(device, non_blocking=True) for v in batch["views"]]
        feats = embed_views(self.nets["encoder"], views)  # V x [B, D]
        negs = self._negatives(device)
        nl, ns = self.large_views, len(views) - self.large_views
        large = feats[0] if nl == 1 else torch.cat(feats[:nl])  # [nl*B, D]
        loss = self.classifier(large, index.repeat(nl), negatives=negs) * nl
        if ns:
            small = feats[nl] if ns == 1 else torch.cat(feats[nl:])  # [ns*B, D]
            # PIC: small crops train the network, not the classifier (detached weight).
            loss = loss + self.classifier(small, index.repeat(ns), detach_weight=True, negatives=negs) * ns
        return {"loss": loss / (nl + ns), "index": index}

    @torch.no_grad()
    def after_step(self, out: dict, ok: torch.Tensor) -> None:
        if self.num_negatives > 0 and self.sampling == "recent":  # this step's rows, where ok
            idx = fdist.all_gather_no_grad(out["index"])[-self.num_negatives:]  # [B_global'] newest last
            k = self.recent.shape[0]
            rows = (self.recent_ptr + torch.arange(idx.shape[0], device=idx.device)) % k  # [B']
            self.recent.index_copy_(0, rows, torch.where(ok, idx, self.recent.index_select(0, rows)))
            self.recent_ptr.copy_(torch.where(ok, (self.recent_ptr + idx.shape[0]) % k, self.recent_ptr))

    @torch.no_grad()
    def flush(self) -> None:
        if self.optimizer is not None:
            self.optimizer.flush()  # rows not sampled lately get their skipped SGD steps

    @torch.no_grad()
    def train_features(self):
        """(normalised classifier rows [rows_local, D], labels [rows_local]) for weighted kNN:
        the classifier rows play the role of NPID's memory bank."""
        if self.labels is None:
            return None
        self.flush()
        w = torch.nn.functional.normalize(self.classifier.weight.detach().float(), dim=1)
        return w, self.labels.to(w.device)

    def extra_repr(self) -> str:
        return (f"large_views={self.large_views}, negatives={self.num_negatives}"
                + (f" ({self.sampling})" if self.num_negatives else " (full softmax)"))

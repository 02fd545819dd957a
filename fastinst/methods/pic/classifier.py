"""PIC's parametric instance classifier, sharded across ranks, and its lazy SGD.

PIC (Cao et al. 2020, "Parametric Instance Classification for Unsupervised Visual Feature
Learning") classifies every training image as its own class: one learnable 128-d weight row
per image, cosine logits s = <x/|x|, w/|w|> / T with T = 0.2, cross-entropy on the image's
own index.  Two pieces the authors described but never released live here:

* negative sampling: a step's logits cover only the batch's positives plus a set of sampled
  negative rows (shared by the batch), so the cost does not grow with N;
* the weight-update correction: rows outside that set get no gradient, yet dense SGD with
  momentum and weight decay would still move them.  `LazySGD` updates only the touched rows
  and, when a row is next read (or on `flush()`), first applies the skipped steps in closed
  form, so training is *exactly* dense `torch.optim.SGD` on the full weight matrix.

Sharding (the sharded-rows block, fastinst/core/rows.py, as NPID's bank): rank r of W owns rows
[start, end); the weight is a plain `nn.Parameter` of that block only.  It must NOT be
given to DDP: build the classifier as a separate module beside the DDP-wrapped backbone (not
a submodule of it) and step it with its own `LazySGD`.  DDP would otherwise all-reduce (and
average) gradients of different rows as if they were replicas of one tensor.

Gradient convention (fastinst/core/dist.py): every rank returns the single-process loss L of the
global batch.  Local features get W·dL/dx (DDP's ÷W then gives the single-process backbone
gradient, as in nce.py).  The weight shard is not averaged by anyone, so its path carries a
1/W gradient scale: `weight.grad` is exactly dL/dW for the rows this rank owns.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...core import dist as fdist
from ...core.rows import ShardedRows, partial_fc_cross_entropy
from .lazysgd import LazySGD

PIC_TEMPERATURE = 0.2  # PIC seed: --contrast-temperature 0.2


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient × scale backward (the weight's 1/W, see module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def _scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    return x if scale == 1.0 else _ScaleGrad.apply(x, scale)


# ---- the classifier ----------------------------------------------------------------------------
class ShardedClassifier(ShardedRows):
    """Rank `rank`'s block of PIC's N×D instance classifier (`weight`, [end−start, D]).

    forward(local_feats [B_local, D], local_index [B_local]) → the global-batch loss.
    Features are all-gathered (with gradient), so every rank sees the same B = W·B_local rows
    and `negatives` (if given) must be the same global indices on every rank.

    With a `LazySGD` from `make_optimizer`, forward first brings the rows it reads up to date
    (the skipped decay/momentum steps), so it always sees what dense SGD would hold.
    """

    what, short = "PIC classifier", "classifier"

    def __init__(self, num_rows: int, dim: int = 128, temperature: float = PIC_TEMPERATURE, *,
                 rank: int = 0, world_size: int = 1, dtype=torch.float32, device=None,
                 seed: int = 0):
        super().__init__(num_rows, dim, rank=rank, world_size=world_size)
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype={dtype}: keep the classifier weight in float32 (float64 for "
                             "tests); SGD on bf16/fp16 rows loses the small updates")
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0 (PIC uses 0.2)")
        self.temperature = float(temperature)
        # Same chunk-seeded init as the NPID bank: a row's initial value does not depend on W,
        # which is what makes sharded == unsharded testable.  Scale is irrelevant to the
        # logits (rows are normalised) but sets |w|, hence the effective step size.
        self.weight = nn.Parameter(self.init_table(seed).to(device=device, dtype=dtype))  # [rows_local, D]
        self._optimizer: Optional[LazySGD] = None  # set by make_optimizer (not a submodule)

    @property
    def table(self) -> torch.Tensor:
        return self.weight

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, T={self.temperature}"

    def make_optimizer(self, lr: float, momentum: float = 0.9,
                       weight_decay: float = 0.0) -> LazySGD:
        """The classifier's own optimiser (never the backbone's, never DDP's); forward uses it
        to catch rows up before reading them."""
        opt = LazySGD([self.weight], lr=lr, momentum=momentum, weight_decay=weight_decay)
        self._optimizer = opt
        return opt

    # ---- loss ---------------------------------------------------------------------------------
    def forward(self, local_feats: torch.Tensor, local_index: torch.Tensor,
                detach_weight: bool = False,
                negatives: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Cross-entropy of each sample on its own instance index.

        negatives=None: full softmax over all N rows.  negatives=[K] global row indices:
        softmax over the set positives ∪ negatives (deduplicated), so only those rows get
        gradient.  detach_weight=True (PIC's small multi-crop views): the weight gets no
        gradient from this loss; features still do.
        """
        device = self.weight.device
        feats = fdist.all_gather_with_grad(local_feats.to(self.weight.dtype))  # [B, D]
        index = fdist.all_gather_no_grad(local_index.to(device))  # [B]
        # Cosine logits / 0.2 in the weight's precision: keep autocast out of the loss.
        with torch.autocast(device_type=device.type, enabled=False):
            f = F.normalize(feats, dim=1)  # [B, D]
            if negatives is None:
                logits, pos = self._full_logits(f, index, detach_weight)
            else:
                logits, pos = self._sampled_logits(f, index, negatives.to(device), detach_weight)
            return partial_fc_cross_entropy(logits, pos, self.world_size)

    def _weight_path(self, rows: torch.Tensor, detach: bool) -> torch.Tensor:
        # 1/W: the all-reduce backward hands this shard W·dL/d(logits); nobody averages it.
        return rows.detach() if detach else _scale_grad(rows, 1.0 / self.world_size)

    def _full_logits(self, f, index, detach):
        if self._optimizer is not None:
            self._optimizer.flush()  # no-op when every row was stepped last step (the usual case)
        w = F.normalize(self._weight_path(self.weight, detach), dim=1)  # [rows_local, D]
        logits = f @ w.t() / self.temperature  # [B, rows_local]
        return logits, self.owned_logit(logits, index)

    def _sampled_logits(self, f, index, negatives, detach):
        # Host sync: the size of the deduplicated set is data-dependent.  Dedup matters: a
        # negative equal to a positive (or drawn twice) must not count twice in the softmax.
        cols = torch.unique(torch.cat([index, negatives.reshape(-1)]))  # [C] sorted global rows
        # Shards are contiguous row blocks, so this rank's columns are one contiguous run.
        bounds = torch.tensor([self.start, self.end], device=cols.device, dtype=cols.dtype)
        lo, hi = torch.searchsorted(cols, bounds).tolist()
        local_cols = cols[lo:hi] - self.start  # [C_own]
        if self._optimizer is not None:
            self._optimizer.catch_up(local_cols)
        if detach:
            rows = self.weight.detach()[local_cols]  # [C_own, D]
        else:
            # sparse=True: weight.grad is a sparse tensor over exactly these rows, which is
            # what tells LazySGD which rows this step touched (no N×D dense gradient).
            rows = self._weight_path(F.embedding(local_cols, self.weight, sparse=True), False)
        w = F.normalize(rows, dim=1)  # [C_own, D]
        logits = f @ w.t() / self.temperature  # [B, C_own]
        if hi == lo:  # this rank owns none of the columns: contributes only zeros
            return logits, torch.zeros_like(f[:, 0])
        col = (torch.searchsorted(cols, index) - lo).clamp(0, hi - lo - 1)  # [B]
        pos = torch.where(self.owner_mask(index), logits.gather(1, col.unsqueeze(1)).squeeze(1), 0.0)  # [B]
        return logits, pos

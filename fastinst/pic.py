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

Sharding (same layout as `ShardedMemoryBank`): rank r of W owns rows [start, end) from
`shard_bounds`; the weight is a plain `nn.Parameter` of that block only.  It must NOT be
given to DDP: build the classifier as a separate module beside the DDP-wrapped backbone (not
a submodule of it) and step it with its own `LazySGD`.  DDP would otherwise all-reduce (and
average) gradients of different rows as if they were replicas of one tensor.

Gradient convention (fastinst/dist.py): every rank returns the single-process loss L of the
global batch.  Local features get W·dL/dx (DDP's ÷W then gives the single-process backbone
gradient, as in nce.py).  The weight shard is not averaged by anyone, so its path carries a
1/W gradient scale: `weight.grad` is exactly dL/dW for the rows this rank owns.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import dist as fdist
from .memory import check_shard_layout, gather_row_shards, init_rows, shard_bounds

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
class ShardedClassifier(nn.Module):
    """Rank `rank`'s block of PIC's N×D instance classifier (`weight`, [end−start, D]).

    forward(local_feats [B_local, D], local_index [B_local]) → the global-batch loss.
    Features are all-gathered (with gradient), so every rank sees the same B = W·B_local rows
    and `negatives` (if given) must be the same global indices on every rank.

    With a `LazySGD` from `make_optimizer`, forward first brings the rows it reads up to date
    (the skipped decay/momentum steps), so it always sees what dense SGD would hold.
    """

    def __init__(self, num_rows: int, dim: int = 128, temperature: float = PIC_TEMPERATURE, *,
                 rank: int = 0, world_size: int = 1, dtype=torch.float32, device=None,
                 seed: int = 0):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if num_rows < world_size:
            raise ValueError(f"num_rows={num_rows} < world_size={world_size}: "
                             "every rank needs at least one classifier row")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype={dtype}: keep the classifier weight in float32 (float64 for "
                             "tests); SGD on bf16/fp16 rows loses the small updates")
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0 (PIC uses 0.2)")
        self.num_rows, self.dim, self.temperature = num_rows, dim, float(temperature)
        self.rank, self.world_size = rank, world_size
        self.start, self.end = shard_bounds(num_rows, rank, world_size)
        # Same chunk-seeded init as the NPID bank: a row's initial value does not depend on W,
        # which is what makes sharded == unsharded testable.  Scale is irrelevant to the
        # logits (rows are normalised) but sets |w|, hence the effective step size.
        w = init_rows(self.start, self.end, dim, seed).to(device=device, dtype=dtype)
        self.weight = nn.Parameter(w)  # [rows_local, D]
        self._optimizer: Optional["LazySGD"] = None  # set by make_optimizer (not a submodule)

    @property
    def rows_local(self) -> int:
        return self.end - self.start

    def extra_repr(self) -> str:
        return (f"num_rows={self.num_rows}, dim={self.dim}, T={self.temperature}, "
                f"rank={self.rank}/{self.world_size}, rows=[{self.start}, {self.end})")

    def make_optimizer(self, lr: float, momentum: float = 0.9,
                       weight_decay: float = 0.0) -> "LazySGD":
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
            return self._cross_entropy(logits, pos)

    def _weight_path(self, rows: torch.Tensor, detach: bool) -> torch.Tensor:
        # 1/W: the all-reduce backward hands this shard W·dL/d(logits); nobody averages it.
        return rows.detach() if detach else _scale_grad(rows, 1.0 / self.world_size)

    def _full_logits(self, f, index, detach):
        if self._optimizer is not None:
            self._optimizer.flush()  # no-op when every row was stepped last step (the usual case)
        w = F.normalize(self._weight_path(self.weight, detach), dim=1)  # [rows_local, D]
        logits = f @ w.t() / self.temperature  # [B, rows_local]
        owned = (index >= self.start) & (index < self.end)  # [B]
        local = (index - self.start).clamp(0, self.rows_local - 1)  # [B]
        pos = torch.where(owned, logits.gather(1, local.unsqueeze(1)).squeeze(1), 0.0)  # [B]
        return logits, pos

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
        owned = (index >= self.start) & (index < self.end)  # [B]
        if hi == lo:  # this rank owns none of the columns: contributes only zeros
            return logits, torch.zeros_like(f[:, 0])
        col = (torch.searchsorted(cols, index) - lo).clamp(0, hi - lo - 1)  # [B]
        pos = torch.where(owned, logits.gather(1, col.unsqueeze(1)).squeeze(1), 0.0)  # [B]
        return logits, pos

    def _cross_entropy(self, logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """mean_b(logsumexp over all ranks' columns − positive logit), Partial-FC style: only
        the row max ([B]) and the stacked [sum-exp, positive] ([B, 2]) cross ranks."""
        if logits.shape[1] > 0:
            m = logits.detach().amax(1)  # [B]; a constant shift, its gradient cancels
        else:
            m = torch.full_like(pos.detach(), torch.finfo(logits.dtype).min)  # [B]
        if self.world_size > 1:
            m = fdist.all_reduce_no_grad(m, "max")
        sumexp = torch.exp(logits - m.unsqueeze(1)).sum(1)  # [B]
        stats = torch.stack([sumexp, pos], 1)  # [B, 2]: one collective for both
        if self.world_size > 1:
            stats = fdist.all_reduce_sum_with_grad(stats)
        return (stats[:, 0].log() + m - stats[:, 1]).mean()

    # ---- inspection / checkpointing ---------------------------------------------------------
    @torch.no_grad()
    def gather_full(self) -> torch.Tensor:
        """The whole N×D weight on every rank (eval / tests; call optimizer.flush() first)."""
        if self.world_size == 1:
            return self.weight.detach().clone()
        return gather_row_shards(self.weight.detach(), self.num_rows, self.world_size)  # [N, D]

    def _layout(self) -> dict:
        return dict(num_rows=self.num_rows, dim=self.dim, rank=self.rank,
                    world_size=self.world_size, start=self.start, end=self.end)

    def get_extra_state(self) -> dict:
        return self._layout()

    def set_extra_state(self, state: dict) -> None:
        check_shard_layout(state, self._layout(), "PIC classifier", "classifier")  # runs in load_state_dict


# ---- lazy SGD with the weight-update correction -------------------------------------------------
def _step_matrix(lr: float, momentum: float, weight_decay: float) -> list:
    """A_t for a step with zero loss-gradient, acting on the row state s = [w; v]:
    v' = μ v + λ w;  w' = w − η v' = (1 − ηλ) w − ημ v."""
    return [[1.0 - lr * weight_decay, -lr * momentum], [weight_decay, momentum]]


class _StepProducts:
    """Segment tree over the per-step matrices A_0, A_1, …: node i covers a dyadic range of
    steps [a, b) and holds A_{b−1}⋯A_a (later steps on the left).

    Why a tree and not prefix products P_t = A_{t−1}⋯A_0 with A_{t−1}⋯A_c = P_t P_c⁻¹:
    det A_t = μ, so P_c⁻¹ grows like μ^(−c) (0.9^(−10⁴) overflows) and the difference of
    large terms cancels catastrophically after a few hundred steps.  The tree only multiplies
    contraction-like matrices: appending a step updates log2(cap) ancestors; a query for
    [c, t) combines ≤ 2·log2(cap) nodes, vectorised over all queried rows.  Storage: 2·cap
    2×2 float64 nodes (64·cap bytes: 32 MB for 500k steps), capacity doubled (rebuilt in
    O(T)) when full.  A CPU master copy takes the per-step path updates (tiny scalar work,
    no kernel launches); the touched nodes are copied to the device copy used by queries.
    """

    INITIAL_CAPACITY = 1024  # steps; doubled when full

    def __init__(self, momentum: float, weight_decay: float, device, lrs=()):
        self.momentum, self.weight_decay, self.device = momentum, weight_decay, device
        self.lrs: list = [float(x) for x in lrs]  # η_t of every step taken (exact float64)
        capacity = self.INITIAL_CAPACITY
        while capacity <= len(self.lrs):  # room for the next step without a rebuild
            capacity *= 2
        self._build(capacity)  # O(T) vectorised rebuild on resume

    def _build(self, capacity: int) -> None:
        self.cap = capacity
        nodes = torch.eye(2, dtype=torch.float64).repeat(2 * capacity, 1, 1)  # [2cap, 2, 2]
        if self.lrs:
            lr = torch.tensor(self.lrs, dtype=torch.float64)  # [T]
            mu, wd = torch.full_like(lr, self.momentum), torch.full_like(lr, self.weight_decay)
            top = torch.stack([1.0 - lr * self.weight_decay, -lr * self.momentum], 1)  # [T, 2]
            leaves = torch.stack([top, torch.stack([wd, mu], 1)], 1)  # [T, 2, 2] = _step_matrix
            nodes[capacity:capacity + len(self.lrs)] = leaves
        n = capacity // 2
        while n >= 1:  # level by level: node i = right child @ left child
            nodes[n:2 * n] = nodes[2 * n + 1:4 * n:2] @ nodes[2 * n:4 * n:2]
            n //= 2
        self.master = nodes  # [2cap, 2, 2] CPU
        self.nodes = nodes if torch.device(self.device).type == "cpu" else nodes.to(self.device)

    @property
    def steps(self) -> int:
        return len(self.lrs)

    def append(self, lr: float) -> None:
        if self.steps == self.cap:
            self._build(2 * self.cap)  # amortised O(1) per step
        i = self.cap + self.steps
        self.lrs.append(float(lr))
        self.master[i] = torch.tensor(_step_matrix(lr, self.momentum, self.weight_decay),
                                      dtype=torch.float64)
        path = [i]
        i //= 2
        while i >= 1:
            self.master[i] = self.master[2 * i + 1] @ self.master[2 * i]
            path.append(i)
            i //= 2
        if self.nodes is not self.master:
            idx = torch.tensor(path)
            self.nodes[idx.to(self.device)] = self.master[idx].to(self.device)

    def query(self, first: torch.Tensor) -> torch.Tensor:
        """[R, 2, 2] float64: A_{t−1}⋯A_c for each c in `first` ([R] int64), t = steps."""
        r_count = first.shape[0]
        eye = torch.eye(2, dtype=torch.float64, device=first.device).expand(r_count, 2, 2)
        acc_l, acc_r = eye.clone(), eye.clone()  # [R, 2, 2] each
        lo = first + self.cap  # [R]
        hi = torch.full_like(lo, self.steps + self.cap)  # [R]
        top = 2 * self.cap - 1
        for _ in range(self.cap.bit_length()):  # log2(cap) + 1 levels, bottom-up
            active = lo < hi
            take_l = active & (lo % 2 == 1)  # [R]
            acc_l = torch.where(take_l[:, None, None], self.nodes[lo.clamp(max=top)] @ acc_l, acc_l)
            lo = lo + take_l.long()
            take_r = active & (hi % 2 == 1)  # [R]
            hi = hi - take_r.long()
            acc_r = torch.where(take_r[:, None, None], acc_r @ self.nodes[hi.clamp(max=top)], acc_r)
            lo, hi = lo // 2, hi // 2
        return acc_r @ acc_l  # later steps (right side) on the left


class LazySGD(torch.optim.Optimizer):
    """SGD with momentum μ and weight decay λ (dampening 0, no Nesterov) on row-sparse
    parameters, applied only to the rows touched at a step, and exactly equal, after
    `flush()`, to `torch.optim.SGD([w], lr=η_t, momentum=μ, weight_decay=λ)` run densely on
    the full parameter whose untouched rows have zero loss-gradient.

    torch.optim.SGD, per step:  d = g + λw;  v ← d (first step) or μv + d;  w ← w − ηv.
    Since dampening = 0, "v ← d on the first step" equals μ·0 + d: starting every row from
    v = 0 reproduces the dense first step, including rows with g = 0 there (they get v = λ w,
    exactly as the dense buffer does).  With g = 0 the state s = [w; v] evolves linearly:
        s_{t+1} = A_t s_t,   A_t = [[1 − η_t λ, −η_t μ], [λ, μ]]
    so a row last updated at step c is brought to step t by A_{t−1}⋯A_c (`_StepProducts`).

    Touched rows: a sparse `grad` (ShardedClassifier's sampled path) touches its indices
    (duplicates summed by coalesce); a dense `grad` touches every row; `grad=None` touches
    none — but the step still counts (the clock is global, unlike torch's SGD, which skips a
    None-grad parameter).  Every rank must call `step()` at every iteration.
    Read rows only through `catch_up(rows)` / `flush()` (ShardedClassifier does this).
    One param group; params must be float32/float64 with rows along dim 0.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0):
        if lr < 0:
            raise ValueError(f"lr={lr} must be >= 0")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum={momentum} must be in [0, 1)")
        if weight_decay < 0:
            raise ValueError(f"weight_decay={weight_decay} must be >= 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        if len(self.param_groups) != 1:
            raise ValueError("LazySGD takes one param group: the step matrices depend on its "
                             "momentum and weight decay, which all rows must share")
        group = self.param_groups[0]
        for p in group["params"]:
            if p.dtype not in (torch.float32, torch.float64) or p.dim() < 1:
                raise ValueError("LazySGD params must be float32/float64 tensors, rows on dim 0")
        self._tree = _StepProducts(momentum, weight_decay, group["params"][0].device)
        for p in group["params"]:
            self._init_state(p)

    def _init_state(self, p: torch.Tensor) -> None:
        st = self.state[p]
        st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        st["last_step"] = torch.zeros(p.shape[0], dtype=torch.long, device=p.device)  # [rows]

    @property
    def steps(self) -> int:
        """Steps taken so far (the index t of the next step)."""
        return self._tree.steps

    def _check_hyper(self) -> None:
        g = self.param_groups[0]
        if (g["momentum"], g["weight_decay"]) != (self._tree.momentum, self._tree.weight_decay):
            raise ValueError("LazySGD: momentum / weight_decay changed after construction; the "
                             "skipped-step matrices assume fixed values (only lr may change)")

    # ---- the correction -------------------------------------------------------------------------
    @torch.no_grad()
    def _catch_up_param(self, p: torch.Tensor, rows: torch.Tensor) -> None:
        st = self.state[p]
        t = self.steps
        stale = rows[st["last_step"][rows] < t]  # [R]; host sync (data-dependent size)
        if stale.numel() == 0:
            return  # nothing written: a graph holding the weight stays valid
        # Rows touched at the same step share their matrix: query once per distinct step.
        first, inverse = torch.unique(st["last_step"][stale], return_inverse=True)
        mat = self._tree.query(first)[inverse].to(p.dtype)  # [R, 2, 2]
        shape = (-1,) + (1,) * (p.dim() - 1)
        w, v = p[stale], st["momentum_buffer"][stale]  # [R, D] each (copies)
        p[stale] = mat[:, 0, 0].view(shape) * w + mat[:, 0, 1].view(shape) * v
        st["momentum_buffer"][stale] = mat[:, 1, 0].view(shape) * w + mat[:, 1, 1].view(shape) * v
        st["last_step"][stale] = t

    @torch.no_grad()
    def catch_up(self, rows: torch.Tensor, param: Optional[torch.Tensor] = None) -> None:
        """Apply the skipped (gradient-free) steps to `rows` (local indices) of `param`
        (default: the only param), so they hold what dense SGD holds now."""
        self._check_hyper()
        params = self.param_groups[0]["params"]
        if param is None:
            if len(params) != 1:
                raise ValueError("catch_up: pass param= when the optimiser holds several")
            param = params[0]
        self._catch_up_param(param, rows.to(param.device).long())

    @torch.no_grad()
    def flush(self) -> None:
        """Bring every row up to date (before saving, evaluating or a full-softmax forward)."""
        self._check_hyper()
        for p in self.param_groups[0]["params"]:
            self._catch_up_param(p, torch.arange(p.shape[0], device=p.device))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_hyper()
        group = self.param_groups[0]
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue  # no row touched; the global step below still advances
            if p.grad.is_sparse:
                g = p.grad.coalesce()
                rows, grad = g.indices()[0], g.values()  # [R], [R, D]
            else:
                rows = torch.arange(p.shape[0], device=p.device)  # [rows] (dense: all touched)
                grad = p.grad  # [rows, D]
            if rows.numel() == 0:
                continue
            self._catch_up_param(p, rows)
            st = self.state[p]
            # torch.optim.SGD's order: d = g + λw; v = μv + d; w = w − ηv (v starts at 0).
            w = p[rows]  # [R, D]
            d = grad.to(p.dtype).add(w, alpha=wd)  # [R, D]
            v = st["momentum_buffer"][rows].mul_(mu).add_(d)  # [R, D]
            p[rows] = w.add_(v, alpha=-lr)
            st["momentum_buffer"][rows] = v
            st["last_step"][rows] = self.steps + 1
        self._tree.append(lr)  # after the update: rows touched now are already past step t
        return loss

    # ---- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        sd = super().state_dict()
        # Optimizer.load_state_dict casts every tensor in `state` to the param's dtype, which
        # would turn the int64 step counters into floats: keep them (and the lr history that
        # rebuilds the tree) in a section of our own.
        state = {k: dict(v) for k, v in sd["state"].items()}
        last = {k: v.pop("last_step") for k, v in state.items()}
        sd["state"] = state
        sd["lazy_sgd"] = dict(lrs=torch.tensor(self._tree.lrs, dtype=torch.float64),
                              last_step=last)
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("lazy_sgd")
        super().load_state_dict(state_dict)
        lrs = extra["lrs"].tolist()
        self._tree = _StepProducts(self.param_groups[0]["momentum"],
                                   self.param_groups[0]["weight_decay"], self._tree.device,
                                   lrs=lrs)
        for i, p in enumerate(self.param_groups[0]["params"]):
            self.state[p]["last_step"] = extra["last_step"][i].to(device=p.device,
                                                                   dtype=torch.long)

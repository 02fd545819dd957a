"""`LazySGD`: SGD with momentum and weight decay on row-sparse parameters (PIC's classifier
rows), exact to dense SGD: rows not touched in a step get the skipped momentum / weight-decay
steps in closed form when they are next read (the weight-update correction of PIC, Cao et al.
2020, which the authors described but never released).
"""

from __future__ import annotations

from typing import Optional

import torch

from ...core.guard import closure_loss


def _step_matrix(lr: float, momentum: float, weight_decay: float) -> list:
    """A_t for a step with zero loss-gradient, acting on the row state s = [w; v]:
    v' = μ v + λ w;  w' = w − η v' = (1 − ηλ) w − ημ v."""
    return [[1.0 - lr * weight_decay, -lr * momentum], [weight_decay, momentum]]


def _mul2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for [..., 2, 2] matrices, written out as elementwise products and sums: each entry
    has the same bits whether a node is multiplied alone (a step appended) or in a batch (the
    tree rebuilt on resume). A batched matmul need not round like a single one; on an Intel
    Xeon the two differed in the last bit, so a resumed tree answered other products."""
    a00, a01, a10, a11 = a[..., 0, 0], a[..., 0, 1], a[..., 1, 0], a[..., 1, 1]
    b00, b01, b10, b11 = b[..., 0, 0], b[..., 0, 1], b[..., 1, 0], b[..., 1, 1]
    return torch.stack([torch.stack([a00 * b00 + a01 * b10, a00 * b01 + a01 * b11], -1),
                        torch.stack([a10 * b00 + a11 * b10, a10 * b01 + a11 * b11], -1)], -2)


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
            nodes[n:2 * n] = _mul2(nodes[2 * n + 1:4 * n:2], nodes[2 * n:4 * n:2])
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
            self.master[i] = _mul2(self.master[2 * i + 1], self.master[2 * i])
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
        loss = closure_loss(closure)
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

    def step_gated(self, ok: torch.Tensor) -> None:
        """The step if the 0-dim bool ``ok`` holds, else nothing (not even the global step).
        A host read of ``ok``: the closed-form catch-up keeps its per-step lr products on the
        host, so whether a step happened must be known there (PIC's one sync per step)."""
        if bool(ok):  # host sync
            self.step()

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

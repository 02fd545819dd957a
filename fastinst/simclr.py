"""SimCLR pieces (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
Representations"; reference code google-research/simclr): the NT-Xent loss over the samples
of all ranks, and the LARS optimiser it is trained with.

Distributed convention of `nt_xent` (see fastinst/dist.py and fastinst/nce.py): every rank
passes its *local* projections; they are all-gathered with gradient, so the 2N×2N problem is
the one of the global batch and every rank returns the same value, the single-process loss L.
Each rank only forms the rows of its own 2B samples (2B × 2N logits, as SimCLR's TPU code
does), and the per-rank sums are combined with a differentiable all-reduce; backward gives the
local projections W·∂L/∂z_local, so DDP's ÷W averaging reproduces the single-process
gradient.  Without DDP, divide by W.
"""

from __future__ import annotations

from typing import Iterable, List, Sequence

import torch
import torch.nn.functional as F
from torch.optim import Optimizer

from . import dist as fdist

__all__ = ["nt_xent", "LARS", "apex_larc_available"]


# ---- NT-Xent -------------------------------------------------------------------------------------
def nt_xent(z_local_views: Sequence[torch.Tensor], T: float = 0.1, *,
            normalize: bool = True) -> torch.Tensor:
    """NT-Xent (SimCLR eq. 1) of the global batch, averaged over its 2N anchors.

    z_local_views: two tensors [B, D], the projections of the two views of this rank's B images
    (same B on every rank).  Similarity is cosine (rows are L2-normalised here unless
    ``normalize=False``; normalising unit rows again changes neither value nor the gradient
    that reaches the network).  For each anchor the other view of the same image is the
    positive and the remaining 2N − 2 samples of all ranks are negatives; self-similarity is
    masked out.  SimCLR's TF code reports loss_a + loss_b, i.e. 2× this value.
    """
    if len(z_local_views) != 2:
        raise ValueError(f"nt_xent takes exactly 2 views per image, got {len(z_local_views)}")
    z1, z2 = z_local_views
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"nt_xent: views must both be [B, D], got {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}")
    b = z1.shape[0]
    # fp32 outside autocast: cosine similarities are divided by T as low as 0.1.
    with torch.autocast(device_type=z1.device.type, enabled=False):
        local = torch.cat([z1, z2], 0).float()  # [2B, D]: view 1 rows, then view 2 rows
        if normalize:
            local = F.normalize(local, dim=1)  # [2B, D]
        # One collective for both views; column order is rank-major: [r0 v1, r0 v2, r1 v1, ...].
        cols = fdist.all_gather_with_grad(local)  # [2N, D]
        logits = local @ cols.t() / T  # [2B, 2N]: only this rank's anchors
        j = torch.arange(2 * b, device=local.device)  # [2B] local anchor rows
        base = fdist.get_rank() * 2 * b  # first column of this rank's block
        self_col = base + j  # [2B]
        pos_col = base + (j + b) % (2 * b)  # [2B]: the other view of the same image
        col = torch.arange(cols.shape[0], device=local.device)  # [2N]
        is_self = col == self_col.unsqueeze(1)  # [2B, 2N]
        logits = logits.masked_fill(is_self, float("-inf"))  # [2B, 2N]
        total = F.cross_entropy(logits, pos_col, reduction="sum")  # [] sum over local anchors
        world = fdist.get_world_size()
        if world > 1:
            total = fdist.all_reduce_sum_with_grad(total)  # [] sum over all 2N anchors
        return total / (2 * b * world)


# ---- LARS ----------------------------------------------------------------------------------------
def apex_larc_available() -> bool:
    """True when NVIDIA apex with ``apex.parallel.LARC`` imports (the PyPI package named
    ``apex`` is unrelated and has no ``apex.parallel``: it counts as absent)."""
    try:
        from apex.parallel import LARC  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA-extension build raising on import
        return False
    return True


class _LarcView:
    """What apex's LARC wraps: only the adapted parameters, and a no-op ``step`` because LARS
    applies the momentum update itself (one code path for both backends, so they agree)."""

    def __init__(self, params: List[torch.Tensor], lr: float, weight_decay: float):
        self.param_groups = [{"params": params, "lr": lr, "weight_decay": weight_decay}]

    def step(self) -> None:
        pass


class LARS(Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017), as SimCLR uses.

    For each adapted parameter w with gradient g (wd = weight_decay, η = eta):

        trust = η·‖w‖ / (‖g‖ + wd·‖w‖ + eps)   if ‖w‖ > 0 and ‖g‖ > 0, else 1
        d     = trust · (g + wd·w)                  (g alone when trust falls back to 1)
        v     ← momentum·v + d ;   w ← w − lr·v     (torch.optim.SGD's momentum form)

    SimCLR's TF LARS puts lr inside the momentum buffer (v ← μv + lr·d); the two agree while
    lr is constant and differ slightly during warm-up/decay.  apex's LARC wraps a torch
    optimiser, hence the torch form here, so that both backends give the same update.

    Excluded parameters (biases and BN/norm affine parameters, i.e. every tensor with
    ``ndim <= 1`` when ``exclude_1d=True``, or a whole param group with ``lars_exclude=True``)
    get neither adaptation nor weight decay: d = g, as SimCLR's ``exclude_from_weight_decay``
    and ``exclude_from_layer_adaptation`` with ['batch_normalization', 'bias'].

    backend: "torch" (multi-tensor ops, no host sync), "apex" (the gradient scaling done by
    ``apex.parallel.LARC(..., clip=False)``, whose formula is the one above, including the
    fall-back when a norm is zero), or "auto" (apex when it imports, else torch).  Both give
    the same update; apex's LARC loops in Python with two host syncs per parameter (and scales
    ``p.grad`` in place), while the torch path computes all norms in one multi-tensor kernel.
    ``apex.optimizers`` exports no LARS (FusedSGD/Adam/LAMB/NovoGrad...), so LARC is the apex
    LARS; its trust-ratio formula is the one above, which is why it is the ``apex`` backend.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9,
                 weight_decay: float = 1e-6, eta: float = 1e-3, eps: float = 1e-8, *,
                 exclude_1d: bool = True, backend: str = "auto"):
        if lr < 0 or not 0.0 <= momentum < 1.0 or weight_decay < 0 or eta <= 0 or eps < 0:
            raise ValueError(f"LARS: need lr >= 0, 0 <= momentum < 1, weight_decay >= 0, eta > 0, "
                             f"eps >= 0; got lr={lr}, momentum={momentum}, "
                             f"weight_decay={weight_decay}, eta={eta}, eps={eps}")
        if backend not in ("auto", "torch", "apex"):
            raise ValueError(f"LARS backend={backend!r}: choose 'auto', 'torch' or 'apex'")
        if backend == "auto":
            backend = "apex" if apex_larc_available() else "torch"
        elif backend == "apex" and not apex_larc_available():
            raise ValueError("LARS backend='apex' needs NVIDIA apex (apex.parallel.LARC), which "
                             "does not import here; use backend='torch' (same update) or build "
                             "apex from github.com/NVIDIA/apex (not `pip install apex`)")
        self.backend = backend
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, eps=eps,
                        exclude_1d=exclude_1d, lars_exclude=False)
        super().__init__(params, defaults)

    @staticmethod
    def _split(group) -> tuple:
        adapt, plain = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise ValueError("LARS does not support sparse gradients")
            excluded = group["lars_exclude"] or (group["exclude_1d"] and p.ndim <= 1)
            (plain if excluded else adapt).append(p)
        return adapt, plain

    @staticmethod
    def _scaled_grads_torch(adapt: List[torch.Tensor], group) -> List[torch.Tensor]:
        wd, eta, eps = group["weight_decay"], group["eta"], group["eps"]
        grads = [p.grad for p in adapt]
        # All norms in one multi-tensor kernel; kept on the device (no .item(): no host sync).
        w_norm = torch.stack([n.float() for n in torch._foreach_norm(adapt)])  # [P]
        g_norm = torch.stack([n.float() for n in torch._foreach_norm(grads)])  # [P]
        ok = (w_norm > 0) & (g_norm > 0)  # [P]; LARC leaves g untouched otherwise
        trust = torch.where(ok, eta * w_norm / (g_norm + wd * w_norm + eps),
                            torch.ones_like(w_norm))  # [P]
        wd_eff = ok.float() * wd  # [P]
        d = torch._foreach_mul(adapt, list(wd_eff.unbind()))  # wd·w per tensor
        torch._foreach_add_(d, grads)  # g + wd·w
        torch._foreach_mul_(d, list(trust.unbind()))  # trust·(g + wd·w)
        return d

    @staticmethod
    def _scaled_grads_apex(adapt: List[torch.Tensor], group) -> List[torch.Tensor]:
        from apex.parallel import LARC

        # clip=False: LARC's "scaling" mode, trust·(g + wd·w); clip=True would instead cap the
        # local rate at the global lr, which is not the LARS of SimCLR.  LARC scales p.grad in
        # place and then calls the view's no-op step.
        view = _LarcView(adapt, group["lr"], group["weight_decay"])
        LARC(view, trust_coefficient=group["eta"], clip=False, eps=group["eps"]).step()
        return [p.grad for p in adapt]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            adapt, plain = self._split(group)
            d: List[torch.Tensor] = []
            if adapt:
                d = (self._scaled_grads_apex if self.backend == "apex"
                     else self._scaled_grads_torch)(adapt, group)
            params = adapt + plain
            d = list(d) + [p.grad for p in plain]  # excluded: plain SGD direction, no decay
            if not params:
                continue
            if group["momentum"] > 0:
                bufs = []
                for p in params:
                    st = self.state[p]
                    if "momentum_buffer" not in st:
                        # Zero start: μ·0 + d = d exactly, torch SGD's first-step buffer.
                        st["momentum_buffer"] = torch.zeros_like(p)
                    bufs.append(st["momentum_buffer"])
                torch._foreach_mul_(bufs, group["momentum"])
                torch._foreach_add_(bufs, d)
                d = bufs
            torch._foreach_add_(params, d, alpha=-group["lr"])
        return loss

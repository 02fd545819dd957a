"""Optimisers: torch SGD (fused where torch has the kernel, else foreach), LARS (SimCLR's; apex's LARC when
it imports), Adam, the linear lr scaling rule, and `OptimFactory`, what a method builds its
optimisers with (the engine's default: ``train.optimizer`` over the given parameters, with
the ``train.*`` lr schedule).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

import torch
from torch.optim import Optimizer

from ..core.guard import closure_loss, where_
from .schedule import LRSchedule

__all__ = ["sgd", "adam", "LARS", "apex_larc_available", "scaled_lr", "OptimFactory"]


def scaled_lr(lr: float, lr_batch: int, batch_size: int, world: int) -> float:
    """Linear scaling (Goyal et al. 2017): lr for the global batch from ``lr`` quoted at ``lr_batch``."""
    return lr * batch_size * world / lr_batch


def _fused_or_foreach(make):
    """``make(fused=True)``: torch's fused kernel (CUDA; CPU from torch 2.4), which can skip a
    non-finite step on the device (fastinst/core/guard.py); where this torch or device has none,
    the foreach kernel (whose skip needs a host read)."""
    try:
        return make(fused=True)
    except (RuntimeError, TypeError, ValueError):
        return make(foreach=True)


def sgd(params, lr: float, momentum: float, weight_decay: float, cuda: bool = False) -> torch.optim.SGD:
    """torch SGD, fused where available (`_fused_or_foreach`)."""
    params = list(params)
    return _fused_or_foreach(lambda **k: torch.optim.SGD(params, lr=lr, momentum=momentum,
                                                         weight_decay=weight_decay, **k))


def adam(params, lr: float, betas: Tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0,
         cuda: bool = False) -> torch.optim.Adam:
    """torch Adam, fused where available (`_fused_or_foreach`)."""
    params = list(params)
    return _fused_or_foreach(lambda **k: torch.optim.Adam(params, lr=lr, betas=betas,
                                                          weight_decay=weight_decay, **k))


@dataclass(frozen=True)
class OptimFactory:
    """Built by the engine from ``train.*`` and the loader's geometry; a method's
    ``optimizers(make)`` asks it for (optimiser, schedule) pairs."""

    kind: str  # train.optimizer: sgd | lars
    lr: float  # train.lr scaled to the global batch
    momentum: float
    weight_decay: float
    lars_eta: float
    schedule: LRSchedule  # the train.* schedule at base lr
    cuda: bool = False

    def default(self, params) -> Tuple[Optimizer, LRSchedule]:
        """``train.optimizer`` over ``params`` with the train schedule. Weight decay on every
        parameter, as lemniscate / PIC do (LARS: biases and BN excluded, as SimCLR)."""
        if self.kind == "lars":
            return LARS(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                        eta=self.lars_eta), self.schedule
        return sgd(params, self.lr, self.momentum, self.weight_decay, self.cuda), self.schedule

    def adam(self, params, lr: float, *, betas: Tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0,
             schedule: Optional[LRSchedule] = None) -> Tuple[Optimizer, LRSchedule]:
        """Adam at ``lr`` (constant unless ``schedule`` says otherwise)."""
        return adam(params, lr, betas, weight_decay, self.cuda), schedule or LRSchedule.constant(lr)


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
        loss = closure_loss(closure)
        self._step(None)
        return loss

    @torch.no_grad()
    def step_gated(self, ok: torch.Tensor) -> None:
        """The step where the 0-dim bool ``ok`` holds, else no change (no host sync)."""
        self._step(ok)

    def _step(self, ok: Optional[torch.Tensor]) -> None:
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
                if ok is None:
                    torch._foreach_mul_(bufs, group["momentum"])
                    torch._foreach_add_(bufs, d)
                else:  # the new buffers only where ok (d is NaN on a non-finite step)
                    new = torch._foreach_mul(bufs, group["momentum"])
                    torch._foreach_add_(new, d)
                    where_(bufs, ok, new)
                d = bufs
            if ok is None:
                torch._foreach_add_(params, d, alpha=-group["lr"])
            else:
                where_(params, ok, torch._foreach_add(params, d, alpha=-group["lr"]))

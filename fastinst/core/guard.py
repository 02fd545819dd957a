"""The non-finite guard, decided on the device: no host synchronisation per training step.

A step whose loss is NaN/inf must not reach the weights, the optimiser state, the BatchNorm
statistics, or the method's state (bank rows, queue, Z, key encoder); it is counted, and
``train.max_nonfinite`` in a row stop the run before anything is saved. Reading the loss on
the host every step (``float(loss)``) would stall the CPU until the GPU caught up, so instead
the step computes ``ok = isfinite(loss)``, a 0-dim bool tensor on the device, and every
update is gated on it:

- optimisers: `gated_step`. torch's fused SGD/Adam/AdamW skip inside their kernel when given
  ``found_inf`` (what GradScaler uses); optimisers with a ``step_gated(ok)`` method (LARS,
  LazySGD) gate themselves; any other optimiser falls back to a host read of ``ok``;
- tensors: `where_` keeps the old values where ``ok`` is false (BN statistics, the key
  encoder, queue rows);
- rows of banks: the updated row indices become −1 (a no-op) where ``ok`` is false;
- counts: `Guard` keeps the streak, the longest streak and the total on the device; the
  engine reads them (one sync) only where it logs, evaluates or saves.

Also here, for every optimiser (fastinst.train.optim's and the methods' own, PIC's LazySGD):
`closure_loss`, torch.optim's ``step(closure)`` convention.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch


def where_(dst: Sequence[torch.Tensor], ok: torch.Tensor, src: Sequence[torch.Tensor]) -> None:
    """dst[i] ← src[i] where ``ok``, else unchanged (in place; NaN in src never leaks)."""
    for d, s in zip(dst, src):
        d.copy_(torch.where(ok, s, d))


def closure_loss(closure):
    """torch.optim's ``step(closure)`` convention: the loss re-evaluated with gradients on."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _zero_momentum(opt: torch.optim.Optimizer) -> None:
    """Create missing SGD momentum buffers as zeros: torch's first step otherwise allocates an
    uninitialised buffer and a skipped (found_inf) first step would leave garbage in it. From
    zero, μ·0 + g = g exactly, the first-step buffer torch would have made."""
    for group in opt.param_groups:
        if group.get("momentum", 0):
            for p in (q for q in group["params"] if q.grad is not None):
                st = opt.state[p]
                if "momentum_buffer" not in st or st["momentum_buffer"] is None:
                    st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _scaler_found_inf(scaler, opt) -> torch.Tensor:
    """The grad scaler's device-side "some gradient of ``opt`` overflowed" flag (after unscale_)."""
    found = scaler._per_optimizer_states[id(opt)]["found_inf_per_device"]
    return torch.stack([f.reshape(()) for f in found.values()]).sum() > 0


def gated_step(opt: torch.optim.Optimizer, ok: torch.Tensor, scaler=None) -> None:
    """``opt.step()`` if ``ok`` (and, with an fp16 grad scaler, no gradient overflowed); else
    nothing changes: parameters, optimiser state and step counts stay as they were."""
    if scaler is not None and scaler.is_enabled():
        scaler.unscale_(opt)  # device-side overflow check of the gradients, no sync
        ok = ok & ~_scaler_found_inf(scaler, opt)
    if hasattr(opt, "step_gated"):
        opt.step_gated(ok)
    elif getattr(opt, "_step_supports_amp_scaling", False):  # torch fused SGD / Adam / AdamW
        _zero_momentum(opt)
        opt.grad_scale, opt.found_inf = None, (~ok).float()  # 0-dim, as GradScaler passes it
        try:
            opt.step()
        finally:
            del opt.grad_scale, opt.found_inf
    elif bool(ok):  # host sync: an optimiser that cannot skip on the device (foreach, apex)
        opt.step()


class Guard:
    """Non-finite step counts kept on the device; `read` syncs once."""

    def __init__(self, device):
        z = torch.zeros((), dtype=torch.long, device=device)
        self.streak, self.worst, self.total = z.clone(), z.clone(), z.clone()

    @torch.no_grad()
    def record(self, ok: torch.Tensor) -> None:
        bad = (~ok).long()
        self.streak.mul_(bad).add_(bad)  # +1 on a bad step, 0 on a good one
        torch.maximum(self.worst, self.streak, out=self.worst)
        self.total.add_(bad)

    def read(self) -> Dict[str, int]:
        """{streak, worst (longest streak since the last reset_worst), total}: one host sync."""
        streak, worst, total = torch.stack([self.streak, self.worst, self.total]).tolist()
        return {"streak": streak, "worst": worst, "total": total}

    def reset_worst(self) -> None:
        self.worst.copy_(self.streak)

    def load(self, streak: int, total: int) -> None:
        self.streak.fill_(streak)
        self.worst.fill_(streak)
        self.total.fill_(total)


def finite_and(oks: List[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
    """ok of this loss: finite, and every earlier loss of the step finite (a step that went
    non-finite skips the rest of its updates too)."""
    ok = torch.isfinite(loss.detach())
    return ok & oks[-1] if oks else ok

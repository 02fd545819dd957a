"""A check that the engine's training step descends a method's own loss, for any method.

A plausible training bug (the loss's sign, a gradient that never reaches a parameter group, an
optimiser that is not stepped, a step that moves along the wrong direction) leaves a short run
finite, so "the loss stayed finite" cannot catch it, and the loss curve of a short run with
moving targets (NPID's bank, MoCo's queue) is no test either. What does hold for every method,
and on every CPU, is first-order descent on a fixed batch with every non-trained state held
still: one step Δ of SGD-like optimisers from fresh state is linear in the lr, so the lr can be
chosen to make the predicted decrease <g, Δ> a fixed small fraction of the loss, and then the
Armijo condition L(θ) − L(θ − Δ) ≥ ½·<g, Δ> must hold (Taylor: the decrease is <g, Δ> − O(|Δ|²)).
The fraction (1e-3 of the loss) is far above float32 rounding of the loss (~1e-7 relative) and
far below the curvature scale of a network at initialisation.
"""
from __future__ import annotations

import copy
from typing import List

import torch

from fastinst.train import engine, trainer
from fastinst.core.runtime import DistEnv


def trained_params(tr) -> List[torch.Tensor]:
    """Every parameter one of the trainer's optimisers steps (its modules' + the method's own)."""
    return [p for o in tr.optimizers.values() for g in o.param_groups for p in g["params"]]


def _snapshot(tr):
    nets = {n: copy.deepcopy(engine.unwrap(m).state_dict()) for n, m in tr.method.trained_modules().items()}
    return (nets, copy.deepcopy(tr.method.state_dict()),
            [copy.deepcopy(o.state_dict()) for o in tr.optimizers.values()])


def _restore(tr, snap, keep_params: bool) -> None:
    """Put back the model's and the method's state (BN statistics, bank, queue, noise RNG) and
    the optimisers' state; with ``keep_params`` the trained parameters keep their values."""
    now = [p.detach().clone() for p in trained_params(tr)] if keep_params else None
    nets_sd, method_sd, opt_sds = snap
    for n, m in tr.method.trained_modules().items():
        engine.unwrap(m).load_state_dict(nets_sd[n])
    tr.method.load_state_dict(method_sd)
    for o, sd in zip(tr.optimizers.values(), opt_sds):
        o.load_state_dict(copy.deepcopy(sd))
    if now is not None:
        with torch.no_grad():
            for p, v in zip(trained_params(tr), now):
                p.copy_(v)


def _loss(tr, batch, lr: float) -> float:
    tr.method.before_step(0)
    with torch.no_grad():
        return float(tr.method(batch)["loss"])


def _step(tr, batch, lr: float):
    """One engine step (trainer.train_step) at ``lr``: returns (g, Δ) flattened over every
    trained parameter, g the gradient of this step's loss, Δ = θ_before − θ_after."""
    before = [p.detach().clone() for p in trained_params(tr)]
    for o in tr.optimizers.values():
        for grp in o.param_groups:
            grp["lr"] = lr
    tr.method.before_step(0)
    stage = tr.stages[0]
    opts = {n: tr.optimizers[n] for n in stage.optimizers}
    _, loss, ok = trainer.train_step(tr.method, opts, tr.scaler, tr.amp, tr.env.device.type, batch, stage.step)
    assert bool(ok) and bool(torch.isfinite(loss)), "non-finite loss in the descent check"
    g = torch.cat([(p.grad.to_dense() if p.grad is not None else torch.zeros_like(p)).flatten().double()
                   for p in trained_params(tr)])
    delta = torch.cat([(b - p.detach()).flatten().double() for b, p in zip(before, trained_params(tr))])
    return g, delta


def assert_one_step_descends(cfg, out_dir: str, rel_decrease: float = 1e-3) -> List[torch.Tensor]:
    """Build the trainer for ``cfg`` (fresh weights), and check on its first batch that one
    engine step lowers the method's loss by at least half its first-order prediction, and that
    every parameter the optimisers own receives a gradient. Returns the initial values of the
    trained parameters (in `trained_params` order)."""
    tr = trainer.build_trainer(cfg, out_dir, DistEnv())
    try:
        init = [p.detach().clone() for p in trained_params(tr)]
        for m in tr.method.trained_modules().values():
            m.train()
        batch = next(iter(tr.loader))
        snap = _snapshot(tr)
        l0 = _loss(tr, batch, 0.0)
        _restore(tr, snap, keep_params=False)
        g, delta = _step(tr, batch, 1e-3)  # probe: the update is linear in lr from fresh state
        without_grad = [i for i, p in enumerate(trained_params(tr)) if p.grad is None]
        assert not without_grad, f"trained parameters that got no gradient: {without_grad}"
        pred = float(g @ delta)
        assert pred > 0, f"the step is not a descent direction: <g, delta> = {pred}"
        lr = 1e-3 * rel_decrease * abs(l0) / pred
        _restore(tr, snap, keep_params=False)
        g, delta = _step(tr, batch, lr)
        pred = float(g @ delta)
        _restore(tr, snap, keep_params=True)  # targets, BN statistics, RNG as for l0
        l1 = _loss(tr, batch, lr)
        assert l0 - l1 >= 0.5 * pred > 0, (f"one step did not descend the loss: L0={l0:.7f} L1={l1:.7f}, "
                                           f"decrease {l0 - l1:.3g} < half the predicted {pred:.3g}")
        return init
    finally:
        tr.close_loaders()

"""The non-finite guard decided on the device (fastinst/core/guard.py): a non-finite step changes
nothing but the counts, every optimiser skips exactly, and the engine's step reads nothing on
the host (the CPU stand-in for ``torch.cuda.set_sync_debug_mode``, which tests/test_gpu.py
runs on CUDA)."""
from __future__ import annotations

import contextlib
import os
import traceback

import pytest
import torch

from fastinst.train import engine, trainer
from fastinst.core.guard import Guard, gated_step
from fastinst.methods.pic.lazysgd import LazySGD
from fastinst.train.optim import LARS, adam, sgd
from datagen import make_colour_train_val
from test_engine import tiny_cfg

TWO_VIEWS = "aug.crops=[{count: 2, size: 16, scale: [0.2, 1.0]}]"
METHODS = {
    "npid": ["method.npid.loss=nce"],
    "moco": ["method.name=moco", TWO_VIEWS, "method.moco.K=16"],
    "simclr": ["method.name=simclr", TWO_VIEWS, "train.optimizer=lars"],
    "pic": ["method.name=pic", "method.pic.negatives=8", "method.pic.sampling=recent"],
}


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return make_colour_train_val(str(tmp_path_factory.mktemp("colours")))


# --------------------------------------------------------------------------- optimisers


def _fused_sgd(ps):
    return sgd(ps, lr=0.1, momentum=0.9, weight_decay=1e-2)


def _foreach_sgd(ps):
    return torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2, foreach=True)


OPTIMISERS = {
    "sgd (fused)": _fused_sgd,
    "sgd (foreach: host fallback)": _foreach_sgd,
    "adam (fused)": lambda ps: adam(ps, lr=0.01, weight_decay=1e-2),
    "lars": lambda ps: LARS(ps, lr=0.5, momentum=0.9, weight_decay=1e-3, backend="torch"),
    "lazysgd": lambda ps: LazySGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2),
}


def _state(opt):
    return {k: v.clone() if torch.is_tensor(v) else v for st in opt.state.values() for k, v in st.items()}


@pytest.mark.parametrize("name", list(OPTIMISERS))
def test_gated_step_skips_exactly(name):
    check_gated_step(name, "cpu")


def check_gated_step(name: str, device: str) -> None:
    """Steps [NaN (the very first), g1, NaN, g2, g3] through the gate end bit-identical to plain
    steps [g1, g2, g3] on a twin, and each skipped step leaves parameters and state untouched."""
    make = OPTIMISERS[name]
    torch.manual_seed(0)
    init = [torch.randn(6, 4, device=device), torch.randn(4, device=device)]
    grads = [[torch.randn_like(t) for t in init] for _ in range(3)]
    nan = [torch.full_like(t, float("nan")) for t in init]
    gated = [torch.nn.Parameter(t.clone()) for t in init]
    plain = [torch.nn.Parameter(t.clone()) for t in init]
    og, op = make(gated), make(plain)
    if name.startswith("sgd (fused)") or name.startswith("adam"):
        assert og.defaults.get("fused"), "this torch has the CPU fused kernel: the device-side path is tested"
    for g in [nan, grads[0], nan, grads[1], grads[2]]:
        before = ([p.detach().clone() for p in gated], _state(og))
        for p, x in zip(gated, g):
            p.grad = x.clone()
        ok = torch.isfinite(g[0]).all()  # on the device
        gated_step(og, ok)
        if not ok:
            assert all(torch.equal(a, p) for a, p in zip(before[0], gated)), "a skipped step moved a parameter"
            now = _state(og)  # a skipped first step may create the state, as zeros
            assert all(torch.equal(now[k], before[1][k]) if torch.is_tensor(now[k]) else now[k] == before[1][k]
                       for k in before[1]), "a skipped step changed the optimiser state"
            assert all(not torch.is_tensor(now[k]) or torch.count_nonzero(now[k]) == 0
                       for k in set(now) - set(before[1])), "a skipped step made non-zero state"
    for g in grads:
        for p, x in zip(plain, g):
            p.grad = x.clone()
        op.step()
    if isinstance(og, LazySGD):
        og.flush(), op.flush()
    for a, b in zip(gated, plain):
        assert torch.equal(a, b), f"{name}: gated run differs from the plain run"
    sa, sb = _state(og), _state(op)
    assert set(sa) == set(sb)
    assert all(torch.equal(sa[k], sb[k]) if torch.is_tensor(sa[k]) else sa[k] == sb[k] for k in sa)


def test_fp16_scaler_overflow_skips_on_the_device():
    """With an fp16 grad scaler: an overflowed gradient (finite loss) skips the step, and the
    scale is halved, with the gate's own flag still true."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = _fused_sgd([p])
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    scaler.scale(torch.ones(()))  # the scale tensor is made by the first scale()
    p.grad = torch.tensor([1.0, float("inf"), 1.0])
    gated_step(opt, torch.tensor(True), scaler)
    scaler.update()
    assert torch.equal(p.detach(), torch.ones(3)) and scaler.get_scale() == 4.0
    p.grad = torch.full((3,), 8.0)  # scaled by 4: unscaled 2
    gated_step(opt, torch.tensor(True), scaler)
    scaler.update()
    torch.testing.assert_close(p.detach(), torch.full((3,), 1.0 - 0.1 * (2.0 + 1e-2)), rtol=0, atol=1e-7)


def test_guard_counts_the_longest_streak_between_reads():
    """A streak that ended before the read still counts: max_nonfinite must stop the run even
    when the engine only reads the counts at the next log line."""
    g = Guard("cpu")
    for ok in [True, False, False, False, True, False]:
        g.record(torch.tensor(ok))
    assert g.read() == {"streak": 1, "worst": 3, "total": 4}
    g.reset_worst()
    g.record(torch.tensor(True))
    assert g.read() == {"streak": 0, "worst": 1, "total": 4}


# --------------------------------------------------------------------------- the engine's step


def _batches(tr, n):
    out = []
    for batch in tr.loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def _everything(tr):
    """Every tensor the step may change: trained modules, method state, optimiser state (after
    ``flush``: PIC's lazily-updated rows made current)."""
    tr.method.flush()
    state = {f"net.{n}.{k}": v.clone() for n, m in tr.method.trained_modules().items()
             for k, v in engine.unwrap(m).state_dict().items()}
    state.update({f"method.{k}": v.clone() for k, v in tr.method.state_dict().items() if torch.is_tensor(v)})
    for name, opt in tr.optimizers.items():
        for i, st in enumerate(opt.state.values()):
            state.update({f"opt.{name}.{i}.{k}": v.clone() for k, v in st.items() if torch.is_tensor(v)})
    return state


def _trainer(colours, tmp_path, method, *over):
    cfg = tiny_cfg(colours, *METHODS[method], *over)
    return trainer.build_trainer(cfg, str(tmp_path / method), engine.init_distributed())


@contextlib.contextmanager
def host_reads():
    """Record every host read of a tensor's value (bool/float/int/item/tolist), with its caller."""
    seen = []
    names = ["__bool__", "__float__", "__int__", "item", "tolist"]
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def spy(n):
        def f(self, *a, **k):
            frame = traceback.extract_stack(limit=2)[0]  # the line that read the value
            seen.append((n, os.path.basename(frame.filename), frame.lineno))
            return saved[n](self, *a, **k)
        return f

    for n in names:
        setattr(torch.Tensor, n, spy(n))
    try:
        yield seen
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


@pytest.mark.parametrize("method", list(METHODS))
def test_nonfinite_step_changes_nothing_and_reads_nothing(colours, tmp_path, method):
    """After a finite step (optimiser state exists, momentum non-zero), a NaN step leaves every
    weight, BN statistic, optimiser state and method state (bank, Z, queue, key encoder,
    negatives) bit-identical and is counted; the next finite step changes them. No step reads a
    tensor on the host, except PIC's (its sampled column set has a data-dependent size, and
    LazySGD keeps its catch-up products on the host)."""
    tr = _trainer(colours, tmp_path, method)
    try:
        stage = tr.stages[0]
        trainer.enter_stage(tr, stage)
        batches = _batches(tr, 3)
        forward = type(tr.method).forward

        def nan_forward(self, batch):
            out = forward(self, batch)
            return {**out, "loss": out["loss"] * float("nan")}

        with host_reads() as reads:
            trainer.run_step(tr, stage, batches[0], 0)
            before = _everything(tr)
            tr.method.forward = nan_forward.__get__(tr.method)
            loss, ok = trainer.run_step(tr, stage, batches[1], 0)
            del tr.method.forward
        after = _everything(tr)
        assert set(after) == set(before)
        moved = [k for k in before if not torch.equal(before[k], after[k])]
        assert moved == [], f"{method}: a non-finite step changed {moved[:5]}"
        assert not bool(ok) and tr.skipped == 1 and tr.nonfinite == 1
        if method == "pic":
            # the sampled column set's bounds (data-dependent size) and LazySGD's host-side step
            assert {f for _, f, _ in reads} == {"classifier.py", "lazysgd.py"}, reads
        else:
            assert reads == [], f"{method}: host reads in the step: {reads}"
        trainer.run_step(tr, stage, batches[2], 0)
        again = _everything(tr)
        changed = {k.split(".")[0] for k in before if not torch.equal(before[k], again[k])}
        assert changed >= {"net", "opt"}, changed
        assert tr.nonfinite == 0 and tr.skipped == 1
    finally:
        tr.close_loaders()


def test_max_nonfinite_streak_between_log_lines_stops_the_run(colours, tmp_path, monkeypatch):
    """Three NaN steps in a row that end before the next log line (log_every=4) still stop the
    run at train.max_nonfinite=3, and nothing is saved after them."""
    from fastinst.methods.npid import NPID
    from fastinst.train.checkpoint import find_latest_complete

    forward, calls = NPID.forward, {"n": 0}

    def fwd(self, batch):
        out = forward(self, batch)
        if calls["n"] in (4, 5, 6):
            out["loss"] = out["loss"] * float("nan")
        calls["n"] += 1
        return out

    monkeypatch.setattr(NPID, "forward", fwd)
    out = str(tmp_path / "run")
    with pytest.raises(trainer.NonFiniteLossError, match=r"3 consecutive non-finite.*by step 8"):
        engine.train(tiny_cfg(colours, "train.max_nonfinite=3", "train.epochs=3", "train.log_every=4"), out)
    assert os.path.basename(find_latest_complete(os.path.join(out, "checkpoints"))) == "ckpt_000000004"

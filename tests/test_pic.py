"""PIC classifier (fastinst/methods/pic/classifier.py): cosine-logit CE, negative sampling, LazySGD's correction,
and sharded == unsharded.

References are float64 formulas written here; LazySGD is checked against dense
torch.optim.SGD on the full weight, where rows outside a step's touched set simply get a zero
loss-gradient.  The distributed test (2-process gloo, N odd) checks losses, DDP-averaged
backbone gradients and the gathered weight matrix against the single-process run; a second
one runs the PIC method with 'recent' negatives and checks its FIFO against a plain Python
list of the latest global indices, on every rank and in one process.
"""

import copy
import math

import pytest
import torch

from fastinst.core.rows import shard_bounds
from fastinst.methods.pic.lazysgd import LazySGD, _step_matrix, _StepProducts
from fastinst.methods.pic.classifier import ShardedClassifier
from tests.distutil import in_gloo_group, spawn_and_collect

F64 = torch.float64
T = 0.2


def cosine_warmup_lr(step, steps, base=0.5, warmup=8):
    """A learning rate that changes at every step (linear warm-up, then cosine)."""
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * base * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))


# ---- float64 references ----------------------------------------------------------------------
def ref_cosine_ce(x, w, index, cols=None):
    """mean_b [log Σ_j exp(s_bj) − s_b,index_b], s = (x/|x|)·(w/|w|)ᵀ / T, over all rows or
    over the rows `cols` (a sorted list of distinct global rows)."""
    xn = x / torch.sqrt((x * x).sum(1, keepdim=True))
    wn = w / torch.sqrt((w * w).sum(1, keepdim=True))
    if cols is None:
        cols = list(range(w.shape[0]))
    s = xn @ wn[cols].t() / T
    target = torch.tensor([cols.index(int(i)) for i in index])
    return (torch.log(torch.exp(s).sum(1)) - s[torch.arange(len(index)), target]).mean()


def leaf(t):
    return t.detach().clone().requires_grad_(True)


# ---- LazySGD == dense torch.optim.SGD ------------------------------------------------------------
def test_step_products_match_sequential_product():
    """Tree queries (across several capacity doublings) equal the plain left-to-right product."""
    _StepProducts.INITIAL_CAPACITY, saved = 4, _StepProducts.INITIAL_CAPACITY
    try:
        mu, wd = 0.9, 0.01
        tree = _StepProducts(mu, wd, "cpu")
        lrs = [0.3 + 0.2 * math.sin(t) for t in range(300)]
        for lr in lrs:
            tree.append(lr)
        first = torch.tensor([0, 1, 5, 64, 100, 255, 256, 299, 300])
        got = tree.query(first)
        for c, m in zip(first.tolist(), got):
            ref = torch.eye(2, dtype=F64)
            for t in range(c, 300):
                ref = torch.tensor(_step_matrix(lrs[t], mu, wd), dtype=F64) @ ref
            torch.testing.assert_close(m, ref, rtol=1e-12, atol=1e-14)
        # resume path: a tree rebuilt from the lr history answers the same
        torch.testing.assert_close(_StepProducts(mu, wd, "cpu", lrs=lrs).query(first), got,
                                   rtol=0, atol=0)
    finally:
        _StepProducts.INITIAL_CAPACITY = saved


N_OPT, D_OPT, STEPS_OPT, MU, WD = 50, 4, 60, 0.9, 0.05
NEVER = [0, 1, 2, 3, 4]  # never touched (unless a dense step touches everything)
ONCE = {5: 0, 6: 1, 7: 17, 8: 42, 9: 59}  # row → the only step it is touched at
NO_GRAD_STEP, EMPTY_STEP, RESUME_STEP = 23, 30, 31


def touched(step, gen):
    """Sorted touched rows of a step: a random subset of rows 10.. plus ONCE rows."""
    if step in (NO_GRAD_STEP, EMPTY_STEP):
        return []
    k = int(torch.randint(0, 13, (1,), generator=gen))
    rows = set(torch.randperm(N_OPT - 10, generator=gen)[:k].add(10).tolist())
    rows |= {r for r, s in ONCE.items() if s == step}
    return sorted(rows)


@pytest.mark.parametrize("dense_step", [None, 35], ids=["sparse-only", "with-dense-step"])
def test_lazy_sgd_equals_dense_sgd_on_every_row(dense_step):
    _StepProducts.INITIAL_CAPACITY, saved = 4, _StepProducts.INITIAL_CAPACITY  # exercise growth
    try:
        gen = torch.Generator().manual_seed(0)
        w0 = torch.randn(N_OPT, D_OPT, dtype=F64, generator=gen)
        dense_w = leaf(w0)
        dense = torch.optim.SGD([dense_w], lr=0.0, momentum=MU, weight_decay=WD)
        lazy_w = torch.nn.Parameter(w0.clone())
        lazy = LazySGD([lazy_w], lr=0.0, momentum=MU, weight_decay=WD)
        for step in range(STEPS_OPT):
            lr = cosine_warmup_lr(step, STEPS_OPT)
            rows = list(range(N_OPT)) if step == dense_step else touched(step, gen)
            g = torch.randn(len(rows), D_OPT, dtype=F64, generator=gen)  # [R, D]
            full_g = torch.zeros(N_OPT, D_OPT, dtype=F64)
            full_g[rows] = g
            dense_w.grad = full_g  # dense: untouched rows have zero loss-gradient
            dense.param_groups[0]["lr"] = lr
            dense.step()

            if step == NO_GRAD_STEP:
                lazy_w.grad = None
            elif step == dense_step:
                lazy_w.grad = full_g.clone()
            else:
                idx = torch.tensor(rows, dtype=torch.long).view(1, -1)
                if len(rows) > 1:  # a duplicated index: sparse grads of one row are summed
                    idx = torch.cat([idx, idx[:, :1]], 1)
                    g = torch.cat([g, torch.zeros_like(g[:1])], 0)
                lazy_w.grad = torch.sparse_coo_tensor(idx, g, (N_OPT, D_OPT), check_invariants=True)
            lazy.param_groups[0]["lr"] = lr
            lazy.step()
            buf = dense.state[dense_w]["momentum_buffer"]
            if rows:  # rows touched now are exact right away
                torch.testing.assert_close(lazy_w[rows], dense_w[rows], rtol=1e-12, atol=1e-13)
                torch.testing.assert_close(lazy.state[lazy_w]["momentum_buffer"][rows], buf[rows],
                                           rtol=1e-12, atol=1e-13)
            if step % 7 == 3:  # catch_up of arbitrary rows mid-run
                some = torch.randperm(N_OPT - 5, generator=gen)[:9] + 5  # NEVER stays stale
                lazy.catch_up(some)
                torch.testing.assert_close(lazy_w[some], dense_w[some], rtol=1e-12, atol=1e-13)
            if step == RESUME_STEP:  # save → load into a fresh optimiser → continue with it
                sd = copy.deepcopy(lazy.state_dict())
                lazy_w = torch.nn.Parameter(lazy_w.detach().clone())
                lazy = LazySGD([lazy_w], lr=1.0, momentum=MU, weight_decay=WD)
                lazy.load_state_dict(sd)
                assert lazy.steps == step + 1
                assert lazy.state[lazy_w]["last_step"].dtype == torch.long

        if dense_step is None:  # the test means something: stale rows differ before flush
            torch.testing.assert_close(lazy_w[NEVER], w0[NEVER], rtol=0, atol=0)
            assert not torch.allclose(lazy_w[NEVER], dense_w[NEVER])
        lazy.flush()
        torch.testing.assert_close(lazy_w.detach(), dense_w.detach(), rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(lazy.state[lazy_w]["momentum_buffer"],
                                   dense.state[dense_w]["momentum_buffer"], rtol=1e-12, atol=1e-13)
        assert bool((lazy.state[lazy_w]["last_step"] == STEPS_OPT).all())
    finally:
        _StepProducts.INITIAL_CAPACITY = saved


# ---- losses against float64 formulas -----------------------------------------------------------
N, D, B = 23, 8, 6
INDEX = torch.tensor([3, 0, 22, 3, 11, 7])  # a repeated image (two views)
NEGATIVES = torch.tensor([5, 3, 19, 19, 0, 14, 2])  # overlaps positives, and a duplicate


def make_clf(**kw):
    return ShardedClassifier(N, D, T, dtype=F64, seed=3, **kw)


def feats(seed=1):
    return torch.randn(B, D, dtype=F64, generator=torch.Generator().manual_seed(seed)) * 3


def test_full_softmax_loss_and_grads_match_formula():
    clf = make_clf()
    x = leaf(feats())
    loss = clf(x, INDEX)
    loss.backward()
    xr, wr = leaf(x), leaf(clf.weight)
    ref = ref_cosine_ce(xr, wr, INDEX)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(clf.weight.grad, wr.grad, rtol=1e-10, atol=1e-12)


def test_negative_sampled_loss_matches_formula_on_positives_and_negatives():
    clf = make_clf()
    x = leaf(feats())
    loss = clf(x, INDEX, negatives=NEGATIVES)
    loss.backward()
    cols = sorted(set(INDEX.tolist()) | set(NEGATIVES.tolist()))
    xr, wr = leaf(x), leaf(clf.weight)
    ref = ref_cosine_ce(xr, wr, INDEX, cols)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-12)
    grad = clf.weight.grad
    assert grad.is_sparse  # only the rows positives ∪ negatives carry gradient
    assert grad.coalesce().indices()[0].tolist() == cols
    torch.testing.assert_close(grad.to_dense(), wr.grad, rtol=1e-10, atol=1e-12)
    # every row sampled → the full softmax
    assert torch.allclose(clf(x, INDEX, negatives=torch.arange(N)), clf(x, INDEX),
                          rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("negatives", [None, NEGATIVES], ids=["full", "sampled"])
def test_detach_weight_gives_no_weight_gradient(negatives):
    clf = make_clf()
    x = leaf(feats())
    clf(x, INDEX, detach_weight=True, negatives=negatives).backward()
    assert clf.weight.grad is None
    cols = None if negatives is None else sorted(set(INDEX.tolist()) | set(negatives.tolist()))
    xr = leaf(x)
    ref_cosine_ce(xr, clf.weight.detach(), INDEX, cols).backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-12)


def test_sampled_training_with_lazy_sgd_equals_dense_sgd():
    """End to end: negative sampling + LazySGD (forward catches rows up) == the same losses
    with dense torch.optim.SGD on the full weight (zero gradient outside the sampled rows)."""
    steps, gen = 12, torch.Generator().manual_seed(4)
    batches = [(feats(10 + s), torch.randint(0, N, (B,), generator=gen),
                torch.randint(0, N, (4,), generator=gen)) for s in range(steps)]
    lazy_clf, dense_clf = make_clf(), make_clf()
    lazy = lazy_clf.make_optimizer(lr=0.0, momentum=0.9, weight_decay=0.01)
    dense = torch.optim.SGD([dense_clf.weight], lr=0.0, momentum=0.9, weight_decay=0.01)
    for step, (x, index, neg) in enumerate(batches):
        lr = cosine_warmup_lr(step, steps, base=2.0, warmup=3)
        losses = []
        for clf, opt in ((lazy_clf, lazy), (dense_clf, dense)):
            loss = clf(x, index, negatives=neg) + 0.5 * clf(x.flip(0), index, True, neg)
            loss.backward()
            if opt is dense:
                clf.weight.grad = clf.weight.grad.to_dense()
            opt.param_groups[0]["lr"] = lr
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=1e-12)
    lazy.flush()
    torch.testing.assert_close(lazy_clf.weight.detach(), dense_clf.weight.detach(),
                               rtol=1e-12, atol=1e-13)


def test_state_dict_rejects_other_layout():
    sd = ShardedClassifier(24, D, rank=0, world_size=2).state_dict()
    with pytest.raises(ValueError, match="layout mismatch"):
        ShardedClassifier(24, D, rank=1, world_size=2).load_state_dict(sd)


# ---- sharded == unsharded (2-process gloo) ------------------------------------------------------
WORLD, N_DIST, IN, BL, STEPS_DIST, K_DIST = 2, 37, 5, 4, 5, 6  # N odd: shards of 19 and 18
ONE_SHARD_STEP = 2  # every column in rank 0's block: rank 1 owns none


def dist_batch(step):
    g = torch.Generator().manual_seed(100 + step)
    xb = torch.randn(WORLD * BL, IN, dtype=F64, generator=g)  # big crops
    xs = torch.randn(WORLD * BL, IN, dtype=F64, generator=g)  # small crops (detached weight)
    hi = shard_bounds(N_DIST, 0, WORLD)[1] if step == ONE_SHARD_STEP else N_DIST
    index = torch.randint(0, hi, (WORLD * BL,), generator=g)
    index[1] = index[0]  # two views of one image on the same rank
    index[BL] = index[0]  # and on another rank
    neg = torch.randint(0, hi, (K_DIST,), generator=g)
    return xb, xs, index, neg


def step_both(opt_b, opt_c, lr_c):
    """One step of the backbone's SGD and of the classifier's LazySGD at lr ``lr_c``; zero both."""
    opt_b.step()
    opt_c.param_groups[0]["lr"] = lr_c
    opt_c.step()
    opt_b.zero_grad()
    opt_c.zero_grad()


def train(rank, world, mode):
    """The PIC step loop: DDP backbone (world > 1) + unwrapped ShardedClassifier + LazySGD."""
    torch.manual_seed(7)
    backbone = torch.nn.Linear(IN, D).double()
    model = torch.nn.parallel.DistributedDataParallel(backbone) if world > 1 else backbone
    clf = ShardedClassifier(N_DIST, D, T, rank=rank, world_size=world, dtype=F64, seed=8)
    opt_c = clf.make_optimizer(lr=0.0, momentum=0.9, weight_decay=1e-2)
    opt_b = torch.optim.SGD(backbone.parameters(), lr=0.1, momentum=0.9)
    bl = WORLD * BL // world
    mine = slice(rank * bl, (rank + 1) * bl)
    records = []
    for step in range(STEPS_DIST):
        xb, xs, index, neg = dist_batch(step)
        neg = neg if mode == "sampled" else None
        f = model(torch.cat([xb[mine], xs[mine]]))  # one DDP forward for all views
        big, small = f[:bl], f[bl:]
        loss = clf(big, index[mine], negatives=neg) + \
            0.5 * clf(small, index[mine], detach_weight=True, negatives=neg)
        loss.backward()
        records.append((loss.detach().clone(), backbone.weight.grad.clone(),
                        backbone.bias.grad.clone()))
        step_both(opt_b, opt_c, cosine_warmup_lr(step, STEPS_DIST, base=4.0, warmup=2))
    opt_c.flush()
    return records, clf.gather_full()




def _worker(rank, port, out_path):
    res = in_gloo_group(rank, WORLD, port, lambda: {mode: train(rank, WORLD, mode) for mode in ("full", "sampled")})
    torch.save(res, out_path.format(rank))


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    return spawn_and_collect(_worker, WORLD, tmp_path_factory.mktemp("pic_dist"))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "sampled"])
def test_sharded_training_equals_single_process(distributed_results, mode):
    ref_records, ref_weight = train(0, 1, mode)
    for res in distributed_results:
        records, weight = res[mode]
        for (loss, gw, gb), (r_loss, r_gw, r_gb) in zip(records, ref_records):
            torch.testing.assert_close(loss, r_loss, rtol=1e-10, atol=1e-12)
            # DDP averaged W × the local-sample gradient: the single-process gradient
            torch.testing.assert_close(gw, r_gw, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(gb, r_gb, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(weight, ref_weight, rtol=1e-10, atol=1e-12)


# ---- 'recent' negative sampling through the PIC method, 2 processes vs 1 -----------------------
RECENT_K = (6, 12)  # fewer than one global batch (8), and a ring that wraps mid-batch
STEPS_RECENT = 6


def train_recent(rank, world, k):
    """fastinst.methods.pic.PIC with negatives=k, sampling='recent', hooks called in the
    engine's order. Records per step: loss, the negatives used, the FIFO after the step."""
    from fastinst.methods.pic import PIC

    torch.manual_seed(11)
    backbone = torch.nn.Linear(IN, D).double()
    model = torch.nn.parallel.DistributedDataParallel(backbone) if world > 1 else backbone
    method = PIC(model, N_DIST, embed_dim=D, T=T, large_views=1, negatives=k, sampling="recent",
                 rank=rank, world_size=world, seed=3).double()
    opt_c = method.make_optimizer(lr=0.0, momentum=0.9, weight_decay=1e-2)
    opt_b = torch.optim.SGD(backbone.parameters(), lr=0.1, momentum=0.9)
    bl = WORLD * BL // world
    mine = slice(rank * bl, (rank + 1) * bl)
    records = []
    for step in range(STEPS_RECENT):
        xb, xs, index, _ = dist_batch(step)
        lr = cosine_warmup_lr(step, STEPS_RECENT, base=4.0, warmup=2)
        method.before_step(step)
        used = method._negatives(torch.device("cpu"))
        out = method({"index": index[mine], "views": [xb[mine], xs[mine]]})
        out["loss"].backward()
        step_both(opt_b, opt_c, lr)
        method.after_step(out, torch.tensor(True))  # the engine's flag: a finite step
        records.append((out["loss"].detach().clone(), used, method.recent.clone()))
    method.flush()
    return records, method.classifier.gather_full()


def _recent_worker(rank, port, out_path):
    res = in_gloo_group(rank, WORLD, port, lambda: {k: train_recent(rank, WORLD, k) for k in RECENT_K})
    torch.save(res, out_path.format(rank))


@pytest.fixture(scope="module")
def recent_results(tmp_path_factory):
    return spawn_and_collect(_recent_worker, WORLD, tmp_path_factory.mktemp("pic_recent"))


@pytest.mark.slow
@pytest.mark.parametrize("k", RECENT_K)
def test_recent_negatives_sharded_equal_single_process_and_a_fifo(recent_results, k):
    ref_records, ref_weight = train_recent(0, 1, k)
    # Independent reference for the sampled rows: at step s they are the k latest entries of
    # (initial draw, then every global batch's indices in rank order) — a plain Python FIFO.
    history = ref_records[0][1].tolist()  # step 0 samples the initial (uniform) draw
    assert len(history) == k
    for step, (_, used, _) in enumerate(ref_records):
        assert sorted(used.tolist()) == sorted(history[-k:]), step
        history += dist_batch(step)[2].tolist()
    for res in recent_results:
        records, weight = res[k]
        for (loss, used, fifo), (r_loss, r_used, r_fifo) in zip(records, ref_records):
            assert torch.equal(used, r_used) and torch.equal(fifo, r_fifo)
            torch.testing.assert_close(loss, r_loss, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(weight, ref_weight, rtol=1e-10, atol=1e-12)
    # the FIFO after the last step holds the k latest global indices
    assert sorted(ref_records[-1][2].tolist()) == sorted(history[-k:])

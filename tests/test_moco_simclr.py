"""MoCo v2 and SimCLR pieces: NT-Xent, the MoCo key queue / loss / momentum encoder / shuffle
BN, and LARS.

References are written here in float64 (loops where that is clearer).  The distributed tests
run 2 gloo processes once (module fixture) and check, under fastinst's convention (every rank
returns the global-batch loss L and local inputs receive W·∂L/∂x_local, so DDP's average is
the single-process gradient), that results equal a single-process run on the same global batch.
"""

import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastinst.core import dist as fdist
from fastinst.methods.moco.keys import KeyQueue, batch_shuffle, batch_unshuffle, moco_loss, momentum_update
from fastinst.train.optim import LARS
from fastinst.methods.simclr.ntxent import nt_xent
from tests.distutil import in_gloo_group, spawn_and_collect

WORLD, B_LOCAL, D, T = 2, 3, 5, 0.2
N = WORLD * B_LOCAL  # global batch
QUEUE_K, ENQUEUES = 3 * N, 5  # 5 enqueues of 6 into 18 rows: wraps around after 3


# ---- float64 references --------------------------------------------------------------------------
def ref_nt_xent(z1, z2, temperature):
    """SimCLR eq. 1 written out: mean over the 2N anchors of −log softmax of the positive."""
    z = torch.cat([z1, z2]).double()
    z = z / z.norm(dim=1, keepdim=True)
    n2 = z.shape[0]
    total = 0.0
    for i in range(n2):
        pos = (i + n2 // 2) % n2
        denom = sum(torch.exp(z[i] @ z[k] / temperature) for k in range(n2) if k != i)
        total = total - torch.log(torch.exp(z[i] @ z[pos] / temperature) / denom)
    return total / n2


def ref_moco_loss(q, k, queue, temperature):
    q, k, queue = q.double(), k.double(), queue.double()
    total = 0.0
    for b in range(q.shape[0]):
        pos = torch.exp(q[b] @ k[b] / temperature)
        neg = torch.exp(queue @ q[b] / temperature).sum()
        total = total - torch.log(pos / (pos + neg))
    return total / q.shape[0]


def views(seed):
    """Two un-normalised views [N, D] (nt_xent normalises) of the global batch."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=g) * 2, torch.randn(N, D, generator=g) * 2


def leaf(x):
    return x.detach().clone().requires_grad_(True)


def moco_inputs():
    g = torch.Generator().manual_seed(40)
    q = torch.randn(N, D, generator=g)
    k = F.normalize(torch.randn(N, D, generator=g), dim=1)
    queue = F.normalize(torch.randn(QUEUE_K, D, generator=g), dim=1)
    return q, k, queue


def keys_for(step):
    return F.normalize(torch.randn(N, D, generator=torch.Generator().manual_seed(50 + step)), dim=1)


def make_model():
    torch.manual_seed(60)
    return nn.Linear(4, D)


def model_inputs():
    g = torch.Generator().manual_seed(61)
    return torch.randn(N, 4, generator=g), torch.randn(N, 4, generator=g)


# ---- NT-Xent, single process --------------------------------------------------------------------
def test_nt_xent_matches_formula_and_gradient():
    a, b = views(1)
    x1, x2 = leaf(a), leaf(b)
    loss = nt_xent([x1, x2], T)
    loss.backward()
    r1, r2 = leaf(a.double()), leaf(b.double())
    ref = ref_nt_xent(r1, r2, T)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x1.grad.double(), r1.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x2.grad.double(), r2.grad, rtol=1e-5, atol=1e-7)


def test_nt_xent_fp32_under_autocast_and_bad_inputs():
    a, b = views(2)
    plain = nt_xent([a, b], 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = nt_xent([a, b], 0.1)
    assert amp.dtype == torch.float32 and amp.item() == pytest.approx(plain.item(), rel=1e-6)
    with pytest.raises(ValueError, match="2 views"):
        nt_xent([a, b, a], 0.1)
    with pytest.raises(ValueError, match="views must both be"):
        nt_xent([a, b[:-1]], 0.1)


# ---- MoCo, single process ------------------------------------------------------------------------
def test_moco_loss_matches_formula_and_gradient():
    q, k, queue = moco_inputs()
    x = leaf(q)
    loss = moco_loss(x, k, queue, T)
    loss.backward()
    r = leaf(q.double())
    ref = ref_moco_loss(r, k, queue, T)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), r.grad, rtol=1e-5, atol=1e-7)


def test_queue_divisibility_checked_at_construction():
    with pytest.raises(ValueError, match=r"moco queue size K=65000 .*global batch 256.*Fix"):
        KeyQueue(128, 65000, global_batch=256)
    qu = KeyQueue(D, QUEUE_K, global_batch=N)
    assert qu.queue.shape == (QUEUE_K, D) and qu.ptr.item() == 0
    assert set(qu.state_dict()) == {"queue", "ptr"}
    torch.testing.assert_close(qu.queue.norm(dim=1), torch.ones(QUEUE_K))
    with pytest.raises(ValueError, match="all-gathered"):
        qu.enqueue(keys_for(0)[:B_LOCAL])  # one rank's keys only


def single_queue_run():
    qu = KeyQueue(D, QUEUE_K, global_batch=N, seed=3)
    history = []
    for step in range(ENQUEUES):
        qu.enqueue(keys_for(step))
        history.append((qu.queue.clone(), qu.ptr.clone()))
    return history


def test_queue_fifo_with_wrap_around():
    history = single_queue_run()
    init = KeyQueue(D, QUEUE_K, global_batch=N, seed=3).queue
    expect = init.clone()
    for step, (queue, ptr) in enumerate(history):
        lo = (step * N) % QUEUE_K
        expect[lo:lo + N] = keys_for(step)
        assert torch.equal(queue, expect) and ptr.item() == (lo + N) % QUEUE_K


def make_bn_net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def test_momentum_update_matches_formula():
    online, target = make_bn_net(7), make_bn_net(8)
    online(torch.randn(5, 4))  # train-mode forward: moves the online BN running statistics
    before = {n: p.detach().double().clone() for n, p in target.named_parameters()}
    m = 0.9
    momentum_update(online, target, m)
    for (n, p), (_, po) in zip(target.named_parameters(), online.named_parameters()):
        torch.testing.assert_close(p.double(), m * before[n] + (1 - m) * po.detach().double(),
                                   rtol=1e-6, atol=1e-7)
    for bt, bo in zip(target.buffers(), online.buffers()):
        assert torch.equal(bt, bo)
    momentum_update(online, target, 1.0)  # m = 1: parameters untouched
    with pytest.raises(ValueError, match="different parameters"):
        momentum_update(online, nn.Linear(4, 3), 0.9)
    with pytest.raises(ValueError, match="momentum"):
        momentum_update(online, target, 1.5)


def test_batch_shuffle_round_trip_world1():
    x = torch.arange(24.0).view(8, 3)
    shuffled, idx = batch_shuffle(x, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(shuffled, x) and torch.equal(shuffled.sort(0).values, x)
    assert torch.equal(batch_unshuffle(shuffled * 2, idx), x * 2)


# ---- LARS ----------------------------------------------------------------------------------------
LR, MOM, WD, ETA, EPS = 0.5, 0.9, 0.1, 0.02, 1e-8


def lars_model():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[2].weight.zero_()  # ‖w‖ = 0: trust falls back to 1, no decay
    return model


def lars_grads(step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g) for p in lars_model().parameters()]


def hand_lars(steps):
    """LARS written per tensor with Python floats for the norms (float64)."""
    params = [p.detach().double().clone() for p in lars_model().parameters()]
    bufs = [torch.zeros_like(p) for p in params]
    for step in range(steps):
        for i, (w, g) in enumerate(zip(params, lars_grads(step))):
            g = g.double()
            if w.dim() <= 1:  # bias or BN affine: excluded, no decay
                d = g
            else:
                wn, gn = math.sqrt(float((w * w).sum())), math.sqrt(float((g * g).sum()))
                if wn > 0 and gn > 0:
                    d = ETA * wn / (gn + WD * wn + EPS) * (g + WD * w)
                else:
                    d = g
            bufs[i] = MOM * bufs[i] + d
            params[i] = w - LR * bufs[i]
    return params


def run_lars(steps, backend):
    model = lars_model()
    opt = LARS(model.parameters(), lr=LR, momentum=MOM, weight_decay=WD, eta=ETA, eps=EPS,
               backend=backend)
    for step in range(steps):
        for p, g in zip(model.parameters(), lars_grads(step)):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in model.parameters()], opt


def test_lars_matches_hand_computed_update():
    got, opt = run_lars(2, "torch")
    assert opt.backend == "torch"
    for a, b in zip(got, hand_lars(2)):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)
    # The trust ratio actually bites (η·‖w‖/‖g‖ ≪ 1 here): not plain SGD.
    sgd_w = lars_model()[0].weight.detach() - LR * lars_grads(0)[0]
    assert not torch.allclose(run_lars(1, "torch")[0][0], sgd_w, atol=1e-3)
    # Resumable like any torch optimiser.
    fresh = LARS(lars_model().parameters(), lr=LR, backend="torch")
    fresh.load_state_dict(opt.state_dict())
    assert fresh.param_groups[0]["eta"] == ETA


def test_lars_group_exclusion_and_args():
    model = lars_model()
    w = model[0].weight
    opt = LARS([{"params": [w], "lars_exclude": True}], lr=LR, momentum=0.0, weight_decay=WD,
               eta=ETA, backend="torch")
    before = w.detach().clone()
    w.grad = torch.ones_like(w)
    opt.step()
    torch.testing.assert_close(w.detach(), before - LR)  # plain SGD step, no decay, no trust
    with pytest.raises(ValueError, match="backend"):
        LARS(model.parameters(), lr=0.1, backend="fused")
    with pytest.raises(ValueError, match="momentum"):
        LARS(model.parameters(), lr=0.1, momentum=1.0)


class _StubLARC:
    """apex.parallel.LARC's published algorithm (arXiv 1708.03888 + apex docs), scaling mode,
    to check LARS's wiring to it where apex is not installed."""

    def __init__(self, optimizer, trust_coefficient=0.02, clip=True, eps=1e-8):
        self.optim, self.tc, self.clip, self.eps = optimizer, trust_coefficient, clip, eps

    def step(self):
        assert not self.clip
        with torch.no_grad():
            for group in self.optim.param_groups:
                wd = group["weight_decay"]
                for p in group["params"]:
                    wn, gn = p.norm(), p.grad.norm()
                    if wn != 0 and gn != 0:
                        p.grad.add_(p, alpha=wd).mul_(self.tc * wn / (gn + wd * wn + self.eps))
        self.optim.step()


def test_lars_apex_backend_wiring(monkeypatch):
    if "apex" not in sys.modules:
        apex, parallel = types.ModuleType("apex"), types.ModuleType("apex.parallel")
        parallel.LARC = _StubLARC
        apex.parallel = parallel
        monkeypatch.setitem(sys.modules, "apex", apex)
        monkeypatch.setitem(sys.modules, "apex.parallel", parallel)
    got, opt = run_lars(2, "auto")
    assert opt.backend == "apex"
    for a, b in zip(got, hand_lars(2)):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


# ---- distributed == single process (2-process gloo) ----------------------------------------------


def _work(rank):
    mine = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    res = {}
    # NT-Xent on local views: loss and the W-scaled local gradients.
    a, b = views(1)
    x1, x2 = leaf(a[mine]), leaf(b[mine])
    loss = nt_xent([x1, x2], T)
    loss.backward()
    res["nt_xent"] = (loss.detach(), x1.grad, x2.grad)
    # NT-Xent through DDP: both views in one forward (DDP allows one forward per backward).
    model = nn.parallel.DistributedDataParallel(make_model())
    i1, i2 = model_inputs()
    z = model(torch.cat([i1[mine], i2[mine]]))
    loss = nt_xent(list(z.split(B_LOCAL)), T)
    loss.backward()
    res["ddp"] = (loss.detach(), model.module.weight.grad.clone(),
                  model.module.bias.grad.clone())
    # MoCo loss on local queries against the shared queue.
    q, k, queue = moco_inputs()
    x = leaf(q[mine])
    loss = moco_loss(x, k[mine], queue, T)
    loss.backward()
    res["moco_loss"] = (loss.detach(), x.grad)
    # Queue: each rank enqueues the all-gathered keys of the global batch.
    qu = KeyQueue(D, QUEUE_K, global_batch=N, seed=3)
    res["queue"] = []
    for step in range(ENQUEUES):
        qu.enqueue(fdist.all_gather_no_grad(keys_for(step)[mine]))
        res["queue"].append((qu.queue.clone(), qu.ptr.clone()))
    # Shuffle BN round trip; a "key encoder" acting per sample on the shuffled slice.
    xs = torch.arange(N * 4, dtype=torch.float32).view(N, 2, 2)
    gen = torch.Generator().manual_seed(11)
    shuffled, idx = batch_shuffle(xs[mine], generator=gen)
    res["shuffle"] = (shuffled, idx, batch_unshuffle(shuffled * 3 + 1, idx))
    return res


def _worker(rank, port, out_path):
    torch.save(in_gloo_group(rank, WORLD, port, _work, rank), out_path.format(rank))


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    return spawn_and_collect(_worker, WORLD, tmp_path_factory.mktemp("moco_simclr_dist"))


@pytest.mark.slow
def test_distributed_nt_xent_equals_single_process(dist_results):
    a, b = views(1)
    x1, x2 = leaf(a), leaf(b)
    ref = nt_xent([x1, x2], T)
    ref.backward()
    for rank, res in enumerate(dist_results):
        mine = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        loss, g1, g2 = res["nt_xent"]
        torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
        # convention: local grad = W × single-process grad of those rows
        torch.testing.assert_close(g1 / WORLD, x1.grad[mine], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(g2 / WORLD, x2.grad[mine], rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_distributed_nt_xent_ddp_parameter_grads_equal_single_process(dist_results):
    model = make_model()
    i1, i2 = model_inputs()
    z = model(torch.cat([i1, i2]))
    loss = nt_xent(list(z.split(N)), T)
    loss.backward()
    for res in dist_results:
        d_loss, d_w, d_b = res["ddp"]
        torch.testing.assert_close(d_loss, loss.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(d_w, model.weight.grad, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(d_b, model.bias.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_distributed_moco_loss_equals_single_process(dist_results):
    q, k, queue = moco_inputs()
    x = leaf(q)
    ref = moco_loss(x, k, queue, T)
    ref.backward()
    for rank, res in enumerate(dist_results):
        mine = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        loss, grad = res["moco_loss"]
        torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad / WORLD, x.grad[mine], rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_distributed_queue_identical_across_ranks_and_equal_single(dist_results):
    single = single_queue_run()
    for step, (queue, ptr) in enumerate(single):
        for res in dist_results:
            d_queue, d_ptr = res["queue"][step]
            assert torch.equal(d_queue, queue) and torch.equal(d_ptr, ptr)
    assert single[-1][1].item() == (ENQUEUES * N) % QUEUE_K  # the pointer wrapped


@pytest.mark.slow
def test_distributed_batch_shuffle_round_trip(dist_results):
    xs = torch.arange(N * 4, dtype=torch.float32).view(N, 2, 2)
    idx = dist_results[0]["shuffle"][1]
    assert all(torch.equal(res["shuffle"][1], idx) for res in dist_results)  # one permutation
    perm = torch.argsort(idx)
    assert not torch.equal(perm, torch.arange(N))
    shuffled_global = torch.cat([res["shuffle"][0] for res in dist_results])
    assert torch.equal(shuffled_global, xs[perm])  # rank r holds slice r of the permuted batch
    for rank, res in enumerate(dist_results):
        mine = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        assert torch.equal(res["shuffle"][2], xs[mine] * 3 + 1)  # back in the original order

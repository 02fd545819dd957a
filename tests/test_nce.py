"""NPID losses: NCE, softmax-CE with per-sample / shared negatives, full softmax (K = 0).

Each is checked against a float64 formula written here; the distributed tests (2-process
gloo) check that loss values and feature / parameter gradients equal the single-process ones
on the same global batch, under the convention of fastinst.methods.npid.nce (each rank returns the global
loss L and receives W·∂L/∂x_local, so DDP's average is the single-process gradient).
"""


import pytest
import torch
import torch.nn.functional as F

from fastinst.methods.npid.bank import ShardedMemoryBank
from fastinst.methods.npid.nce import (NCECriterion, NPIDLoss, estimate_z, full_softmax_loss, nce_loss,
                                       sampled_dots, softmax_ce)
from fastinst.core.runtime import generator
from tests.distutil import in_gloo_group, spawn_and_collect

N, D, T = 23, 8, 0.1


# ---- float64 references --------------------------------------------------------------------------
def ref_nce(dots, temperature, z, num_rows, eps=1e-7):
    """lemniscate NCECriterion on P = exp(s/T)/Z, written out term by term."""
    k = dots.shape[1] - 1
    pn = 1.0 / num_rows
    p = torch.exp(dots.double() / temperature) / z
    total = 0.0
    for b in range(dots.shape[0]):
        total = total + torch.log(p[b, 0] / (p[b, 0] + k * pn + eps))
        for j in range(1, k + 1):
            total = total + torch.log(k * pn / (p[b, j] + k * pn + eps))
    return -total / dots.shape[0]


def ref_softmax_ce(logits, target):
    """mean_b [log Σ_j exp(l_bj) − l_b,target]."""
    logits = logits.double()
    lse = torch.log(torch.exp(logits).sum(1))
    return (lse - logits[torch.arange(len(target)), target]).mean()


def ref_dots(bank64, feats, index, noise):
    """[B, 1+K] of f_b·v: own row first, then per-sample [B, K] or shared [K] noise rows."""
    f = feats.double()
    pos = (f * bank64[index]).sum(1, keepdim=True)
    if noise.dim() == 2:
        neg = torch.einsum("bd,bkd->bk", f, bank64[noise])
    else:
        neg = f @ bank64[noise].t()
    return torch.cat([pos, neg], 1)


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def leaf(x):
    return x.detach().clone().requires_grad_(True)


def grad_of(fn, x):
    x = leaf(x)
    out = fn(x)
    out.backward()
    return out.detach(), x.grad


# ---- NCE and Z ----------------------------------------------------------------------------------
def test_nce_loss_matches_formula_and_gradient():
    dots = leaf(unit(5, 7, 3, seed=1)[..., 0] * 0.9)
    z = torch.tensor(3.7)
    loss = nce_loss(dots, T, z, N)
    loss.backward()
    ref, ref_grad = grad_of(lambda d: ref_nce(d, T, 3.7, N), dots.detach().double())
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dots.grad.double(), ref_grad, rtol=1e-5, atol=1e-6)


def test_z_estimated_once_on_first_call():
    crit = NCECriterion(N, T)
    assert crit.z.item() < 0 and "z" in crit.state_dict()
    d1, d2 = unit(4, 6, 3, seed=2)[..., 0], unit(4, 6, 3, seed=3)[..., 0]
    z1 = N * torch.exp(d1.double() / T).mean()
    torch.testing.assert_close(estimate_z(d1, T, N).double(), z1, rtol=1e-6, atol=0)
    loss1 = crit(d1)
    torch.testing.assert_close(crit.z.double(), z1, rtol=1e-6, atol=0)
    torch.testing.assert_close(loss1.double(), ref_nce(d1, T, z1, N), rtol=1e-6, atol=1e-6)
    loss2 = crit(d2)  # Z frozen after the first batch (seed behaviour)
    torch.testing.assert_close(crit.z.double(), z1, rtol=1e-6, atol=0)
    torch.testing.assert_close(loss2.double(), ref_nce(d2, T, z1, N), rtol=1e-6, atol=1e-6)
    fresh = NCECriterion(N, T)
    fresh.load_state_dict(crit.state_dict())
    assert fresh.z.item() == crit.z.item()


def test_z_ema_option():
    crit = NCECriterion(N, T, z_momentum=0.9)
    d1, d2 = unit(4, 6, 3, seed=4)[..., 0], unit(4, 6, 3, seed=5)[..., 0]
    crit(d1)
    z1 = N * torch.exp(d1.double() / T).mean()
    loss2 = crit(d2)
    z2 = 0.9 * z1 + 0.1 * N * torch.exp(d2.double() / T).mean()
    torch.testing.assert_close(crit.z.double(), z2, rtol=1e-6, atol=0)
    torch.testing.assert_close(loss2.double(), ref_nce(d2, T, z2, N), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="z_momentum"):
        NCECriterion(N, T, z_momentum=1.0)


# ---- sampled logits and softmax-CE ---------------------------------------------------------------
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampled_dots_and_softmax_ce(shared, dtype):
    bank = ShardedMemoryBank(N, D, dtype=dtype, seed=6)
    bank64 = bank.shard.double()  # exactly the stored values
    feats, index = unit(5, D, seed=7), torch.tensor([0, 4, 4, 22, 9])
    g = torch.Generator().manual_seed(8)
    noise = torch.randint(0, N, (6,) if shared else (5, 6), generator=g)
    loss, grad = grad_of(lambda x: softmax_ce(sampled_dots(bank, x, index, noise), T), feats)
    ref, ref_grad = grad_of(
        lambda x: ref_softmax_ce(ref_dots(bank64, x, index, noise) / T, torch.zeros(5).long()),
        feats.double())
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
    dots = sampled_dots(bank, feats, index, noise)
    assert dots.shape == (5, 7) and dots.dtype == torch.float32


def test_full_softmax_matches_formula():
    bank = ShardedMemoryBank(N, D, dtype=torch.bfloat16, seed=9)
    bank64 = bank.shard.double()
    feats, index = unit(6, D, seed=10), torch.tensor([1, 2, 3, 3, 20, 22])
    loss, grad = grad_of(lambda x: full_softmax_loss(bank, x, index, T), feats)
    ref, ref_grad = grad_of(lambda x: ref_softmax_ce(x @ bank64.t() / T, index), feats.double())
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


def test_npid_loss_end_to_end_matches_formula():
    # NPIDLoss draws per-sample noise uniformly from runtime.generator(seed, "npid-noise").
    bank = ShardedMemoryBank(N, D, seed=11)
    feats, index = unit(4, D, seed=12), torch.tensor([3, 1, 4, 1])
    crit = NPIDLoss(N, loss="nce", num_negatives=5, temperature=T, seed=13)
    noise = torch.randint(0, N, (4, 5), generator=generator(13, "npid-noise"))
    x = leaf(feats)
    loss, gathered, gidx = crit(x, index, bank)
    loss.backward()
    dots64 = ref_dots(bank.shard.double(), feats, index, noise)
    z = N * torch.exp(dots64 / T).mean()
    ref, ref_grad = grad_of(lambda f: ref_nce(ref_dots(bank.shard.double(), f, index, noise),
                                              T, z, N), feats.double())
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
    assert torch.equal(gathered, feats) and torch.equal(gidx, index) and not gathered.requires_grad


def test_npid_loss_rng_state_round_trip():
    bank = ShardedMemoryBank(N, D, seed=14)
    a = NPIDLoss(N, loss="softmax", num_negatives=4, temperature=T, seed=15)
    feats, index = unit(3, D, seed=16), torch.tensor([0, 1, 2])
    a(feats, index, bank)  # advance the generator
    b = NPIDLoss(N, loss="softmax", num_negatives=4, temperature=T, seed=99)
    b.load_state_dict(a.state_dict())
    assert a(feats, index, bank).loss.item() == b(feats, index, bank).loss.item()


def test_update_between_forward_and_backward_is_refused():
    bank = ShardedMemoryBank(N, D, seed=17)
    for k in (0, 5):
        x = leaf(unit(3, D, seed=18))
        out = NPIDLoss(N, loss="softmax", num_negatives=k, temperature=T)(x, torch.arange(3), bank)
        bank.update(out.index, out.feats)
        with pytest.raises(RuntimeError, match="after loss.backward"):
            out.loss.backward()


def test_loss_is_fp32_under_autocast():
    bank = ShardedMemoryBank(N, D, seed=19)
    crit = NPIDLoss(N, loss="softmax", num_negatives=0, temperature=0.07)
    feats, index = unit(4, D, seed=20), torch.arange(4)
    plain = crit(feats, index, bank).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = crit(feats, index, bank).loss
    assert amp.dtype == torch.float32 and amp.item() == pytest.approx(plain.item(), rel=1e-6)


def test_bad_configurations():
    with pytest.raises(ValueError, match="loss='softmax'"):
        NPIDLoss(N, loss="nce", num_negatives=0)
    with pytest.raises(ValueError, match="loss="):
        NPIDLoss(N, loss="infonce")


# ---- distributed == single process (2-process gloo) ----------------------------------------------
WORLD, B_LOCAL, STEPS = 2, 3, 2
CONFIGS = [  # (loss, K, shared negatives, z_momentum)
    ("nce", 5, False, None), ("nce", 5, True, 0.5),
    ("softmax", 5, False, None), ("softmax", 5, True, None), ("softmax", 0, False, None)]




def batch(step):
    g = torch.Generator().manual_seed(200 + step)
    index = torch.randint(0, N, (WORLD * B_LOCAL,), generator=g)
    index[1] = index[0]  # two views of one image, on the same rank
    index[B_LOCAL] = index[0]  # and on another rank
    return unit(WORLD * B_LOCAL, D, seed=300 + step), index


def run_config(cfg, bank, feats_fn, steps=STEPS):
    """Per step: loss, backward, then bank update (the training order). Returns records."""
    kind, k, shared, zm = cfg
    crit = NPIDLoss(N, loss=kind, num_negatives=k, shared_negatives=shared, temperature=T,
                    z_momentum=zm, seed=21)
    records = []
    for step in range(steps):
        x, index = feats_fn(step)
        out = crit(x, index, bank)
        out.loss.backward()
        bank.update(out.index, out.feats)
        records.append((out.loss.detach(), x.grad.clone()))
    return records


def make_model():
    torch.manual_seed(22)
    return torch.nn.Linear(5, D)


def model_inputs():
    return torch.randn(WORLD * B_LOCAL, 5, generator=torch.Generator().manual_seed(23))


def ddp_step(model, inputs, index, bank, cfg):
    kind, k, shared, zm = cfg
    crit = NPIDLoss(N, loss=kind, num_negatives=k, shared_negatives=shared, temperature=T, seed=24)
    loss = crit(F.normalize(model(inputs), dim=1), index, bank).loss
    loss.backward()
    return loss.detach()


def _loss_work(rank):
    mine = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)

    def local_feats(step):
        feats, index = batch(step)
        return leaf(feats[mine]), index[mine]

    res = {}
    for cfg in CONFIGS:
        bank = ShardedMemoryBank(N, D, rank=rank, world_size=WORLD, seed=25)
        res[cfg] = run_config(cfg, bank, local_feats)
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    for cfg in (CONFIGS[0], CONFIGS[4]):
        bank = ShardedMemoryBank(N, D, rank=rank, world_size=WORLD, seed=25)
        model.zero_grad()
        loss = ddp_step(model, model_inputs()[mine], batch(0)[1][mine], bank, cfg)
        res[("ddp",) + cfg] = (loss, model.module.weight.grad.clone(),
                               model.module.bias.grad.clone())
    return res


def _loss_worker(rank, port, out_path):
    torch.save(in_gloo_group(rank, WORLD, port, _loss_work, rank), out_path.format(rank))


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    return spawn_and_collect(_loss_worker, WORLD, tmp_path_factory.mktemp("nce_dist"))


@pytest.mark.slow
@pytest.mark.parametrize("cfg", CONFIGS,
                         ids=lambda c: f"{c[0]}-K{c[1]}-{'shared' if c[2] else 'per'}")
def test_distributed_loss_and_feature_grads_equal_single_process(distributed_results, cfg):
    single = run_config(cfg, ShardedMemoryBank(N, D, seed=25),
                        lambda step: (leaf(batch(step)[0]), batch(step)[1]))
    for rank, res in enumerate(distributed_results):
        mine = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        for (loss, grad), (ref_loss, ref_grad) in zip(res[cfg], single):
            torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
            # convention: local grad = W × single-process grad of those rows
            torch.testing.assert_close(grad / WORLD, ref_grad[mine], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[4]], ids=["nce", "full-softmax"])
def test_ddp_parameter_grads_equal_single_process(distributed_results, cfg):
    model = make_model()
    loss = ddp_step(model, model_inputs(), batch(0)[1], ShardedMemoryBank(N, D, seed=25), cfg)
    for res in distributed_results:
        d_loss, d_w, d_b = res[("ddp",) + cfg]
        torch.testing.assert_close(d_loss, loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(d_w, model.weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(d_b, model.bias.grad, rtol=1e-4, atol=1e-6)

"""ISL's formulas (fastinst/methods/isl/loss.py, gan.py) against float64 references written here, the sharded loss
at 2 ranks against 1, and the GAN's stopping rule on scripted loss sequences."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastinst.methods.isl.gan import StoppingRule, d_loss, g_loss, mining_radius, triplet_logits
from fastinst.methods.isl.loss import isl_loss
from fastinst.methods.npid.bank import ShardedMemoryBank
from tests.distutil import in_gloo_group, spawn_and_collect

N, D, T = 9, 5, 0.1
NBRS = [[-1, -1, -1], [4, 6, -1], [-1, -1, -1], [0, -1, -1]]  # A(i)∖{i} of the batch below
INDEX = [2, 3, 7, 5]


def _data():
    g = torch.Generator().manual_seed(3)
    feats = F.normalize(torch.randn(len(INDEX), D, generator=g, dtype=torch.float64), dim=1)
    bank = F.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=1)
    return feats, bank


def reference_loss(feats, bank, index, nbrs, T, w=0.5):
    """L = mean_i[−log Σ_{A(i)} p_ij + w·KL(p_i‖q_i)·[|A(i)|>1]], float64, written out."""
    terms = []
    for b, i in enumerate(index):
        p = torch.softmax(feats[b] @ bank.t() / T, 0)
        a = [i] + [j for j in nbrs[b] if j >= 0]
        term = -torch.log(p[a].sum())
        if len(a) > 1:
            others = a[1:]
            h = others[max(range(len(others)), key=lambda k: float(bank[i] @ bank[others[k]]))]
            q = torch.softmax(bank[h] @ bank.t() / T, 0)
            term = term + w * (p * (p.log() - q.log())).sum()
        terms.append(term)
    return torch.stack(terms).mean()


def test_loss_and_gradient_match_the_formula():
    feats, bank_rows = _data()
    ref_f = feats.clone().requires_grad_(True)
    ref = reference_loss(ref_f, bank_rows, INDEX, NBRS, T)
    ref.backward()
    bank = ShardedMemoryBank(N, D)
    bank.shard.copy_(bank_rows.float())
    f = feats.float().requires_grad_(True)
    out = isl_loss(f, torch.tensor(INDEX), torch.tensor(NBRS), bank, T)
    out["loss"].backward()
    assert float(out["loss"].detach()) == pytest.approx(float(ref), rel=1e-5)
    torch.testing.assert_close(f.grad.double(), ref_f.grad, rtol=1e-4, atol=1e-6)
    # |A(i)| = 1 is NPID's full softmax: −log p_ii, no KL term
    p = torch.softmax(feats[0] @ bank_rows.t() / T, 0)
    assert float(out["nbr"][0]) == pytest.approx(float(-p[INDEX[0]].log()), rel=1e-5)


def _sharded_worker(rank, port, pattern):
    def run():
        feats, bank_rows = _data()
        bank = ShardedMemoryBank(N, D, rank=rank, world_size=2)
        bank.shard.copy_(bank_rows[bank.start:bank.end].float())
        f = feats.float().requires_grad_(True)
        out = isl_loss(f, torch.tensor(INDEX), torch.tensor(NBRS), bank, T)
        out["loss"].backward()
        return {"loss": out["loss"].detach(), "grad": f.grad, "kl": out["kl"]}

    torch.save(in_gloo_group(rank, 2, port, run), pattern.format(rank))


@pytest.mark.slow
def test_sharded_loss_on_two_ranks_equals_one(tmp_path):
    feats, bank_rows = _data()
    bank = ShardedMemoryBank(N, D)
    bank.shard.copy_(bank_rows.float())
    f = feats.float().requires_grad_(True)
    one = isl_loss(f, torch.tensor(INDEX), torch.tensor(NBRS), bank, T)
    one["loss"].backward()
    ranks = spawn_and_collect(_sharded_worker, 2, tmp_path)
    for r in ranks:
        torch.testing.assert_close(r["loss"], one["loss"].detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(r["kl"], one["kl"], rtol=1e-5, atol=1e-7)
    # fastinst.core.dist's convention: each rank's gradient is its columns' part of ∂(Σ_r L_r)/∂f = 2·∂L/∂f
    # (the all-gather's backward then sums the parts); half their sum is the 1-process gradient
    torch.testing.assert_close((ranks[0]["grad"] + ranks[1]["grad"]) / 2, f.grad, rtol=1e-5, atol=1e-6)


def _bce(prob, y):
    return -(y * math.log(prob) + (1 - y) * math.log(1 - prob))


def test_gan_losses_match_the_formulas():
    torch.manual_seed(0)
    a, p, n, fake = (torch.randn(4, 3, dtype=torch.float64) for _ in range(4))
    lin = torch.nn.Linear(9, 1).double()

    def disc(x, y, z):
        return lin(torch.cat([x, y, z], 1)).squeeze(1)

    logits = triplet_logits(disc, a, p, n, fake)
    s = torch.sigmoid(logits).tolist()  # [3][B]: D(a,p,n), D(a,p,p'), D(a,p',n)
    s_real = [float(torch.sigmoid(disc(a, p, n))[b]) for b in range(4)]
    s_fp = [float(torch.sigmoid(disc(a, p, fake))[b]) for b in range(4)]
    s_fpn = [float(torch.sigmoid(disc(a, fake, n))[b]) for b in range(4)]
    assert s[0] == pytest.approx(s_real) and s[1] == pytest.approx(s_fp) and s[2] == pytest.approx(s_fpn)

    def mean_bce(ps, y):
        return sum(_bce(q, y) for q in ps) / len(ps)

    ref_d = 0.5 * (mean_bce(s_real, 1) + 0.5 * mean_bce(s_fp, 0) + 0.5 * mean_bce(s_fpn, 0))
    ref_g = 0.5 * mean_bce(s_fp, 1) + 0.5 * mean_bce(s_fpn, 1)
    assert float(d_loss(logits)) == pytest.approx(ref_d, rel=1e-6)
    assert float(g_loss(logits)) == pytest.approx(ref_g, rel=1e-6)


def test_mining_radius():
    s = torch.tensor([0.0, 0.5, 1.0])
    assert mining_radius(s, 0.6).tolist() == pytest.approx([1.0, 0.8, 0.6])


@pytest.mark.parametrize("losses, patience, beta, expect_best, stop_at", [
    ([3.0, 2.0, 2.5, 2.6, 2.7], 2, 0.0, [True, True, False, False, False], 3),  # plain: 2 epochs w/o gain
    ([3.0, 2.0, 2.5, 2.6, 2.7], 0, 0.0, [True, True, False, False, False], None),  # budget only
    ([4.0, 1.0, 4.0, 4.0, 1.0, 1.0], 3, 0.5, [True, True, False, False, True, True], None),  # EMA: gains again
])
def test_stopping_rule_on_scripted_losses(losses, patience, beta, expect_best, stop_at):
    rule = StoppingRule(patience, beta)
    ema, best, got, stopped = None, math.inf, [], None
    for e, x in enumerate(losses):
        ema = x if ema is None else beta * ema + (1 - beta) * x  # the EMA written out
        is_best, stop = rule.update(x)
        assert rule.ema == pytest.approx(ema)
        assert is_best == (ema < best)
        best = min(best, ema)
        got.append(is_best)
        if stop and stopped is None:
            stopped = e
    assert got == expect_best and stopped == stop_at
    state = rule.state()
    again = StoppingRule(patience, beta)
    again.load(state)
    assert again.state() == state

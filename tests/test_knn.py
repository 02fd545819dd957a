import math
import os

import pytest
import torch
import torch.multiprocessing as mp

from fastinst.core.knn import knn_classify
from tests.distutil import free_port, in_gloo_group


def _clustered(n_train, n_query, num_classes, dim, noise, seed):
    """Class-centred Gaussian features: accuracy is informative (neither 0 nor 100%)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=g)
    tl = torch.randint(0, num_classes, (n_train,), generator=g)
    ql = torch.randint(0, num_classes, (n_query,), generator=g)
    t = centers[tl] + noise * torch.randn(n_train, dim, generator=g)
    q = centers[ql] + noise * torch.randn(n_query, dim, generator=g)
    t = torch.nn.functional.normalize(t, dim=1)
    return q, ql, t, tl


# A decision closer to a tie than this may go either way in float32 (similarities of these 16-d
# unit vectors are exact to ~1e-7, the weights exp(s / sigma) then to ~1e-7 / sigma relative):
# such queries may differ from the float64 reference, by one count each.
_TIE = 1e-6


def _reference(q, ql, t, tl, num_classes, k, sigma):
    """Independent float64 NPID weighted kNN, one query at a time in plain Python. Returns
    (top1 %, top5 %, queries whose top-1 / top-5 decision is within float32 rounding of a tie)."""
    q = q.double()
    t = t.double()
    qn = q / q.norm(dim=1, keepdim=True)
    tn = t / t.norm(dim=1, keepdim=True)
    labels = tl.tolist()
    top1 = top5 = 0
    near_tie = 0
    for i in range(q.shape[0]):
        sims = (tn @ qn[i]).tolist()
        order = sorted(range(len(sims)), key=lambda j: -sims[j])
        nearest = order[:k]
        votes = [0.0] * num_classes
        for j in nearest:
            votes[labels[j]] += math.exp((sims[j] - 1.0) / sigma)  # shifted: same ranking, no overflow
        ranking = sorted(range(num_classes), key=lambda c: -votes[c])
        target = int(ql[i])
        top1 += ranking[0] == target
        top5 += target in ranking[:5]
        cut = k < len(sims) and sims[order[k - 1]] - sims[order[k]] < _TIE  # who is in the k nearest
        others = sorted((votes[c] for c in range(num_classes) if c != target), reverse=True)
        close = [abs(votes[target] - others[r]) < _TIE / sigma * max(votes[target], others[r]) and
                 votes[target] + others[r] > 0  # exact zeros are no rounding question
                 for r in (0, 4) if r < len(others)]  # against the best other class, and the 5th best
        near_tie += bool(cut or any(close))
    n = q.shape[0]
    return 100.0 * top1 / n, 100.0 * top5 / n, near_tie


def _check(result, ref):
    """Equal to the reference, up to one count for each query that is within rounding of a tie
    (there are none in most cases; the margin is counted, not guessed)."""
    slack = 100.0 * ref[2] / result["n"] + 1e-9
    assert result["top1"] == pytest.approx(ref[0], abs=slack)
    assert result["top5"] == pytest.approx(ref[1], abs=slack)


@pytest.mark.parametrize(
    "n_train,n_query,num_classes,k,sigma,seed",
    [
        (300, 60, 10, 200, 0.07, 0),  # paper defaults
        (300, 60, 10, 20, 0.07, 1),  # k > num_classes
        (120, 40, 8, 500, 0.1, 2),  # k > n_train: every row votes
        (200, 50, 12, 1, 0.07, 3),  # 1-NN
        (200, 50, 12, 30, 0.005, 4),  # tiny sigma: exp(1/0.005) overflows fp32 naively
        (150, 30, 3, 10, 0.07, 5),  # fewer than 5 classes: top-5 covers all
    ],
)
def test_matches_bruteforce_reference(n_train, n_query, num_classes, k, sigma, seed):
    q, ql, t, tl = _clustered(n_train, n_query, num_classes, 16, noise=1.2, seed=seed)
    result = knn_classify(q, ql, t, tl, num_classes, k=k, sigma=sigma, chunk=16)
    _check(result, _reference(q, ql, t, tl, num_classes, k, sigma))
    assert result["n"] == n_query
    if num_classes > 5:
        assert 0.0 < result["top1"] < 100.0  # the data is not trivial


def test_chunking_invariance():
    q, ql, t, tl = _clustered(400, 77, 10, 16, noise=1.2, seed=7)
    results = [knn_classify(q, ql, t, tl, 10, k=50, chunk=c) for c in (1, 7, 64, 77, 4096)]
    assert all(r == results[0] for r in results)


def test_unnormalised_inputs_use_cosine():
    q, ql, t, tl = _clustered(300, 50, 10, 16, noise=1.2, seed=8)
    g = torch.Generator().manual_seed(0)
    scaled_t = t * (0.1 + 5 * torch.rand(t.shape[0], 1, generator=g))
    scaled_q = q * 3.0
    base = knn_classify(q, ql, t, tl, 10, k=40)
    assert knn_classify(scaled_q, ql, scaled_t, tl, 10, k=40) == base


def test_perfect_when_queries_are_train_rows():
    q, ql, t, tl = _clustered(100, 1, 4, 32, noise=0.05, seed=9)
    result = knn_classify(t, tl, t, tl, 4, k=1)
    assert result["top1"] == 100.0 and result["top5"] == 100.0


def test_bad_arguments():
    q, ql, t, tl = _clustered(10, 4, 3, 8, noise=1.0, seed=0)
    with pytest.raises(ValueError, match="dims differ"):
        knn_classify(q[:, :4], ql, t, tl, 3)
    with pytest.raises(ValueError, match="k >= 1"):
        knn_classify(q, ql, t, tl, 3, k=0)


# ---- distributed: train rows sharded unevenly over 2 gloo ranks -------------------------

# (split point of the train rows between rank 0 and rank 1, k)
_SPLITS = [(37, 50), (5, 50), (0, 30), (150, 30), (90, 400)]




def _dist_work(rank, data):
    q, ql, t, tl = data
    results = []
    for split, k in _SPLITS:
        lo, hi = (0, split) if rank == 0 else (split, t.shape[0])
        results.append(knn_classify(q, ql, t[lo:hi], tl[lo:hi], 10, k=k, chunk=13, distributed=True))
    return results


def _dist_worker(rank, world, port, data, out_dir):
    torch.save(in_gloo_group(rank, world, port, _dist_work, rank, data), os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_two_process_sharded_equals_single(tmp_path):
    data = _clustered(150, 45, 10, 16, noise=1.2, seed=11)
    mp.spawn(_dist_worker, args=(2, free_port(), data, str(tmp_path)), nprocs=2, join=True)
    q, ql, t, tl = data
    expected = [knn_classify(q, ql, t, tl, 10, k=k, chunk=13) for _, k in _SPLITS]
    for rank in range(2):
        got = torch.load(os.path.join(tmp_path, f"rank{rank}.pt"))
        assert got == expected, f"rank {rank}"
    # And the single-process numbers themselves match the float64 reference.
    for (_, k), res in zip(_SPLITS, expected):
        _check(res, _reference(q, ql, t, tl, 10, k, 0.07))

"""ShardedMemoryBank: NPID update rule, storage dtypes, Triton kernel, sharding, checkpoints.

References are float64 formulas written here (never the code under test).  Multi-process
tests use gloo on 127.0.0.1 via torch.multiprocessing.spawn.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from fastinst.core.dist import all_gather_no_grad
from fastinst.methods.npid.bank import ShardedMemoryBank, shard_bounds
from tests.distutil import free_port, in_gloo_group

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, D, M = 37, 8, 0.5  # 37 rows: divisible by neither 2 nor 3


# ---- independent float64 reference ------------------------------------------------------------
def ref_update(bank64, index, feats, momentum):
    """NPID: average duplicate views, then v ← (m·v + (1−m)·x)/‖·‖, all in float64."""
    groups = {}
    for i, r in enumerate(index.tolist()):
        groups.setdefault(r, []).append(feats[i].double())
    for r, xs in groups.items():
        x = torch.stack(xs).mean(0)
        v = momentum * bank64[r] + (1 - momentum) * x
        bank64[r] = v / math.sqrt(float((v * v).sum()))
    return bank64


def global_batch(step, size, num_rows=N, dim=D):
    """Deterministic global batch with a repeated index (two views of one image)."""
    g = torch.Generator().manual_seed(100 + step)
    index = torch.randint(0, num_rows, (size,), generator=g)
    index[1] = index[0]
    feats = torch.nn.functional.normalize(torch.randn(size, dim, generator=g), dim=1)
    return index, feats


# ---- layout and initialisation -------------------------------------------------------------------
def test_shard_bounds_even_and_complete():
    for n, w in [(37, 2), (37, 3), (10, 10), (1000, 7)]:
        bounds = [shard_bounds(n, r, w) for r in range(w)]
        sizes = [e - s for s, e in bounds]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(bounds[r][1] == bounds[r + 1][0] for r in range(w - 1))
        assert sizes == [n // w + (1 if r < n % w else 0) for r in range(w)]


def test_init_range_and_world_size_independence():
    n, dim = 40000, 4  # crosses the init chunk boundaries
    stdv = 1 / math.sqrt(dim / 3)  # lemniscate
    whole = ShardedMemoryBank(n, dim, seed=7).shard
    assert whole.shape == (n, dim) and whole.dtype == torch.float32
    assert whole.abs().max() <= stdv and whole.min() < -0.99 * stdv and whole.max() > 0.99 * stdv
    assert abs(whole.mean().item()) < 0.01 * stdv
    parts = [ShardedMemoryBank(n, dim, rank=r, world_size=3, seed=7).shard for r in range(3)]
    assert torch.equal(torch.cat(parts), whole)
    assert not torch.equal(ShardedMemoryBank(n, dim, seed=8).shard, whole)


def test_constructor_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        ShardedMemoryBank(10, rank=2, world_size=2)
    with pytest.raises(ValueError, match="dtype"):
        ShardedMemoryBank(10, dtype=torch.float64)
    with pytest.raises(ValueError, match="kernel"):
        ShardedMemoryBank(10, kernel="cuda")


# ---- update rule ---------------------------------------------------------------------------------
def test_update_matches_float64_reference_over_steps():
    bank = ShardedMemoryBank(N, D, M, seed=1, kernel="torch")
    ref = bank.shard.double().clone()
    for step in range(6):
        index, feats = global_batch(step, 12)
        bank.update(index, feats)
        ref_update(ref, index, feats, M)
    torch.testing.assert_close(bank.shard.double(), ref, atol=2e-6, rtol=0)
    assert bank.num_updates == 6


def test_duplicate_indices_are_averaged():
    bank = ShardedMemoryBank(6, 3, 0.5, kernel="torch")
    old = bank.shard.double().clone()
    a, b, c = torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0]), torch.tensor([0, 0, 1.0])
    bank.update(torch.tensor([3, 5, 3]), torch.stack([a, c, b]))
    v3 = 0.5 * old[3] + 0.5 * (a + b).double() / 2
    v5 = 0.5 * old[5] + 0.5 * c.double()
    torch.testing.assert_close(bank.shard[3].double(), v3 / v3.norm(), atol=1e-6, rtol=0)
    torch.testing.assert_close(bank.shard[5].double(), v5 / v5.norm(), atol=1e-6, rtol=0)
    for r in (0, 1, 2, 4):
        assert torch.equal(bank.shard[r].double(), old[r])


@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 8e-3), (torch.float16, 1e-3)])
def test_low_precision_storage(dtype, atol):
    bank = ShardedMemoryBank(N, D, M, dtype=dtype, seed=2, kernel="torch")
    assert bank.shard.dtype == dtype
    for step in range(3):
        index, feats = global_batch(step, 10)
        ref = ref_update(bank.shard.double().clone(), index, feats, M)  # from stored values
        bank.update(index, feats.to(dtype))  # low-precision inputs are accumulated in fp32
        assert bank.shard.dtype == dtype
        # feats rounded to `dtype` by the caller, result rounded once on store: ≤ ~1 ulp
        torch.testing.assert_close(bank.shard.double(), ref, atol=atol, rtol=0)


def test_only_owned_rows_change():
    bank = ShardedMemoryBank(N, D, M, rank=1, world_size=3, seed=3, kernel="torch")
    start, end = shard_bounds(N, 1, 3)
    assert (bank.start, bank.end, bank.rows_local) == (start, end, end - start)
    full = ShardedMemoryBank(N, D, seed=3).shard.double()
    index, feats = global_batch(0, 30)
    bank.update(index, feats)
    ref = ref_update(full.clone(), index, feats, M)[start:end]
    torch.testing.assert_close(bank.shard.double(), ref, atol=1e-6, rtol=0)
    assert bank.owner_mask(torch.tensor([start - 1, start, end - 1, end])).tolist() == \
        [False, True, True, False]
    assert bank.local_index(torch.tensor([start, end - 1])).tolist() == [0, end - start - 1]


def test_rows_single_process_is_fp32_copy():
    bank = ShardedMemoryBank(N, D, dtype=torch.bfloat16)
    idx = torch.tensor([[0, 36], [4, 4]])
    out = bank.rows(idx)
    assert out.shape == (2, 2, D) and out.dtype == torch.float32
    assert torch.equal(out, bank.shard[idx].float())


# ---- Triton kernel under the interpreter ---------------------------------------------------------
_TRITON_SCRIPT = r"""
import json, torch
from fastinst.methods.npid.bank import ShardedMemoryBank
out = {}
g = torch.Generator().manual_seed(0)
index = torch.randint(0, 53, (40,), generator=g)
index[1] = index[0]
feats = torch.nn.functional.normalize(torch.randn(40, 24, generator=g), dim=1)
for name in ("float32", "bfloat16", "float16"):
    dt = getattr(torch, name)
    # rank 1 of 3: updates must skip other ranks' rows; D = 24 exercises the masked tail.
    tri = ShardedMemoryBank(53, 24, 0.5, rank=1, world_size=3, dtype=dt, seed=4, kernel="triton")
    ref = ShardedMemoryBank(53, 24, 0.5, rank=1, world_size=3, dtype=dt, seed=4, kernel="torch")
    before = tri.shard.clone()
    for step in range(2):
        tri.update(index, feats.to(dt))
        ref.update(index, feats.to(dt))
    own = tri.owner_mask(index)
    touched = torch.zeros(tri.rows_local, dtype=torch.bool)
    touched[tri.local_index(index[own])] = True
    out[name] = dict(
        diff=(tri.shard.float() - ref.shard.float()).abs().max().item(),
        untouched_same=bool(torch.equal(tri.shard[~touched], before[~touched])),
        dtype=str(tri.shard.dtype), n_touched=int(touched.sum()))
print(json.dumps(out))
"""


def test_triton_kernel_under_interpreter_matches_torch_path():
    pytest.importorskip("triton")
    # TRITON_INTERPRET must be set before triton is imported, hence a fresh interpreter.
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    # The interpreter truncates fp32 → bf16 (GPU rounds to nearest): allow one bf16 ulp.
    tol = {"float32": 1e-6, "bfloat16": 8e-3, "float16": 1e-3}
    for name, r in res.items():
        assert r["diff"] <= tol[name], (name, r)
        assert r["untouched_same"] and r["n_touched"] > 0 and r["dtype"] == f"torch.{name}"


def test_triton_kernel_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    bank = ShardedMemoryBank(8, 4, kernel="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        bank.update(torch.tensor([1]), torch.ones(1, 4))


# ---- checkpoints ---------------------------------------------------------------------------------
def test_state_dict_round_trip(tmp_path):
    bank = ShardedMemoryBank(N, D, rank=1, world_size=2, seed=5, dtype=torch.bfloat16)
    index, feats = global_batch(0, 8)
    bank.update(index, feats)
    torch.save(bank.state_dict(), tmp_path / "bank.pt")
    fresh = ShardedMemoryBank(N, D, rank=1, world_size=2, seed=99, dtype=torch.bfloat16)
    fresh.load_state_dict(torch.load(tmp_path / "bank.pt"))
    assert torch.equal(fresh.shard, bank.shard) and fresh.num_updates == 1
    # inside a parent module (prefixed keys) too
    parent, other = torch.nn.Module(), torch.nn.Module()
    parent.bank, other.bank = bank, ShardedMemoryBank(N, D, rank=1, world_size=2, seed=98,
                                                      dtype=torch.bfloat16)
    other.load_state_dict(parent.state_dict())
    assert torch.equal(other.bank.shard, bank.shard)


def test_state_dict_layout_mismatch_is_a_clear_error():
    saved = ShardedMemoryBank(N, D, rank=0, world_size=2).state_dict()
    with pytest.raises(ValueError, match=r"rank: saved 0 vs this bank 1"):
        ShardedMemoryBank(N, D, rank=1, world_size=2).load_state_dict(saved)
    with pytest.raises(ValueError, match=r"world_size: saved 2 vs this bank 3"):
        ShardedMemoryBank(N, D, rank=0, world_size=3).load_state_dict(saved)
    with pytest.raises(ValueError, match=r"num_rows: saved 37 vs this bank 38"):
        ShardedMemoryBank(38, D, rank=0, world_size=2).load_state_dict(saved)
    with pytest.raises(ValueError, match="layout record"):
        ShardedMemoryBank(N, D, rank=0, world_size=2).load_state_dict({"shard": saved["shard"]})


# ---- sharded == unsharded (multi-process gloo) ---------------------------------------------------


def _bank_work(rank, world, dtype_name, steps, b_local):
    bank = ShardedMemoryBank(N, D, M, rank=rank, world_size=world,
                             dtype=getattr(torch, dtype_name), seed=11)
    for step in range(steps):
        index, feats = global_batch(step, world * b_local)
        mine = slice(rank * b_local, (rank + 1) * b_local)
        # the caller's job in training: gather the global batch, then update
        bank.update(all_gather_no_grad(index[mine]), all_gather_no_grad(feats[mine]))
    probe = torch.tensor([[0, N - 1, 18], [18, 5, 36]])
    return dict(full=bank.full_bank(), rows=bank.rows(probe), probe=probe,
                shard=bank.shard, bounds=(bank.start, bank.end))


def _bank_worker(rank, world, port, out_dir, dtype_name, steps, b_local):
    res = in_gloo_group(rank, world, port, _bank_work, rank, world, dtype_name, steps, b_local)
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("world,dtype_name", [(2, "float32"), (3, "float32"), (3, "bfloat16")])
def test_sharded_bank_equals_single_process(tmp_path, world, dtype_name):
    steps, b_local = 5, 4
    mp.spawn(_bank_worker, args=(world, free_port(), str(tmp_path), dtype_name, steps, b_local),
             nprocs=world)
    dtype = getattr(torch, dtype_name)
    single = ShardedMemoryBank(N, D, M, dtype=dtype, seed=11)
    for step in range(steps):
        single.update(*global_batch(step, world * b_local))
    for rank in range(world):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        start, end = res["bounds"]
        assert (start, end) == shard_bounds(N, rank, world)
        assert res["full"].dtype == dtype and res["full"].shape == (N, D)
        torch.testing.assert_close(res["full"], single.shard, atol=1e-6, rtol=0)
        torch.testing.assert_close(res["shard"], single.shard[start:end], atol=1e-6, rtol=0)
        torch.testing.assert_close(res["rows"], single.shard[res["probe"]].float(),
                                   atol=1e-6, rtol=0)

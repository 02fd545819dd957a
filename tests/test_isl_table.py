"""ISL's neighbour table (fastinst/methods/isl/table.py): add_pairs against a brute-force reference
written here with Python sets and dicts, the invariants checked directly, reads on known
tables, checkpoint resharding, and world 1 == world 2 == world 3 over gloo."""

import copy
import functools

import pytest
import torch

from fastinst.methods.isl.table import NeighbourTable
from fastinst.train.reshard import reshard_payload, row_manifest
from fastinst.core.rows import shard_bounds
from tests.distutil import in_gloo_group, spawn_and_collect

N, CAP = 40, 3
INF = float("-inf")


# ---- brute-force reference ------------------------------------------------------------------------
class RefTable:
    """The semantics of add_pairs, one call at a time, on adj[r] = {neighbour: sim}."""

    def __init__(self, n, cap):
        self.n, self.cap = n, cap
        self.adj = {r: {} for r in range(n)}
        self.evicted = self.rejected_one_side = 0  # coverage counters for the tests

    def add_pairs(self, i, j, sim):
        sim = torch.tensor(sim, dtype=torch.float32).tolist()  # the table stores float32
        new = {}
        for x, y, s in zip(i, j, sim):
            if x != y:
                key = (min(x, y), max(x, y))
                new[key] = max(new.get(key, INF), s)
        ends = {x for key in new for x in key}
        cand = {}
        for r in ends:
            for k, s in self.adj[r].items():
                key = (min(r, k), max(r, k))
                cand[key] = max(cand.get(key, INF), s)
        existing = set(cand)
        for key, s in new.items():
            cand[key] = max(cand.get(key, INF), s)
        kept = {}
        for r in ends:
            mine = sorted(((-s, key[0] + key[1] - r) for key, s in cand.items() if r in key))
            kept[r] = {k for _, k in mine[:self.cap]}
        count = 0
        for (x, y), s in cand.items():
            at_x, at_y = x not in ends or y in kept[x], y not in ends or x in kept[y]
            self.adj[x].pop(y, None)
            self.adj[y].pop(x, None)
            if at_x and at_y:
                self.adj[x][y] = self.adj[y][x] = s
                count += (x, y) not in existing
            else:
                self.evicted += (x, y) in existing
                self.rejected_one_side += at_x != at_y
        return count

    def tables(self):
        nbr = torch.full((self.n, self.cap), -1, dtype=torch.long)
        sim = torch.full((self.n, self.cap), INF)
        for r, d in self.adj.items():
            for c, (s, k) in enumerate(sorted((-s, k) for k, s in d.items())):
                nbr[r, c], sim[r, c] = k, -s
        return nbr, sim

    def stats(self):
        sizes = [len(d) for d in self.adj.values()]
        return {"pairs": sum(sizes) // 2, "mean_size": 1 + sum(sizes) / self.n, "max_size": 1 + max(sizes)}


def check_invariants(nbr, sim, cap):
    """Symmetric with equal sims, within cap, no self pairs, no duplicates, canonical rows."""
    n = nbr.shape[0]
    assert nbr.shape == sim.shape == (n, cap)
    assert torch.equal(nbr < 0, sim == INF) and (nbr >= -1).all() and (nbr < n).all()
    pairs = {}
    for r in range(n):
        row = [(k, s) for k, s in zip(nbr[r].tolist(), sim[r].tolist()) if k >= 0]
        ks = [k for k, _ in row]
        assert r not in ks, f"self pair in row {r}"
        assert len(set(ks)) == len(ks), f"duplicate in row {r}: {ks}"
        assert nbr[r, len(row):].eq(-1).all(), f"row {r} not packed: {nbr[r].tolist()}"
        assert [(-s, k) for k, s in row] == sorted((-s, k) for k, s in row), f"row {r} not sorted"
        pairs.update({(r, k): s for k, s in row})
    for (r, k), s in pairs.items():
        assert pairs.get((k, r)) == s, f"pair ({r}, {k}) sim {s} but ({k}, {r}) {pairs.get((k, r))}"


def stream(step, n=N, size=14):
    """A global pair batch with self pairs, in-batch duplicates and ties (sims on a 0.1 grid)."""
    g = torch.Generator().manual_seed(1000 + step)
    i = torch.randint(0, n, (size,), generator=g)
    j = torch.randint(0, n, (size,), generator=g)
    sim = torch.randint(0, 10, (size,), generator=g).float() / 10
    i[0], j[0] = 5, 5  # a self pair
    i[1], j[1], i[2], j[2] = 7, 3, 3, 7  # the same pair twice, both orders
    return i, j, sim


def run_stream(table, steps, n=N):
    """The stream fed to ``table``: per step (accepted count, stats)."""
    return [(table.add_pairs(*stream(t, n)), table.stats()) for t in range(steps)]


# ---- add_pairs == reference -----------------------------------------------------------------------
@pytest.mark.parametrize("cap", [1, 3, 6])
def test_stream_matches_reference(cap):
    table, ref = NeighbourTable(N, cap), RefTable(N, cap)
    for t in range(25):
        i, j, sim = stream(t)
        got = table.add_pairs(i, j, sim)
        assert got == ref.add_pairs(i.tolist(), j.tolist(), sim.tolist()), f"step {t}"
        nbr, sm = table.full()
        check_invariants(nbr, sm, cap)
        want_nbr, want_sim = ref.tables()
        assert torch.equal(nbr, want_nbr), f"step {t}"
        assert torch.equal(sm, want_sim), f"step {t}"
        assert table.stats() == ref.stats()
        assert torch.equal(table.sizes(), (want_nbr >= 0).sum(1))
    if cap < 6:  # the stream exercises eviction and the both-endpoints rule
        assert ref.evicted > 0 and ref.rejected_one_side > 0 and ref.stats()["max_size"] == cap + 1


def test_overflow_keeps_most_similar_ties_by_smaller_id():
    t = NeighbourTable(10, 2)
    got = t.add_pairs(torch.tensor([0, 0, 4, 0, 0]), torch.tensor([1, 2, 0, 3, 0]),
                      torch.tensor([0.1, 0.5, 0.5, 0.2, 0.9]))
    assert got == 2
    nbr, sim = t.full()
    assert nbr[0].tolist() == [2, 4] and sim[0].tolist() == [0.5, 0.5]
    assert nbr[2].tolist() == [0, -1] and nbr[4].tolist() == [0, -1]
    assert nbr[1].tolist() == [-1, -1] and nbr[3].tolist() == [-1, -1]
    # a more similar later offer evicts the least similar (the larger id of the tie) from both rows
    assert t.add_pairs(torch.tensor([3]), torch.tensor([0]), torch.tensor([0.6])) == 1
    nbr, _ = t.full()
    assert nbr[0].tolist() == [3, 2] and nbr[3].tolist() == [0, -1] and nbr[4].tolist() == [-1, -1]
    check_invariants(*t.full(), 2)


def test_both_endpoints_rule():
    t = NeighbourTable(10, 1)
    t.add_pairs(torch.tensor([5]), torch.tensor([6]), torch.tensor([0.95]))
    t.add_pairs(torch.tensor([0]), torch.tensor([1]), torch.tensor([0.2]))
    # 0 prefers 5 (0.9 > 0.2) but 5 keeps 6 (0.95): (0, 5) is rejected, and (0, 1) was evicted
    # by 0's ranking, so it leaves both rows too
    assert t.add_pairs(torch.tensor([0]), torch.tensor([5]), torch.tensor([0.9])) == 0
    nbr, _ = t.full()
    assert nbr[:7, 0].tolist() == [-1, -1, -1, -1, -1, 6, 5]
    # offered together, each row's top pick must agree with the other end's
    t = NeighbourTable(10, 1)
    got = t.add_pairs(torch.tensor([0, 1, 2]), torch.tensor([1, 2, 3]), torch.tensor([0.5, 0.7, 0.6]))
    assert got == 1
    assert t.full()[0][:4, 0].tolist() == [-1, 2, 1, -1]  # 3 preferred 2, but 2 kept 1
    check_invariants(*t.full(), 1)


def test_duplicates_keep_larger_similarity_and_count_only_new_pairs():
    t = NeighbourTable(6, 3)
    assert t.add_pairs(torch.tensor([1, 2, 1, 4]), torch.tensor([2, 1, 2, 4]), torch.tensor([0.3, 0.8, 0.5, 1.0])) == 1
    nbr, sim = t.full()
    assert nbr[1].tolist() == [2, -1, -1] and sim[1, 0].item() == pytest.approx(0.8)
    assert nbr[4].tolist() == [-1, -1, -1]  # a self pair is never stored
    assert t.add_pairs(torch.tensor([2]), torch.tensor([1]), torch.tensor([0.1])) == 0  # lower: kept 0.8
    assert t.full()[1][2, 0].item() == pytest.approx(0.8)
    assert t.add_pairs(torch.tensor([1, 1]), torch.tensor([2, 3]), torch.tensor([0.9, 0.4])) == 1
    nbr, sim = t.full()
    assert nbr[1].tolist() == [2, 3, -1] and sim[2, 0].item() == pytest.approx(0.9)
    assert t.stats() == {"pairs": 2, "mean_size": 1 + 4 / 6, "max_size": 3}
    assert t.add_pairs(torch.tensor([3]), torch.tensor([3]), torch.tensor([0.5])) == 0  # self only


# ---- reads -------------------------------------------------------------------------------------------
def known_table():
    t = NeighbourTable(8, 3)
    t.add_pairs(torch.tensor([0, 0, 1, 5]), torch.tensor([1, 2, 2, 6]), torch.tensor([0.9, 0.4, 0.6, 0.7]))
    return t


def test_neighbours_on_known_table():
    t = known_table()
    got = t.neighbours(torch.tensor([0, 2, 7, 6, 0]))
    assert got.tolist() == [[1, 2, -1], [1, 0, -1], [-1, -1, -1], [5, -1, -1], [1, 2, -1]]
    assert t.sizes().tolist() == [2, 2, 2, 0, 0, 1, 1, 0]
    assert t.stats() == {"pairs": 4, "mean_size": 2.0, "max_size": 3}


def test_contains_on_known_table():
    t = known_table()
    index = torch.tensor([0, 7, 5])
    cand = torch.tensor([[0, 1, 2, 3, -1], [7, 0, 6, -1, 5], [6, 5, 4, 0, -1]])
    want = [[True, True, True, False, False], [True, False, False, False, False],
            [True, True, False, False, False]]
    assert t.contains(index, cand).tolist() == want


# ---- checkpoints ------------------------------------------------------------------------------------
def test_row_tensors_reshard_with_the_layout():
    t = NeighbourTable(N, CAP)
    run_stream(t, 8)
    assert [x.data_ptr() for x in t.row_tensors()] == [t.nbr.data_ptr(), t.sim.data_ptr()]
    payload = {"table": t.state_dict(), "rng": None}
    payload["row_shards"] = row_manifest(payload, [t], {})
    assert sorted(e["path"][-1] for e in payload["row_shards"]["rows"]) == ["nbr", "sim"]
    for rank in range(3):
        part = reshard_payload(lambda q: copy.deepcopy(payload), 1, rank, 3)  # it edits what it reads
        shard = NeighbourTable(N, CAP, rank=rank, world_size=3)
        shard.load_state_dict(part["table"])
        s, e = shard_bounds(N, rank, 3)
        assert torch.equal(shard.nbr, t.nbr[s:e]) and torch.equal(shard.sim, t.sim[s:e])


def test_bad_arguments():
    with pytest.raises(ValueError, match="cap"):
        NeighbourTable(5, 0)
    t = NeighbourTable(5, 2)
    with pytest.raises(ValueError, match="ids"):
        t.add_pairs(torch.tensor([0]), torch.tensor([5]), torch.tensor([0.1]))
    with pytest.raises(ValueError, match="finite"):
        t.add_pairs(torch.tensor([0]), torch.tensor([1]), torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="length"):
        t.add_pairs(torch.tensor([0, 1]), torch.tensor([1]), torch.tensor([0.1]))
    assert t.add_pairs(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long), torch.tensor([])) == 0


# ---- sharded == single process (gloo) ---------------------------------------------------------------
PROBE = torch.tensor([0, 39, 19, 20, 13, 26, 0])


def _work(rank, world):
    t = NeighbourTable(N, CAP, rank=rank, world_size=world)
    steps = run_stream(t, 20)
    nbr, sim = t.full()
    cand = torch.arange(N).expand(PROBE.numel(), N)
    return dict(steps=steps, nbr=nbr, sim=sim, shard=(t.nbr.clone(), t.sim.clone()), bounds=(t.start, t.end),
                neighbours=t.neighbours(PROBE), contains=t.contains(PROBE, cand))


def _worker(world, rank, port, pattern):
    torch.save(in_gloo_group(rank, world, port, _work, rank, world), pattern.format(rank))


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_equals_single_process(tmp_path, world):
    single = _work(0, 1)
    check_invariants(single["nbr"], single["sim"], CAP)
    for rank, res in enumerate(spawn_and_collect(functools.partial(_worker, world), world, tmp_path)):
        assert res["steps"] == single["steps"]  # accepted counts and all-reduced stats, every step
        assert torch.equal(res["nbr"], single["nbr"]) and torch.equal(res["sim"], single["sim"])
        s, e = shard_bounds(N, rank, world)
        assert res["bounds"] == (s, e)
        assert torch.equal(res["shard"][0], single["nbr"][s:e]) and torch.equal(res["shard"][1], single["sim"][s:e])
        assert torch.equal(res["neighbours"], single["neighbours"])
        assert torch.equal(res["contains"], single["contains"])

"""ISL's neighbour table: for each of N training samples a symmetric neighbour set A(i), sharded
by rows across ranks like the memory bank (the sharded-rows block, fastinst/core/rows.py).

Layout. Rank r owns rows [start, end) (`shard_bounds`). Two buffers, one row per owned sample:
``nbr`` int64 [rows_local, cap], the global ids of A(i) \\ {i} (i itself is implicit and never
stored), and ``sim`` float32 [rows_local, cap], the similarity each pair was accepted with
(the same value in both rows of a pair). Every row is kept canonical: entries sorted by
(sim desc, id asc), then empty slots (nbr −1, sim −inf). `row_tensors` lists both buffers, so
a checkpoint reshards them together (`fastinst.train.reshard`).

Semantics of ``add_pairs(i, j, sim)`` (one call = one round; every rank passes the same lists):

1. New pairs: self pairs (i = j) are dropped; a pair is undirected, and a pair given several
   times keeps its largest similarity. Let R be the endpoints of the new pairs.
2. Candidates: C = the new pairs ∪ every existing pair with an endpoint in R; a pair both
   existing and new keeps max(old sim, new sim).
3. Ranking: each row r ∈ R ranks the pairs of C touching it by (sim desc, other id asc) and
   keeps its first ``cap``. A row outside R keeps all its pairs of C (they are existing pairs
   of that row, so at most cap of them).
4. Both-endpoints rule: a pair of C is accepted iff both endpoints keep it. Accepted pairs are
   stored in both rows; rejected ones are removed from both rows (so an existing pair evicted
   from row i because i got more similar candidates also leaves the other row, and a pair
   evicted for a newcomer stays evicted even if the newcomer is rejected at its other end).
   Pairs outside C are untouched.

Returned: the number of accepted pairs of C that were not in the table before the call.
Invariants: symmetric (j ∈ A(i) ⇔ i ∈ A(j), same sim), at most cap neighbours per row, no self
pairs or duplicates.

Algorithm. The only collective of ``add_pairs`` is one read of the R rows: owners fill them,
an all_reduce(sum) gives all of them to every rank (ids and sims packed into one float64
tensor: exactly one rank contributes a non-zero term per entry, so the sum is exact). Every
rank then builds C, ranks it and applies the both-endpoints rule itself: the same
deterministic ops on the same data, so every rank (and every world size) makes the same
decisions. Owners finally rebuild the rows they own among C's endpoints: their entries not in
C, plus the accepted pairs of C touching them, sorted by (sim desc, id asc).
"""

from __future__ import annotations

import torch

from ...core import dist as fdist
from ...core.rows import ShardedRows, gather_row_shards


def _rank_in_row(row: torch.Tensor, nbr: torch.Tensor, sim: torch.Tensor):
    """Order of the entries (row, nbr, sim) [M] by (row asc, sim desc, nbr asc), and each
    entry's position inside its row under that order: (order [M], rank [M])."""
    o = torch.argsort(nbr, stable=True)  # [M] id asc (the last key first)
    o = o[torch.argsort(sim[o], descending=True, stable=True)]  # sim desc, ties by id asc
    o = o[torch.argsort(row[o], stable=True)]  # grouped by row
    rows = row[o]  # [M]
    pos = torch.arange(rows.numel(), device=row.device)  # [M]
    first = torch.ones_like(rows, dtype=torch.bool)
    first[1:] = rows[1:] != rows[:-1]
    start = torch.cummax(torch.where(first, pos, 0), 0).values  # [M] position of the row's first entry
    rank = torch.empty_like(pos)
    rank[o] = pos - start
    return o, rank


class NeighbourTable(ShardedRows):
    """Rank ``rank``'s rows of ISL's neighbour table (see the module docstring)."""

    what, short = "ISL neighbour table", "neighbours"

    def __init__(self, num_rows: int, cap: int, *, rank: int = 0, world_size: int = 1, device=None):
        super().__init__(num_rows, cap, rank=rank, world_size=world_size)
        if cap < 1:
            raise ValueError(f"cap={cap}: a row needs room for at least one neighbour")
        self.cap = cap
        self.register_buffer("nbr", torch.full((self.rows_local, cap), -1, dtype=torch.long, device=device))
        self.register_buffer("sim", torch.full((self.rows_local, cap), float("-inf"), device=device))

    @property
    def table(self) -> torch.Tensor:
        return self.nbr  # [rows_local, cap]

    def row_tensors(self) -> list:
        return [self.nbr, self.sim]

    def _sharded(self) -> bool:
        if self.world_size == 1:
            return False
        if fdist.get_world_size() != self.world_size:
            raise RuntimeError(f"the sharded {self.what} needs torch.distributed with world size "
                               f"{self.world_size}, found {fdist.get_world_size()}")
        return True

    # ---- reads -------------------------------------------------------------------------------
    @torch.no_grad()
    def _read(self, index: torch.Tensor):
        """(nbr [B, cap], sim [B, cap]) of global rows ``index`` [B] on every rank: the owner
        fills, one all_reduce(sum) of (id + 1, sim) packed in float64 (ids < 2**53)."""
        index = index.to(self.nbr.device).long()
        if not self._sharded():
            return self.nbr[index], self.sim[index]
        own = self.owner_mask(index).unsqueeze(1)  # [B, 1]
        local = self.local_index(index).clamp(0, self.rows_local - 1)  # [B]
        nb, sm = self.nbr[local], self.sim[local]  # [B, cap] each
        packed = torch.cat([torch.where(own, nb + 1, 0).double(),
                            torch.where(own & (nb >= 0), sm, 0.0).double()], 1)  # [B, 2·cap]
        packed = fdist.all_reduce_no_grad(packed, "sum")
        nb = packed[:, :self.cap].long() - 1  # [B, cap]
        sm = torch.where(nb >= 0, packed[:, self.cap:].float(), float("-inf"))  # [B, cap]
        return nb, sm

    def neighbours(self, index: torch.Tensor) -> torch.Tensor:
        """Global ids of A(index[b]) \\ {index[b]}, −1 padded, sorted by (sim desc, id asc):
        [B, cap] on every rank (one all_reduce when sharded)."""
        return self._read(index)[0]

    def contains(self, index: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        """cand[b, k] ∈ A(index[b]) (index[b] itself included; negative ids never): [B, K]
        bool, for masking neighbours out of a negative draw."""
        index = index.to(self.nbr.device).long()  # [B]
        cand = cand.to(self.nbr.device).long()  # [B, K]
        nb = self.neighbours(index)  # [B, cap]
        hit = (cand.unsqueeze(2) == nb.unsqueeze(1)).any(2)  # [B, K]; −1 slots can only meet −1 cands
        return (hit | (cand == index.unsqueeze(1))) & (cand >= 0)

    def sizes(self) -> torch.Tensor:
        """|A(i)| − 1 of the owned rows: [rows_local] int64."""
        return (self.nbr >= 0).sum(1)

    @torch.no_grad()
    def stats(self) -> dict:
        """Over all N rows (all_reduced): undirected pairs, mean |A(i)| and max |A(i)| (i included)."""
        s = self.sizes()  # [rows_local]
        total = s.sum().reshape(1)
        most = s.max().reshape(1) if s.numel() else torch.zeros(1, dtype=torch.long, device=s.device)
        if self._sharded():
            total, most = fdist.all_reduce_no_grad(total, "sum"), fdist.all_reduce_no_grad(most, "max")
        total, most = int(total.item()), int(most.item())
        return {"pairs": total // 2, "mean_size": 1.0 + total / self.num_rows, "max_size": 1 + most}

    @torch.no_grad()
    def full(self):
        """(nbr [N, cap], sim [N, cap]): the whole table on every rank, for tests and evaluation."""
        if not self._sharded():
            return self.nbr.clone(), self.sim.clone()
        return (gather_row_shards(self.nbr, self.num_rows, self.world_size),
                gather_row_shards(self.sim, self.num_rows, self.world_size))

    # ---- update ------------------------------------------------------------------------------
    @torch.no_grad()
    def add_pairs(self, i: torch.Tensor, j: torch.Tensor, sim: torch.Tensor) -> int:
        """Offer the undirected pairs (i[p], j[p]) with similarity sim[p] ([P] each, the same
        global lists on every rank); returns how many pairs not in the table before were
        accepted. Semantics: the module docstring."""
        dev, n = self.nbr.device, self.num_rows
        i, j = i.to(dev).long().reshape(-1), j.to(dev).long().reshape(-1)  # [P]
        sim = sim.to(dev, torch.float32).reshape(-1)  # [P]
        if not i.numel() == j.numel() == sim.numel():
            raise ValueError(f"add_pairs: i, j and sim differ in length ({i.numel()}, {j.numel()}, {sim.numel()})")
        if i.numel() and (min(i.min(), j.min()) < 0 or max(i.max(), j.max()) >= n):
            raise ValueError(f"add_pairs: ids must be in [0, {n})")
        if not torch.isfinite(sim).all():
            raise ValueError("add_pairs: similarities must be finite")
        keep = i != j  # step 1: no self pairs
        a, b, s = torch.minimum(i, j)[keep], torch.maximum(i, j)[keep], sim[keep]  # [P'] a < b
        if a.numel() == 0:  # the same decision on every rank (same lists)
            return 0
        ends = torch.unique(torch.cat([a, b]))  # [R] sorted: the rows offered new pairs

        # step 2: existing pairs of the R rows (one collective), then C = new ∪ existing, deduped
        onb, osm = self._read(ends)  # [R, cap] each
        row = ends.unsqueeze(1).expand_as(onb)  # [R, cap]
        ok = onb >= 0
        ea, eb = torch.minimum(row, onb)[ok], torch.maximum(row, onb)[ok]  # [E] each pair up to twice
        key = torch.cat([a * n + b, ea * n + eb])  # [P' + E] canonical pair keys a·N + b
        ksim = torch.cat([s, osm[ok]])
        old = torch.cat([torch.zeros_like(a, dtype=torch.bool), torch.ones_like(ea, dtype=torch.bool)])
        ckey, inv = torch.unique(key, return_inverse=True)  # [C] sorted
        csim = torch.full(ckey.shape, float("-inf"), device=dev).scatter_reduce(0, inv, ksim, "amax")  # [C]
        cold = torch.zeros(ckey.shape, dtype=torch.long, device=dev).scatter_reduce(
            0, inv, old.long(), "amax").bool()  # [C] the pair was in the table
        ca, cb = ckey // n, ckey % n  # [C]

        # step 3: rank each R row's candidates by (sim desc, id asc); rows outside R keep all
        c = ckey.numel()
        drow, dnbr, dsim = torch.cat([ca, cb]), torch.cat([cb, ca]), torch.cat([csim, csim])  # [2C] directed
        in_r = torch.isin(drow, ends)  # [2C]
        _, rank = _rank_in_row(drow, dnbr, dsim)
        kept = ~in_r | (rank < self.cap)  # [2C]
        # step 4: accepted iff kept at both endpoints (entry p is the a side, p + C the b side)
        acc = kept[:c] & kept[c:]  # [C]
        new_pairs = int((acc & ~cold).sum().item())

        # rebuild the owned rows among C's endpoints. Rows of non-endpoints receive nothing and
        # lose nothing: their pairs are outside C (a pair with an endpoint in R is in C), so both
        # of its rows keep it and those rows stay symmetric and within cap unchanged. A row
        # outside R that is an endpoint of C only loses rejected existing pairs (never grows).
        touched = torch.unique(torch.cat([ca, cb]))  # [T]
        touched = touched[self.owner_mask(touched)]  # [T_own]
        if touched.numel() == 0:
            return new_pairs
        local = self.local_index(touched)  # [T_own]
        tnb, tsm = self.nbr[local], self.sim[local]  # [T_own, cap]
        trow = touched.unsqueeze(1).expand_as(tnb)
        tkey = torch.minimum(trow, tnb) * n + torch.maximum(trow, tnb)  # [T_own, cap]
        stay = (tnb >= 0) & ~torch.isin(tkey, ckey)  # entries outside C, left as they are
        add = torch.cat([acc, acc]) & self.owner_mask(drow)  # [2C] accepted entries of owned rows
        frow = torch.cat([trow[stay], drow[add]])  # [M] global row
        fnbr = torch.cat([tnb[stay], dnbr[add]])
        fsim = torch.cat([tsm[stay], dsim[add]])
        _, frank = _rank_in_row(frow, fnbr, fsim)  # slot of each entry in its rebuilt row
        slot = torch.searchsorted(touched, frow)  # [M] row of the rebuilt block
        nb = torch.full_like(tnb, -1)
        sm = torch.full_like(tsm, float("-inf"))
        nb[slot, frank] = fnbr  # frank < cap: R rows hold only kept pairs, others only old ones
        sm[slot, frank] = fsim
        self.nbr[local], self.sim[local] = nb, sm
        return new_pairs

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, cap={self.cap}"

"""Checkpoints that resume at another world size: row shards as global row ranges.

A rank's checkpoint payload is mostly replicated state (the DDP model, its optimiser, the
MoCo queue, NCE's Z: identical on every rank) plus the rows it owns of each sharded table
(`fastinst.core.rows.ShardedRows`: NPID's and CMC's banks, PIC's classifier rows) and any
optimiser state kept per row of such a table (PIC's LazySGD momentum and last-step counters).

At save time `row_manifest` lists where in the payload each row-sharded tensor sits (its
path of keys) with the global row range [start, end) of N rows it holds, and where each
shard's layout record sits. `reshard_payload` builds the payload of rank r of a world W'
from a checkpoint written by W ranks: the replicated state from saved rank 0, every listed
tensor cut from the saved shards whose ranges overlap r's new range (read from those files
only), the layout records rewritten to the new layout, and the RNG state of saved rank r
where it existed (None for ranks beyond the saved world: they keep their seeded state).
The loader turns its saved position into global samples read (`loaders.base`).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, Tuple

import torch

from ..core.rows import ShardedRows, shard_bounds

__all__ = ["row_manifest", "reshard_payload", "ReshardError"]

_LAYOUT_KEYS = ("num_rows", "rank", "world_size", "start", "end")


class ReshardError(ValueError):
    """The checkpoint cannot be cut to this world size (no manifest, or an inconsistent one)."""


def _walk(obj: Any, path: Tuple = ()) -> Iterator[Tuple[Tuple, Any]]:
    """(path, value) of every node of a payload of dicts, lists and tuples, depth first."""
    yield path, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, path + (k,))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _walk(v, path + (i,))


def _key(t: torch.Tensor) -> Tuple:
    return (t.device.type, t.data_ptr(), tuple(t.shape))


def _is_layout(v: Any) -> bool:
    return isinstance(v, dict) and all(k in v for k in _LAYOUT_KEYS)


def row_manifest(payload: dict, modules: List[Any], optimizers: Dict[str, Any]) -> dict:
    """Where ``payload``'s row-sharded tensors and layout records are.

    ``modules``: the modules whose `ShardedRows` submodules hold tables; ``optimizers``: the
    optimisers, whose per-parameter state tensors of a table's rows (first dim = rows owned)
    are row-sharded too. Tensors are matched by storage and shape, so every copy of a table
    in the payload (a module's state and the method's) is listed.
    """
    ranges: Dict[Tuple, Tuple[int, int, int]] = {}
    tables = {}
    for mod in modules:
        for sub in mod.modules():
            if isinstance(sub, ShardedRows):
                rng = (sub.start, sub.end, sub.num_rows)
                for t in sub.row_tensors():
                    ranges[_key(t)] = rng
                    tables[_key(t)] = rng
    for opt in optimizers.values():
        for group in opt.param_groups:
            for p in group["params"]:
                rng = tables.get(_key(p))
                if rng is None:
                    continue
                for v in opt.state.get(p, {}).values():
                    if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == rng[1] - rng[0]:
                        ranges[_key(v)] = rng
    rows, layouts = [], []
    for path, v in _walk(payload):
        if torch.is_tensor(v) and v.dim() >= 1 and _key(v) in ranges:
            start, end, n = ranges[_key(v)]
            rows.append({"path": list(path), "start": start, "end": end, "num_rows": n})
        elif _is_layout(v):
            layouts.append(list(path))
    return {"rows": rows, "layouts": layouts}


def _get(obj: Any, path: List) -> Any:
    for k in path:
        obj = obj[k]
    return obj


def _set(obj: Any, path: List, value: Any) -> None:
    for k in path[:-1]:
        obj = obj[k]
    obj[path[-1]] = value


def reshard_payload(read: Callable[[int], dict], saved_world: int, rank: int, world: int,
                    where: str = "checkpoint") -> dict:
    """Rank ``rank`` of ``world``'s payload from a checkpoint of ``saved_world`` ranks;
    ``read(q)`` returns saved rank q's payload. Reads rank 0 and the ranks holding rows this
    rank now owns."""
    cache: Dict[int, dict] = {}

    def saved(q: int) -> dict:
        if q not in cache:
            cache[q] = read(q)
        return cache[q]

    out = saved(0)
    manifest = out.get("row_shards")
    if not isinstance(manifest, dict) or "rows" not in manifest:
        raise ReshardError(f"{where} has no row manifest ('row_shards'): it was written by a fastinst that "
                           f"saved shards without their global row ranges; resume it with {saved_world} ranks")
    rng = saved(rank)["rng"] if rank < saved_world else None
    for entry in manifest["rows"]:
        n = int(entry["num_rows"])
        lo, hi = shard_bounds(n, rank, world)
        pieces = []
        for q in range(saved_world):
            s, e = shard_bounds(n, q, saved_world)
            if min(e, hi) <= max(s, lo):
                continue
            src_manifest = saved(q)["row_shards"]["rows"]
            src_entry = next((x for x in src_manifest if x["path"] == entry["path"]), None)
            if src_entry is None or (int(src_entry["start"]), int(src_entry["end"])) != (s, e):
                raise ReshardError(f"{where}: rank {q}'s manifest does not hold rows [{s}, {e}) of "
                                   f"{'.'.join(map(str, entry['path']))}")
            t = _get(saved(q), entry["path"])
            if t.shape[0] != e - s:
                raise ReshardError(f"{where}: rank {q}'s {'.'.join(map(str, entry['path']))} has "
                                   f"{t.shape[0]} rows, its manifest says [{s}, {e})")
            pieces.append(t[max(s, lo) - s:min(e, hi) - s])
        _set(out, entry["path"], torch.cat(pieces, 0).clone())
        entry.update(start=lo, end=hi)
    for path in manifest["layouts"]:
        rec = dict(_get(out, path))
        lo, hi = shard_bounds(int(rec["num_rows"]), rank, world)
        rec.update(rank=rank, world_size=world, start=lo, end=hi)
        _set(out, path, rec)
    out["rng"] = rng
    return out

"""Atomic, per-rank checkpoints with a completion marker.

Layout under a run's checkpoint directory::

    ckpt_000012000/
        rank0.pt  rank1.pt  ...   one file per rank (model, optimiser, bank shard, RNG...)
        COMPLETE                  JSON, written last by rank 0 once every rank file exists

Why this shape:

- Every file is written to a temp file in the same directory, flushed and fsync'ed, then
  ``os.replace``'d onto its final name and the directory fsync'ed. A crash at any point
  leaves either the old file or the new one, never a truncated one under a final name.
- A checkpoint only counts once ``COMPLETE`` exists, and rank 0 writes it after all
  ranks' files are on disk (a barrier when torch.distributed is initialised). A job
  killed mid-save therefore leaves a directory without the marker, which
  `find_latest_complete` (``--resume auto``) skips, so resume picks the previous one.
- Old checkpoints are pruned only after the new one is complete, so there is always at
  least one complete checkpoint on disk once the first save finished.
- Each rank file holds only that rank's state (its memory-bank shard is N/W rows) and a
  manifest of the global row ranges its shards hold (`fastinst.train.reshard`). At the world size
  that wrote it a rank reads its own file; with ``any_world=True`` a rank of another world
  size reads rank 0's file and the files whose row ranges overlap its new ones, and cuts
  its rows from them. Without ``any_world`` a mismatch is refused by name.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

__all__ = [
    "CheckpointError",
    "MARKER",
    "checkpoint_path",
    "save_checkpoint",
    "list_complete",
    "find_latest_complete",
    "saved_world_size",
    "load_checkpoint",
]

MARKER = "COMPLETE"
FORMAT_VERSION = 1
_DIR_RE = re.compile(r"^ckpt_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or from another world size."""


def checkpoint_path(directory: str, step: int) -> str:
    """Directory of the checkpoint for ``step`` (zero-padded so names sort by step)."""
    return os.path.join(directory, f"ckpt_{step:09d}")


def _rank_file(ckpt_dir: str, rank: int) -> str:
    return os.path.join(ckpt_dir, f"rank{rank}.pt")


def _fsync_dir(path: str) -> None:
    # Makes a rename / create inside `path` durable. Not possible on every platform or
    # filesystem (e.g. Windows); the rename itself is still atomic there.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str, write: Callable[[Any], None]) -> None:
    """Write ``path`` via ``write(fileobj)`` to a same-directory temp file, then rename."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX within one filesystem
    except BaseException:
        # Any failure (including KeyboardInterrupt) leaves no temp litter; the final name
        # was never touched, so the previous version of `path`, if any, is intact.
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


def _dist_active(world_size: int) -> bool:
    return world_size > 1 and dist.is_available() and dist.is_initialized()


def _barrier(world_size: int) -> None:
    if _dist_active(world_size):
        dist.barrier()


def save_checkpoint(
    directory: str,
    step: int,
    payload: Dict[str, Any],
    *,
    rank: int = 0,
    world_size: int = 1,
    keep: Optional[int] = 3,
) -> str:
    """Save this rank's ``payload`` as part of checkpoint ``step``; returns its directory.

    Call on every rank with the same ``step``. With torch.distributed initialised the
    ranks synchronise with barriers and the call returns only once the checkpoint is
    complete. Without it (world_size 1, or tests emulating ranks in one process), rank 0
    must be called last: it checks that every other rank's file exists and raises
    `CheckpointError` naming the missing ones otherwise.

    ``keep``: number of complete checkpoints to retain (newest by step), ``None`` keeps
    all. Pruning happens after the new checkpoint is complete.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is outside world_size={world_size}")
    if keep is not None and keep < 1:
        raise ValueError(f"keep={keep} must be >= 1 (or None to keep every checkpoint)")
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() != world_size:
        raise ValueError(
            f"world_size={world_size} but torch.distributed has {dist.get_world_size()} "
            "ranks; pass world_size=dist.get_world_size()"
        )
    ckpt_dir = checkpoint_path(directory, step)
    marker = os.path.join(ckpt_dir, MARKER)

    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        _fsync_dir(directory)
        # Re-saving a step (e.g. right after resuming at it): the directory must stop
        # counting as complete before any rank file in it is replaced.
        if os.path.exists(marker):
            os.unlink(marker)
            _fsync_dir(ckpt_dir)
    _barrier(world_size)  # directory exists and is marked incomplete on every rank's view
    os.makedirs(ckpt_dir, exist_ok=True)  # non-distributed callers with rank > 0 first

    record = {
        "format": FORMAT_VERSION,
        "step": step,
        "rank": rank,
        "world_size": world_size,
        "payload": payload,
    }
    _atomic_write(_rank_file(ckpt_dir, rank), lambda f: torch.save(record, f))
    _barrier(world_size)  # every rank's file is durable

    if rank == 0:
        missing = [_rank_file(ckpt_dir, r) for r in range(world_size)]
        missing = [p for p in missing if not os.path.isfile(p)]
        if missing:
            raise CheckpointError(
                f"checkpoint {ckpt_dir} is incomplete, rank files missing: {missing}; "
                "without torch.distributed, save every other rank before rank 0"
            )
        _remove_stale_files(ckpt_dir, world_size)
        info = {"format": FORMAT_VERSION, "step": step, "world_size": world_size}
        _atomic_write(marker, lambda f: f.write(json.dumps(info).encode()))
        if keep is not None:
            _prune(directory, keep)
    _barrier(world_size)  # nobody returns before the checkpoint counts as complete
    return ckpt_dir


def _remove_stale_files(ckpt_dir: str, world_size: int) -> None:
    # Litter of an earlier save of this same step that crashed: temp files (every rank
    # has renamed its own by now, past the barrier) and files of ranks >= world_size
    # from a larger run. They would never be read but would waste space.
    for name in os.listdir(ckpt_dir):
        m = re.match(r"^rank(\d+)\.pt$", name)
        stale_rank = m is not None and int(m.group(1)) >= world_size
        if stale_rank or name.endswith(".tmp"):
            os.unlink(os.path.join(ckpt_dir, name))


def _scan(directory: str) -> List[Tuple[int, str, bool]]:
    """(step, path, complete) for every ckpt_* directory, sorted by step."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        m = _DIR_RE.match(name)
        path = os.path.join(directory, name)
        if m and os.path.isdir(path):
            found.append((int(m.group(1)), path, os.path.isfile(os.path.join(path, MARKER))))
    return sorted(found)


def _prune(directory: str, keep: int) -> None:
    entries = _scan(directory)
    complete = [(s, p) for s, p, ok in entries if ok]
    if not complete:
        return
    survivors = complete[-keep:]
    oldest_kept = survivors[0][0]
    for step, path, ok in entries:
        # Older complete ones beyond `keep`, and crashed partial saves older than what we
        # keep. Partial directories newer than that are left alone: they cannot be ours.
        if step < oldest_kept:
            shutil.rmtree(path, ignore_errors=True)
    _fsync_dir(directory)


def list_complete(directory: str) -> List[str]:
    """Paths of complete checkpoints under ``directory``, oldest step first."""
    return [p for _, p, ok in _scan(directory) if ok]


def find_latest_complete(directory: str) -> Optional[str]:
    """The complete checkpoint with the highest step, or None (``--resume auto``)."""
    complete = list_complete(directory)
    return complete[-1] if complete else None


def _marker_world_size(path: str, missing: str) -> int:
    """World size recorded in the COMPLETE marker of ``path``; `CheckpointError` with the
    message ``missing`` when there is no marker, or naming the marker when it is unreadable."""
    marker = os.path.join(path, MARKER)
    if not os.path.isfile(marker):
        raise CheckpointError(missing)
    try:
        with open(marker, "rb") as f:
            return int(json.loads(f.read().decode())["world_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint marker {marker} is unreadable: {e}") from e


def saved_world_size(path: str) -> int:
    """World size that wrote the complete checkpoint ``path`` (read from its marker).

    Replicated state (the model: DDP keeps it identical on every rank) can be read from
    ``rank0.pt`` at any world size, e.g. by the linear probe and the backbone export.
    """
    return _marker_world_size(path, f"{path} is not a complete checkpoint (no {MARKER} marker); pass a "
                                    "ckpt_* directory with a marker, e.g. the newest one in <run>/checkpoints")


def _unsafe_globals(file: str) -> str:
    """The globals a pickle names beyond torch's weights-only allowlist (torch >= 2.5), or ''."""
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    try:
        return ", ".join(finder(file)) if finder else ""
    except Exception:
        return ""


def load_checkpoint(
    path: str,
    rank: int = 0,
    world_size: int = 1,
    map_location: Any = "cpu",
    *,
    weights_only: bool = True,
    any_world: bool = False,
) -> Dict[str, Any]:
    """Load this rank's payload from the checkpoint directory ``path``.

    Raises `CheckpointError` (message names the file and the fix) when the directory or
    its marker is missing, the world size differs from the one that saved it (unless
    ``any_world``: then the payload is resharded, see `fastinst.train.reshard`), or a rank file
    is missing or unreadable.

    Payloads hold only tensors and plain types (RNG states as tensors and lists, the config
    as a dict), so every file loads with ``torch.load(weights_only=True)``: a file whose pickle
    would import or call anything else (a crafted or foreign file) is refused with a
    `CheckpointError` before any of it runs. ``weights_only=False`` is for trusted files only.
    """
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    saved_world = _marker_world_size(path, f"checkpoint {path} is incomplete (no {MARKER} marker: the save "
                                           "was interrupted); resume from an earlier one, e.g. find_latest_complete()")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is outside world_size={world_size}")
    if saved_world == world_size:
        return _read_rank(path, rank, saved_world, map_location, weights_only)
    if not any_world:
        raise CheckpointError(
            f"checkpoint {path} was saved by {saved_world} ranks but this run has "
            f"world_size={world_size}; per-rank state (e.g. memory-bank shards) only "
            f"resumes at the same world size here: launch with {saved_world} processes"
        )
    from .reshard import ReshardError, reshard_payload

    try:
        return reshard_payload(lambda q: _read_rank(path, q, saved_world, map_location, weights_only),
                               saved_world, rank, world_size, where=f"checkpoint {path}")
    except ReshardError as e:
        raise CheckpointError(str(e)) from None


def _read_rank(path: str, rank: int, world_size: int, map_location: Any, weights_only: bool) -> Dict[str, Any]:
    """The payload of rank file ``rank`` of a checkpoint written by ``world_size`` ranks."""
    file = _rank_file(path, rank)
    if not os.path.isfile(file):
        raise CheckpointError(f"checkpoint file {file} is missing (rank {rank} of {world_size})")
    try:
        record = torch.load(file, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as e:
        if weights_only and "eights only load failed" in str(e):
            raise CheckpointError(
                f"checkpoint file {file} is refused: loading it would import or call "
                f"{_unsafe_globals(file) or 'objects other than tensors and plain types'}; fastinst checkpoints "
                "hold only tensors and plain types, so this file was not written by this fastinst (or comes "
                "from a build before checkpoints became weights-only). Nothing in it was run") from None
        raise CheckpointError(f"checkpoint file {file} is corrupt or unreadable: {type(e).__name__}: {e}") from e
    except Exception as e:  # torch raises several types for truncated / garbage files
        raise CheckpointError(
            f"checkpoint file {file} is corrupt or unreadable: {type(e).__name__}: {e}"
        ) from e
    if not isinstance(record, dict) or "payload" not in record:
        raise CheckpointError(f"checkpoint file {file} is not a fastinst checkpoint record")
    if record.get("rank") != rank or record.get("world_size") != world_size:
        raise CheckpointError(
            f"checkpoint file {file} holds rank {record.get('rank')} of "
            f"{record.get('world_size')}, expected rank {rank} of {world_size}"
        )
    return record["payload"]

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.multiprocessing as mp

from fastinst.train import checkpoint as ck
from tests.distutil import free_port, in_gloo_group

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _payload(seed):
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"w": torch.randn(4, 3, generator=g)},
        "step": seed,
        "rng": torch.get_rng_state(),
        "config": {"lr": 0.03, "name": "npid"},
    }


def _assert_payload_equal(a, b):
    torch.testing.assert_close(a["model"]["w"], b["model"]["w"])
    assert a["step"] == b["step"] and a["config"] == b["config"]
    assert torch.equal(a["rng"], b["rng"])


def test_round_trip(tmp_path):
    p = _payload(1)
    path = ck.save_checkpoint(str(tmp_path), 100, p)
    assert path == ck.checkpoint_path(str(tmp_path), 100)
    assert os.path.isfile(os.path.join(path, ck.MARKER))
    assert ck.find_latest_complete(str(tmp_path)) == path
    _assert_payload_equal(ck.load_checkpoint(path, 0, 1), p)


def test_find_latest_complete_empty_or_missing(tmp_path):
    assert ck.find_latest_complete(str(tmp_path)) is None
    assert ck.find_latest_complete(str(tmp_path / "nope")) is None


def test_multi_rank_without_process_group(tmp_path):
    d = str(tmp_path)
    # Rank 0 first cannot complete: rank 1's file is missing and is named.
    with pytest.raises(ck.CheckpointError, match="rank1.pt"):
        ck.save_checkpoint(d, 5, _payload(0), rank=0, world_size=2)
    assert ck.find_latest_complete(d) is None
    ck.save_checkpoint(d, 5, _payload(1), rank=1, world_size=2)
    path = ck.save_checkpoint(d, 5, _payload(0), rank=0, world_size=2)
    assert ck.find_latest_complete(d) == path
    _assert_payload_equal(ck.load_checkpoint(path, 1, 2), _payload(1))
    _assert_payload_equal(ck.load_checkpoint(path, 0, 2), _payload(0))


def test_partial_multi_rank_save_is_ignored(tmp_path):
    # Rank 1 wrote its file, then the job died before rank 0 wrote the marker.
    d = str(tmp_path)
    good = ck.save_checkpoint(d, 1, _payload(1))
    ck.save_checkpoint(d, 2, _payload(2), rank=1, world_size=2)
    assert ck.find_latest_complete(d) == good
    with pytest.raises(ck.CheckpointError, match="incomplete"):
        ck.load_checkpoint(ck.checkpoint_path(d, 2), 1, 2)


def test_keep_n_pruning(tmp_path):
    d = str(tmp_path)
    for step in range(1, 6):
        ck.save_checkpoint(d, step * 10, _payload(step), keep=2)
    names = [os.path.basename(p) for p in ck.list_complete(d)]
    assert names == ["ckpt_000000040", "ckpt_000000050"]
    assert sorted(os.listdir(d)) == ["ckpt_000000040", "ckpt_000000050"]
    ck.save_checkpoint(d, 60, _payload(6), keep=None)
    assert len(ck.list_complete(d)) == 3
    with pytest.raises(ValueError, match="keep"):
        ck.save_checkpoint(d, 70, _payload(7), keep=0)


def test_pruning_removes_older_partial_but_not_before_complete(tmp_path, monkeypatch):
    d = str(tmp_path)
    ck.save_checkpoint(d, 1, _payload(1), keep=1)
    # A failing save must not prune anything.
    monkeypatch.setattr(ck, "_atomic_write", _raise_on_marker(ck._atomic_write))
    with pytest.raises(OSError):
        ck.save_checkpoint(d, 2, _payload(2), keep=1)
    monkeypatch.undo()
    assert ck.find_latest_complete(d) == ck.checkpoint_path(d, 1)
    assert os.path.isdir(ck.checkpoint_path(d, 2))  # partial left behind
    path = ck.save_checkpoint(d, 3, _payload(3), keep=1)
    assert os.listdir(d) == [os.path.basename(path)]


def _raise_on_marker(real):
    def wrapper(path, write):
        if os.path.basename(path) == ck.MARKER:
            raise OSError("disk full (simulated)")
        return real(path, write)

    return wrapper


def test_resave_same_step_overwrites(tmp_path):
    d = str(tmp_path)
    ck.save_checkpoint(d, 7, _payload(1))
    path = ck.save_checkpoint(d, 7, _payload(2))
    _assert_payload_equal(ck.load_checkpoint(path), _payload(2))
    assert sorted(os.listdir(path)) == [ck.MARKER, "rank0.pt"]


def test_exception_mid_write_keeps_previous(tmp_path, monkeypatch):
    d = str(tmp_path)
    good = ck.save_checkpoint(d, 1, _payload(1), keep=1)
    real_save = torch.save

    def half_then_raise(obj, f):
        real_save(obj, f)
        f.truncate(f.tell() // 2)
        raise RuntimeError("boom mid-write")

    monkeypatch.setattr(torch, "save", half_then_raise)
    with pytest.raises(RuntimeError, match="boom"):
        ck.save_checkpoint(d, 2, _payload(2), keep=1)
    monkeypatch.undo()
    partial = ck.checkpoint_path(d, 2)
    assert os.listdir(partial) == []  # temp file removed, no final name, no marker
    assert ck.find_latest_complete(d) == good
    _assert_payload_equal(ck.load_checkpoint(good), _payload(1))


_CHILD = textwrap.dedent(
    """
    import io, os, signal, sys
    sys.path.insert(0, {root!r})
    import torch
    from fastinst.train import checkpoint as ck

    directory = sys.argv[1]
    ck.save_checkpoint(directory, 1, {{"w": torch.arange(10.0)}}, keep=1)
    real_save = torch.save

    def save_half_then_die(obj, f):
        buf = io.BytesIO()
        real_save(obj, buf)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup handler can run

    torch.save = save_half_then_die
    ck.save_checkpoint(directory, 2, {{"big": torch.randn(2_000_000)}}, keep=1)
    print("unreachable")
    """
)


def test_sigkill_mid_save_leaves_previous_loadable(tmp_path):
    d = str(tmp_path / "ckpts")
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(root=ROOT))
    proc = subprocess.run([sys.executable, str(script), d], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    partial = ck.checkpoint_path(d, 2)
    names = os.listdir(partial)
    assert len(names) == 1 and names[0].endswith(".tmp")  # half-written temp only
    assert os.path.getsize(os.path.join(partial, names[0])) > 1_000_000
    good = ck.find_latest_complete(d)
    assert good == ck.checkpoint_path(d, 1)
    torch.testing.assert_close(ck.load_checkpoint(good)["w"], torch.arange(10.0))
    with pytest.raises(ck.CheckpointError, match="incomplete"):
        ck.load_checkpoint(partial)
    # The next save of that step cleans the litter and prunes the old one.
    path = ck.save_checkpoint(d, 2, {"w": torch.ones(3)}, keep=1)
    assert sorted(os.listdir(path)) == [ck.MARKER, "rank0.pt"]
    assert ck.list_complete(d) == [path]


def test_corrupt_file_error_names_it(tmp_path):
    path = ck.save_checkpoint(str(tmp_path), 3, _payload(3))
    file = os.path.join(path, "rank0.pt")
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) // 3)
    with pytest.raises(ck.CheckpointError, match="rank0.pt") as err:
        ck.load_checkpoint(path)
    assert file in str(err.value) and "corrupt" in str(err.value)
    with open(file, "wb") as f:
        f.write(b"not a checkpoint at all")
    with pytest.raises(ck.CheckpointError, match="corrupt"):
        ck.load_checkpoint(path)


def test_missing_and_mismatch_errors(tmp_path):
    d = str(tmp_path)
    path = ck.save_checkpoint(d, 3, _payload(3))
    with pytest.raises(ck.CheckpointError, match="saved by 1 ranks.*world_size=2"):
        ck.load_checkpoint(path, 0, 2)
    with pytest.raises(ck.CheckpointError, match="does not exist"):
        ck.load_checkpoint(os.path.join(d, "ckpt_000000999"))
    os.unlink(os.path.join(path, "rank0.pt"))
    with pytest.raises(ck.CheckpointError, match="rank0.pt is missing"):
        ck.load_checkpoint(path)




def _dist_work(rank, world, directory):
    for step in (1, 2, 3):
        payload = {"r": rank, "s": step}
        ck.save_checkpoint(directory, step, payload, rank=rank, world_size=world, keep=2)
        # save_checkpoint returns only once complete, on every rank.
        assert ck.find_latest_complete(directory) == ck.checkpoint_path(directory, step)
    got = ck.load_checkpoint(ck.find_latest_complete(directory), rank, world)
    assert got == {"r": rank, "s": 3}


def _dist_worker(rank, world, port, directory):
    in_gloo_group(rank, world, port, _dist_work, rank, world, directory)


@pytest.mark.slow
def test_two_process_gloo_save(tmp_path):
    d = str(tmp_path)
    mp.spawn(_dist_worker, args=(2, free_port(), d), nprocs=2, join=True)
    names = [os.path.basename(p) for p in ck.list_complete(d)]
    assert names == ["ckpt_000000002", "ckpt_000000003"]
    assert sorted(os.listdir(ck.checkpoint_path(d, 3))) == [ck.MARKER, "rank0.pt", "rank1.pt"]


class _RunsCode:
    """Unpickling this would call os.makedirs(path): what a crafted checkpoint could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    ckpt = ck.save_checkpoint(str(tmp_path / "ck"), 3, {"w": torch.ones(2)}, rank=0, world_size=1)
    assert torch.equal(ck.load_checkpoint(ckpt)["w"], torch.ones(2))  # a real one loads (weights-only)
    ran = str(tmp_path / "this_ran")
    rank_file = [os.path.join(ckpt, f) for f in os.listdir(ckpt) if f.endswith(".pt")][0]
    torch.save({"payload": {"w": _RunsCode(ran)}, "rank": 0, "world_size": 1}, rank_file)
    with pytest.raises(ck.CheckpointError, match=r"is refused: loading it would import or call .*Nothing in it was run"):
        ck.load_checkpoint(ckpt)
    assert not os.path.exists(ran)

"""Two real nodes on one machine (scripts/two_node_test.sh: a network namespace and a private
/dev/shm each, a veth pair between them, torchrun's c10d rendezvous on node 0's veth address,
gloo over the veth) against one node with two processes: the same losses and bank, one
data.cache=full copy per node shared by that node's ranks, and the process group's traffic on
the veth addresses. Needs root; skips when namespaces cannot be made here."""
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from datagen import make_colour_train_val
from fastinst.train.checkpoint import find_latest_complete, load_checkpoint
from test_engine import SAME_ON_ANY_WORLD, TINY, read_metrics
from tests.distutil import train_on_worlds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "two_node_test.sh")
WORKER = os.path.join(ROOT, "tests", "dist_train_worker.py")
SUBNET = "10.77.0"
NODE_ADDR = {"0": f"{SUBNET}.1", "1": f"{SUBNET}.2"}
GLOBAL_BATCH = 16


@pytest.fixture(scope="module")
def args(tmp_path_factory):
    data = make_colour_train_val(str(tmp_path_factory.mktemp("colours")))
    # dist.timeout_minutes: a rank that cannot reach its peers fails in 2 minutes, not 60
    return TINY + SAME_ON_ANY_WORLD + [f"data.path={data}", "data.cache=full", "dist.timeout_minutes=2"]


@pytest.fixture(scope="module")
def one_node(args, tmp_path_factory):
    """The 1-node, 2-process gloo run (127.0.0.1): (losses, kNN result, full bank)."""
    out, ckpt = train_on_worlds(tmp_path_factory.mktemp("one_node"), args, ((2, GLOBAL_BATCH // 2),))[2]
    return _result(out, ckpt, 2)


def _result(out, ckpt, world):
    recs = read_metrics(out)
    bank = torch.cat([load_checkpoint(ckpt, rank=r, world_size=world)["method"]["bank.shard"] for r in range(world)])
    return [r["loss"] for r in recs if r["kind"] == "train"], [r for r in recs if r["kind"] == "eval"][-1], bank


def _run_two_nodes(tmp_path, args, nproc: int):
    """scripts/two_node_test.sh with the worker; skips when the script cannot make namespaces
    (exit 77). Returns (run directory, both nodes' logs, the ranks' report records)."""
    out, logs, reports = tmp_path / "run", tmp_path / "logs", tmp_path / "reports"
    reports.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT", "OMP_NUM_THREADS")}
    # no OMP_NUM_THREADS: each node's ranks take their share of the cores (runtime.set_compute_threads)
    env.update(PYTHON=sys.executable, NPROC_PER_NODE=str(nproc), SUBNET=SUBNET, LOG_DIR=str(logs),
               FASTINST_TEST_REPORT=str(reports), TIMEOUT_S="240", JOIN_TIMEOUT_S="60")
    cmd = ["bash", SCRIPT, WORKER, str(out)] + args + [f"loader.batch_size={GLOBAL_BATCH // (2 * nproc)}"]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        said, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the script's trap stops both nodes and removes the namespaces
        try:
            said, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            said, _ = proc.communicate()
        pytest.fail(f"two-node run timed out:\n{said[-3000:]}")
    if proc.returncode == 77:
        pytest.skip([ln for ln in said.splitlines() if "SKIP:" in ln][-1].split("SKIP:", 1)[1].strip())
    node_logs = {n: (logs / f"node{n}.log").read_text() for n in "01" if (logs / f"node{n}.log").exists()}
    assert proc.returncode == 0, said[-3000:] + "".join(f"\n--- node {n}:\n{t[-2000:]}" for n, t in node_logs.items())
    records = [json.loads(ln) for f in sorted(reports.iterdir()) for ln in f.read_text().splitlines() if ln.strip()]
    return out, node_logs, records


def check_rendezvous_on_veth(records, nproc: int) -> None:
    """Every rank's process group (its store at MASTER_ADDR:MASTER_PORT and gloo's peer
    connections) runs between the nodes' veth addresses: loopback would not reach the other
    namespace, and no rank may hold a connection on it."""
    net = [r for r in records if r["kind"] == "net"]
    assert sorted(r["rank"] for r in net) == list(range(2 * nproc)), net
    for r in net:
        me, other = NODE_ADDR[r["node"]], NODE_ADDR["1" if r["node"] == "0" else "0"]
        addr, port = r["master"]
        assert addr in NODE_ADDR.values(), f"rank {r['rank']}: MASTER_ADDR={addr}, not a veth address"
        assert r["gloo_ifname"] and r["gloo_ifname"].startswith(f"fi{r['node']}-"), r
        est = [(loc, rem) for state, loc, rem in r["tcp"] if state == "ESTABLISHED"]
        assert not [c for c in est if any(ipaddress.ip_address(a.rsplit(":", 1)[0]).is_loopback for a in c)], \
            f"rank {r['rank']} (node {r['node']}) talks over loopback: {est}"
        assert (f"{me}", f"{addr}:{port}") in [(loc.rsplit(":", 1)[0], rem) for loc, rem in est], \
            f"rank {r['rank']} (node {r['node']}): no connection from {me} to the store at {addr}:{port}: {est}"
        assert any(rem.rsplit(":", 1)[0] == other for _, rem in est), \
            f"rank {r['rank']} (node {r['node']}): no connection to the other node ({other}): {est}"


def check_one_cache_copy_per_node(records, nproc: int) -> None:
    """data.cache=full: on each node every rank maps the same file, written by that node's local
    rank 0, in that node's own /dev/shm (a file system neither the other node nor the host has);
    that /dev/shm holds no other cache file."""
    cache, net = [r for r in records if r["kind"] == "cache"], [r for r in records if r["kind"] == "net"]
    host_shm = os.stat("/dev/shm").st_dev if os.path.isdir("/dev/shm") else None
    devs = {}
    for node in "01":
        mine = [r for r in cache if r["node"] == node]
        writer = [r["pid"] for r in net if r["node"] == node and r["local_rank"] == 0]
        assert len(writer) == 1 and sorted(r["local_rank"] for r in net if r["node"] == node) == list(range(nproc))
        paths = sorted({r["path"] for r in mine})
        assert len(paths) == 2, f"node {node}: expected the train and val caches, got {paths}"  # eval_every=2
        for path in paths:
            seen = [r for r in mine if r["path"] == path]
            assert sorted(r["local_rank"] for r in seen) == list(range(nproc)), seen
            files = {tuple(r["file"]) for r in seen}
            assert len(files) == 1, f"node {node}: its ranks hold {len(files)} copies of {path}: {seen}"
            assert {r["writer_pid"] for r in seen} == set(writer), \
                f"node {node}: {path} not written by this node's local rank 0 (pid {writer}): {seen}"
        assert len({r["dir_dev"] for r in mine}) == 1
        devs[node] = mine[0]["dir_dev"]
        listed = {n for r in mine for n in r["files"] if n.endswith(".bin")}
        assert listed == {os.path.basename(p) for p in paths}, f"node {node}: /dev/shm holds {sorted(listed)}"
    assert devs["0"] != devs["1"], f"both nodes' caches are on one file system (device {devs['0']})"
    assert host_shm not in devs.values(), f"a node's cache is in the host's /dev/shm (device {host_shm})"


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2], ids=["1_per_node", "2_per_node"])
def test_two_nodes_match_one_node(args, tmp_path, request, nproc):
    """2 nodes x ``nproc`` ranks (global batch 16) == 1 node x 2 ranks: losses, kNN, bank."""
    t0 = time.time()
    out, node_logs, records = _run_two_nodes(tmp_path, args, nproc)
    wall = time.time() - t0
    world = 2 * nproc
    losses, knn, bank = _result(str(out), find_latest_complete(os.path.join(out, "checkpoints")), world)
    losses1, knn1, bank1 = request.getfixturevalue("one_node")  # after a possible skip: not run for nothing
    loss_diff = max(abs(a - b) for a, b in zip(losses, losses1)) if losses else float("nan")
    bank_diff = (bank - bank1).abs().max().item() if bank.shape == bank1.shape else float("nan")
    print(f"\ntwo nodes x {nproc}: {wall:.1f}s; max |loss - 1-node loss| {loss_diff:.3g}, "
          f"max |bank - 1-node bank| {bank_diff:.3g}")
    assert len(losses) == len(losses1) == 4
    assert losses == pytest.approx(losses1, rel=1e-4)
    torch.testing.assert_close(bank, bank1, rtol=1e-4, atol=1e-5)
    assert (knn["knn_top1"], knn["knn_top5"]) == (knn1["knn_top1"], knn1["knn_top5"])
    text = "\n".join(node_logs.values())
    assert f"world={world} batch {GLOBAL_BATCH // world}/rank" in text
    # rank 0 (on whichever node the c10d rendezvous made group rank 0) logs its compute threads:
    # its share of the cores, or torchrun's OMP_NUM_THREADS=1 when a node runs several ranks
    cores = len(os.sched_getaffinity(0))
    threads = f"torch threads: {cores} = {cores} cores available / 1 local rank(s)" if nproc == 1 else \
        f"torch threads: 1 (OMP_NUM_THREADS=1; {cores} cores available)"
    assert threads in text, text[-2000:]
    check_rendezvous_on_veth(records, nproc)
    check_one_cache_copy_per_node(records, nproc)

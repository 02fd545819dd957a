"""Run fastinst.train.engine.train with BatchNorm replaced by Identity (so one process on a batch of
2B and two processes on B each compute the same function: per-rank BN statistics would
differ, and SyncBatchNorm needs CUDA), the toy methods of tests/toy_methods.py registered.
Used by tests/test_engine.py and tests/test_protocol.py, both under
``python -m torch.distributed.run --nproc_per_node=2`` and as a plain single process, and by
tests/test_two_node.py on two network-namespace nodes (scripts/two_node_test.sh).

    python tests/dist_train_worker.py OUT key=value ...

With FASTINST_TEST_REPORT=DIR each rank appends JSON lines to DIR/rank<RANK>.jsonl: after the
process group is up, the TCP connections this process holds and MASTER_ADDR/PORT ("net"); after
each RAM cache is opened, its file, the file system it is on and the writer named in its ready
marker ("cache").
"""
import ipaddress
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from torch import nn  # noqa: E402

import fastinst.train.build as build  # noqa: E402
import fastinst.train.engine as engine  # noqa: E402
from fastinst.config import load_config  # noqa: E402
from fastinst.core.runtime import main_guard  # noqa: E402
from tests.toy_methods import register_toys  # noqa: E402

_build = build.build_model


def _no_bn(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, nn.Identity())
        else:
            _no_bn(child)
    return module


def build_model_without_bn(*args, **kw):
    return _no_bn(_build(*args, **kw))


def _tcp_connections() -> list:
    """[state, local "addr:port", remote "addr:port"] of this process's TCP sockets, from
    /proc/net/tcp{,6} of its network namespace (IPv4-mapped IPv6 shown as IPv4)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])

    def addr(field: str) -> str:
        host, port = field.split(":")
        raw = bytes.fromhex(host)
        # the kernel prints each 32-bit word in host (little-endian) order
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
        ip = ipaddress.ip_address(raw)
        if ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return f"{ip}:{int(port, 16)}"

    states = {"01": "ESTABLISHED", "0A": "LISTEN"}
    out = []
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[9] in inodes:
                    out.append([states.get(cols[3], cols[3]), addr(cols[1]), addr(cols[2])])
    return out


def _report(record: dict) -> None:
    env = os.environ
    record.update(rank=int(env.get("RANK", 0)), local_rank=int(env.get("LOCAL_RANK", 0)),
                  node=env.get("FASTINST_NODE"), pid=os.getpid())
    with open(os.path.join(env["FASTINST_TEST_REPORT"], f"rank{record['rank']}.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def _install_reports() -> None:
    import loaders.cache as cache

    init = engine.init_distributed

    def init_and_report(*args, **kw):
        env = init(*args, **kw)
        _report({"kind": "net", "master": [os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")],
                 "gloo_ifname": os.environ.get("GLOO_SOCKET_IFNAME"), "tcp": _tcp_connections()})
        return env

    cached_init = cache.CachedSource.__init__

    def cached_init_and_report(self, *args, **kw):
        cached_init(self, *args, **kw)
        st, shm = os.stat(self.path), os.stat(os.path.dirname(self.path))
        with open(self.path + ".ready") as f:
            writer = int(f.read())
        files = sorted(n for n in os.listdir(os.path.dirname(self.path)) if n.startswith("fastinst-"))
        _report({"kind": "cache", "path": self.path, "file": [st.st_dev, st.st_ino], "dir_dev": shm.st_dev,
                 "writer_pid": writer, "files": files})

    engine.init_distributed = init_and_report
    cache.CachedSource.__init__ = cached_init_and_report


if __name__ == "__main__":
    build.build_model = build_model_without_bn
    register_toys()
    if os.environ.get("FASTINST_TEST_REPORT"):
        _install_reports()
    out, overrides = sys.argv[1], sys.argv[2:]
    main_guard(engine.train, load_config(None, overrides), out)

"""Run fastinst.engine.train with BatchNorm replaced by Identity (so one process on a batch of
2B and two processes on B each compute the same function: per-rank BN statistics would
differ, and SyncBatchNorm needs CUDA), the toy methods of tests/toy_methods.py registered.
Used by tests/test_engine.py and tests/test_protocol.py, both under
``python -m torch.distributed.run --nproc_per_node=2`` and as a plain single process.

    python tests/dist_train_worker.py OUT key=value ...
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from torch import nn  # noqa: E402

import fastinst.build as build  # noqa: E402
import fastinst.engine as engine  # noqa: E402
from fastinst.config import load_config  # noqa: E402
from fastinst.runtime import main_guard  # noqa: E402
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


if __name__ == "__main__":
    build.build_model = build_model_without_bn
    register_toys()
    out, overrides = sys.argv[1], sys.argv[2:]
    main_guard(engine.train, load_config(None, overrides), out)

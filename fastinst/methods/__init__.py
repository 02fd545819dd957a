"""Method registry: each self-supervised method is one small module registered by name.

A method is an ``nn.Module`` built by ``build_method(cfg, model, num_samples, ranks)``:

- ``forward(batch) -> dict(loss=Tensor[], ...)``: embeddings of the batch's views and the
  loss of the *global* batch (same value on every rank);
- ``after_step(out) -> bool``: ``@torch.no_grad()`` state updates (memory bank, queues) made
  after the optimiser step, only when ``out["loss"]`` is finite; returns whether it applied;
- ``state_dict()``: everything resumable the method owns (bank shard, Z, noise RNG), not
  the model's weights (the engine saves those);
- ``train_features() -> (feats, labels) | None``: this rank's training features for kNN
  evaluation without a recompute pass (NPID: its bank shard), or None;
- ``extra_optimizers(lr)``, ``before_step(step, lr)``, ``flush()``: see fastinst/methods/base.py,
  whose ``Method`` base class holds the protocol and its no-op defaults.

Registered: npid (NPID / InstDisc), pic (PIC), moco (MoCo v2), simclr (SimCLR).

The engine never branches on the method's name (DESIGN.md, "one registry of methods").
"""
from __future__ import annotations

from typing import Callable, Dict

_REGISTRY: Dict[str, Callable] = {}


def register(name: str):
    """Class decorator: ``@register("npid")`` makes the class buildable by ``method.name``."""

    def deco(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method {name!r} is registered twice")
        _REGISTRY[name] = cls
        return cls

    return deco


def available() -> list:
    """Registered method names, in registration order."""
    _import_all()
    return list(_REGISTRY)


def _import_all() -> None:
    from . import npid, pic, moco, simclr  # noqa: F401  (each registers itself)


def method_class(name: str):
    """The class registered as ``name``; a ConfigError naming ``method.name`` otherwise."""
    _import_all()
    if name not in _REGISTRY:
        from ..config import ConfigError

        raise ConfigError(f"config key 'method.name': must be one of {available()}, got {name!r}")
    return _REGISTRY[name]


def build_method(cfg, model, num_samples: int, ranks, *, labels=None, device=None):
    """Instantiate ``cfg.method.name`` for a training set of ``num_samples`` images."""
    return method_class(cfg.method.name).from_config(cfg, model, num_samples, ranks, labels=labels,
                                                     device=device)

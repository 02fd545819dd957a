"""Method registry: each self-supervised method is one small module registered by name, with
its config dataclass (``cls.Config``, the ``method.<name>`` section of a config file).

Registered: npid (NPID / InstDisc), pic (PIC), moco (MoCo v2), simclr (SimCLR). Adding a
method is a new module here (or anywhere that calls `register`) plus one line in
`_import_all`. The protocol is fastinst/methods/base.py; the engine never branches on a
method's name (DESIGN.md, "one registry of methods").
"""
from __future__ import annotations

from typing import Callable, Dict

_REGISTRY: Dict[str, Callable] = {}


def register(name: str):
    """Class decorator: ``@register("npid")`` makes the class buildable by ``method.name`` and
    its ``Config`` the ``method.<name>`` config section."""

    def deco(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method {name!r} is registered twice")
        _REGISTRY[name] = cls
        return cls

    return deco


def _import_all() -> None:
    from . import npid, pic, moco, simclr  # noqa: F401  (each registers itself)


def available() -> list:
    """Registered method names, in registration order."""
    _import_all()
    return list(_REGISTRY)


def registered() -> Dict[str, Callable]:
    """{name: class} of every registered method, in registration order."""
    _import_all()
    return dict(_REGISTRY)


def method_class(name: str):
    """The class registered as ``name``; a ConfigError naming ``method.name`` otherwise."""
    _import_all()
    if name not in _REGISTRY:
        from ..config import ConfigError

        raise ConfigError(f"config key 'method.name': must be one of {available()}, got {name!r}")
    return _REGISTRY[name]

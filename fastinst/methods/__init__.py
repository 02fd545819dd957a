"""Method registry: each self-supervised method is one small module registered by name, with
its config dataclass (``cls.Config``, the ``method.<name>`` section of a config file).

Registered: npid (NPID / InstDisc), pic (PIC), moco (MoCo v2), simclr (SimCLR), cmc (CMC). Adding a
method is a new module here (or anywhere that calls `register`) plus one line in
`_import_all`. The protocol is fastinst/methods/base.py; the engine never branches on a
method's name (DESIGN.md, "one registry of methods").
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict

_REGISTRY: Dict[str, Callable] = {}
_DEFAULT: list = []  # the method.name of a config that names none
_SECTION_TYPES: dict = {}


def register(name: str, *, default: bool = False):
    """Class decorator: ``@register("npid")`` makes the class buildable by ``method.name`` and
    its ``Config`` the ``method.<name>`` config section; ``default=True``: the method a config
    gets when it names none."""

    def deco(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method {name!r} is registered twice")
        _REGISTRY[name] = cls
        if default:
            _DEFAULT[:] = [name]
        return cls

    return deco


_SHIPPED: list = []  # module names of the shipped methods, in `_import_all`'s order


def _import_all() -> None:
    from . import npid, pic, moco, simclr, cmc, isl  # (each registers itself)

    _SHIPPED[:] = [m.__name__ for m in (npid, pic, moco, simclr, cmc, isl)]


def available() -> list:
    """Registered method names: the shipped ones first, in `_import_all`'s order (whichever
    module was imported first), then any others in registration order."""
    _import_all()
    rank = {m: i for i, m in enumerate(_SHIPPED)}
    names = list(_REGISTRY)
    return sorted(names, key=lambda n: (rank.get(_REGISTRY[n].__module__, len(rank)), names.index(n)))


def registered() -> Dict[str, Callable]:
    """{name: class} of every registered method, in `available`'s order."""
    _import_all()
    return {n: _REGISTRY[n] for n in available()}


def method_class(name: str):
    """The class registered as ``name``; a ConfigError naming ``method.name`` otherwise."""
    _import_all()
    if name not in _REGISTRY:
        from ..config import ConfigError

        raise ConfigError(f"config key 'method.name': must be one of {available()}, got {name!r}")
    return _REGISTRY[name]


def method_config_type():
    """The dataclass of config section ``method``: ``name`` (default: the method registered with
    default=True) plus one section per registered method, that method's own ``Config``, and a
    ``section`` property (the chosen method's). One class per set of registered methods."""
    methods = registered()
    sections = tuple((n, cls.Config) for n, cls in methods.items() if cls.Config is not None)
    if sections not in _SECTION_TYPES:
        fields = [("name", str, dataclasses.field(default=_DEFAULT[0]))]
        fields += [(n, c, dataclasses.field(default_factory=c)) for n, c in sections]
        section = property(lambda self: getattr(self, self.name), doc="the chosen method's own section")
        cls = dataclasses.make_dataclass("MethodConfig", fields, frozen=True, kw_only=True,
                                         namespace={"section": section})
        cls.__module__ = "fastinst.config"
        _SECTION_TYPES[sections] = cls
    return _SECTION_TYPES[sections]

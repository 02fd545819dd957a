"""The method registry: each self-supervised method registered by name, with its config
dataclass (``cls.Config``, the ``method.<name>`` section of a config file).

A method's module registers its class with ``@register("name")``; fastinst/methods/__init__.py
imports the shipped ones (its one line per method) and hands the registry to the config. The
engine never branches on a method's name (DESIGN.md, "one registry of methods").
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict

from ..config.errors import ConfigError

_REGISTRY: Dict[str, Callable] = {}  # name -> class, in registration order (the shipped methods first)
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


def available() -> list:
    """Registered method names: the shipped ones first, in fastinst/methods/__init__.py's order,
    then any others in registration order."""
    return list(_REGISTRY)


def registered() -> Dict[str, Callable]:
    """{name: class} of every registered method, in `available`'s order."""
    return dict(_REGISTRY)


def method_class(name: str):
    """The class registered as ``name``; a ConfigError naming ``method.name`` otherwise."""
    if name not in _REGISTRY:
        raise ConfigError(f"config key 'method.name': must be one of {available()}, got {name!r}")
    return _REGISTRY[name]


def check_config(cfg) -> None:
    """The chosen method's start-up checks of the rest of ``cfg`` (`Method.check_config`)."""
    method_class(cfg.method.name).check_config(cfg)


def method_config_type():
    """The dataclass of config section ``method``: ``name`` (default: the method registered with
    default=True) plus one section per registered method, that method's own ``Config``, and a
    ``section`` property (the chosen method's). One class per set of registered methods."""
    sections = tuple((n, cls.Config) for n, cls in _REGISTRY.items() if cls.Config is not None)
    if sections not in _SECTION_TYPES:
        fields = [("name", str, dataclasses.field(default=_DEFAULT[0]))]
        fields += [(n, c, dataclasses.field(default_factory=c)) for n, c in sections]
        section = property(lambda self: getattr(self, self.name), doc="the chosen method's own section")
        cls = dataclasses.make_dataclass("MethodConfig", fields, frozen=True, kw_only=True,
                                         namespace={"section": section})
        cls.__module__ = "fastinst.config"
        _SECTION_TYPES[sections] = cls
    return _SECTION_TYPES[sections]

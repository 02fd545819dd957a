"""Config files: YAML and ``key.sub=value`` overrides -> a tree of typed dataclasses, and back
(`to_dict`, `save_config`). Values are converted to each field's type (Literal, tuples,
unions, nested dataclasses) or fail with a ConfigError naming the key. Generic over the root
class: `build(cls, raw, overrides)` knows no section of fastinst's own tree (fastinst/config/tree.py).
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any, Literal, Tuple

import yaml

from .errors import ConfigError, check


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp, key: str):
    """Convert a YAML value to ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        check(isinstance(value, dict), key, f"expected a mapping, got {value!r}")
        return _build(tp, value, key)
    if origin is Literal:
        if isinstance(value, bool) and all(isinstance(a, str) for a in args):
            # YAML 1.1 reads off/on/no/yes as booleans: take the word back (model.amp=off)
            value = next((a for a in args if a in (("on", "yes", "true") if value else ("off", "no", "false"))),
                         value)
        check(value in args, key, f"must be one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _convert(value, a, key)
            except ConfigError as e:  # try the next member of the union
                errors.append(str(e))
        raise ConfigError(errors[-1])
    if origin in (tuple, Tuple):
        check(isinstance(value, (list, tuple)), key, f"expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        check(len(value) == len(args), key, f"expected {len(args)} values, got {len(value)}: {value!r}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        check(isinstance(value, bool), key, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        check(isinstance(value, int) and not isinstance(value, bool), key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        check(isinstance(value, (int, float)) and not isinstance(value, bool), key,
              f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        check(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise ConfigError(f"config key '{key}': unsupported type {_type_name(tp)}")


def _build(cls, raw: dict, prefix: str = ""):
    hints = cls.field_types() if hasattr(cls, "field_types") else typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        where = prefix or "top level"
        raise ConfigError(
            f"unknown config key '{(prefix + '.' if prefix else '') + unknown[0]}' in {where}; "
            f"valid keys: {', '.join(sorted(names))}")
    kwargs = {k: _convert(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - every field has a default
        raise ConfigError(f"config section '{prefix or 'top level'}': {e}") from e


def parse_override(text: str) -> Tuple[list, Any]:
    """'a.b.c=value' -> (['a','b','c'], yaml-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, val = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        parsed = yaml.safe_load(val) if val.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from e
    return key.split("."), parsed


def apply_overrides(raw: dict, overrides) -> dict:
    raw = dict(raw)
    for text in overrides or ():
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
            node[part] = dict(child)
            node = node[part]
        node[path[-1]] = value
    return raw


def load_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return raw


def build(cls, raw: dict, overrides=()):
    """An instance of dataclass ``cls`` from the mapping ``raw`` with ``key.sub=value``
    ``overrides`` applied; every value converted to its field's type (``cls.field_types()``
    where a class declares it) or a ConfigError naming the key."""
    return _build(cls, apply_overrides(raw, overrides))


def to_dict(cfg) -> dict:
    """Plain nested dict (tuples as lists) suitable for YAML/JSON dumps and checkpoints."""

    def conv(x):
        if dataclasses.is_dataclass(x):
            return {f.name: conv(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, (list, tuple)):
            return [conv(v) for v in x]
        return x

    return conv(cfg)


def save_config(cfg, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    os.replace(tmp, path)

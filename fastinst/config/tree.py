"""The configuration of a run: `Config`, a tree of typed, frozen, keyword-only dataclasses,
one per component (fastinst/config/sections.py, aug_sections.py, eval_sections.py), each
checking its own values in ``__post_init__`` and saying how to fix a bad one.

``load_config(path, overrides)`` reads YAML, applies ``key.sub=value`` overrides and builds
this tree (fastinst/config/files.py); unknown keys, wrong types and impossible combinations
fail at start-up with a message naming the key.

The ``method`` section is ``name`` plus one section per registered method, that method's own
``Config`` class, declared beside the method. The config package knows no method: the method
registry (fastinst/methods/__init__.py) hands it the section's dataclass and the start-up check
of the chosen method through `use_method_registry` when it is imported, as launch.py,
fastinst.train and fastinst.eval do.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .aug_sections import AugConfig
from .errors import ConfigError, check
from .eval_sections import DistConfig, EvalConfig, LinearConfig, SVMConfig
from .files import build, load_yaml
from .sections import DataConfig, LoaderConfig, ModelConfig, ProfileConfig, SamplerConfig, TrainConfig


@dataclass(frozen=True)
class MethodRegistry:
    """What the method registry hands the config: ``section_type()``, the dataclass of section
    ``method`` for the methods registered now, and ``check(cfg)``, the chosen method's start-up
    checks of the rest of the config (its views, say)."""

    section_type: Callable[[], type]
    check: Callable[[Any], None]


_REGISTRY: list = []  # the one MethodRegistry, once fastinst.methods is imported


def use_method_registry(section_type: Callable[[], type], check_config: Callable[[Any], None]) -> None:
    """Called by fastinst.methods on import (see the module docstring)."""
    _REGISTRY[:] = [MethodRegistry(section_type, check_config)]


def _methods() -> MethodRegistry:
    if not _REGISTRY:
        raise ConfigError("config section 'method': no method registry is loaded; import fastinst.methods "
                          "before building a config (launch.py, fastinst.train and fastinst.eval import it)")
    return _REGISTRY[0]


@dataclass(frozen=True, kw_only=True)
class Config:
    name: str = "fastinst"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: Any = field(default_factory=lambda: _methods().section_type()())  # name + each method's own section
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)
    svm: SVMConfig = field(default_factory=SVMConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    @classmethod
    def field_types(cls) -> dict:
        """The type of each field for the builder: the method section's comes from the registry."""
        return dict(typing.get_type_hints(cls), method=_methods().section_type())

    def __post_init__(self):
        if self.sampler.kind == "sliding_window":
            check(self.sampler.window >= self.loader.batch_size, "sampler.window",
                  "must be >= loader.batch_size (one window holds many batches)")
        check(not (self.aug.mix.uses_partners and self.data.cache == "part"), "aug.mix.kind",
              f"{self.aug.mix.kind} draws partners from the whole data set, but data.cache=part holds only this "
              "rank's rows; use data.cache=full (one copy per node) or none")
        # The method checks what it needs of the rest of the config at start-up; the
        # registry names the valid methods.
        _methods().check(self)


def load_config(path: Optional[str] = None, overrides=()) -> Config:
    """The `Config` of YAML file ``path`` (None: the defaults) with ``key.sub=value``
    overrides applied; a ConfigError naming the file and the key otherwise."""
    raw = load_yaml(path) if path else {}
    try:
        return build(Config, raw, overrides)
    except ConfigError as e:
        if path:
            raise ConfigError(f"{path}: {e}") from None
        raise


def config_from_dict(raw: dict, overrides=()) -> Config:
    """The `Config` of a plain mapping (a checkpoint's saved config) with overrides applied."""
    return build(Config, raw, overrides)


def for_world(cfg: Config, world: int) -> Config:
    """``cfg`` with loader.batch_size = loader.global_batch / world where a global batch is set."""
    g = cfg.loader.global_batch
    if not g:
        return cfg
    if g % world:
        raise ConfigError(f"config key 'loader.global_batch': {g} is not divisible by the {world} ranks of this run; "
                          f"use a world size that divides it, or a global batch that is a multiple of {world}")
    return dataclasses.replace(cfg, loader=dataclasses.replace(cfg.loader, batch_size=g // world))

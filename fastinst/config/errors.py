"""The configuration error and the one check every config section's ``__post_init__`` uses.
The bottom of the config package: every layer may raise these (a method's own section, the
builders' start-up checks) without importing the config tree."""
from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem; the message names the key and the fix."""


def check(cond: bool, key: str, msg: str) -> None:
    """Raise a ConfigError naming ``key`` unless ``cond`` (every component's __post_init__)."""
    if not cond:
        raise ConfigError(f"config key '{key}': {msg}")

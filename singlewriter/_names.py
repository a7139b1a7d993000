"""Validation of lock names, shared by every backend."""

from __future__ import annotations

import re

from ._errors import ConfigError

__all__ = ["validate_name"]

# Safe as a file name, a Redis key part, a Consul key segment and (once
# lower-cased) most Kubernetes object names: no separators, no "..".
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


def validate_name(name: object) -> str:
    """Return ``name`` if it is a valid lock name, else raise ConfigError."""
    if not isinstance(name, str):
        raise ConfigError(
            f"lock name {name!r} is invalid: expected a string such as 'example.com'"
        )
    if not _NAME.fullmatch(name) or ".." in name:
        raise ConfigError(
            f"lock name {name!r} is invalid: use 1 to 200 characters from"
            " letters, digits, '.', '_' and '-', starting with a letter or"
            " digit, with no '..'",
            lock_name=name,
        )
    return name

"""A crash-safe, fenced store for certificate key material.

See :class:`KeyStore` for the guarantees and ``docs/keystore.md`` for the
layout on disk and the commit protocol.
"""

from __future__ import annotations

from ._fs import FileSystem, atomic_write
from ._hooks import DeployHook
from ._layout import REQUIRED_NAMES
from ._manifest import Generation
from ._store import KeyStore

__all__ = [
    "REQUIRED_NAMES",
    "DeployHook",
    "FileSystem",
    "Generation",
    "KeyStore",
    "atomic_write",
]

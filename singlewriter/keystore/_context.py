"""Settings shared by the modules that read and change one store."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from ._fs import FileSystem
from ._layout import StoreLayout

__all__ = ["StoreContext"]


@dataclass(frozen=True)
class StoreContext:
    """The configuration of one KeyStore, passed to its helper modules.

    Modes are the exact permission bits of new files and directories.
    ``file_mode`` applies only to files that are PEM made of CERTIFICATE
    blocks and nothing else, ``key_mode`` to every other file.
    """

    layout: StoreLayout
    fs: FileSystem
    passphrase: bytes | None
    clock: Callable[[], datetime]
    keep: int
    key_mode: int
    file_mode: int
    directory_mode: int
    lock_name: str | None

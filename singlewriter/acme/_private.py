"""Owner and mode checks for the account and state files the renewal trusts.

The account directory contains the account key and the in-flight order key,
which becomes the live certificate's key. Another local user who can write
there could plant a key of their choosing. So every directory is created
with mode 0700, whatever the umask. Every directory and file that is read
must belong to root or the current user and have no group or other write
bit.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from singlewriter._errors import ConfigError, StoreError
from singlewriter.keystore._paths import check_store_path

__all__ = ["check_private_file", "make_private_directory"]

_UNSAFE_BITS = stat.S_IWGRP | stat.S_IWOTH


def _trusted(uid: int) -> bool:
    return uid in (0, os.geteuid())


def make_private_directory(path: Path, what: str) -> None:
    """Create ``path`` and its missing parents with mode 0700, then check it.

    Raise ConfigError when the path passes through a directory or symlink
    another user controls, or when ``path`` is not a private directory, and
    StoreError when it cannot be created.
    """
    check_store_path(path)
    missing: list[Path] = []
    current = path
    while not os.path.lexists(current):
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise StoreError(
                f"could not create the {what} {directory}: {exc.strerror or exc};"
                " check its parent's owner and mode"
            ) from exc
    check_private_directory(path, what)


def check_private_directory(path: Path, what: str) -> None:
    """Raise ConfigError unless ``path`` is a directory only trusted users can write."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise StoreError(
            f"could not open the {what} {path}: {exc.strerror or exc}"
        ) from exc
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"the {what} {path} is not a directory")
    _check_owner_and_mode(path, info, what)


def check_private_file(path: Path, info: os.stat_result, what: str) -> None:
    """Raise ConfigError unless the file ``path`` with ``info`` is the user's own."""
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"the {what} {path} is not a regular file")
    _check_owner_and_mode(path, info, what)


def _check_owner_and_mode(path: Path, info: os.stat_result, what: str) -> None:
    if not _trusted(info.st_uid):
        raise ConfigError(
            f"the {what} {path} is owned by uid {info.st_uid}, so that user could"
            f" choose what the renewal uses; only root or uid {os.geteuid()} may"
            f" own it. Remove it or run 'chown {os.geteuid()} {path}'"
        )
    if info.st_mode & _UNSAFE_BITS:
        raise ConfigError(
            f"the {what} {path} is writable by group or others"
            f" (mode {stat.S_IMODE(info.st_mode):04o}), so another user could"
            f" choose what the renewal uses. Run 'chmod go-w {path}'"
        )

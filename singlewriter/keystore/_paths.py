"""Checks on file names and on the directory chain above a store."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from singlewriter._errors import ConfigError

__all__ = ["check_store_path", "path_argument", "store_path", "validate_name"]

_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")

# Linux resolves at most 40 symlinks in one lookup (path_resolution(7)).
_MAX_SYMLINKS = 40


def validate_name(name: object) -> str:
    """Return ``name`` if it is a plain file name a store may publish.

    A name starts with a letter or digit and contains only letters, digits,
    dots, dashes and underscores, at most 100 characters. That excludes path
    separators, ``..``, empty names and hidden names, which the store uses
    for its own entries.
    """
    if not isinstance(name, str) or _NAME_PATTERN.fullmatch(name) is None:
        raise ConfigError(
            f"invalid file name {name!r}: use a plain name such as 'cert.pem' "
            "that starts with a letter or digit and contains only letters, "
            "digits, '.', '-' and '_' (no '/', no leading dot, at most 100 "
            "characters)"
        )
    return name


def path_argument(value: object, description: str) -> Path:
    """Return ``value`` as a Path, or raise ConfigError naming ``description``.

    Accepts a str or an os.PathLike that gives a str. Rejects bytes, other
    types, the empty string and text with a NUL byte, which no system call
    accepts.
    """
    text = os.fspath(value) if isinstance(value, (str, os.PathLike)) else value
    if not isinstance(text, str):
        raise ConfigError(
            f"invalid {description} {value!r}: pass the path as a str or a pathlib.Path"
        )
    if not text:
        raise ConfigError(
            f"invalid {description}: the path is empty. Pass a path, or '.' for the "
            "current directory"
        )
    if "\0" in text:
        raise ConfigError(
            f"invalid {description} {text!r}: it contains a NUL byte, which no file "
            "name can contain"
        )
    return Path(text)


def store_path(value: object) -> Path:
    """Check the store path argument and the directory chain above it.

    Returns the absolute path as :func:`check_store_path` does. The empty
    string and any path that resolves to ``/`` are rejected, because the
    store would fill the current directory or the filesystem root with its
    entries.
    """
    if value == "":
        raise ConfigError(
            "invalid store path: the path is empty. Pass the directory that "
            "holds this certificate's files, such as /etc/acme/live/example.com, "
            "or '.' to use the current directory on purpose"
        )
    path = path_argument(value, "store path")
    store = check_store_path(path)
    if store == Path("/") or os.path.realpath(store) == "/":
        raise ConfigError(
            f"invalid store path {os.fspath(path)!r}: it resolves to the "
            "filesystem root '/'. Pass a directory of its own for each "
            "certificate, such as /etc/acme/live/example.com"
        )
    return store


def _trusted_owners() -> frozenset[int]:
    return frozenset({0, os.geteuid()})


def _check_directory(path: Path, info: os.stat_result, store: Path) -> None:
    """Reject a directory that another user could use to swap the store."""
    mode = info.st_mode
    if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
        raise ConfigError(
            f"store path {store} is unsafe: directory {path} is world-writable "
            "without the sticky bit, so any user could replace entries in it. "
            f"Run 'chmod o-w {path}' or choose another location."
        )
    if info.st_uid not in _trusted_owners():
        raise ConfigError(
            f"store path {store} is unsafe: directory {path} is owned by uid "
            f"{info.st_uid}, which could replace the store. Use a directory "
            "owned by root or by the user running the store."
        )


def _check_symlink(path: Path, info: os.stat_result, store: Path) -> None:
    if info.st_uid not in _trusted_owners():
        raise ConfigError(
            f"store path {store} is unsafe: it passes through symlink {path} "
            f"owned by uid {info.st_uid}, who could point it elsewhere. Replace "
            "the symlink with one owned by root or by the user running the "
            "store, or use the real path."
        )


def check_store_path(path: Path) -> Path:
    """Walk the store path from ``/`` and reject a chain another user controls.

    Each existing directory on the way, after following symlinks, must be
    owned by root or the current user and must not be world-writable without
    the sticky bit. Each symlink on the way must be owned by root or the
    current user. ``/tmp`` (root-owned, mode 1777) passes. Components that do
    not exist yet are created later by the store with safe owners.

    Returns the absolute form of ``path`` without resolving symlinks, so the
    live names keep the spelling the caller configured.

    NOTE: group-writable directories pass, and the chain is checked once at
    open, not again before each commit.
    """
    store = Path(os.path.abspath(path))
    pending = list(reversed(store.parts[1:]))
    current = Path("/")
    _check_directory(current, os.lstat(current), store)
    followed = 0

    while pending:
        part = pending.pop()
        if part == "..":
            current = current.parent
            continue

        candidate = current / part
        try:
            info = os.lstat(candidate)
        except FileNotFoundError:
            return store

        if stat.S_ISLNK(info.st_mode):
            _check_symlink(candidate, info, store)
            followed += 1
            if followed > _MAX_SYMLINKS:
                raise ConfigError(f"store path {store} has a symlink loop")

            target = Path(os.readlink(candidate))
            parts = target.parts
            if target.is_absolute():
                current = Path("/")
                parts = parts[1:]
            pending.extend(reversed(parts))
            continue

        if not stat.S_ISDIR(info.st_mode):
            raise ConfigError(
                f"store path {store} is invalid: {candidate} is not a directory"
            )
        _check_directory(candidate, info, store)
        current = candidate

    return store

"""The manifest that makes a generation directory complete, and its reader.

A generation is complete when its ``.manifest.json`` parses and every file it
lists is present with the recorded size and sha256. The manifest is written
last and fsynced with its directory, so a generation interrupted at any
point before that has no manifest and is never published.

The manifest also records each file's mode. A different mode on disk does
not make a generation damaged, because an operator may change it on purpose
(``chmod 640 privkey.pem``) and the content is still the committed one.
Readers return such differences so that callers can report them.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ._layout import MANIFEST_NAME, REQUIRED_NAMES

__all__ = [
    "FileRecord",
    "Generation",
    "InvalidGeneration",
    "Manifest",
    "ModeDifference",
    "StoredGeneration",
    "encode_manifest",
    "open_directory",
    "read_file_at",
    "read_generation",
    "read_manifest",
]

_FORMAT = 1
_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class InvalidGeneration(Exception):
    """A generation directory that must not be published.

    ``incomplete`` is true when the manifest is missing or is not valid JSON,
    which is what an interrupted commit or cleanup leaves behind. Recovery
    removes such directories and keeps every other invalid one for
    inspection.
    """

    def __init__(self, reason: str, *, incomplete: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.incomplete = incomplete


@dataclass(frozen=True)
class Generation:
    """One complete set of files in its own directory, as its manifest lists it.

    ``previous`` is the sequence number that was current when this one was
    committed, which is where :meth:`KeyStore.rollback` goes from here.
    ``not_after`` is the end of the leaf certificate's validity period.
    """

    sequence: int
    token: int
    path: Path
    names: tuple[str, ...]
    created: datetime
    previous: int | None
    not_after: datetime


@dataclass(frozen=True)
class FileRecord:
    """Size, mode and sha256 of one file in a generation."""

    sha256: str
    size: int
    mode: int

    @classmethod
    def of(cls, data: bytes, mode: int) -> FileRecord:
        return cls(sha256=hashlib.sha256(data).hexdigest(), size=len(data), mode=mode)


@dataclass(frozen=True)
class Manifest:
    """The parsed content of ``.manifest.json``."""

    sequence: int
    token: int
    previous: int | None
    created: datetime
    not_after: datetime
    files: Mapping[str, FileRecord]

    def generation(self, path: Path) -> Generation:
        return Generation(
            sequence=self.sequence,
            token=self.token,
            path=path,
            names=tuple(sorted(self.files)),
            created=self.created,
            previous=self.previous,
            not_after=self.not_after,
        )


def encode_manifest(manifest: Manifest) -> bytes:
    """Serialise ``manifest`` as canonical JSON."""
    document = {
        "format": _FORMAT,
        "sequence": manifest.sequence,
        "token": manifest.token,
        "previous": manifest.previous,
        "created": manifest.created.isoformat(),
        "not_after": manifest.not_after.isoformat(),
        "files": {
            name: {"sha256": record.sha256, "size": record.size, "mode": record.mode}
            for name, record in sorted(manifest.files.items())
        },
    }
    return json.dumps(document, indent=2, sort_keys=True).encode() + b"\n"


def _require(document: Mapping[str, Any], key: str, kind: type) -> Any:
    value = document.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InvalidGeneration(
            f"manifest field {key!r} is missing or not {kind.__name__}",
            incomplete=False,
        )
    return value


def _parse_record(name: str, value: object) -> FileRecord:
    if not isinstance(value, dict):
        raise InvalidGeneration(f"manifest entry {name!r} is invalid", incomplete=False)
    return FileRecord(
        sha256=_require(value, "sha256", str),
        size=_require(value, "size", int),
        mode=_require(value, "mode", int),
    )


def _parse_manifest(raw: bytes) -> Manifest:
    try:
        document = json.loads(raw)
    except ValueError as exc:
        # A manifest torn by a crash fails here: it is written in one piece,
        # so a truncated copy is never valid JSON.
        raise InvalidGeneration(
            f"manifest does not parse: {exc}", incomplete=True
        ) from exc
    if not isinstance(document, dict) or document.get("format") != _FORMAT:
        raise InvalidGeneration("manifest has an unknown format", incomplete=False)

    previous = document.get("previous")
    if previous is not None and not isinstance(previous, int):
        raise InvalidGeneration(
            "manifest field 'previous' is invalid", incomplete=False
        )

    files = _require(document, "files", dict)
    try:
        created = datetime.fromisoformat(_require(document, "created", str))
        not_after = datetime.fromisoformat(_require(document, "not_after", str))
    except ValueError as exc:
        raise InvalidGeneration(
            f"manifest time is invalid: {exc}", incomplete=False
        ) from exc

    return Manifest(
        sequence=_require(document, "sequence", int),
        token=_require(document, "token", int),
        previous=previous,
        created=created,
        not_after=not_after,
        files={name: _parse_record(name, value) for name, value in files.items()},
    )


@dataclass(frozen=True)
class ModeDifference:
    """A file whose mode on disk differs from the mode its manifest records."""

    name: str
    actual: int
    recorded: int

    def __str__(self) -> str:
        return f"{self.name} is {self.actual:#o}, recorded {self.recorded:#o}"


@dataclass(frozen=True)
class StoredGeneration:
    """A generation read from disk: its manifest, its files and their modes."""

    manifest: Manifest
    files: dict[str, bytes]
    mode_differences: tuple[ModeDifference, ...]


def open_directory(path: Path) -> int:
    """Open a directory for reading and return its descriptor.

    A symlink at ``path`` is resolved by this one call, so every read through
    the descriptor stays in the directory it named at that moment.
    """
    return os.open(path, _DIRECTORY_FLAGS)


def read_file_at(directory_fd: int, name: str) -> tuple[bytes, os.stat_result]:
    """Read a regular file inside an open directory without following symlinks."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory_fd)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidGeneration(f"{name} is not a regular file", incomplete=False)
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks), info
    finally:
        os.close(fd)


def read_manifest(directory_fd: int, sequence: int | None) -> Manifest:
    """Read and parse the manifest of the directory open as ``directory_fd``.

    When ``sequence`` is given, the manifest must carry that number, which
    ties it to the directory name.
    """
    try:
        raw, _ = read_file_at(directory_fd, MANIFEST_NAME)
    except FileNotFoundError:
        raise InvalidGeneration("manifest is missing", incomplete=True) from None

    manifest = _parse_manifest(raw)
    if sequence is not None and manifest.sequence != sequence:
        raise InvalidGeneration(
            f"manifest names generation {manifest.sequence}", incomplete=False
        )

    missing = sorted(set(REQUIRED_NAMES) - set(manifest.files))
    if missing:
        raise InvalidGeneration(
            f"manifest does not list {', '.join(missing)}", incomplete=False
        )
    return manifest


def _read_listed_file(
    directory_fd: int, name: str, record: FileRecord
) -> tuple[bytes, int]:
    """Return the content and mode of a listed file, checking its size and sha256."""
    try:
        data, info = read_file_at(directory_fd, name)
    except FileNotFoundError:
        raise InvalidGeneration(f"{name} is missing", incomplete=False) from None

    if len(data) != record.size or hashlib.sha256(data).hexdigest() != record.sha256:
        raise InvalidGeneration(
            f"{name} does not match its sha256 in the manifest", incomplete=False
        )
    return data, stat.S_IMODE(info.st_mode)


def read_generation(directory_fd: int, sequence: int | None) -> StoredGeneration:
    """Read a generation through its open directory and check its integrity.

    Raises InvalidGeneration when the manifest is missing or invalid, or when
    a listed file is missing or its content differs from its record. A mode
    that differs from the record is returned in ``mode_differences``.
    """
    manifest = read_manifest(directory_fd, sequence)
    files = {}
    differences = []
    for name, record in manifest.files.items():
        files[name], mode = _read_listed_file(directory_fd, name, record)
        if mode != record.mode:
            differences.append(ModeDifference(name, mode, record.mode))
    return StoredGeneration(manifest, files, tuple(differences))

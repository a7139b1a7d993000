"""Fencing tokens: checking them, recording the highest, and resetting it.

The highest token of a store is the maximum of the token in ``.token`` and
the token of every manifest on disk, so a token whose commit died part way
still fences lower tokens. A store never lowers its highest token by
itself. Only :func:`reset_fence`, which an operator calls through
``KeyStore.reset_fence``, does.

``.token`` contains the token on its first line. After a reset it has a
second line, ``fence-reset-after-generation N``: the manifests of
generations up to N were written before the reset and no longer count, and
new generations are numbered above N.
"""

from __future__ import annotations

from dataclasses import dataclass

from singlewriter._errors import ConfigError, StoreError

from ._context import StoreContext
from ._fs import atomic_write
from ._manifest import InvalidGeneration
from ._publish import generation_sequences
from ._recovery import load_manifest

__all__ = [
    "MAX_TOKEN",
    "TokenFile",
    "check_token",
    "next_sequence",
    "read_token_file",
    "record_token",
    "recorded_token",
    "reset_fence",
]

# The largest signed 64-bit integer. Every lock backend issues tokens far
# below it (Redis and Consul count microseconds since 1970, about 1.8e15 in
# 2026), and larger values usually come from a bug that would lock the
# store forever.
MAX_TOKEN = 2**63 - 1

_RESET_PREFIX = "fence-reset-after-generation "


@dataclass(frozen=True)
class TokenFile:
    """The content of ``.token``."""

    token: int
    reset_after: int | None = None

    def encode(self) -> bytes:
        text = f"{self.token}\n"
        if self.reset_after is not None:
            text += f"{_RESET_PREFIX}{self.reset_after}\n"
        return text.encode("ascii")


def check_token(value: object, lock_name: str | None) -> int:
    """Return ``value`` if it is a valid fencing token, else raise ConfigError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            f"invalid token {value!r}: pass the integer fencing token of the "
            "lease that is committing",
            lock_name=lock_name,
        )
    if not 0 <= value <= MAX_TOKEN:
        raise ConfigError(
            f"invalid token {value}: a fencing token must be from 0 to 2**63 - 1. "
            "Pass the token of the lease that is committing",
            lock_name=lock_name,
        )
    return value


def _parse(text: str) -> TokenFile:
    lines = text.splitlines()
    if len(lines) == 1:
        return TokenFile(int(lines[0]))
    if len(lines) == 2 and lines[1].startswith(_RESET_PREFIX):
        return TokenFile(int(lines[0]), int(lines[1][len(_RESET_PREFIX) :]))
    raise ValueError("unexpected lines")


def read_token_file(context: StoreContext) -> TokenFile | None:
    """Return the content of ``.token``, or None when there is no such file."""
    path = context.layout.token
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        return None
    except ValueError:
        text = ""
    try:
        return _parse(text)
    except ValueError:
        raise StoreError(
            f"token file {path} is invalid: its first line must be one integer. "
            "Restore it from the highest token your lock backend issued"
        ) from None


def recorded_token(context: StoreContext) -> int | None:
    """Return the highest token in the token file and in every manifest.

    A manifest counts even when its generation was never published, so a
    lower token stays rejected after a commit died part way. Manifests of
    generations up to the last fence reset do not count.
    """
    record = read_token_file(context)
    highest = None if record is None else record.token
    reset_after = None if record is None else record.reset_after
    for sequence in generation_sequences(context.layout):
        if reset_after is not None and sequence <= reset_after:
            continue
        try:
            token = load_manifest(context, sequence).token
        except InvalidGeneration:
            continue
        highest = token if highest is None else max(highest, token)
    return highest


def next_sequence(context: StoreContext) -> int:
    """Return the sequence number of the next generation."""
    sequences = generation_sequences(context.layout)
    record = read_token_file(context)
    if record is not None and record.reset_after is not None:
        sequences.append(record.reset_after)
    return max(sequences, default=0) + 1


def record_token(context: StoreContext, token: int) -> None:
    """Raise the token in ``.token`` to ``token``, keeping the reset line."""
    record = read_token_file(context)
    if record is not None and record.token >= token:
        return
    reset_after = None if record is None else record.reset_after
    data = TokenFile(token, reset_after).encode()
    atomic_write(context.layout.token, data, mode=0o644, fs=context.fs)


def reset_fence(context: StoreContext, token: int) -> int | None:
    """Make ``token`` the highest token; return the highest one before.

    The caller holds the store lock. One atomic replacement of ``.token``
    records the new token and the newest sequence number on disk, so a
    crash leaves either the old fence or the new one.
    """
    previous = recorded_token(context)
    record = read_token_file(context)
    candidates = generation_sequences(context.layout)
    if record is not None and record.reset_after is not None:
        candidates.append(record.reset_after)
    reset_after = max(candidates) if candidates else None
    data = TokenFile(token, reset_after).encode()
    atomic_write(context.layout.token, data, mode=0o644, fs=context.fs)
    return previous

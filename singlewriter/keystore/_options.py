"""Checks on the arguments of KeyStore, each raising ConfigError with the fix."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path

from singlewriter._errors import ConfigError

from ._layout import REQUIRED_NAMES
from ._paths import validate_name

__all__ = [
    "MAX_PASSPHRASE_BYTES",
    "check_clock",
    "check_files",
    "check_keep",
    "check_modes",
    "encode_passphrase",
]

# cryptography 50.0.2 rejects longer passphrases with "Passwords longer than
# 1023 bytes are not supported by this backend".
MAX_PASSPHRASE_BYTES = 1023

_GROUP_OR_OTHER_WRITE = 0o022


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _permission_bits(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o777:
        value_text = f"{value:#o}" if isinstance(value, int) else repr(value)
        raise ConfigError(
            f"invalid {name} {value_text}: pass permission bits from 0o000 to 0o777, "
            "such as 0o600"
        )
    return value


def check_modes(key_mode: object, file_mode: object, directory_mode: object) -> None:
    """Reject modes that expose a key or let others change the store."""
    key = _permission_bits("key_mode", key_mode)
    if key & 0o007 or key & _GROUP_OR_OTHER_WRITE or not key & 0o400:
        raise ConfigError(
            f"invalid key_mode {key:#o}: a private key must be readable by its "
            "owner, by nobody outside its group, and writable by nobody but its "
            "owner, for example 0o600 or 0o640"
        )

    file = _permission_bits("file_mode", file_mode)
    if file & _GROUP_OR_OTHER_WRITE or not file & 0o400:
        raise ConfigError(
            f"invalid file_mode {file:#o}: certificates must be readable by their "
            "owner and writable by nobody else, for example 0o644 or 0o640"
        )

    directory = _permission_bits("directory_mode", directory_mode)
    if directory & _GROUP_OR_OTHER_WRITE or directory & 0o700 != 0o700:
        raise ConfigError(
            f"invalid directory_mode {directory:#o}: the owner needs all of "
            "0o700, and nobody else may write, for example 0o755 or 0o750"
        )


def check_keep(keep: object) -> int:
    """Return ``keep`` if it is a valid number of generations to keep."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ConfigError(
            f"invalid keep={keep!r}: pass how many generations to keep, at least 1"
        )
    return keep


def encode_passphrase(passphrase: object) -> bytes | None:
    """Return the passphrase as bytes, or None when the key is not encrypted."""
    if passphrase is None:
        return None
    encoded = passphrase.encode() if isinstance(passphrase, str) else passphrase
    if not isinstance(encoded, bytes) or not encoded:
        raise ConfigError("invalid passphrase: pass a non-empty str or bytes")
    if len(encoded) > MAX_PASSPHRASE_BYTES:
        raise ConfigError(
            f"invalid passphrase: it is {len(encoded)} bytes long, and the "
            f"encryption that cryptography provides accepts at most "
            f"{MAX_PASSPHRASE_BYTES} bytes. Pass a shorter passphrase"
        )
    return encoded


def check_clock(clock: object) -> Callable[[], datetime]:
    """Return a clock that raises ConfigError unless it returns an aware datetime."""
    if clock is None:
        return _utc_now
    if not callable(clock):
        raise ConfigError(
            f"invalid clock {clock!r}: pass a callable that returns an aware "
            "datetime, such as lambda: datetime.now(timezone.utc)"
        )

    def now() -> datetime:
        value = clock()
        if not isinstance(value, datetime) or value.utcoffset() is None:
            kind = "a naive datetime" if isinstance(value, datetime) else repr(value)
            raise ConfigError(
                f"invalid clock: it returned {kind}, but it must return an aware "
                "datetime, such as datetime.now(timezone.utc)"
            )
        return value

    return now


def check_files(files: object, root: Path) -> dict[str, bytes]:
    """Return the files of a commit as a dict, checking names and content types."""
    if not isinstance(files, Mapping):
        raise ConfigError(
            f"invalid files for {root}: pass a mapping of file name to bytes, "
            f"such as {{'privkey.pem': key_pem, ...}}, not {type(files).__name__}"
        )

    content = {}
    for name, data in files.items():
        validate_name(name)
        if not isinstance(data, bytes):
            raise ConfigError(
                f"invalid content for {name}: pass bytes, not {type(data).__name__}"
            )
        content[name] = data

    missing = sorted(set(REQUIRED_NAMES) - set(content))
    if missing:
        raise ConfigError(
            f"commit to {root} is missing {', '.join(missing)}: pass "
            f"all of {', '.join(REQUIRED_NAMES)}"
        )
    return content

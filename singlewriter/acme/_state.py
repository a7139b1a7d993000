"""Durable per-certificate state: the order in flight, failures, the ARI response.

Each set of names at one CA gets a directory ``STATE/NAME-HASH/`` (mode
0700) with up to three JSON files, each written with ``atomic_write`` at
mode 0600:

``order.json``
    The order in flight: the new private key and CSR, written *before* the
    newOrder request, then again with the order URL as soon as the server
    returns it. A run that was killed finds it and resumes that order
    instead of placing another. Removed after the commit, or when the order
    turns out to be unusable.
``failures.json``
    Consecutive failures of these names and the earliest next attempt.
``ari.json``
    The last renewal window the CA sent and when to ask again (the
    Retry-After of RFC 9773 section 4.3).

Only the holder of the certificate's lock writes these files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from singlewriter._errors import ConfigError
from singlewriter.keystore import atomic_write

from ._client import RenewalInfo
from ._private import (
    check_private_directory,
    check_private_file,
    make_private_directory,
)

__all__ = ["FailureRecord", "InFlightOrder", "LineageState", "lineage_directory"]

log = logging.getLogger(__name__)

_VERSION = 1
_UNSAFE = re.compile(r"[^a-z0-9.-]")


def lineage_directory(root: Path, directory_url: str, domains: tuple[str, ...]) -> Path:
    """Return the state directory for ``domains`` at the CA ``directory_url``."""
    key = directory_url + "\n" + ",".join(sorted(domains))
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    readable = _UNSAFE.sub("_", min(d.removeprefix("*.") for d in domains))[:60]
    return root / f"{readable}-{digest}"


@dataclass(frozen=True)
class InFlightOrder:
    """An order that was started and not yet committed to the store."""

    directory_url: str
    domains: tuple[str, ...]
    key_type: str
    key_pem: bytes
    csr_pem: bytes
    created: datetime
    order_url: str | None = None
    replaces: str | None = None

    def matches(
        self, directory_url: str, domains: tuple[str, ...], key_type: str
    ) -> bool:
        """Return whether this order is for the same CA, names and key type."""
        return (
            self.directory_url == directory_url
            and sorted(self.domains) == sorted(domains)
            and self.key_type == key_type
        )


@dataclass(frozen=True)
class FailureRecord:
    """Consecutive failures of one set of names."""

    domains: tuple[str, ...]
    failures: int
    last_failure: datetime
    next_attempt: datetime
    last_error: str


@dataclass(frozen=True)
class CachedWindow:
    """The last ARI response for a certificate; ``window`` None if it was unusable."""

    cert_id: str
    window: RenewalInfo | None
    next_fetch: datetime


class LineageState:
    """The state files of one set of names at one CA (see the module docstring)."""

    def __init__(self, directory: Path, passphrase: bytes | None = None) -> None:
        self.directory = directory
        # With a passphrase, the order key is stored encrypted with it
        # (PKCS#8 with the best encryption cryptography offers).
        self.passphrase = passphrase

    def __repr__(self) -> str:
        return f"LineageState({str(self.directory)!r})"

    # The order in flight.

    def load_order(self) -> InFlightOrder | None:
        document = self._read("order.json")
        if document is None:
            return None
        try:
            return InFlightOrder(
                directory_url=document["directory_url"],
                domains=tuple(document["domains"]),
                key_type=document["key_type"],
                key_pem=self._decrypt_key(document["key_pem"].encode()),
                csr_pem=document["csr_pem"].encode(),
                created=datetime.fromisoformat(document["created"]),
                order_url=document.get("order_url"),
                replaces=document.get("replaces"),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            log.warning("ignoring malformed order state in %s: %s", self.directory, exc)
            return None

    def save_order(self, order: InFlightOrder) -> None:
        self._write(
            "order.json",
            {
                "directory_url": order.directory_url,
                "domains": list(order.domains),
                "key_type": order.key_type,
                "key_pem": self._encrypt_key(order.key_pem).decode(),
                "csr_pem": order.csr_pem.decode(),
                "created": order.created.isoformat(),
                "order_url": order.order_url,
                "replaces": order.replaces,
            },
        )

    def _encrypt_key(self, key_pem: bytes) -> bytes:
        if self.passphrase is None:
            return key_pem
        key = serialization.load_pem_private_key(key_pem, password=None)
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(self.passphrase),
        )

    def _decrypt_key(self, key_pem: bytes) -> bytes:
        if b"ENCRYPTED PRIVATE KEY" not in key_pem:
            return key_pem
        if self.passphrase is None:
            raise ConfigError(
                f"the order key in {self.directory} is encrypted: pass the"
                " store's passphrase to resume the order"
            )
        try:
            key = serialization.load_pem_private_key(key_pem, self.passphrase)
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                f"the order key in {self.directory} cannot be decrypted with the"
                " passphrase given; pass the passphrase it was stored with"
            ) from exc
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def clear_order(self) -> None:
        self._remove("order.json")

    # Failures.

    def load_failures(self) -> FailureRecord | None:
        document = self._read("failures.json")
        if document is None:
            return None
        try:
            return FailureRecord(
                domains=tuple(document["domains"]),
                failures=int(document["failures"]),
                last_failure=datetime.fromisoformat(document["last_failure"]),
                next_attempt=datetime.fromisoformat(document["next_attempt"]),
                last_error=str(document.get("last_error", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            log.warning(
                "ignoring malformed failure record in %s: %s", self.directory, exc
            )
            return None

    def save_failures(self, record: FailureRecord) -> None:
        self._write(
            "failures.json",
            {
                "domains": list(record.domains),
                "failures": record.failures,
                "last_failure": record.last_failure.isoformat(),
                "next_attempt": record.next_attempt.isoformat(),
                "last_error": record.last_error,
            },
        )

    def clear_failures(self) -> None:
        self._remove("failures.json")

    # The last ARI response.

    def load_window(self, cert_id: str) -> CachedWindow | None:
        document = self._read("ari.json")
        if document is None or document.get("cert_id") != cert_id:
            return None
        try:
            window = None
            if document.get("window") is not None:
                window = _window_from_json(cert_id, document["window"])
            return CachedWindow(
                cert_id=cert_id,
                window=window,
                next_fetch=datetime.fromisoformat(document["next_fetch"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("ignoring malformed ARI cache in %s: %s", self.directory, exc)
            return None

    def save_window(self, cached: CachedWindow) -> None:
        window = cached.window
        self._write(
            "ari.json",
            {
                "cert_id": cached.cert_id,
                "next_fetch": cached.next_fetch.isoformat(),
                "window": None
                if window is None
                else {
                    "start": window.start.isoformat(),
                    "end": window.end.isoformat(),
                    "explanation_url": window.explanation_url,
                    "retry_after": window.retry_after,
                },
            },
        )

    # Files.

    def _read(self, name: str) -> dict[str, Any] | None:
        path = self.directory / name
        if not self.directory.exists():
            return None
        check_private_directory(self.directory, "ACME state directory")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("ignoring unreadable state file %s: %s", path, exc)
            return None
        with os.fdopen(fd, "rb") as handle:
            check_private_file(path, os.fstat(fd), "ACME state file")
            data = handle.read()
        try:
            document = json.loads(data)
        except ValueError as exc:
            log.warning("ignoring unreadable state file %s: %s", path, exc)
            return None
        if not isinstance(document, dict) or document.get("version") != _VERSION:
            log.warning("ignoring state file %s of an unknown version", path)
            return None
        return document

    def _write(self, name: str, document: dict[str, Any]) -> None:
        make_private_directory(self.directory, "ACME state directory")
        payload = {"version": _VERSION, **document}
        atomic_write(
            self.directory / name,
            json.dumps(payload, indent=2).encode() + b"\n",
            mode=0o600,
        )

    def _remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.directory / name).unlink()


def _window_from_json(cert_id: str, document: dict[str, Any]) -> RenewalInfo:
    return RenewalInfo(
        cert_id=cert_id,
        start=datetime.fromisoformat(document["start"]),
        end=datetime.fromisoformat(document["end"]),
        explanation_url=document.get("explanation_url"),
        retry_after=float(document["retry_after"]),
    )

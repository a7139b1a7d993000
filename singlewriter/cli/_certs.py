"""Reading a live certificate and key, and judging whether they are healthy.

The health check reads files only: it takes no lock and writes nothing, so
it also works on a read-only mount of the store and on certbot's
``live/NAME`` directory. The certificate and key are read through the
paths servers use. When their targets change while being read, because a
commit happened in between, the read starts over. So the key and the
certificate compared always come from one published set.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

__all__ = [
    "CertificateSet",
    "Health",
    "Unhealthy",
    "certificate_names",
    "covers",
    "evaluate",
    "load_files",
    "load_store",
]

_GENERATION = re.compile(r"\.\.gen-0*(\d+)")
_READ_ATTEMPTS = 5

#: The largest certificate or key file read, in bytes (1 MiB). A chain of a
#: few PEM certificates is well under 20 KiB, so this only stops a device or
#: a huge file from being read into memory.
MAX_FILE_SIZE = 1024 * 1024


class Unhealthy(Exception):
    """The certificate or key cannot be used; the message gives the reason."""


@dataclass(frozen=True)
class CertificateSet:
    """A leaf certificate and the private key read with it."""

    certificate: x509.Certificate
    key: PrivateKeyTypes
    source: str
    generation: int | None = None


@dataclass(frozen=True)
class Health:
    """The outcome of a check: ``healthy`` and one line with the reason."""

    healthy: bool
    line: str


def load_store(store: Path, passphrase: bytes | None = None) -> CertificateSet:
    """Read ``cert.pem`` and ``privkey.pem`` from a store's live names."""
    if not store.is_dir():
        raise Unhealthy(f"store {store} does not exist or is not a directory")
    return load_files(store / "cert.pem", store / "privkey.pem", passphrase)


def load_files(
    cert_path: Path, key_path: Path, passphrase: bytes | None = None
) -> CertificateSet:
    """Read a certificate (the first in the file) and its private key."""
    for _ in range(_READ_ATTEMPTS):
        before = _targets(cert_path, key_path)
        cert_data = _read(cert_path, "certificate")
        key_data = _read(key_path, "private key")
        if _targets(cert_path, key_path) == before:
            break
    else:
        raise Unhealthy(
            f"{cert_path} and {key_path} kept changing while being read;"
            " a renewal may be publishing, check again"
        )

    certificate = _parse_certificate(cert_path, cert_data)
    key = _parse_key(key_path, key_data, passphrase)
    generation = _generation_of(before[0])
    return CertificateSet(certificate, key, str(cert_path), generation)


def _targets(cert_path: Path, key_path: Path) -> tuple[str, str]:
    return os.path.realpath(cert_path), os.path.realpath(key_path)


def _read(path: Path, what: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_SIZE + 1)
    except FileNotFoundError:
        raise Unhealthy(f"{what} {path} is missing") from None
    except OSError as exc:
        raise Unhealthy(f"{what} {path} cannot be read: {exc.strerror}") from None
    if len(data) > MAX_FILE_SIZE:
        raise Unhealthy(
            f"{what} {path} is larger than {MAX_FILE_SIZE} bytes (1 MiB);"
            " give the PEM file itself"
        )
    return data


def _parse_certificate(path: Path, data: bytes) -> x509.Certificate:
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise Unhealthy(
            f"certificate {path} contains no valid PEM certificate"
        ) from None
    return certificates[0]


def _parse_key(path: Path, data: bytes, passphrase: bytes | None) -> PrivateKeyTypes:
    if b"ENCRYPTED PRIVATE KEY" in data and passphrase is None:
        raise Unhealthy(
            f"private key {path} is encrypted; pass --passphrase-file to check it"
        )
    try:
        return serialization.load_pem_private_key(data, passphrase)
    except (ValueError, TypeError):
        # The loader's message can quote key material, so it is not shown.
        raise Unhealthy(
            f"private key {path} is not a valid PEM private key, or the"
            " passphrase is wrong"
        ) from None


def _generation_of(target: str) -> int | None:
    match = _GENERATION.fullmatch(Path(target).parent.name)
    return int(match.group(1)) if match else None


def certificate_names(certificate: x509.Certificate) -> list[str]:
    """Return the DNS names and IP addresses in the subjectAltName extension.

    The subject common name is never used: RFC 6125 section 6.4.4 lets a
    client ignore it, and browsers do, so a certificate without a
    subjectAltName covers no name.
    """
    try:
        extension = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        )
    except x509.ExtensionNotFound:
        return []
    names = extension.value.get_values_for_type(x509.DNSName)
    addresses = extension.value.get_values_for_type(x509.IPAddress)
    return [*names, *(str(address) for address in addresses)]


def covers(names: Sequence[str], domain: str) -> bool:
    """Return whether one of ``names`` matches ``domain``.

    A wildcard stands for exactly one whole left-most label (RFC 6125
    section 6.4.3): ``*.example.com`` covers ``www.example.com`` but not
    ``example.com`` or ``a.b.example.com``. Comparison ignores case and a
    trailing dot.
    """
    expected = _normalise(domain)
    for name in names:
        candidate = _normalise(name)
        if candidate == expected:
            return True
        if candidate.startswith("*.") and not _is_address(expected):
            _, _, rest = expected.partition(".")
            if rest and rest == candidate[2:] and not expected.startswith("*."):
                return True
    return False


def _normalise(name: str) -> str:
    return name.strip().rstrip(".").lower()


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _public_key_der(key: PrivateKeyTypes | x509.Certificate) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def evaluate(
    loaded: CertificateSet,
    domains: Sequence[str],
    min_days: float,
    now: datetime | None = None,
) -> Health:
    """Judge a certificate set: key match, validity, names and days left."""
    now = now if now is not None else datetime.now(timezone.utc)
    certificate = loaded.certificate
    names = certificate_names(certificate)

    if _public_key_der(loaded.key) != _public_key_der(certificate):
        return Health(False, f"unhealthy: private key does not match {loaded.source}")

    not_before = certificate.not_valid_before_utc
    not_after = certificate.not_valid_after_utc
    if now < not_before:
        return Health(
            False,
            f"unhealthy: certificate is not valid until {_iso(not_before)};"
            " check the system clock",
        )
    days_left = (not_after - now).total_seconds() / 86400
    if days_left <= 0:
        return Health(False, f"unhealthy: certificate expired at {_iso(not_after)}")

    missing = [domain for domain in domains if not covers(names, domain)]
    if missing:
        return Health(
            False,
            f"unhealthy: certificate does not cover {', '.join(missing)}"
            f" (it names {', '.join(names) or 'no name in a subjectAltName'})",
        )
    if days_left < min_days:
        return Health(
            False,
            f"unhealthy: certificate expires at {_iso(not_after)}, in"
            f" {days_left:.1f} days, below the minimum of {min_days:g} days",
        )

    generation = (
        f", generation {loaded.generation}" if loaded.generation is not None else ""
    )
    return Health(
        True,
        f"healthy: certificate for {', '.join(names)} expires at {_iso(not_after)}"
        f" ({days_left:.1f} days left){generation}",
    )


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

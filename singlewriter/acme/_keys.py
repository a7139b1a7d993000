"""Certificate keys, CSRs and the checks on what the CA returned."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from acme import crypto_util
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from singlewriter._errors import ConfigError

__all__ = [
    "KEY_TYPES",
    "IssuedChain",
    "check_key_type",
    "generate_key",
    "key_matches",
    "key_type_of",
    "make_csr",
    "missing_names",
    "split_chain",
]

# Key type name: (family, size or curve). Names follow the "ec-p256" /
# "rsa-2048" style that the command-line tool uses.
_KEY_SPECS: dict[str, tuple[str, int]] = {
    "ec-p256": ("ec", 256),
    "ec-p384": ("ec", 384),
    "rsa-2048": ("rsa", 2048),
    "rsa-3072": ("rsa", 3072),
    "rsa-4096": ("rsa", 4096),
}
KEY_TYPES = tuple(_KEY_SPECS)

_CURVES: dict[int, ec.EllipticCurve] = {256: ec.SECP256R1(), 384: ec.SECP384R1()}


def check_key_type(key_type: object) -> str:
    """Return ``key_type`` if it is supported, else raise ConfigError."""
    if not isinstance(key_type, str) or key_type not in _KEY_SPECS:
        raise ConfigError(
            f"key_type={key_type!r} is invalid; use one of {', '.join(KEY_TYPES)}"
        )
    return key_type


def generate_key(key_type: str) -> bytes:
    """Generate a private key of ``key_type``; return it as unencrypted PKCS#8 PEM."""
    family, size = _KEY_SPECS[check_key_type(key_type)]
    key: PrivateKeyTypes
    if family == "ec":
        key = ec.generate_private_key(_CURVES[size])
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=size)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def key_type_of(key_pem: bytes) -> str | None:
    """Return the KEY_TYPES name of a PEM private key, or None for other keys."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        name = f"ec-p{key.curve.key_size}"
    elif isinstance(key, rsa.RSAPrivateKey):
        name = f"rsa-{key.key_size}"
    else:
        return None
    return name if name in _KEY_SPECS else None


def make_csr(key_pem: bytes, domains: Sequence[str]) -> bytes:
    """Return a PEM CSR for ``domains``, which all go into subjectAltName."""
    return crypto_util.make_csr(key_pem, list(domains))


def key_matches(key_pem: bytes, certificate: x509.Certificate) -> bool:
    """Return whether the PEM private key belongs to ``certificate``."""
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        return False
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    expected = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return public == expected


def missing_names(certificate: x509.Certificate, domains: Sequence[str]) -> list[str]:
    """Return the names in ``domains`` that ``certificate`` does not list exactly."""
    try:
        extension = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        )
    except x509.ExtensionNotFound:
        return list(domains)
    listed = {
        name.lower() for name in extension.value.get_values_for_type(x509.DNSName)
    }
    return [name for name in domains if name not in listed]


@dataclass(frozen=True)
class IssuedChain:
    """A downloaded certificate chain split into the files a KeyStore publishes."""

    certificate: x509.Certificate
    cert_pem: bytes
    chain_pem: bytes

    @property
    def fullchain_pem(self) -> bytes:
        return self.cert_pem + self.chain_pem


def split_chain(fullchain: str | bytes) -> IssuedChain:
    """Split a PEM chain (leaf first, RFC 8555 section 7.4.2) into leaf and issuers.

    Raise ValueError when it contains no certificate.
    """
    data = fullchain.encode() if isinstance(fullchain, str) else fullchain
    certificates = x509.load_pem_x509_certificates(data)
    encoded = [c.public_bytes(serialization.Encoding.PEM) for c in certificates]
    return IssuedChain(
        certificate=certificates[0],
        cert_pem=encoded[0],
        chain_pem=b"".join(encoded[1:]),
    )

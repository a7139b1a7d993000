"""Checks that a set of PEM files is a usable key and certificate chain.

A set passes when every PEM parses, the private key matches the public key
of the certificate, ``chain.pem`` lists the issuers in order, and
``fullchain.pem`` is the certificate followed by the chain. In order means
that each certificate names the next one as its issuer and that the next
one's public key verifies its signature. The validity period is checked
separately, so that recovery can tell an expired set from a broken one. Only the leaf
certificate's validity period is checked: chains sometimes end in an expired
cross-signed root on purpose, and clients skip it.

Problems with the material raise VerificationError. A missing or wrong
passphrase raises ConfigError, because the material is fine and the
configuration is not.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from singlewriter._errors import ConfigError, VerificationError

__all__ = [
    "CERT_NAME",
    "CHAIN_NAME",
    "FULLCHAIN_NAME",
    "KEY_NAME",
    "check_validity_period",
    "decrypt_private_key",
    "encrypt_private_key",
    "is_certificate_only_pem",
    "is_encrypted_key",
    "verify_set",
]

KEY_NAME = "privkey.pem"
CERT_NAME = "cert.pem"
CHAIN_NAME = "chain.pem"
FULLCHAIN_NAME = "fullchain.pem"

_ENCRYPTED_HEADER = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"

_CERTIFICATE_BLOCK = (
    rb"-----BEGIN CERTIFICATE-----\r?\n[A-Za-z0-9+/=\r\n]+-----END CERTIFICATE-----"
)
_CERTIFICATE_ONLY = re.compile(rb"\s*(?:" + _CERTIFICATE_BLOCK + rb"\s*)+")
_CERTIFICATE_BLOCKS = re.compile(_CERTIFICATE_BLOCK)


def is_certificate_only_pem(data: bytes) -> bool:
    """Return whether ``data`` is PEM made only of CERTIFICATE blocks.

    Whitespace may separate the blocks, and every block must parse as a
    certificate. Anything else returns False, whatever it contains: DER,
    PKCS#12, other PEM block types and text outside the blocks may hold a
    private key, so the store gives such a file ``key_mode``.
    """
    if _CERTIFICATE_ONLY.fullmatch(data) is None:
        return False
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        return False
    return len(certificates) == len(_CERTIFICATE_BLOCKS.findall(data))


def is_encrypted_key(data: bytes) -> bool:
    """Return whether ``data`` is an encrypted PKCS#8 PEM key."""
    return _ENCRYPTED_HEADER in data


def _require_content(name: str, data: bytes) -> None:
    if not data.strip():
        raise VerificationError(
            f"{name} is empty: pass the PEM-encoded content of the file"
        )


def _load_private_key(data: bytes, passphrase: bytes | None) -> PrivateKeyTypes:
    _require_content(KEY_NAME, data)
    encrypted = is_encrypted_key(data)
    if encrypted and passphrase is None:
        raise ConfigError(
            f"{KEY_NAME} is encrypted but the store has no passphrase: pass "
            "the passphrase it was encrypted with as KeyStore(passphrase=...)"
        )

    try:
        return serialization.load_pem_private_key(
            data, passphrase if encrypted else None
        )
    except ValueError as exc:
        if encrypted:
            raise ConfigError(
                f"{KEY_NAME} could not be decrypted: the passphrase is wrong. "
                "Pass the passphrase the key was encrypted with"
            ) from exc
        raise VerificationError(
            f"{KEY_NAME} is not a valid PEM private key ({exc}): pass the "
            "PEM-encoded private key"
        ) from exc
    except TypeError as exc:
        raise VerificationError(
            f"{KEY_NAME} could not be loaded ({exc}): pass an unencrypted PEM "
            "key or a PKCS#8 key encrypted with the store's passphrase"
        ) from exc
    except UnsupportedAlgorithm as exc:
        raise VerificationError(
            f"{KEY_NAME} uses an unsupported key algorithm ({exc}): pass an RSA, "
            "ECDSA or EdDSA key"
        ) from exc


def _load_certificates(name: str, data: bytes) -> list[x509.Certificate]:
    _require_content(name, data)
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise VerificationError(
            f"{name} contains no valid PEM certificate ({exc}): pass the "
            "PEM-encoded certificates"
        ) from exc


def _describe(certificate: x509.Certificate) -> str:
    return f"'{certificate.subject.rfc4514_string()}'"


def _public_key_bytes(key: PrivateKeyTypes | x509.Certificate) -> bytes:
    public_key = key.public_key()
    return public_key.public_bytes(
        serialization.Encoding.DER,
        serialization.PublicFormat.SubjectPublicKeyInfo,
    )


def _check_issued_by(
    child: x509.Certificate, child_place: str, parent: x509.Certificate, index: int
) -> None:
    parent_place = f"certificate {index + 1} of {CHAIN_NAME}"
    if child.issuer != parent.subject:
        raise VerificationError(
            f"{CHAIN_NAME} is out of order or incomplete: {child_place} "
            f"{_describe(child)} names the issuer "
            f"'{child.issuer.rfc4514_string()}', but {parent_place} is "
            f"{_describe(parent)}. List the issuer of each certificate right "
            "after it"
        )

    try:
        child.verify_directly_issued_by(parent)
    except InvalidSignature as exc:
        raise VerificationError(
            f"{CHAIN_NAME} does not belong to {child_place} {_describe(child)}: "
            f"the issuer name matches {parent_place} {_describe(parent)}, but "
            "the signature does not verify with that certificate's public "
            "key, so the chain comes from a different CA with the same name. "
            "Pass the chain that was issued together with this certificate"
        ) from exc
    except (ValueError, TypeError) as exc:
        raise VerificationError(
            f"the signature of {child_place} {_describe(child)} could not be "
            f"checked against {parent_place} {_describe(parent)}: {exc}. Pass "
            "the chain that was issued together with this certificate"
        ) from exc


def _check_chain(certificate: x509.Certificate, chain: list[x509.Certificate]) -> None:
    _check_issued_by(certificate, f"the certificate in {CERT_NAME}", chain[0], 0)
    for index in range(len(chain) - 1):
        place = f"certificate {index + 1} of {CHAIN_NAME}"
        _check_issued_by(chain[index], place, chain[index + 1], index + 1)


def verify_set(
    files: Mapping[str, bytes], passphrase: bytes | None
) -> x509.Certificate:
    """Check the key, certificate, chain and full chain, and return the leaf.

    ``files`` must contain the four required names. The validity period is
    not checked here, see :func:`check_validity_period`.
    """
    key = _load_private_key(files[KEY_NAME], passphrase)

    certificates = _load_certificates(CERT_NAME, files[CERT_NAME])
    if len(certificates) != 1:
        raise VerificationError(
            f"{CERT_NAME} contains {len(certificates)} certificates: it must "
            f"contain only the leaf certificate, and its issuers go in {CHAIN_NAME}"
        )
    certificate = certificates[0]

    if _public_key_bytes(key) != _public_key_bytes(certificate):
        raise VerificationError(
            f"{KEY_NAME} does not match {CERT_NAME}: the key's public key differs "
            f"from the public key of {_describe(certificate)}. Pass the key the "
            "certificate was issued for"
        )

    chain = _load_certificates(CHAIN_NAME, files[CHAIN_NAME])
    _check_chain(certificate, chain)

    fullchain = _load_certificates(FULLCHAIN_NAME, files[FULLCHAIN_NAME])
    if fullchain != [certificate, *chain]:
        raise VerificationError(
            f"{FULLCHAIN_NAME} is not {CERT_NAME} followed by {CHAIN_NAME}: "
            f"it contains {len(fullchain)} certificates, expected "
            f"{len(chain) + 1} in that order. Concatenate the two files"
        )
    return certificate


def check_validity_period(certificate: x509.Certificate, now: datetime) -> None:
    """Raise VerificationError unless ``now`` is inside the validity period."""
    not_before = certificate.not_valid_before_utc
    not_after = certificate.not_valid_after_utc
    if now < not_before:
        raise VerificationError(
            f"{CERT_NAME} {_describe(certificate)} is not valid yet: it is valid "
            f"from {not_before.isoformat()} and the time is {now.isoformat()}. "
            "Check the system clock or the certificate"
        )
    if now > not_after:
        raise VerificationError(
            f"{CERT_NAME} {_describe(certificate)} expired at "
            f"{not_after.isoformat()} (the time is {now.isoformat()}). Renew "
            "the certificate and commit the new one"
        )


def encrypt_private_key(data: bytes, passphrase: bytes) -> bytes:
    """Return the key in ``data`` as PKCS#8 PEM encrypted with ``passphrase``.

    ``data`` may already be encrypted with the same passphrase. The output
    differs on every call because the salt and IV are random.
    """
    key = _load_private_key(data, passphrase)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase),
    )


def decrypt_private_key(data: bytes, passphrase: bytes | None) -> bytes:
    """Return an encrypted key as unencrypted PKCS#8 PEM, other keys unchanged."""
    if not is_encrypted_key(data):
        return data

    key = _load_private_key(data, passphrase)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )

"""The ACME account: one key per account directory, one registration per CA.

Layout of an account directory::

    account.key                 EC P-256 private key, PKCS#8 PEM, mode 0600
    registrations/HASH.json     {"directory_url", "uri", "body"} per directory URL
    .lock                       flock(2) taken while the key or a registration
                                is created, so that two renewers never make
                                two keys or two accounts

The key is created once and reused for every CA. Files are written with
``atomic_write`` (fsync, rename, directory fsync), so a crash never leaves a
truncated key. The directory is created with mode 0700.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from acme import errors as acme_errors
from acme import messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from josepy import jwk

from singlewriter._errors import ConfigError, StoreError
from singlewriter.keystore import atomic_write

from ._client import Connection
from ._private import check_private_file, make_private_directory

__all__ = ["AccountStore", "ensure_registered"]

log = logging.getLogger(__name__)

KEY_FILE = "account.key"
REGISTRATIONS = "registrations"


class AccountStore:
    """An ACME account directory: the account key and its registrations.

    Pass the same directory to every run so that the account is reused:
    a container that starts without it registers a new account every time.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_absolute():
            self.path = self.path.resolve()

    def __repr__(self) -> str:
        return f"AccountStore({str(self.path)!r})"

    @property
    def key_path(self) -> Path:
        return self.path / KEY_FILE

    def load_key(self) -> jwk.JWK:
        """Return the account key, creating and storing it on first use."""
        self._create_directory()
        key = self._read_key()
        if key is not None:
            return key

        with self.locked():
            key = self._read_key()
            if key is not None:
                return key
            private = ec.generate_private_key(ec.SECP256R1())
            pem = private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            atomic_write(self.key_path, pem, mode=0o600)
            log.info("created ACME account key %s", self.key_path)
            return jwk.JWKEC(key=private)

    def registration_path(self, directory_url: str) -> Path:
        digest = hashlib.sha256(directory_url.encode()).hexdigest()[:24]
        return self.path / REGISTRATIONS / f"{digest}.json"

    def load_registration(
        self, directory_url: str
    ) -> messages.RegistrationResource | None:
        """Return the stored registration with the CA at ``directory_url``, or None."""
        path = self.registration_path(directory_url)
        try:
            document = json.loads(self._read_private(path, "account registration"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable account registration %s: %s", path, exc)
            return None
        if document.get("directory_url") != directory_url or not document.get("uri"):
            return None
        return messages.RegistrationResource(
            uri=document["uri"],
            body=messages.Registration.from_json(document.get("body") or {}),
        )

    def save_registration(
        self, directory_url: str, registration: messages.RegistrationResource
    ) -> None:
        path = self.registration_path(directory_url)
        make_private_directory(path.parent, "ACME registrations directory")
        document: dict[str, Any] = {
            "directory_url": directory_url,
            "uri": registration.uri,
            "body": registration.body.to_json(),
        }
        atomic_write(path, json.dumps(document, indent=2).encode() + b"\n", mode=0o600)

    def forget_registration(self, directory_url: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.registration_path(directory_url).unlink()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold an exclusive flock on the account directory's ``.lock``."""
        self._create_directory()
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _create_directory(self) -> None:
        make_private_directory(self.path, "ACME account directory")

    def _read_private(self, path: Path, what: str) -> bytes:
        """Read ``path`` after checking its owner and mode; OSError passes through."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as handle:
            check_private_file(path, os.fstat(fd), what)
            return handle.read()

    def _read_key(self) -> jwk.JWK | None:
        try:
            pem = self._read_private(self.key_path, "ACME account key")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(
                f"could not read the ACME account key {self.key_path}:"
                f" {exc.strerror or exc}"
            ) from exc
        try:
            private = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                f"the ACME account key {self.key_path} is not an unencrypted PEM"
                f" private key ({exc}); restore it from a backup, or move it away"
                " to register a new account"
            ) from exc
        if isinstance(private, ec.EllipticCurvePrivateKey):
            return jwk.JWKEC(key=private)
        return jwk.JWKRSA(key=private)


def ensure_registered(
    connection: Connection, accounts: AccountStore, email: str | None
) -> messages.RegistrationResource:
    """Make ``connection`` sign as the stored account, registering it if needed.

    Registering agrees to the CA's terms of service (RFC 8555 section 7.3).
    """
    url = connection.directory_url
    registration = accounts.load_registration(url)
    if registration is None:
        with accounts.locked():
            registration = accounts.load_registration(url)
            if registration is None:
                registration = _register(connection, email)
                accounts.save_registration(url, registration)

    connection.net.account = registration
    return registration


def reregister(
    connection: Connection, accounts: AccountStore, email: str | None
) -> messages.RegistrationResource:
    """Forget the stored registration for this CA and register again."""
    log.warning(
        "the ACME server at %s has no record of the stored account; registering"
        " the account key again",
        connection.directory_url,
    )
    with accounts.locked():
        accounts.forget_registration(connection.directory_url)
    connection.net.account = None
    return ensure_registered(connection, accounts, email)


def _register(
    connection: Connection, email: str | None
) -> messages.RegistrationResource:
    # TODO: external account binding (RFC 8555 section 7.3.4), which some
    # commercial CAs require.
    if connection.external_account_required:
        raise ConfigError(
            f"the ACME server at {connection.directory_url} requires external"
            " account binding, which this client does not support yet; use a CA"
            " that does not require it"
        )

    connection.net.account = None
    new = messages.NewRegistration.from_data(email=email, terms_of_service_agreed=True)
    try:
        registration = connection.client.new_account(new)
    except acme_errors.ConflictError as exc:
        # RFC 8555 section 7.3.1: the key already has an account, whose URL
        # the server returned in Location.
        existing = messages.RegistrationResource(
            uri=exc.location, body=messages.Registration()
        )
        connection.net.account = existing
        registration = connection.client.query_registration(existing)
    log.info("registered ACME account %s", registration.uri)
    return registration

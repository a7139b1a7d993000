"""A fenced key store in one Kubernetes Secret of type kubernetes.io/tls.

Rules:

- A commit takes the same four files as ``KeyStore.commit``. It writes
  ``tls.key`` (privkey.pem), ``tls.crt`` (fullchain.pem, the certificate
  followed by its issuers, which TLS servers and ingress controllers load)
  and ``ca.crt`` (chain.pem) in one create or update.
- Before writing, it runs the file store's checks: every PEM parses, the
  key matches the certificate, the chain is in order and the certificate
  is valid now.
- The Secret's annotation ``singlewriter.io/token`` records the highest
  token that has written it. A commit with a lower token raises StaleTokenError
  and changes nothing; an equal token may commit again.
- Every update carries the resourceVersion that was read as precondition,
  so a writer whose read is out of date gets 409, reads again and checks
  its token again. The token check and the write are therefore atomic.
- Other data keys, labels and annotations of the Secret are kept.
"""

from __future__ import annotations

import base64
import copy
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import kubernetes.client

from .._errors import (
    BackendUnavailable,
    ConfigError,
    StaleTokenError,
    StoreError,
    VerificationError,
)
from ..backends._kube_client import (
    Conflict,
    NotFound,
    build_api_client,
    call_api,
    describe_server,
    parse_url,
    validate_namespace,
    validate_object_name,
)
from ._layout import REQUIRED_NAMES
from ._verify import (
    CERT_NAME,
    CHAIN_NAME,
    FULLCHAIN_NAME,
    KEY_NAME,
    check_validity_period,
    is_encrypted_key,
    verify_set,
)

__all__ = ["TOKEN_ANNOTATION", "KubernetesSecretStore", "SecretSnapshot"]

log = logging.getLogger(__name__)

# An annotation key, not a credential.
TOKEN_ANNOTATION = "singlewriter.io/token"  # noqa: S105
SECRET_TYPE = "kubernetes.io/tls"  # noqa: S105 (a Secret type name)

# Secret data key: the file whose content it holds.
SECRET_KEYS = {"tls.key": KEY_NAME, "tls.crt": FULLCHAIN_NAME, "ca.crt": CHAIN_NAME}

_MANAGED_BY = {"app.kubernetes.io/managed-by": "singlewriter"}
_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.*?-----END CERTIFICATE-----\r?\n?", re.DOTALL
)

# Attempts of read, check, write when other writers keep changing the Secret.
_CONFLICT_ATTEMPTS = 5


@dataclass(frozen=True)
class SecretSnapshot:
    """The Secret as read or written: its token, resourceVersion and files.

    ``files`` uses the KeyStore names privkey.pem, cert.pem, chain.pem and
    fullchain.pem. ``token`` is None for a Secret no fenced commit wrote.
    """

    token: int | None
    resource_version: str
    files: dict[str, bytes]


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class KubernetesSecretStore:
    """Certificate key material in the TLS Secret ``name`` of ``namespace``.

    ``api_client`` is a ``kubernetes.client.ApiClient``; ``from_url`` builds
    one from ``k8s://NAMESPACE/SECRET-NAME?SOURCE``. The identity it uses
    needs get and update on the Secret, and create unless the Secret exists
    already. ``clock`` returns the aware datetime that certificates must be
    valid at. ``operation_timeout`` bounds each API request, in seconds.

    The token fences only writers that go through this store (or check the
    annotation the same way). Anything else that updates the Secret, such
    as ``kubectl apply``, is not stopped by it.
    """

    def __init__(
        self,
        api_client: Any,
        namespace: str,
        name: str,
        *,
        clock: Callable[[], datetime] | None = None,
        lock_name: str | None = None,
        operation_timeout: float = 10.0,
    ) -> None:
        described = f"{namespace}/{name}"
        validate_namespace(namespace, described, lock_name)
        validate_object_name(name, "Secret", described, lock_name)
        if not operation_timeout > 0:
            raise ConfigError(
                f"operation_timeout={operation_timeout!r} is invalid; use a number"
                " of seconds greater than 0",
                lock_name=lock_name,
            )
        self.namespace = namespace
        self.name = name
        self.api_client = api_client
        self.clock = clock or _utc_now
        self.lock_name = lock_name
        self.operation_timeout = operation_timeout
        self._core = kubernetes.client.CoreV1Api(api_client)
        self._server = describe_server(api_client)
        self._subject = f"Secret {namespace}/{name}"

    def __repr__(self) -> str:
        return (
            f"KubernetesSecretStore({self.namespace!r}, {self.name!r}, {self._server})"
        )

    @classmethod
    def from_url(cls, url: str, **options: Any) -> KubernetesSecretStore:
        """Build a store from ``k8s://NAMESPACE/SECRET-NAME?SOURCE``.

        The URL takes the same sources as a lock URL (server with token_file,
        kubeconfig, or incluster=1). ``api_client`` may be passed instead.
        """
        target = parse_url(url, "Secret", options.get("lock_name"))
        if target.object_name is None:
            raise ConfigError(
                f"Kubernetes Secret URL {target.redacted_url!r} names no Secret:"
                " use k8s://NAMESPACE/SECRET-NAME?...",
                lock_name=options.get("lock_name"),
            )
        api_client = options.pop("api_client", None)
        if api_client is None:
            api_client = build_api_client(target, options.get("lock_name"))
        elif target.parameters:
            raise ConfigError(
                f"Kubernetes Secret URL {target.redacted_url!r} names a configuration"
                " source and api_client= was passed too; give only one",
                lock_name=options.get("lock_name"),
            )
        return cls(api_client, target.namespace, target.object_name, **options)

    # Reading.

    @property
    def highest_token(self) -> int | None:
        """The highest token that has committed, read from the API server now."""
        snapshot = self.read_current()
        return None if snapshot is None else snapshot.token

    def current(self) -> dict[str, bytes] | None:
        """Return the stored files by KeyStore name, or None if there is no Secret."""
        snapshot = self.read_current()
        return None if snapshot is None else snapshot.files

    def read_current(self) -> SecretSnapshot | None:
        """Return the Secret's token, resourceVersion and files, or None."""
        try:
            secret = self._read()
        except NotFound:
            return None
        return _snapshot(secret)

    # Writing.

    def commit(self, token: int, files: Mapping[str, bytes]) -> SecretSnapshot:
        """Verify ``files`` and write them to the Secret in one update.

        ``files`` must contain exactly privkey.pem (unencrypted), cert.pem,
        chain.pem and fullchain.pem. Raise StaleTokenError when a higher
        token has written the Secret, VerificationError or ConfigError for
        bad input or missing permissions, and StoreError when the API
        server fails. In each case the Secret is unchanged, except after a
        StoreError whose message reports the outcome as unknown. Committing
        again with the same token is then safe.
        """
        token = self._check_token(token)
        content = self._check_files(files)
        try:
            certificate = verify_set(content, None)
            check_validity_period(certificate, self.clock())
        except VerificationError as exc:
            log.error(
                "commit of %s with token %d failed: %s", self._subject, token, exc
            )
            raise
        data = {
            key: base64.b64encode(content[name]).decode("ascii")
            for key, name in SECRET_KEYS.items()
        }

        try:
            snapshot = self._write(token, data)
        except (StaleTokenError, VerificationError):
            raise
        except (BackendUnavailable, ConfigError, StoreError) as exc:
            log.error(
                "commit of %s with token %d failed: %s", self._subject, token, exc
            )
            raise
        log.info(
            "committed %s with token %d (resourceVersion %s)",
            self._subject,
            token,
            snapshot.resource_version,
        )
        return snapshot

    def _write(self, token: int, data: dict[str, str]) -> SecretSnapshot:
        for _ in range(_CONFLICT_ATTEMPTS):
            try:
                existing = self._read()
            except NotFound:
                existing = None
            except BackendUnavailable as exc:
                raise self._unavailable(token, exc, applied=False) from exc

            if existing is None:
                body = self._new_secret(token, data)
            else:
                self._check_existing(existing, token)
                body = _updated(existing, token, data)

            try:
                return _snapshot(self._send(existing is None, body))
            except Conflict:
                continue
            except NotFound as exc:
                if existing is None:
                    raise ConfigError(
                        f"cannot create {self._subject} at {self._server}: {exc}."
                        f" Create the namespace {self.namespace!r} or use an"
                        " existing one.",
                        lock_name=self.lock_name,
                        token=token,
                    ) from exc
                continue
            except BackendUnavailable as exc:
                return self._resolve_lost_reply(token, data, existing, exc)

        raise StoreError(
            f"commit of {self._subject} with token {token} gave up: the Secret"
            f" changed {_CONFLICT_ATTEMPTS} times between a read and the next write"
            " (HTTP 409). Nothing was written; commit again.",
            lock_name=self.lock_name,
            token=token,
        )

    def _check_existing(self, secret: Any, token: int) -> None:
        if secret.type != SECRET_TYPE:
            raise ConfigError(
                f"{self._subject} has type {secret.type!r}, and a Secret's type"
                f" cannot change; the store writes {SECRET_TYPE} Secrets. Delete"
                " it or choose another name.",
                lock_name=self.lock_name,
                token=token,
            )
        recorded = _recorded_token(secret)
        if recorded is None or token >= recorded:
            return

        log.warning(
            "rejected write to %s with stale token %d: token %d has already written",
            self._subject,
            token,
            recorded,
        )
        raise StaleTokenError(
            f"token {token} is stale for {self._subject}: token {recorded} has"
            " already written it, so this process no longer holds the lease."
            " Nothing was changed; stop and let the current holder renew.",
            lock_name=self.lock_name,
            token=token,
        )

    def _new_secret(self, token: int, data: dict[str, str]) -> Any:
        return kubernetes.client.V1Secret(
            metadata=kubernetes.client.V1ObjectMeta(
                name=self.name,
                namespace=self.namespace,
                labels=dict(_MANAGED_BY),
                annotations={TOKEN_ANNOTATION: str(token)},
            ),
            type=SECRET_TYPE,
            data=dict(data),
        )

    def _resolve_lost_reply(
        self,
        token: int,
        data: dict[str, str],
        existing: Any,
        error: BackendUnavailable,
    ) -> SecretSnapshot:
        """Find out whether a write whose reply was lost was applied."""
        try:
            secret = self._read()
        except (NotFound, BackendUnavailable, ConfigError):
            raise self._unavailable(token, error, applied=None) from error

        written = secret.data or {}
        ours = _recorded_token(secret) == token and all(
            written.get(key) == value for key, value in data.items()
        )
        if ours:
            return _snapshot(secret)
        unchanged = existing is not None and (
            secret.metadata.resource_version == existing.metadata.resource_version
        )
        raise self._unavailable(token, error, applied=False if unchanged else None)

    def _unavailable(
        self, token: int, error: BackendUnavailable, *, applied: bool | None
    ) -> StoreError:
        if applied is None:
            outcome = (
                "It is unknown whether the Secret was updated; commit again with"
                " the same token."
            )
        else:
            outcome = "Nothing was written; commit again."
        return StoreError(
            f"commit of {self._subject} with token {token} failed: {error}. {outcome}",
            lock_name=self.lock_name,
            token=token,
        )

    # Input checks.

    def _check_token(self, token: int) -> int:
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise ConfigError(
                f"invalid token {token!r}: pass the integer fencing token of the"
                " lease that is committing",
                lock_name=self.lock_name,
            )
        return token

    def _check_files(self, files: Mapping[str, bytes]) -> dict[str, bytes]:
        names = set(files)
        missing = sorted(set(REQUIRED_NAMES) - names)
        extra = sorted(names - set(REQUIRED_NAMES))
        if missing or extra:
            raise ConfigError(
                f"commit to {self._subject} needs exactly"
                f" {', '.join(REQUIRED_NAMES)}; missing {missing}, unexpected"
                f" {extra}",
                lock_name=self.lock_name,
            )
        for name, data in files.items():
            if not isinstance(data, bytes):
                raise ConfigError(
                    f"invalid content for {name}: pass bytes, not"
                    f" {type(data).__name__}",
                    lock_name=self.lock_name,
                )
        if is_encrypted_key(files[KEY_NAME]):
            raise ConfigError(
                f"{KEY_NAME} for {self._subject} is encrypted, but a TLS Secret"
                " holds the unencrypted key that servers load; pass the decrypted"
                " key and restrict access to the Secret with RBAC",
                lock_name=self.lock_name,
            )
        return dict(files)

    # API calls.

    def _read(self) -> Any:
        return call_api(
            self._core.read_namespaced_secret,
            self.name,
            self.namespace,
            action="read",
            subject=self._subject,
            server=self._server,
            lock_name=self.lock_name,
            _request_timeout=self.operation_timeout,
        )

    def _send(self, create: bool, body: Any) -> Any:
        if create:
            return call_api(
                self._core.create_namespaced_secret,
                self.namespace,
                body,
                action="create",
                subject=self._subject,
                server=self._server,
                lock_name=self.lock_name,
                _request_timeout=self.operation_timeout,
            )
        # body.metadata.resourceVersion makes the update conditional.
        return call_api(
            self._core.replace_namespaced_secret,
            self.name,
            self.namespace,
            body,
            action="update",
            subject=self._subject,
            server=self._server,
            lock_name=self.lock_name,
            _request_timeout=self.operation_timeout,
        )


def _updated(secret: Any, token: int, data: dict[str, str]) -> Any:
    body = copy.deepcopy(secret)
    body.data = {**(secret.data or {}), **data}
    body.string_data = None
    annotations = dict(body.metadata.annotations or {})
    annotations[TOKEN_ANNOTATION] = str(token)
    body.metadata.annotations = annotations
    return body


def _recorded_token(secret: Any) -> int | None:
    annotations = secret.metadata.annotations or {}
    value = annotations.get(TOKEN_ANNOTATION)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        # NOTE: an unparsable annotation was not written by this store; it
        # is treated as absent, so any token may then commit.
        log.warning(
            "ignoring invalid %s annotation %r on Secret %s/%s",
            TOKEN_ANNOTATION,
            value,
            secret.metadata.namespace,
            secret.metadata.name,
        )
        return None


def _snapshot(secret: Any) -> SecretSnapshot:
    data = secret.data or {}
    decoded = {key: base64.b64decode(value) for key, value in data.items()}
    fullchain = decoded.get("tls.crt", b"")
    blocks = _PEM_CERTIFICATE.findall(fullchain)

    files: dict[str, bytes] = {}
    if "tls.key" in decoded:
        files[KEY_NAME] = decoded["tls.key"]
    if fullchain:
        files[FULLCHAIN_NAME] = fullchain
        files[CERT_NAME] = blocks[0] if blocks else fullchain
        files[CHAIN_NAME] = b"".join(blocks[1:])
    return SecretSnapshot(
        token=_recorded_token(secret),
        resource_version=str(secret.metadata.resource_version),
        files=dict(sorted(files.items())),
    )

"""The ACME connection: ClientV2 set-up, orders with ``replaces``, and ARI.

Every request goes through ``acme.client.ClientNetwork``, which signs POSTs
and keeps nonces; a subclass here retries a badNonce up to eight times.
This module also adds what acme 5.x lacks: the ``replaces`` field of a new
order (RFC 9773 section 5), the ARI certificate identifier and fetch
(RFC 9773 section 4), and polling steps that do not sleep, so the caller
decides how long to wait.
"""

from __future__ import annotations

import base64
import email.utils
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import requests
from acme import challenges, messages
from acme import errors as acme_errors
from acme.client import ClientNetwork, ClientV2
from cryptography import x509
from josepy import errors as jose_errors
from josepy import jwa, jwk
from josepy.json_util import field as jose_field

from singlewriter._errors import ConfigError

from ._errors import ACMEError

__all__ = [
    "ARI_DEFAULT_RETRY",
    "ARI_MAX_RETRY",
    "ARI_MIN_RETRY",
    "Connection",
    "RenewalInfo",
    "ReplacingNewOrder",
    "cert_id",
    "check_directory_url",
    "connect",
    "retry_after_seconds",
]

log = logging.getLogger(__name__)

# RFC 8555 section 6.3: a POST-as-GET request has an empty payload, and
# ClientNetwork sends an empty payload for a falsy object.
_EMPTY_PAYLOAD: Any = None

# RFC 9773 section 4.3.2 suggests treating a Retry-After under one minute as
# one minute and one over a day as a day. Section 4.3.3 waits six hours
# after an error, which is also used when the header is missing.
ARI_MIN_RETRY = 60.0
ARI_MAX_RETRY = 86400.0
ARI_DEFAULT_RETRY = 6 * 3600.0


def check_directory_url(url: object) -> str:
    """Return ``url`` if it can name an ACME directory, else raise ConfigError."""
    if not isinstance(url, str):
        raise ConfigError(f"directory_url={url!r} is invalid: expected a string")
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ConfigError(
            f"directory_url={url!r} is invalid: ACME needs an https:// URL"
            " (RFC 8555 section 6.1), such as the CA's documented directory URL"
        )
    return url


def cert_id(certificate: x509.Certificate) -> str | None:
    """Return the RFC 9773 identifier of ``certificate``, None without an AKI.

    It is base64url(keyIdentifier of the Authority Key Identifier) "."
    base64url(DER content octets of the serial number), unpadded
    (RFC 9773 section 4.1).
    """
    try:
        extension = certificate.extensions.get_extension_for_class(
            x509.AuthorityKeyIdentifier
        )
    except x509.ExtensionNotFound:
        return None
    key_identifier = extension.value.key_identifier
    if key_identifier is None:
        return None

    # A DER INTEGER is two's complement, so a positive serial whose top bit is
    # set gets a leading zero byte: one bit more than its length.
    serial = certificate.serial_number
    serial_bytes = serial.to_bytes(serial.bit_length() // 8 + 1, "big", signed=True)
    return f"{_b64url(key_identifier)}.{_b64url(serial_bytes)}"


def retry_after_seconds(response: requests.Response, now: datetime) -> float | None:
    """Return the response's Retry-After in seconds from ``now``, None if absent.

    RFC 9110 section 10.2.3 allows a number of seconds or an HTTP-date.
    An unparsable value counts as absent; a date in the past gives 0.
    """
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        return None
    return max(0.0, (moment - now).total_seconds())


class ReplacingNewOrder(messages.NewOrder):
    """A newOrder payload with the RFC 9773 ``replaces`` field."""

    replaces: str | None = jose_field("replaces", omitempty=True)


@dataclass(frozen=True)
class RenewalInfo:
    """A suggested renewal window from the CA (RFC 9773 section 4.2).

    ``retry_after`` is in seconds, already clamped to one minute .. one day.
    """

    cert_id: str
    start: datetime
    end: datetime
    explanation_url: str | None
    retry_after: float


class Connection:
    """An ACME client for one directory and one account key."""

    def __init__(self, client: ClientV2, directory_url: str) -> None:
        self.client = client
        self.directory_url = directory_url

    @property
    def net(self) -> ClientNetwork:
        return self.client.net

    @property
    def directory(self) -> messages.Directory:
        return self.client.directory

    @property
    def has_renewal_info(self) -> bool:
        return self._directory_field("renewalInfo") is not None

    @property
    def external_account_required(self) -> bool:
        return bool(self.client.external_account_required())

    def account_key(self) -> jwk.JWK:
        key: jwk.JWK | None = self.net.key
        assert key is not None
        return key

    def post(self, url: str, payload: Any) -> requests.Response:
        """Send a signed POST, retrying a badNonce a few times."""
        return self.net.post(url, payload, new_nonce_url=self.directory["newNonce"])

    def post_as_get(self, url: str) -> requests.Response:
        return self.post(url, _EMPTY_PAYLOAD)

    def new_order(
        self, domains: tuple[str, ...], *, replaces: str | None, profile: str | None
    ) -> tuple[str, messages.Order]:
        """Create an order and return its URL and body."""
        identifiers = [
            messages.Identifier(typ=messages.IDENTIFIER_FQDN, value=name)
            for name in domains
        ]
        payload = ReplacingNewOrder(
            identifiers=identifiers, replaces=replaces, profile=profile
        )
        response = self.post(self.directory["newOrder"], payload)
        location = response.headers.get("Location")
        if not location:
            raise ACMEError(
                f"the ACME server at {self.directory_url} created an order without"
                " a Location header (RFC 8555 section 7.4), so it cannot be"
                " resumed; report this to the CA",
                domains=domains,
            )
        return location, messages.Order.from_json(response.json())

    def fetch_order(self, url: str) -> tuple[messages.Order, requests.Response]:
        response = self.post_as_get(url)
        return messages.Order.from_json(response.json()), response

    def fetch_authorization(
        self, url: str
    ) -> tuple[messages.AuthorizationResource, requests.Response]:
        response = self.post_as_get(url)
        resource = messages.AuthorizationResource(
            body=messages.Authorization.from_json(response.json()), uri=url
        )
        return resource, response

    def answer(
        self, challenge: messages.ChallengeBody, answer: challenges.ChallengeResponse
    ) -> None:
        self.client.answer_challenge(challenge, answer)

    def finalize(
        self, order: messages.Order, csr_pem: bytes
    ) -> tuple[messages.Order, requests.Response]:
        """Send the CSR to the order's finalize URL and return the updated order."""
        csr = x509.load_pem_x509_csr(csr_pem)
        response = self.post(order.finalize, messages.CertificateRequest(csr=csr))
        return messages.Order.from_json(response.json()), response

    def download(self, certificate_url: str) -> str:
        """Return the PEM chain at ``certificate_url`` (RFC 8555 section 7.4.2)."""
        return self.post_as_get(certificate_url).text

    def renewal_info(
        self, certificate: x509.Certificate, now: datetime
    ) -> RenewalInfo | None:
        """Fetch the CA's suggested window for ``certificate``.

        Return None when the directory has no renewalInfo, the certificate
        has no AKI, or the window is invalid (end not after start, which
        RFC 9773 section 4.2 requires to be treated as no response). Network and server
        errors propagate.
        """
        base = self._directory_field("renewalInfo")
        identifier = cert_id(certificate)
        if base is None or identifier is None:
            return None

        response = self.net.get(
            f"{str(base).rstrip('/')}/{identifier}",
            content_type=ClientNetwork.JSON_CONTENT_TYPE,
        )
        body = response.json()
        window = messages.RenewalInfo.from_json(body).suggested_window
        if window.end <= window.start:
            log.warning(
                "ignoring the renewal window for certificate %s from %s: its end"
                " %s is not after its start %s",
                identifier,
                self.directory_url,
                window.end,
                window.start,
            )
            return None

        explanation = body.get("explanationURL")
        return RenewalInfo(
            cert_id=identifier,
            start=window.start,
            end=window.end,
            explanation_url=explanation if isinstance(explanation, str) else None,
            retry_after=_ari_retry(retry_after_seconds(response, now)),
        )

    def _directory_field(self, name: str) -> Any:
        try:
            return self.directory[name]
        except KeyError:
            return None


def connect(
    directory_url: str,
    account_key: jwk.JWK,
    *,
    ca_bundle: str | None,
    user_agent: str,
    timeout: float,
) -> Connection:
    """Fetch the directory and return a Connection signing with ``account_key``."""
    net = _PatientNetwork(
        account_key,
        alg=_signature_algorithm(account_key),
        user_agent=user_agent,
        timeout=max(1, round(timeout)),
    )
    if urlsplit(directory_url).scheme == "https":
        # Every request, including each redirect requests follows, goes
        # through this session, so a plain-http URL anywhere fails here.
        net.session.mount("http://", _RejectPlainHTTP(directory_url))
    if ca_bundle is not None:
        # ClientNetwork hands verify_ssl to requests as ``verify``, which also
        # accepts the path of a PEM bundle; acme types it as bool only.
        setattr(net, "verify_ssl", ca_bundle)  # noqa: B010

    directory = _get_directory(directory_url, net)
    return Connection(ClientV2(directory, net), directory_url)


class _RejectPlainHTTP(requests.adapters.BaseAdapter):
    """A transport that rejects http:// URLs when the directory is https."""

    def __init__(self, directory_url: str) -> None:
        super().__init__()
        self.directory_url = directory_url

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> Any:
        raise ConfigError(
            f"the ACME server sent the plain-http URL {request.url!r} (as an"
            f" endpoint, a Location header or a redirect) although the directory"
            f" {self.directory_url!r} is https; refusing to downgrade. Check the"
            " CA's directory and proxies"
        )

    def close(self) -> None:
        pass


# Extra tries after a badNonce. RFC 8555 section 6.5 lets a server reject
# any nonce, and Pebble rejects 5 % of good ones by default, so a single
# retry (what ClientNetwork does) fails one POST in 400 there. Each retry
# costs one round trip, so eight of them are cheap.
_BAD_NONCE_RETRIES = 8


class _PatientNetwork(ClientNetwork):
    """A ClientNetwork that retries a badNonce more than once.

    Each retry signs the request again with a new nonce, which
    ClientNetwork fetches from newNonce when its pool is empty.
    """

    def post(self, *args: Any, **kwargs: Any) -> requests.Response:
        for _ in range(_BAD_NONCE_RETRIES):
            try:
                return self._post_once(*args, **kwargs)
            except messages.Error as error:
                if error.code != "badNonce":
                    raise
                log.debug("retrying a POST after badNonce: %s", error)
        return self._post_once(*args, **kwargs)


def _get_directory(directory_url: str, net: ClientNetwork) -> messages.Directory:
    """Fetch the directory; raise ConfigError when the URL serves something else.

    Connection errors, server errors (5xx) and problem documents propagate,
    because they may pass.
    """
    try:
        directory = ClientV2.get_directory(directory_url, net)
    except acme_errors.ClientError as exc:
        response = exc.args[0] if exc.args else None
        if isinstance(response, requests.Response) and response.status_code >= 500:
            raise
        raise _not_a_directory(directory_url, f"the server returned {exc}") from exc
    except (jose_errors.DeserializationError, AttributeError, TypeError) as exc:
        raise _not_a_directory(directory_url, f"its JSON is malformed ({exc})") from exc

    for field in ("newNonce", "newAccount", "newOrder"):
        try:
            directory[field]
        except KeyError:
            raise _not_a_directory(
                directory_url, f"it has no {field!r} field"
            ) from None
    return directory


def _not_a_directory(directory_url: str, reason: str) -> ConfigError:
    return ConfigError(
        f"directory_url {directory_url!r} does not serve an ACME directory"
        f" (RFC 8555 section 7.1.1): {reason}. Check the URL."
    )


def _signature_algorithm(key: jwk.JWK) -> jwa.JWASignature:
    if isinstance(key, jwk.JWKEC):
        return jwa.ES256
    return jwa.RS256


def _ari_retry(seconds: float | None) -> float:
    if seconds is None:
        return ARI_DEFAULT_RETRY
    return min(max(seconds, ARI_MIN_RETRY), ARI_MAX_RETRY)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")

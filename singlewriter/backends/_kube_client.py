"""Connecting to a Kubernetes API server: URL parsing, configuration, errors.

Shared by the Lease lock and the Secret key store. A ``k8s://`` URL names a
namespace, optionally an object, and exactly one configuration source::

    k8s://NAMESPACE[/NAME]?server=https://HOST:PORT&token_file=PATH[&ca=PATH]
    k8s://NAMESPACE[/NAME]?server=https://HOST:PORT&token=TOKEN[&ca=PATH]
    k8s://NAMESPACE[/NAME]?kubeconfig=PATH[&context=NAME]
    k8s://NAMESPACE[/NAME]?incluster=1

Nothing is read from ``KUBECONFIG``, ``~/.kube/config`` or the in-cluster
service account unless the URL names it, so a URL without a source is a
ConfigError instead of a request to whatever cluster the environment names.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import kubernetes.client
import kubernetes.config
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from .._errors import BackendUnavailable, ConfigError

__all__ = [
    "Conflict",
    "KubeTarget",
    "NotFound",
    "api_message",
    "build_api_client",
    "call_api",
    "describe_server",
    "parse_url",
    "redact",
    "validate_namespace",
    "validate_object_name",
]

log = logging.getLogger(__name__)

SCHEME = "k8s"

# Directory in which the kubelet mounts a pod's service account token and CA.
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"

# Projected service account tokens rotate: the kubelet replaces one after 80%
# of its lifetime, which defaults to one hour (ServiceAccountTokenProjection
# expirationSeconds in the Kubernetes API reference). A token file is
# therefore re-read this often.
TOKEN_REREAD_SECONDS = 60.0

_SOURCE_PARAMETERS = ("server", "kubeconfig", "incluster")
_PARAMETERS = frozenset(
    {"server", "token", "token_file", "ca", "kubeconfig", "context", "incluster"}
)
_SECRET_PARAMETERS = ("token",)

# RFC 1123 label (namespaces) and subdomain (Lease and Secret names), as the
# API server validates them in apimachinery's validation package.
_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_NAMESPACE = re.compile(_LABEL)
_SUBDOMAIN = re.compile(rf"{_LABEL}(\.{_LABEL})*")

T = TypeVar("T")


class NotFound(Exception):
    """The API server returned 404 for the object."""


class Conflict(Exception):
    """The API server returned 409: the object changed or already exists."""


@dataclass(frozen=True)
class KubeTarget:
    """A parsed ``k8s://`` URL: where the object lives and how to connect."""

    namespace: str
    object_name: str | None
    parameters: Mapping[str, str] = field(repr=False)
    redacted_url: str


def redact(url: str) -> str:
    """Return ``url`` with the value of ``token=`` replaced by ``***``."""
    parts = urlsplit(url)
    if not parts.query:
        return url
    pairs = parse_qs(parts.query, keep_blank_values=True)
    for key in _SECRET_PARAMETERS:
        if key in pairs:
            pairs[key] = ["***"]
    query = urlencode(pairs, doseq=True, safe="/:*")
    return parts._replace(query=query).geturl()


def parse_url(url: str, kind: str, lock_name: str | None = None) -> KubeTarget:
    """Parse a ``k8s://NAMESPACE[/NAME]?...`` URL for an object of ``kind``."""
    redacted = redact(url) if isinstance(url, str) else repr(url)
    if not isinstance(url, str) or not url.lower().startswith(f"{SCHEME}://"):
        raise ConfigError(
            f"Kubernetes URL {redacted!r} is invalid: expected"
            f" {SCHEME}://NAMESPACE/{kind.upper()}-NAME?kubeconfig=PATH",
            lock_name=lock_name,
            backend="kubernetes",
        )

    parts = urlsplit(url)
    if parts.username is not None or parts.port is not None:
        raise ConfigError(
            f"Kubernetes URL {redacted!r} is invalid: the part after {SCHEME}:// is"
            " the namespace, with no user or port; give the API server as"
            " server=https://HOST:PORT",
            lock_name=lock_name,
            backend="kubernetes",
        )
    namespace = unquote(parts.netloc)
    validate_namespace(namespace, redacted, lock_name)

    path = unquote(parts.path).strip("/")
    object_name = path or None
    if object_name is not None:
        validate_object_name(object_name, kind, redacted, lock_name)

    parameters = _parameters(parts.query, redacted, lock_name)
    return KubeTarget(namespace, object_name, parameters, redacted)


def validate_namespace(
    namespace: str, location: str, lock_name: str | None = None
) -> None:
    """Raise ConfigError unless ``namespace`` is a valid RFC 1123 label.

    ``location`` (a redacted URL or NAMESPACE/NAME) goes in the message.
    """
    if not namespace:
        raise ConfigError(
            f"{location!r} names no namespace: use {SCHEME}://NAMESPACE/NAME,"
            f" for example {SCHEME}://cert-renewal/example-com",
            lock_name=lock_name,
            backend="kubernetes",
        )
    if len(namespace) > 63 or not _NAMESPACE.fullmatch(namespace):
        raise ConfigError(
            f"namespace {namespace!r} in {location!r} is invalid: a namespace is"
            " 1 to 63 lowercase letters, digits and '-', starting and ending"
            " with a letter or digit (RFC 1123 label)",
            lock_name=lock_name,
            backend="kubernetes",
        )


def validate_object_name(
    name: str, kind: str, location: str, lock_name: str | None = None
) -> None:
    """Raise ConfigError unless ``name`` is a valid RFC 1123 subdomain."""
    if len(name) > 253 or not _SUBDOMAIN.fullmatch(name):
        raise ConfigError(
            f"{kind} name {name!r} for {location!r} is invalid: a {kind} name is"
            " 1 to 253 lowercase letters, digits, '-' and '.', each dot-separated"
            " part starting and ending with a letter or digit (RFC 1123"
            " subdomain)",
            lock_name=lock_name,
            backend="kubernetes",
        )


def _parameters(query: str, redacted: str, lock_name: str | None) -> dict[str, str]:
    pairs = parse_qs(query, keep_blank_values=True)
    unknown = sorted(set(pairs) - _PARAMETERS)
    if unknown:
        raise ConfigError(
            f"Kubernetes URL {redacted!r} has unknown parameters {unknown}; accepted"
            f" are {', '.join(sorted(_PARAMETERS))}",
            lock_name=lock_name,
            backend="kubernetes",
        )
    repeated = sorted(key for key, values in pairs.items() if len(values) > 1)
    if repeated:
        raise ConfigError(
            f"Kubernetes URL {redacted!r} repeats parameters {repeated}; give"
            " each once",
            lock_name=lock_name,
            backend="kubernetes",
        )
    return {key: values[0] for key, values in pairs.items()}


def build_api_client(
    target: KubeTarget,
    lock_name: str | None = None,
    *,
    service_account_dir: str = SERVICE_ACCOUNT_DIR,
    environ: Mapping[str, str] | None = None,
) -> Any:
    """Return a ``kubernetes.client.ApiClient`` for the source the URL names.

    Raise ConfigError when the URL names no source, more than one, or one
    that cannot be loaded. ``service_account_dir`` and ``environ`` locate
    the in-cluster token, CA and API server address.
    """
    parameters = dict(target.parameters)
    sources = [key for key in _SOURCE_PARAMETERS if key in parameters]
    if len(sources) != 1:
        found = ", ".join(sources) if sources else "none"
        raise ConfigError(
            f"Kubernetes URL {target.redacted_url!r} must name exactly one"
            f" configuration source (found: {found}). Add one of"
            " server=https://HOST:PORT&token_file=PATH, kubeconfig=PATH, or"
            " incluster=1 inside a pod. KUBECONFIG and ~/.kube/config are"
            " never read unless named.",
            lock_name=lock_name,
            backend="kubernetes",
        )

    _reject_misplaced(sources[0], parameters, target.redacted_url, lock_name)
    if sources[0] == "server":
        configuration = _explicit_configuration(parameters, target, lock_name)
    elif sources[0] == "kubeconfig":
        configuration = _kubeconfig_configuration(parameters, target, lock_name)
    else:
        configuration = _incluster_configuration(
            parameters, target, lock_name, service_account_dir, environ
        )

    # The lock retries with its own deadline in mind. urllib3's default
    # retries would resend a PUT whose reply was lost, and the resent write
    # then fails on its own resourceVersion precondition.
    configuration.retries = False
    return kubernetes.client.ApiClient(configuration)


def _reject_misplaced(
    source: str, parameters: Mapping[str, str], redacted: str, lock_name: str | None
) -> None:
    allowed = {
        "server": {"server", "token", "token_file", "ca"},
        "kubeconfig": {"kubeconfig", "context"},
        "incluster": {"incluster"},
    }[source]
    misplaced = sorted(set(parameters) - allowed)
    if misplaced:
        raise ConfigError(
            f"Kubernetes URL {redacted!r} combines {source}= with {misplaced}; with"
            f" {source}= only {sorted(allowed)} apply",
            lock_name=lock_name,
            backend="kubernetes",
        )


def _explicit_configuration(
    parameters: Mapping[str, str], target: KubeTarget, lock_name: str | None
) -> Any:
    redacted = target.redacted_url
    server = parameters["server"]
    split = urlsplit(server)
    if split.scheme != "https" or not split.hostname:
        raise ConfigError(
            f"server={server!r} in {redacted!r} is invalid: use https://HOST[:PORT];"
            " a bearer token is never sent over plain HTTP",
            lock_name=lock_name,
            backend="kubernetes",
        )

    has_token, has_file = "token" in parameters, "token_file" in parameters
    if has_token == has_file:
        raise ConfigError(
            f"Kubernetes URL {redacted!r} needs exactly one of token_file=PATH"
            " (preferred: it is re-read when the token rotates) or token=TOKEN",
            lock_name=lock_name,
            backend="kubernetes",
        )

    configuration: Any = kubernetes.client.Configuration()
    configuration.host = server.rstrip("/")
    if "ca" in parameters:
        ca_path = parameters["ca"]
        if not os.path.isfile(ca_path):
            raise ConfigError(
                f"ca={ca_path!r} in {redacted!r} is not a file: give the PEM file of"
                " the CA that signed the API server's certificate",
                lock_name=lock_name,
                backend="kubernetes",
            )
        configuration.ssl_ca_cert = ca_path

    if has_token:
        token = parameters["token"]
        if not token:
            raise ConfigError(
                f"token= in {redacted!r} is empty",
                lock_name=lock_name,
                backend="kubernetes",
            )
        _set_token(configuration, token)
    else:
        reader = _TokenFile(parameters["token_file"], redacted, lock_name)
        _set_token(configuration, reader.read(initial=True))
        configuration.refresh_api_key_hook = reader.refresh
    return configuration


def _set_token(configuration: Any, token: str) -> None:
    configuration.api_key["BearerToken"] = token
    configuration.api_key_prefix["BearerToken"] = "Bearer"


class _TokenFile:
    """A bearer token file, re-read at most every TOKEN_REREAD_SECONDS."""

    def __init__(self, path: str, redacted: str, lock_name: str | None) -> None:
        self.path = path
        self._redacted = redacted
        self._lock_name = lock_name
        self._mutex = threading.Lock()
        self._read_at = -float("inf")

    def read(self, *, initial: bool = False) -> str:
        try:
            with open(self.path, encoding="utf-8") as handle:
                token = handle.read().strip()
        except OSError as exc:
            raise ConfigError(
                f"token_file={self.path!r} in {self._redacted!r} cannot be read:"
                f" {exc.strerror or exc}. Give a file that contains the bearer token.",
                lock_name=self._lock_name,
                backend="kubernetes",
            ) from exc
        if not token:
            raise ConfigError(
                f"token_file={self.path!r} in {self._redacted!r} is empty",
                lock_name=self._lock_name,
                backend="kubernetes",
            )
        self._read_at = time.monotonic()
        return token

    def refresh(self, configuration: Any) -> None:
        # Called by the client before every request that needs the token.
        with self._mutex:
            if time.monotonic() - self._read_at < TOKEN_REREAD_SECONDS:
                return
            try:
                _set_token(configuration, self.read())
            except ConfigError as exc:
                self._read_at = time.monotonic()
                log.warning("keeping the previous bearer token: %s", exc)


def _kubeconfig_configuration(
    parameters: Mapping[str, str], target: KubeTarget, lock_name: str | None
) -> Any:
    path = parameters["kubeconfig"]
    if not path or not os.path.isfile(path):
        raise ConfigError(
            f"kubeconfig={path!r} in {target.redacted_url!r} is not a file: give"
            " the path of a kubeconfig file",
            lock_name=lock_name,
            backend="kubernetes",
        )
    configuration: Any = kubernetes.client.Configuration()
    # The loader has no annotations; typed as Any for mypy --strict.
    load_kube_config: Any = kubernetes.config.load_kube_config
    try:
        load_kube_config(
            config_file=path,
            context=parameters.get("context") or None,
            client_configuration=configuration,
            persist_config=False,
        )
    except (ConfigException, OSError, ValueError, TypeError, KeyError) as exc:
        context = parameters.get("context")
        context_part = f" context {context!r} of" if context else ""
        raise ConfigError(
            f"cannot load{context_part} kubeconfig {path!r} for"
            f" {target.redacted_url!r}: {exc}. Check the file and the context name.",
            lock_name=lock_name,
            backend="kubernetes",
        ) from exc
    return configuration


def _incluster_configuration(
    parameters: Mapping[str, str],
    target: KubeTarget,
    lock_name: str | None,
    service_account_dir: str,
    environ: Mapping[str, str] | None,
) -> Any:
    if parameters["incluster"].lower() not in ("1", "true", "yes", "on"):
        raise ConfigError(
            f"incluster={parameters['incluster']!r} in {target.redacted_url!r} is"
            " invalid; use incluster=1, or name another source",
            lock_name=lock_name,
            backend="kubernetes",
        )
    from kubernetes.config.incluster_config import InClusterConfigLoader

    loader_class: Any = InClusterConfigLoader
    loader = loader_class(
        token_filename=os.path.join(service_account_dir, "token"),
        cert_filename=os.path.join(service_account_dir, "ca.crt"),
        environ=os.environ if environ is None else environ,
    )
    configuration: Any = kubernetes.client.Configuration()
    try:
        loader.load_and_set(configuration)
    except (ConfigException, OSError) as exc:
        raise ConfigError(
            f"incluster=1 in {target.redacted_url!r} but no in-cluster service"
            f" account was found ({exc}): KUBERNETES_SERVICE_HOST and"
            f" KUBERNETES_SERVICE_PORT must be set and {service_account_dir}"
            " must hold token and ca.crt, as in a pod with a mounted service"
            " account token",
            lock_name=lock_name,
            backend="kubernetes",
        ) from exc
    return configuration


def describe_server(api_client: Any) -> str:
    """Return the API server's base URL, for messages."""
    return str(api_client.configuration.host)


def api_message(exc: ApiException) -> str:
    """Return the ``message`` of a Kubernetes Status body, else the reason."""
    body = getattr(exc, "body", None)
    if body:
        try:
            message = json.loads(body).get("message")
            if isinstance(message, str) and message:
                return message
        except (ValueError, AttributeError):
            pass
    reason = str(getattr(exc, "reason", "") or "").strip()
    return reason or f"HTTP {exc.status}"


def call_api(
    function: Callable[..., T],
    *args: Any,
    action: str,
    subject: str,
    server: str,
    lock_name: str | None = None,
    **kwargs: Any,
) -> T:
    """Call one API method and translate its errors.

    Raise NotFound for 404 and Conflict for 409 so the caller can decide;
    BackendUnavailable for transport errors, 429 and 5xx; ConfigError for
    401, 403 and other 4xx, whose cause is credentials, RBAC or input.
    ``action`` and ``subject`` ("update", "Lease ns/name") go in messages.
    """
    try:
        return function(*args, **kwargs)
    except ApiException as exc:
        raise _translate(exc, action, subject, server, lock_name) from exc
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise BackendUnavailable(
            f"the Kubernetes API server at {server} did not respond to the {action} of"
            f" {subject}: {exc}. Check that it is up and reachable.",
            lock_name=lock_name,
            backend="kubernetes",
        ) from exc


def _translate(
    exc: ApiException, action: str, subject: str, server: str, lock_name: str | None
) -> Exception:
    status = exc.status or 0
    message = api_message(exc)
    if status == 404:
        return NotFound(message)
    if status == 409:
        return Conflict(message)

    where = f"the Kubernetes API server at {server}"
    if status == 0:
        # The client reports TLS failures as status 0 with the SSL error text.
        if "CERTIFICATE_VERIFY_FAILED" in message:
            return ConfigError(
                f"{where} failed TLS verification during the {action} of"
                f" {subject}: {message}. Set ca=PATH to the cluster's CA file.",
                lock_name=lock_name,
                backend="kubernetes",
            )
        return BackendUnavailable(
            f"{action} of {subject} at {server} failed: {message}",
            lock_name=lock_name,
            backend="kubernetes",
        )
    if status == 401:
        return ConfigError(
            f"{where} rejected the credentials for the {action} of {subject}"
            f" (HTTP 401: {message}). Check the token or kubeconfig user.",
            lock_name=lock_name,
            backend="kubernetes",
        )
    if status == 403:
        return ConfigError(
            f"{where} denied the {action} of {subject} (HTTP 403: {message})."
            " Grant the verb to this user with a Role and RoleBinding; see the"
            " RBAC section of docs/kubernetes.md.",
            lock_name=lock_name,
            backend="kubernetes",
        )
    if status == 429 or status >= 500:
        return BackendUnavailable(
            f"{where} failed the {action} of {subject} (HTTP {status}: {message})",
            lock_name=lock_name,
            backend="kubernetes",
        )
    return ConfigError(
        f"{where} rejected the {action} of {subject} (HTTP {status}: {message})",
        lock_name=lock_name,
        backend="kubernetes",
    )

"""Building a lock from a URL."""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any, Protocol
from urllib.parse import parse_qs, parse_qsl, unquote, urlencode, urlsplit

from ._errors import ConfigError
from ._lock import Lock

__all__ = ["lock_from_url"]


class _FromUrl(Protocol):
    def __call__(self, url: str, name: str | None, **options: Any) -> Lock: ...


# scheme: (module, class, extra that installs its client library)
_BACKENDS: dict[str, tuple[str, str, str | None]] = {
    "file": ("singlewriter.backends.file", "FileLock", None),
    "redis": ("singlewriter.backends.redis", "RedisLock", "redis"),
    "rediss": ("singlewriter.backends.redis", "RedisLock", "redis"),
    "unix": ("singlewriter.backends.redis", "RedisLock", "redis"),
    "consul": ("singlewriter.backends.consul", "ConsulLock", "consul"),
    "consuls": ("singlewriter.backends.consul", "ConsulLock", "consul"),
    "k8s": ("singlewriter.backends.kubernetes", "KubernetesLock", "kubernetes"),
}


def lock_from_url(
    url: str, name: str | None = None, *, ttl: float = 30.0, **options: Any
) -> Lock:
    """Build a lock for ``name`` from a URL.

    ``file:///DIR`` gives a FileLock in DIR (query: ``allow_network_fs=1``).
    ``redis://[USER:PASSWORD@]HOST[:PORT][/DB]`` and ``rediss://`` (TLS) give
    a RedisLock (query: ``prefix``, ``guard_after_data_loss`` and any
    redis-py connection option). ``unix:///PATH`` reaches Redis over a Unix
    socket. ``consul://`` and ``k8s://`` need their extras installed.
    ``ttl`` is in seconds. Raise ConfigError for an unknown scheme, a
    missing extra or a bad parameter.
    """
    if not isinstance(url, str) or "://" not in url:
        shown = _redacted(url) if isinstance(url, str) else repr(url)
        raise ConfigError(
            f"lock URL {shown!r} is invalid: expected SCHEME://..., with a scheme"
            f" among {', '.join(sorted(_BACKENDS))}",
            lock_name=name,
        )
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError as exc:
        raise ConfigError(
            f"lock URL {_redacted(url)!r} is invalid: {exc}", lock_name=name
        ) from exc
    if scheme not in _BACKENDS:
        raise ConfigError(
            f"lock URL scheme {scheme!r} in {_redacted(url)!r} is not supported;"
            f" use one of {', '.join(sorted(_BACKENDS))}",
            lock_name=name,
        )
    if scheme == "file":
        from .backends.file import FileLock

        _check_options(FileLock, options, name)
        return _file_lock(url, name, ttl=ttl, **options)
    factory = _load(scheme, name)
    return factory(url, name, ttl=ttl, **options)


def _check_options(cls: type, options: dict[str, Any], name: str | None) -> None:
    """Reject keyword options that neither the backend nor Lock accepts."""
    accepted: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            accepted |= set(inspect.signature(init).parameters)
    from_url = getattr(cls, "from_url", None)
    if from_url is not None:
        accepted |= set(inspect.signature(from_url).parameters)
    accepted -= {"self", "options", "url", "name", "client", "directory"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(unknown)} for a {cls.__name__}; the"
            f" accepted options are {', '.join(sorted(accepted))}",
            lock_name=name,
        )


def _load(scheme: str, name: str | None) -> _FromUrl:
    module_name, class_name, extra = _BACKENDS[scheme]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"the {scheme}:// lock backend needs a client library that is not"
            f" installed ({exc.name or exc}); install it with"
            f" pip install 'singlewriter[{extra}]'",
            lock_name=name,
        ) from exc
    cls = getattr(module, class_name)

    def build(url: str, name: str | None, **options: Any) -> Lock:
        _check_options(cls, options, name)
        lock: Lock = cls.from_url(url, name, **options)
        return lock

    return build


def _file_lock(url: str, name: str | None, **options: Any) -> Lock:
    from .backends.file import FileLock

    parts = urlsplit(url)
    shown = _redacted(url)
    if parts.netloc not in ("", "localhost"):
        raise ConfigError(
            f"file lock URL {shown!r} names host {parts.hostname!r}; a flock lock"
            " only works on this host, so use file:///ABSOLUTE/DIR",
            lock_name=name,
        )
    if name is None:
        raise ConfigError(
            f"file lock URL {shown!r} needs a lock name; pass name='example.com'"
        )

    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - {"allow_network_fs"})
    if unknown:
        raise ConfigError(
            f"file lock URL {shown!r} has unknown parameters {unknown}; the only"
            " accepted parameter is allow_network_fs=1",
            lock_name=name,
        )
    if "allow_network_fs" in query:
        options["allow_network_fs"] = _flag(query["allow_network_fs"][-1], url)
    return FileLock(unquote(parts.path), name, **options)


def _flag(value: str, url: str) -> bool:
    text = value.lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(
        f"flag value {value!r} in {_redacted(url)!r} is invalid; use 1 or 0"
    )


def _redacted(url: str) -> str:
    """Return ``url`` with its password and any token parameter hidden."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return re.sub(r"//[^@/]*@", "//***@", url)
    if password is not None:
        host = parts.netloc.rsplit("@", 1)[-1]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    if parts.query:
        query = [
            (key, "***" if key.lower() in _SECRET_PARAMETERS else value)
            for key, value in parse_qsl(parts.query, keep_blank_values=True)
        ]
        parts = parts._replace(query=urlencode(query, safe="*"))
    return parts.geturl()


# Query parameters whose values are credentials.
_SECRET_PARAMETERS = frozenset({"token", "password", "secret"})

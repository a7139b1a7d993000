"""A lock on a coordination.k8s.io/v1 Lease, judged as client-go judges one.

The record, in the Lease's spec and one annotation:

- ``holderIdentity``: ``PREFIX_PID_RANDOM``, new for every acquisition, so
  a process that restarts with the same host name never mistakes an old
  tenure for its own. Empty after a release.
- ``leaseDurationSeconds``: the holder's ttl rounded up to whole seconds,
  at least 1 (the field is an integer).
- ``leaseTransitions``: the fencing token of the current tenure.
- ``acquireTime`` and ``renewTime``: written from the holder's wall clock
  for people reading the object. No contender ever compares them with its
  own clock.
- annotation ``singlewriter.io/token``: the highest token issued.

Rules (the expiry rule follows client-go's tools/leaderelection):

- Observe. Each lock object remembers the last version of the record it
  read (resourceVersion, holder, renewTime) and the time, on its own
  monotonic clock, when it first read that version.
- Free. The Lease is free when it does not exist, when its holder is empty
  (released), or when the version this lock observed has not changed for
  the record's own leaseDurationSeconds. The contender's configured ttl
  plays no part, so contenders with different ttls agree.
- Acquire. Create the Lease (404), or replace it with the resourceVersion
  just read as precondition. Both write the token: the largest of
  leaseTransitions, the annotation and this process's highest token for
  the Lease, plus one. A 409 means another contender won: busy.
- Renew. Replace renewTime with the last resourceVersion as precondition.
  On 409, read again. Another holder, or no Lease, means the lease is lost.
  The same holder means another writer touched the object, so the renewal
  gets one more try.
- Release. Write an empty holder, still conditional, and only while the
  record names this tenure. A waiter takes over on its next poll instead
  of after leaseDurationSeconds.
- Errors. Transport errors, 429 and 5xx raise BackendUnavailable. 401 and
  403 raise ConfigError from acquire. During renewal they are logged as an
  error and retried like transient errors, because the lease stays ours on
  the server until it expires. The holder counts it as lost at its own
  deadline, which comes before any contender can take over.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import kubernetes.client

from .._errors import BackendUnavailable, ConfigError
from .._lease import Lease
from .._lock import Busy, Grant, Lock
from ._kube_client import (
    SERVICE_ACCOUNT_DIR,
    Conflict,
    NotFound,
    build_api_client,
    call_api,
    describe_server,
    parse_url,
    validate_namespace,
    validate_object_name,
)

__all__ = ["TOKEN_ANNOTATION", "KubernetesLock"]

log = logging.getLogger(__name__)

# An annotation key, not a credential.
TOKEN_ANNOTATION = "singlewriter.io/token"  # noqa: S105
_MANAGED_BY = {"app.kubernetes.io/managed-by": "singlewriter"}

# spec.leaseTransitions is an int32.
_INT32_MAX = 2**31 - 1

# Shortest time an acquisition request may take. The base class passes the
# time left of acquire(timeout), which on the last attempt can be a few
# milliseconds: a request cut that short fails as BackendUnavailable where
# the caller expects LockTimeout. The last attempt may therefore end up to
# this long after the caller's timeout.
_MIN_ACQUIRE_REQUEST_SECONDS = 1.0

# Highest token this process has seen per (server, namespace, Lease). It
# keeps tokens rising within one process even if the Lease is deleted and
# created again, which resets leaseTransitions and the annotation.
# NOTE: another process has no such memory, so after a deletion its tokens
# restart at 1 and a fenced store rejects them until they pass its record.
_seen: dict[tuple[str, str, str], int] = {}
_seen_lock = threading.Lock()

WallClock = Callable[[], datetime]


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class _Tenure:
    """Backend state of one acquisition, kept in ``Lease.data``."""

    identity: str
    token: int
    record: Any
    mutex: threading.Lock = field(default_factory=threading.Lock)
    denial_logged: bool = False


@dataclass(frozen=True)
class _Observation:
    """A version of the record and when, on the monotonic clock, it was first read."""

    version: tuple[str | None, str | None, str | None]
    seen_at: float


class KubernetesLock(Lock):
    """A lock on one Lease, for holders in any number of pods or hosts.

    ``api_client`` is a ``kubernetes.client.ApiClient``; ``from_url`` builds
    one from a ``k8s://`` URL. The Lease is ``lease_name`` in ``namespace``,
    by default the lock name in lowercase, which must then be a valid
    Kubernetes object name.

    ``ttl`` is written as leaseDurationSeconds, rounded up to whole seconds
    and at least 1. Contenders wait that long after they last saw the
    record change. The holder counts its lease as lost at its own deadline,
    ``ttl - safety_margin`` after the last renewal was sent, which is never
    later.

    ``identity_prefix`` (default: the host name, which in a pod is the pod
    name) starts each holder identity. ``wall_clock`` returns the aware
    datetime written into acquireTime and renewTime; only people read them.
    """

    backend = "kubernetes"

    def __init__(
        self,
        api_client: Any,
        namespace: str,
        name: str,
        *,
        lease_name: str | None = None,
        ttl: float | None = 30.0,
        identity_prefix: str | None = None,
        wall_clock: WallClock | None = None,
        **options: Any,
    ) -> None:
        super().__init__(name, ttl=ttl, **options)
        assert self.ttl is not None
        described = f"{namespace}/{lease_name or self.name}"
        validate_namespace(namespace, described, self.name)
        self.namespace = namespace
        self.lease_name = lease_name or self.name.lower()
        validate_object_name(self.lease_name, "Lease", described, self.name)

        self.lease_duration_seconds = max(1, math.ceil(self.ttl))
        self.identity_prefix = identity_prefix or socket.gethostname() or "singlewriter"
        self.wall_clock = wall_clock or _utc_now
        self.api_client = api_client
        self._leases = kubernetes.client.CoordinationV1Api(api_client)
        self._server = describe_server(api_client)
        self._subject = f"Lease {namespace}/{self.lease_name}"
        self._seen_key = (self._server, namespace, self.lease_name)
        self._observed: _Observation | None = None
        self._observed_lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"<KubernetesLock {self.name!r} lease={self.namespace}/{self.lease_name}"
            f" server={self._server} ttl={self.ttl}>"
        )

    @classmethod
    def from_url(
        cls, url: str, name: str | None = None, **options: Any
    ) -> KubernetesLock:
        """Build a lock from ``k8s://NAMESPACE[/LEASE-NAME]?SOURCE``.

        ``name`` and LEASE-NAME may both be given only if ``name`` in
        lowercase equals LEASE-NAME. The options ``api_client`` (instead of
        a source in the URL), ``service_account_dir`` and ``environ`` (where
        ``incluster=1`` looks) are taken here; the rest go to the lock.
        """
        target = parse_url(url, "Lease", name)
        lease_name = target.object_name
        if name is None:
            if lease_name is None:
                raise ConfigError(
                    f"Kubernetes lock URL {target.redacted_url!r} names no Lease:"
                    " use k8s://NAMESPACE/LEASE-NAME or pass a lock name",
                    backend=cls.backend,
                )
            name = lease_name
        elif lease_name is not None and str(name).lower() != lease_name:
            raise ConfigError(
                f"lock name {name!r} does not match Lease {lease_name!r} in"
                f" {target.redacted_url!r}: pass no name, or the same name",
                lock_name=str(name),
                backend=cls.backend,
            )

        api_client = options.pop("api_client", None)
        service_account_dir = options.pop("service_account_dir", SERVICE_ACCOUNT_DIR)
        environ: Mapping[str, str] | None = options.pop("environ", None)
        if api_client is None:
            api_client = build_api_client(
                target,
                name,
                service_account_dir=service_account_dir,
                environ=environ,
            )
        elif target.parameters:
            raise ConfigError(
                f"Kubernetes lock URL {target.redacted_url!r} names a configuration"
                " source and api_client= was passed too; give only one",
                lock_name=name,
                backend=cls.backend,
            )
        return cls(api_client, target.namespace, name, lease_name=lease_name, **options)

    # Acquisition.

    def _try_acquire(self, timeout: float, owner: str) -> Grant | Busy:
        identity = f"{self.identity_prefix}_{os.getpid()}_{owner[:16]}"
        timeout = max(
            timeout, min(self.operation_timeout, _MIN_ACQUIRE_REQUEST_SECONDS)
        )
        started = self.clock()
        try:
            record = self._read(timeout)
        except NotFound:
            return self._create(identity, self._budget(started, timeout))

        holder = _holder(record)
        if holder == identity:
            # An earlier attempt of this acquire() call wrote the record
            # and its reply was lost: the grant is ours.
            return self._granted(identity, record)

        if holder is not None:
            remaining = self._time_left(record)
            if remaining > 0:
                return Busy(retry_after=remaining, holder=holder)
            log.debug(
                "%s for lock %r: holder %s has not renewed for its"
                " leaseDurationSeconds, taking over",
                self._subject,
                self.name,
                holder,
            )
        return self._take(record, identity, self._budget(started, timeout))

    def _time_left(self, record: Any) -> float:
        """Seconds until ``record`` expires by what this lock has observed."""
        spec = record.spec
        version = (
            record.metadata.resource_version,
            _holder(record),
            None if spec.renew_time is None else str(spec.renew_time),
        )
        now = self.clock()
        with self._observed_lock:
            if self._observed is None or self._observed.version != version:
                self._observed = _Observation(version, now)
            seen_at = self._observed.seen_at

        duration = spec.lease_duration_seconds
        if not isinstance(duration, int) or duration < 1:
            # Written by another tool without a duration: assume ours.
            duration = self.lease_duration_seconds
        return seen_at + duration - now

    def _create(self, identity: str, timeout: float) -> Grant | Busy:
        token = self._next_token(None)
        now = self.wall_clock()
        body = kubernetes.client.V1Lease(
            metadata=kubernetes.client.V1ObjectMeta(
                name=self.lease_name,
                namespace=self.namespace,
                labels=dict(_MANAGED_BY),
                annotations={TOKEN_ANNOTATION: str(token)},
            ),
            spec=kubernetes.client.V1LeaseSpec(),
        )
        self._write_holder(body, identity, token, now)

        try:
            created = self._call(
                self._leases.create_namespaced_lease,
                self.namespace,
                body,
                action="create",
                timeout=timeout,
            )
        except Conflict:
            # Another contender created it first; the next attempt reads it.
            return Busy(retry_after=None, holder="another contender")
        except NotFound as exc:
            raise ConfigError(
                f"cannot create {self._subject} for lock {self.name!r} at"
                f" {self._server}: {exc}. Create the namespace {self.namespace!r}"
                " or use an existing one.",
                lock_name=self.name,
                backend=self.backend,
            ) from exc
        return self._granted(identity, created)

    def _take(self, record: Any, identity: str, timeout: float) -> Grant | Busy:
        token = self._next_token(record)
        body = copy.deepcopy(record)
        annotations = dict(body.metadata.annotations or {})
        annotations[TOKEN_ANNOTATION] = str(token)
        body.metadata.annotations = annotations
        self._write_holder(body, identity, token, self.wall_clock())

        try:
            updated = self._replace(body, "acquisition", timeout)
        except Conflict:
            return Busy(retry_after=None, holder=_holder(record) or "another contender")
        except NotFound:
            return Busy(retry_after=0.0, holder=None)
        return self._granted(identity, updated)

    def _write_holder(
        self, body: Any, identity: str, token: int, now: datetime
    ) -> None:
        spec = body.spec
        spec.holder_identity = identity
        spec.lease_duration_seconds = self.lease_duration_seconds
        spec.lease_transitions = token
        spec.acquire_time = _micro_time(now)
        spec.renew_time = _micro_time(now)

    def _next_token(self, record: Any) -> int:
        with _seen_lock:
            floor = _seen.get(self._seen_key, 0)
        current = 0
        if record is not None:
            current = max(_transitions(record), _annotated_token(record))
        token = max(current, floor) + 1

        if token > _INT32_MAX:
            raise ConfigError(
                f"{self._subject} has issued {current} tokens and"
                " spec.leaseTransitions is an int32; use a new Lease name with"
                " a fenced store whose recorded token is reset",
                lock_name=self.name,
                backend=self.backend,
            )
        return token

    def _granted(self, identity: str, record: Any) -> Grant:
        token = _transitions(record)
        with _seen_lock:
            _seen[self._seen_key] = max(_seen.get(self._seen_key, 0), token)
        return Grant(token, data=_Tenure(identity, token, record))

    # Renewal and release.

    def _renew(self, lease: Lease, timeout: float) -> bool:
        tenure: _Tenure = lease.data
        started = self.clock()
        with tenure.mutex:
            try:
                still_held = self._renew_tenure(tenure, started, timeout)
            except ConfigError as exc:
                self._log_denied(tenure, lease, exc)
                raise BackendUnavailable(
                    str(exc),
                    lock_name=self.name,
                    token=lease.token,
                    backend=self.backend,
                ) from exc
        if still_held:
            tenure.denial_logged = False
        return still_held

    def _renew_tenure(self, tenure: _Tenure, started: float, timeout: float) -> bool:
        # Fast path: one write, which succeeds if no other client changed
        # the object since the last write.
        try:
            tenure.record = self._replace(
                self._renewal(tenure.record), "renewal", timeout
            )
            return True
        except NotFound:
            return self._gone(tenure)
        except Conflict:
            pass

        try:
            fresh = self._read(self._budget(started, timeout))
        except NotFound:
            return self._gone(tenure)
        if _holder(fresh) != tenure.identity:
            log.info(
                "%s for lock %r (token %d) now names holder %s",
                self._subject,
                self.name,
                tenure.token,
                _holder(fresh) or "(none)",
            )
            return False

        tenure.record = fresh
        try:
            tenure.record = self._replace(
                self._renewal(fresh), "renewal", self._budget(started, timeout)
            )
        except NotFound:
            return self._gone(tenure)
        except Conflict as exc:
            raise BackendUnavailable(
                f"{self._subject} for lock {self.name!r} changed between a read and"
                f" the next write twice (HTTP 409): {exc}. Another client is"
                " writing the object; the renewal is retried.",
                lock_name=self.name,
                token=tenure.token,
                backend=self.backend,
            ) from exc
        return True

    def _renewal(self, record: Any) -> Any:
        body = copy.deepcopy(record)
        spec = body.spec
        spec.renew_time = _micro_time(self.wall_clock())
        spec.acquire_time = _micro_time(spec.acquire_time or self.wall_clock())
        return body

    def _gone(self, tenure: _Tenure) -> bool:
        log.info(
            "%s for lock %r (token %d) was deleted",
            self._subject,
            self.name,
            tenure.token,
        )
        return False

    def _log_denied(self, tenure: _Tenure, lease: Lease, exc: ConfigError) -> None:
        if tenure.denial_logged:
            return
        tenure.denial_logged = True
        log.error(
            "renewing lock %r (token %d) was rejected: %s The renewal is retried;"
            " the lease counts as lost at its deadline, %.2f s from now, unless"
            " access is restored.",
            self.name,
            tenure.token,
            exc,
            lease.remaining() or 0.0,
        )

    def _release(self, lease: Lease, timeout: float) -> bool:
        tenure: _Tenure = lease.data
        started = self.clock()
        with tenure.mutex:
            try:
                return self._release_tenure(tenure, started, timeout)
            except ConfigError as exc:
                # Reported as transient so that release() logs it and returns
                # False: the Lease then expires after leaseDurationSeconds.
                raise BackendUnavailable(
                    str(exc),
                    lock_name=self.name,
                    token=lease.token,
                    backend=self.backend,
                ) from exc

    def _release_tenure(self, tenure: _Tenure, started: float, timeout: float) -> bool:
        record = tenure.record
        for _ in range(3):
            if _holder(record) != tenure.identity:
                return False
            body = copy.deepcopy(record)
            spec = body.spec
            spec.holder_identity = None
            spec.acquire_time = None
            spec.renew_time = _micro_time(self.wall_clock())

            try:
                tenure.record = self._replace(
                    body, "release", self._budget(started, timeout)
                )
                return True
            except NotFound:
                return False
            except Conflict:
                pass

            try:
                record = self._read(self._budget(started, timeout))
            except NotFound:
                return False
        raise BackendUnavailable(
            f"{self._subject} for lock {self.name!r} kept changing during release"
            " (HTTP 409 three times); it expires after leaseDurationSeconds",
            lock_name=self.name,
            token=tenure.token,
            backend=self.backend,
        )

    # API calls.

    def _read(self, timeout: float) -> Any:
        return self._call(
            self._leases.read_namespaced_lease,
            self.lease_name,
            self.namespace,
            action="read",
            timeout=timeout,
        )

    def _replace(self, body: Any, purpose: str, timeout: float) -> Any:
        # body.metadata.resourceVersion is the precondition: the API server
        # returns 409 if the object changed since it was read.
        # NOTE: the body holds only the fields the installed client models,
        # so Lease fields added by a newer API server are dropped here.
        return self._call(
            self._leases.replace_namespaced_lease,
            self.lease_name,
            self.namespace,
            body,
            action=f"update ({purpose})",
            timeout=timeout,
        )

    def _call(
        self, function: Callable[..., Any], *args: Any, action: str, timeout: float
    ) -> Any:
        return call_api(
            function,
            *args,
            action=action,
            subject=self._subject,
            server=self._server,
            lock_name=self.name,
            _request_timeout=timeout,
        )

    def _budget(self, started: float, timeout: float) -> float:
        """Seconds left of ``timeout`` for the next call of one step."""
        remaining = timeout - (self.clock() - started)
        if remaining <= 0:
            raise BackendUnavailable(
                f"{self._subject} for lock {self.name!r}: the step ran out of its"
                f" {timeout:.2f} s before its next request",
                lock_name=self.name,
                backend=self.backend,
            )
        return remaining


def _holder(record: Any) -> str | None:
    holder = record.spec.holder_identity if record.spec is not None else None
    return holder or None


def _transitions(record: Any) -> int:
    value = record.spec.lease_transitions if record.spec is not None else None
    return value if isinstance(value, int) and value > 0 else 0


def _annotated_token(record: Any) -> int:
    annotations = record.metadata.annotations or {}
    try:
        return max(0, int(annotations.get(TOKEN_ANNOTATION, 0)))
    except (TypeError, ValueError):
        return 0


def _micro_time(moment: datetime) -> datetime:
    """Return ``moment`` in UTC as the API server's MicroTime accepts it.

    The API server parses MicroTime with a six-digit fraction, and the
    client serializes with ``datetime.isoformat()``, which drops a zero
    fraction. A time on an exact second is moved by one microsecond.
    """
    if moment.tzinfo is None:
        raise ConfigError(
            f"wall_clock returned the naive datetime {moment!r}; return an aware"
            " one, such as datetime.now(timezone.utc)",
            backend="kubernetes",
        )
    moment = moment.astimezone(timezone.utc)
    if moment.microsecond == 0:
        moment = moment.replace(microsecond=1)
    return moment

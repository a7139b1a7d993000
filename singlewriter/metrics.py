"""Prometheus metrics for certificate renewal and the lock behind it.

Metrics, all labelled with the certificate's lock ``name``:

``singlewriter_certificate_expiration_timestamp_seconds``
    Gauge: the live certificate's notAfter as a Unix timestamp, the same
    shape as cert-manager's ``certmanager_certificate_expiration_timestamp_seconds``
    so that existing alert rules (``... - time() < 7 * 86400``) carry over.
``singlewriter_renewals_total``
    Counter: renewals that committed a new certificate.
``singlewriter_renewal_failures_total``
    Counter: renewal attempts that ended in an error (not "not due" and
    not "lock held elsewhere").
``singlewriter_lock_held`` (also labelled ``backend``)
    Gauge: 1 while this process holds a live lease, evaluated when scraped
    or written, 0 otherwise.
``singlewriter_locks_lost_total`` (also labelled ``backend``)
    Counter: leases that ended without a release.

prometheus-client is optional (``pip install 'singlewriter[metrics]'``);
creating :class:`RenewalMetrics` without it raises ConfigError.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import weakref
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._errors import ConfigError
from ._lease import Lease
from ._lock import Lock

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = ["RenewalMetrics", "metrics_available"]

log = logging.getLogger(__name__)


def metrics_available() -> bool:
    """Return whether prometheus-client can be imported."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    return True


def _client() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:
        raise ConfigError(
            "metrics need prometheus-client, which is not installed; install it"
            " with pip install 'singlewriter[metrics]' or drop the metrics options"
        ) from exc
    return prometheus_client


class RenewalMetrics:
    """The renewal and lock metrics of one process, in their own registry.

    ``textfile``, when set, is rewritten atomically (write, fsync, rename)
    after every change, for node_exporter's textfile collector; name it
    ``*.prom``. Methods are safe to call from any thread, including the
    lease renewal thread.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        textfile: str | Path | None = None,
    ) -> None:
        client = _client()
        self.registry = registry if registry is not None else client.CollectorRegistry()
        self.textfile = Path(textfile) if textfile is not None else None
        self._write_lock = threading.RLock()
        self._leases: dict[tuple[str, str], weakref.WeakSet[Lease]] = {}
        self._server: Any = None

        self.expiration = client.Gauge(
            "singlewriter_certificate_expiration_timestamp_seconds",
            "notAfter of the live certificate, as a Unix timestamp in seconds.",
            ["name"],
            registry=self.registry,
        )
        self.renewals = client.Counter(
            "singlewriter_renewals",
            "Renewals that committed a new certificate.",
            ["name"],
            registry=self.registry,
        )
        self.renewal_failures = client.Counter(
            "singlewriter_renewal_failures",
            "Renewal attempts that ended in an error.",
            ["name"],
            registry=self.registry,
        )
        self.lock_held = client.Gauge(
            "singlewriter_lock_held",
            "1 while this process holds a live lease on the lock, else 0.",
            ["name", "backend"],
            registry=self.registry,
        )
        self.locks_lost = client.Counter(
            "singlewriter_locks_lost",
            "Leases that ended without a release: renewal refused or too late.",
            ["name", "backend"],
            registry=self.registry,
        )

    # Recording.

    def instrument(self, lock: Lock) -> Lock:
        """Count ``lock``'s lost leases and report whether one is held.

        Changes ``lock`` in place and returns it. Loss is counted through
        the lock's ``_lease_lost`` hook rather than ``Lease.on_lost``,
        because the code that holds a lease may replace its ``on_lost``.
        """
        key = (lock.name, lock.backend)
        leases = self._leases.setdefault(key, weakref.WeakSet())
        self.lock_held.labels(*key).set_function(lambda: _any_held(leases))
        self.locks_lost.labels(*key).inc(0)
        self.renewals.labels(lock.name).inc(0)
        self.renewal_failures.labels(lock.name).inc(0)

        acquire = lock.acquire
        lease_lost = lock._lease_lost

        def acquire_and_track(
            timeout: float | None = None, blocking: bool = True
        ) -> Lease:
            lease = acquire(timeout=timeout, blocking=blocking)
            leases.add(lease)
            self.flush()
            return lease

        def count_lost(lease: Lease) -> None:
            lease_lost(lease)
            self.locks_lost.labels(*key).inc()
            self.flush()

        # Instance attributes shadow the methods, and Lock.__enter__ calls
        # self.acquire, so with-blocks are tracked too.
        setattr(lock, "acquire", acquire_and_track)  # noqa: B010
        setattr(lock, "_lease_lost", count_lost)  # noqa: B010
        return lock

    def set_expiration(self, name: str, not_after: datetime) -> None:
        """Record the live certificate's notAfter (timezone-aware)."""
        self.expiration.labels(name).set(not_after.timestamp())
        self.flush()

    def renewal_succeeded(self, name: str) -> None:
        """Count a renewal that committed a new certificate."""
        self.renewals.labels(name).inc()
        self.flush()

    def renewal_failed(self, name: str) -> None:
        """Count a renewal attempt that ended in an error."""
        self.renewal_failures.labels(name).inc()
        self.flush()

    # Exposition.

    def render(self) -> bytes:
        """Return the metrics in the Prometheus text format."""
        client = _client()
        data: bytes = client.generate_latest(self.registry)
        return data

    def flush(self) -> None:
        """Rewrite the textfile, if one is set; log and go on if that fails."""
        if self.textfile is None:
            return
        from .keystore import atomic_write

        with self._write_lock:
            try:
                atomic_write(self.textfile, self.render(), mode=0o644)
            except OSError as exc:
                log.warning("could not write metrics to %s: %s", self.textfile, exc)

    def serve(self, port: int, address: str = "127.0.0.1") -> int:
        """Serve /metrics over HTTP on ``address``:``port`` from a daemon thread.

        Return the bound port (useful with port 0). Raise ConfigError when
        the address cannot be bound.
        """
        client = _client()
        try:
            server, _thread = client.start_http_server(
                port, addr=address, registry=self.registry
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {address}:{port}: {exc.strerror or exc};"
                f" {_bind_advice(exc)}"
            ) from exc
        self._server = server
        bound: int = server.server_address[1]
        log.info("serving metrics on http://%s:%d/metrics", address, bound)
        return bound

    def close(self) -> None:
        """Stop the HTTP server, if one runs, and write the textfile once more."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self.flush()


def _bind_advice(exc: OSError) -> str:
    if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
        return "give an IP address of this host with --metrics-address"
    if exc.errno == errno.EACCES:
        return "choose a port above 1023 with --metrics-port"
    return "choose a free port with --metrics-port"


def _any_held(leases: weakref.WeakSet[Lease]) -> float:
    return 1.0 if any(lease.held for lease in list(leases)) else 0.0

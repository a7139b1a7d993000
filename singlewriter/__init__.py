"""singlewriter: one writer of certificate key material at a time.

Fencing-token locks over flock, Redis, Consul and Kubernetes Leases. Every
acquisition returns a Lease whose ``token`` strictly increases, so a store
that checks tokens can reject a writer that no longer holds the lock.
"""

from __future__ import annotations

from ._decorator import single_writer
from ._errors import (
    BackendUnavailable,
    ConfigError,
    LockBusy,
    LockLost,
    LockTimeout,
    SingleWriterError,
    StaleTokenError,
    StoreError,
    VerificationError,
)
from ._lease import Lease
from ._lock import Busy, Grant, Lock
from ._scheduler import Scheduler
from ._signals import Terminated, raise_on_signals
from ._urls import lock_from_url
from .keystore import (
    REQUIRED_NAMES,
    DeployHook,
    FileSystem,
    Generation,
    KeyStore,
    atomic_write,
)

__version__ = "0.1.0"

# The ACME renewal needs the optional ``acme`` extra, so its names are
# imported on first use rather than with the package.
_ACME_NAMES = frozenset({"ACMEError", "RenewalResult", "renew"})


def __getattr__(name: str) -> object:
    if name in _ACME_NAMES:
        from . import acme

        return getattr(acme, name)
    raise AttributeError(f"module 'singlewriter' has no attribute {name!r}")


__all__ = [
    "REQUIRED_NAMES",
    "ACMEError",
    "BackendUnavailable",
    "Busy",
    "ConfigError",
    "DeployHook",
    "FileSystem",
    "Generation",
    "Grant",
    "KeyStore",
    "Lease",
    "Lock",
    "LockBusy",
    "LockLost",
    "LockTimeout",
    "RenewalResult",
    "Scheduler",
    "SingleWriterError",
    "StaleTokenError",
    "StoreError",
    "Terminated",
    "VerificationError",
    "atomic_write",
    "lock_from_url",
    "raise_on_signals",
    "renew",
    "single_writer",
]

"""The singlewriter exception hierarchy.

Every error the library raises on purpose derives from SingleWriterError::

    SingleWriterError
    ├── ConfigError (ValueError)            bad URL, parameter or path
    ├── LockTimeout (TimeoutError)          the lock stayed busy until the timeout
    ├── LockBusy                            non-blocking acquire found the lock held
    ├── LockLost                            a lease ended before its holder released it
    ├── StaleTokenError                     a store rejected a write with an old token
    ├── BackendUnavailable (ConnectionError)
    │                                       the backend did not answer in time
    └── StoreError (OSError)                a key store could not commit or read
        └── VerificationError (ValueError)  key material failed a check before publish

Client-library errors (redis, consul, kubernetes, OSError) are translated into
these by each backend and chained with ``raise ... from``.
"""

from __future__ import annotations

__all__ = [
    "BackendUnavailable",
    "ConfigError",
    "LockBusy",
    "LockLost",
    "LockTimeout",
    "SingleWriterError",
    "StaleTokenError",
    "StoreError",
    "VerificationError",
]


class SingleWriterError(Exception):
    """Base class of every error raised by singlewriter.

    ``lock_name``, ``token`` and ``backend`` are set where they are known.
    """

    def __init__(
        self,
        message: str,
        *,
        lock_name: str | None = None,
        token: int | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__(message)
        self.lock_name = lock_name
        self.token = token
        self.backend = backend


class ConfigError(SingleWriterError, ValueError):
    """A lock URL, parameter or path is invalid.

    Nothing was acquired and nothing was written. Retrying with the same
    input fails the same way: fix the value the message names.
    """


class LockTimeout(SingleWriterError, TimeoutError):
    """Another holder kept the lock for the whole timeout.

    The lock is not held by the caller. Retrying later is safe.
    """


class LockBusy(SingleWriterError):
    """A non-blocking acquire found the lock held by someone else.

    The lock is not held by the caller. Retrying later is safe.
    """


class LockLost(SingleWriterError):
    """The lease ended before its holder released it.

    The renewal failed, the backend reported another holder, or the local
    deadline passed. Another process may hold the lock now, so the caller
    must stop any fenced work at once. Acquiring again gives a new token.
    """


class StaleTokenError(SingleWriterError):
    """A fenced store rejected a write whose token is lower than one it has seen.

    The writer is no longer the current holder. Nothing was changed; do not
    retry with the same token.
    """


class BackendUnavailable(SingleWriterError, ConnectionError):
    """The lock backend did not respond in time, or responded with an error.

    Whether the lock is held is unknown to the caller of acquire: a lease
    that was granted but not reported expires on its ttl. A holder that
    cannot reach its backend declares the lease lost at its deadline.
    Retrying is safe.
    """


class StoreError(SingleWriterError, OSError):
    """A key store could not commit or read its files.

    A failed commit leaves the previously published set in place. The
    commit is not retried in place: call commit again with fresh data.
    """


class VerificationError(StoreError, ValueError):
    """Key material failed a check before it was published.

    The PEM did not parse, the key does not match the certificate, the
    certificate is not valid now, or the chain is out of order. Nothing was
    published; retrying with the same input fails the same way.
    """

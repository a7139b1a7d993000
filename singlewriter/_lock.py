"""The lock base class that every backend extends.

A backend implements three steps and the base class does the rest: waiting,
timeouts, bounded retries of transient errors, renewal and loss detection.

``_try_acquire(timeout, owner)``
    One attempt. Return a ``Grant`` with the new token, or ``Busy`` when
    another holder has the lock. Raise BackendUnavailable on transient errors.
    ``owner`` is random and the same for every attempt of one ``acquire()``
    call, so a backend can recognise a grant whose reply was lost.
``_renew(lease, timeout)``
    Extend the lease. Return False when the backend no longer holds it for
    this lease. Only called when ``renews`` is True.
``_release(lease, timeout)``
    Free the lock if this lease still holds it. Return whether it did.
"""

from __future__ import annotations

import abc
import contextvars
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import tenacity

from ._errors import BackendUnavailable, ConfigError, LockBusy, LockTimeout
from ._lease import Lease, LostCallback
from ._names import validate_name
from ._scheduler import Scheduler, default_scheduler
from ._scheduler import backoff as _backoff

__all__ = ["Busy", "Grant", "Lock"]

log = logging.getLogger("singlewriter.lock")

# Leases taken by ``with lock as lease:``. A context variable keeps each
# thread's and each asyncio task's leases apart, so one ``with`` block never
# releases a lease that another thread or task acquired on the same lock.
# The pause before the first retry of a failed call; later retries back off.
_FIRST_RETRY_DELAY = 0.05

# The ttl range of leases that expire: below 0.1 s a lease is lost before
# its first renewal on a busy host, and 30 days bounds every backend's
# expiry arithmetic (Redis PX in ms, Kubernetes int32 seconds).
_MIN_TTL = 0.1
_MAX_TTL = 30 * 24 * 3600.0

# The shortest time one backend call of an acquisition attempt is given.
_MIN_CALL_TIMEOUT = 1.0

_entered: contextvars.ContextVar[tuple[Lease, ...]] = contextvars.ContextVar(
    "singlewriter_entered", default=()
)


@dataclass(frozen=True)
class Grant:
    """A successful acquisition attempt."""

    token: int
    data: Any = None


@dataclass(frozen=True)
class Busy:
    """A failed attempt: another holder has the lock.

    ``retry_after`` is the backend's hint, in seconds, of when the lock may
    be free (for example the remaining ttl), or None.
    """

    retry_after: float | None = None
    holder: str | None = None


class Lock(abc.ABC):
    """A named mutual-exclusion lock that hands out fencing tokens.

    ``ttl`` (seconds) is how long a lease lives on the backend without a
    renewal. The holder renews every ``renew_interval`` (default ttl/3). It
    counts its lease as lost ``safety_margin`` (default ttl/10) before the
    ttl runs out, measured from when the last successful renewal was sent.
    ``poll_interval`` caps the wait between attempts while blocked.

    A lock object may be shared by threads: every ``acquire()`` returns a
    new Lease and nothing about a lease is stored on the lock.
    """

    #: Short backend name used in messages and metrics.
    backend = "base"

    #: Whether leases expire on the backend and need renewal.
    renews = True

    def __init__(
        self,
        name: str,
        *,
        ttl: float | None = 30.0,
        renew_interval: float | None = None,
        safety_margin: float | None = None,
        poll_interval: float = 0.2,
        operation_timeout: float = 5.0,
        retry_attempts: int = 5,
        on_lost: LostCallback | None = None,
        scheduler: Scheduler | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.name = validate_name(name)
        self.ttl = _check_ttl(ttl, self.renews, name)
        self.renew_interval = _positive(
            "renew_interval", renew_interval, (self.ttl or 0) / 3, name
        )
        self.safety_margin = _non_negative(
            "safety_margin", safety_margin, (self.ttl or 0) / 10, name
        )
        if self.ttl is not None and self.renews:
            _check_timing(self.ttl, self.renew_interval, self.safety_margin, name)
        self.poll_interval = _positive("poll_interval", poll_interval, 0.2, name)
        self.operation_timeout = _positive(
            "operation_timeout", operation_timeout, 5.0, name
        )
        if retry_attempts < 1:
            raise ConfigError(
                f"retry_attempts={retry_attempts!r} for lock {name!r} is invalid;"
                " use 1 or more",
                lock_name=name,
            )
        self.retry_attempts = retry_attempts
        self.on_lost = on_lost
        self._scheduler = scheduler
        self.sleep = sleep

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} ttl={self.ttl}>"

    @property
    def scheduler(self) -> Scheduler:
        """The scheduler that renews this lock's leases."""
        if self._scheduler is None:
            self._scheduler = default_scheduler()
        return self._scheduler

    @property
    def clock(self) -> Callable[[], float]:
        """The monotonic clock deadlines are measured on."""
        return self.scheduler.clock

    # Public API.

    def acquire(self, timeout: float | None = None, blocking: bool = True) -> Lease:
        """Acquire the lock and return a new Lease.

        ``timeout`` (seconds) bounds the wait when ``blocking``; None waits
        until the lock is free. The last attempt may end up to one second
        (one backend call) after the timeout. Raise LockTimeout when it runs
        out, LockBusy when ``blocking`` is False and another holder has the
        lock, and BackendUnavailable when transient errors persist past the
        retries.
        """
        if timeout is not None and not _is_seconds(timeout, allow_zero=True):
            raise ConfigError(
                f"timeout={timeout!r} for lock {self.name!r} is invalid; use a"
                " number of seconds >= 0, or None to wait without limit",
                lock_name=self.name,
                backend=self.backend,
            )
        clock = self.clock
        started = clock()
        give_up_at = math.inf if timeout is None else started + timeout
        owner = secrets.token_hex(16)
        waits = 0

        while True:
            sent = clock()
            try:
                result = self._attempt(give_up_at, owner)
            except Exception:
                raise
            except BaseException:
                # A signal (Terminated, KeyboardInterrupt) may have arrived
                # after the backend granted the lock but before the reply
                # was read: give back whatever this owner may hold.
                self._abandon_attempt(owner)
                raise
            if isinstance(result, Grant):
                return self._grant(result, sent)

            if not blocking:
                raise self._busy_error(result)
            now = clock()
            if now >= give_up_at:
                raise self._timeout_error(timeout, result)

            waits += 1
            self.sleep(self._wait_time(result, waits, give_up_at - now))

    def __enter__(self) -> Lease:
        lease = self.acquire()
        try:
            _entered.set((*_entered.get(), lease))
        except BaseException:
            # __exit__ does not run when __enter__ raises.
            lease.release()
            raise
        return lease

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack = _entered.get()
        for index in range(len(stack) - 1, -1, -1):
            if stack[index].lock is self:
                lease = stack[index]
                _entered.set(stack[:index] + stack[index + 1 :])
                lease.release()
                return
        log.warning(
            "lock %r left a with-block that was entered in another thread, task"
            " or context, so no lease was released here; release the lease that"
            " `with lock as lease:` returned with lease.release() instead",
            self.name,
        )

    # Steps each backend implements.

    @abc.abstractmethod
    def _try_acquire(self, timeout: float, owner: str) -> Grant | Busy:
        """Make one acquisition attempt."""

    def _renew(self, lease: Lease, timeout: float) -> bool:
        """Extend ``lease``. Return False if it is no longer the holder."""
        raise NotImplementedError(f"{self.backend} locks do not renew")

    @abc.abstractmethod
    def _release(self, lease: Lease, timeout: float) -> bool:
        """Free the lock if ``lease`` still holds it; return whether it did."""

    def _abandon_attempt(self, owner: str) -> None:
        """Free the lock if an interrupted attempt of ``owner`` got it.

        Best effort, for backends whose grant could be lost with its reply;
        the default does nothing and the lock expires on its ttl.
        """
        return None

    def _check_held(self, lease: Lease) -> str | None:
        """Return why ``lease`` is certainly no longer held, or None.

        Called by ``Lease.ensure_held()``; it must be cheap and make no
        network call.
        """
        return None

    def _lease_lost(self, lease: Lease) -> None:
        """Hook for backends and metrics: ``lease`` was just marked lost."""
        return None

    # Machinery shared by every backend.

    def _attempt(self, give_up_at: float, owner: str) -> Grant | Busy:
        """Run one attempt, retrying transient errors a bounded number of times."""
        # The first try runs without tenacity: building a Retrying object
        # costs more than a Redis round trip, and most attempts succeed.
        try:
            return self._try_acquire(self._call_timeout(give_up_at), owner)
        except BackendUnavailable as exc:
            if self.retry_attempts == 1 or self.clock() >= give_up_at:
                raise
            self._log_failure("acquiring", 1, exc)
            self.sleep(_FIRST_RETRY_DELAY)

        clock = self.clock

        def stop_retrying(state: tenacity.RetryCallState) -> bool:
            attempts = state.attempt_number + 1
            return attempts >= self.retry_attempts or clock() >= give_up_at

        retrying = tenacity.Retrying(
            stop=stop_retrying,
            wait=_backoff(2.0),
            retry=tenacity.retry_if_exception_type(BackendUnavailable),
            sleep=self.sleep,
            before_sleep=lambda state: self._log_retry("acquiring", state),
            reraise=True,
        )
        return retrying(
            lambda: self._try_acquire(self._call_timeout(give_up_at), owner)
        )

    def _call_timeout(self, give_up_at: float) -> float:
        # A call cut short by the caller's timeout would turn "busy" into a
        # spurious BackendUnavailable. So the last attempt still gets up to
        # one second, and acquire() may return that much after its timeout.
        remaining = give_up_at - self.clock()
        return min(self.operation_timeout, max(remaining, _MIN_CALL_TIMEOUT))

    def _log_retry(self, action: str, state: tenacity.RetryCallState) -> None:
        outcome = state.outcome
        error = outcome.exception() if outcome is not None else None
        self._log_failure(action, state.attempt_number + 1, error)

    def _log_failure(self, action: str, attempt: int, error: object) -> None:
        log.warning(
            "%s lock %r (%s) failed on attempt %d of %d, retrying: %s",
            action,
            self.name,
            self.backend,
            attempt,
            self.retry_attempts,
            error,
        )

    def _grant(self, grant: Grant, sent: float) -> Lease:
        lease = Lease(self, grant.token, sent_at=sent, data=grant.data)
        try:
            lease.on_lost = self.on_lost
            if self.renews and self.ttl is not None:
                self.scheduler.register(lease)
        except BaseException:
            lease.release()
            raise
        log.info(
            "acquired lock %r (%s) with token %d", self.name, self.backend, grant.token
        )
        return lease

    def _release_lease(self, lease: Lease) -> bool:
        try:
            return self._release_with_retries(lease)
        except BackendUnavailable as exc:
            log.warning(
                "could not release lock %r (token %d): %s. The backend frees it"
                " when its ttl of %s s runs out.",
                self.name,
                lease.token,
                exc,
                self.ttl,
            )
            return False

    def _release_with_retries(self, lease: Lease) -> bool:
        try:
            return self._release(lease, self.operation_timeout)
        except BackendUnavailable as exc:
            if self.retry_attempts == 1:
                raise
            self._log_failure("releasing", 1, exc)
            self.sleep(_FIRST_RETRY_DELAY)

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.retry_attempts - 1),
            wait=_backoff(1.0),
            retry=tenacity.retry_if_exception_type(BackendUnavailable),
            sleep=self.sleep,
            before_sleep=lambda state: self._log_retry("releasing", state),
            reraise=True,
        )
        return retrying(self._release, lease, self.operation_timeout)

    def _wait_time(self, busy: Busy, waits: int, remaining: float) -> float:
        # Back off from 10 ms up to poll_interval, so that a release is seen
        # quickly without hammering the backend. Never sleep past the
        # backend's own hint or the caller's timeout.
        delay: float = min(self.poll_interval, 0.01 * 2.0 ** min(waits, 16))
        if busy.retry_after is not None:
            delay = min(delay, max(busy.retry_after, 0.001))
        return min(delay, remaining)

    def _busy_error(self, busy: Busy) -> LockBusy:
        holder = f" by {busy.holder}" if busy.holder else ""
        return LockBusy(
            f"lock {self.name!r} ({self.backend}) is held{holder}; try again later"
            " or acquire with blocking=True",
            lock_name=self.name,
            backend=self.backend,
        )

    def _timeout_error(self, timeout: float | None, busy: Busy) -> LockTimeout:
        holder = f" by {busy.holder}" if busy.holder else ""
        return LockTimeout(
            f"lock {self.name!r} ({self.backend}) stayed held{holder} for the whole"
            f" timeout of {timeout} s; try again later or raise the timeout",
            lock_name=self.name,
            backend=self.backend,
        )


def _is_seconds(value: object, *, allow_zero: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if not math.isfinite(value):
        return False
    return value >= 0 if allow_zero else value > 0


def _check_ttl(ttl: float | None, renews: bool, name: str) -> float | None:
    if ttl is None:
        if renews:
            raise ConfigError(
                f"lock {name!r} needs a ttl: a lock without expiry stays held"
                " forever after its holder is killed. Pass ttl in seconds, for"
                " example ttl=30.",
                lock_name=name,
            )
        return None
    seconds = _positive("ttl", ttl, 30.0, name)
    if renews and not _MIN_TTL <= seconds <= _MAX_TTL:
        raise ConfigError(
            f"ttl={ttl!r} for lock {name!r} is out of range; use {_MIN_TTL} to"
            f" {_MAX_TTL:.0f} seconds (30 days)",
            lock_name=name,
        )
    return seconds


def _positive(field: str, value: float | None, default: float, name: str) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(
            f"{field}={value!r} for lock {name!r} is invalid; use a number of"
            " seconds greater than 0",
            lock_name=name,
        )
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(
            f"{field}={value!r} for lock {name!r} is invalid; use a finite number"
            " of seconds greater than 0",
            lock_name=name,
        )
    return float(value)


def _non_negative(field: str, value: float | None, default: float, name: str) -> float:
    if value == 0:
        return 0.0
    return _positive(field, value, default, name)


def _check_timing(ttl: float, renew_interval: float, margin: float, name: str) -> None:
    if margin >= ttl:
        raise ConfigError(
            f"lock {name!r}: safety_margin={margin} s must be shorter than the"
            f" ttl of {ttl} s",
            lock_name=name,
        )

    # The holder must renew at least once before it would count its own
    # lease as lost, with room for one retry in between.
    if renew_interval >= ttl - margin:
        raise ConfigError(
            f"lock {name!r}: renew_interval={renew_interval} s must be shorter"
            f" than ttl - safety_margin = {ttl - margin} s; use a renew_interval"
            " of about ttl/3",
            lock_name=name,
        )

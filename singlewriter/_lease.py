"""A lease: one acquisition of a lock, with its fencing token."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ._errors import LockLost

if TYPE_CHECKING:
    from ._lock import Lock

__all__ = ["Lease"]

log = logging.getLogger("singlewriter.lease")

LostCallback = Callable[["Lease"], None]

_HELD, _RELEASED, _LOST = "held", "released", "lost"


class Lease:
    """One acquisition of a lock, returned by ``Lock.acquire()``.

    Every acquisition gets its own lease object, so threads or tasks that
    share a lock can never release each other's lease.

    ``token`` is the fencing token: an int strictly greater than every token
    issued before for the same lock name. The token protects data only where
    the store that receives a write checks it (``KeyStore.commit`` does).

    ``lost`` is set, and ``on_lost`` called from the renewal thread, when the
    lease ends without ``release()``: a renewal was refused or the deadline
    passed. ``ensure_held()`` checks the deadline on the caller's own clock,
    so it raises even if the renewal thread has not run yet, for example
    right after the process resumes from SIGSTOP.
    """

    def __init__(
        self,
        lock: Lock,
        token: int,
        *,
        sent_at: float,
        data: Any = None,
        on_lost: LostCallback | None = None,
    ) -> None:
        self.lock = lock
        self.name = lock.name
        self.backend = lock.backend
        self.token = token
        self.lost = threading.Event()
        self.lost_reason: str | None = None
        self.acquired_at = sent_at

        # Backend-specific state, such as the owner value stored in Redis.
        self.data = data

        self._on_lost = on_lost
        self._mutex = threading.Lock()
        self._state = _HELD
        self._pid = os.getpid()
        self._failures = 0
        self._renewing = False
        self._schedule_sequence = 0
        self._deadline: float | None = None
        self._renew_at = float("inf")
        if lock.ttl is not None and lock.renews:
            self._renewed(sent_at)

    def __repr__(self) -> str:
        return (
            f"<Lease {self.backend}:{self.name!r} token={self.token}"
            f" state={self._state}>"
        )

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    @property
    def on_lost(self) -> LostCallback | None:
        """Callback run once, in a new thread, when the lease is lost."""
        return self._on_lost

    @on_lost.setter
    def on_lost(self, callback: LostCallback | None) -> None:
        self._on_lost = callback

        # A lease that was lost before the callback was set still reports it.
        if callback is not None and self.lost.is_set():
            self._call_on_lost(callback)

    @property
    def held(self) -> bool:
        """Whether the lease is held now, by the local deadline and state."""
        try:
            self.ensure_held()
        except LockLost:
            return False
        return True

    @property
    def deadline(self) -> float | None:
        """Monotonic time at which the lease counts as lost, None if it never
        expires (flock)."""
        return self._deadline

    def remaining(self) -> float | None:
        """Seconds left before the deadline, None for leases without one."""
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - self.lock.clock())

    def ensure_held(self) -> None:
        """Raise LockLost unless this process still holds the lease.

        Call it right before each fenced step. It makes no network call: it
        checks the state the renewal thread keeps and the deadline against
        the monotonic clock.
        """
        if self._pid != os.getpid():
            raise self._lost_error(
                f"this lease belongs to process {self._pid}, not to this forked"
                " child; acquire the lock in the child instead"
            )
        if self._state == _RELEASED:
            raise self._lost_error("the lease was already released")
        if self._deadline is not None and self.lock.clock() >= self._deadline:
            self._mark_lost("the lease deadline passed without a renewal")
        if self._state == _HELD:
            reason = self.lock._check_held(self)
            if reason is not None:
                self._mark_lost(reason)
        if self._state == _LOST:
            raise self._lost_error(f"the lease was lost: {self.lost_reason}")

    def release(self) -> bool:
        """Release the lock so that a waiter can take it at once.

        Return True if this call freed the lock. Return False, changing
        nothing on the backend, when the lease was already released, was
        lost to another holder, or belongs to the parent of a forked child.
        """
        if self._pid != os.getpid():
            log.warning(
                "not releasing lock %r (token %d): the lease belongs to process"
                " %d and this is its forked child %d",
                self.name,
                self.token,
                self._pid,
                os.getpid(),
            )
            return False

        with self._mutex:
            previous = self._state
            self._state = _RELEASED
        if previous == _RELEASED:
            log.debug("lock %r (token %d) was already released", self.name, self.token)
            return False

        freed = self.lock._release_lease(self)
        if freed:
            log.info("released lock %r (token %d)", self.name, self.token)
        elif previous == _HELD:
            log.warning(
                "release of lock %r (token %d) changed nothing: this lease was no"
                " longer the holder",
                self.name,
                self.token,
            )
        return freed

    def _lost_error(self, reason: str) -> LockLost:
        return LockLost(
            f"lock {self.name!r} ({self.backend}, token {self.token}) is not held:"
            f" {reason}. Stop the fenced work now and acquire the lock again.",
            lock_name=self.name,
            token=self.token,
            backend=self.backend,
        )

    # The methods below are called by the scheduler and the backends.

    def _active(self) -> bool:
        return self._state == _HELD and self._pid == os.getpid()

    def _next_event(self) -> float:
        if self._deadline is None:
            return self._renew_at
        if self._renewing:
            return self._deadline
        return min(self._renew_at, self._deadline)

    def _call_timeout(self, now: float) -> float:
        """Seconds a single backend call may take without passing the deadline."""
        if self._deadline is None:
            return self.lock.operation_timeout
        return max(0.001, min(self.lock.operation_timeout, self._deadline - now))

    def _renewed(self, sent_at: float) -> None:
        ttl = self.lock.ttl
        assert ttl is not None
        self._failures = 0
        self._deadline = sent_at + ttl - self.lock.safety_margin
        self._renew_at = sent_at + self.lock.renew_interval

    def _mark_lost(self, reason: str) -> None:
        with self._mutex:
            if self._state != _HELD:
                return
            self._state = _LOST
            self.lost_reason = reason
        self.lost.set()
        log.warning(
            "lost lock %r (%s, token %d): %s",
            self.name,
            self.backend,
            self.token,
            reason,
        )
        self.lock._lease_lost(self)
        callback = self._on_lost
        if callback is not None:
            # A thread of its own, so that a slow callback cannot delay the
            # renewal of other leases on the shared scheduler thread.
            threading.Thread(
                target=self._call_on_lost,
                args=(callback,),
                name=f"singlewriter-on-lost-{self.name}",
                daemon=True,
            ).start()

    def _call_on_lost(self, callback: LostCallback) -> None:
        try:
            callback(self)
        except Exception:
            log.exception("on_lost callback for lock %r raised", self.name)

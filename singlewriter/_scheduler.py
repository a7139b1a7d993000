"""One background thread per process that renews every held lease.

Rules the scheduler keeps for each registered lease:

- A renewal is due ``renew_interval`` seconds after the last successful
  renewal was *sent*.
- A successful renewal moves the lease deadline to ``sent + ttl - margin``.
  The deadline is measured from the moment the request left this process,
  never from when the reply came back, because the backend starts its own
  expiry timer somewhere in between.
- A renewal that fails transiently is retried with capped exponential
  backoff; the retry never lands after the deadline.
- A renewal the backend refuses (another holder, key gone) marks the lease
  lost at once.
- When the deadline passes with no successful renewal the lease is lost,
  whatever the backend reports later. The scheduler thread only keeps
  time: renewal calls run on a small shared pool of worker threads, so a
  call that hangs cannot delay the loss of its own lease, nor the renewal
  of other leases.

The scheduler keeps weak references: a lease that its caller dropped without
releasing stops being renewed and expires on the backend after its ttl.
"""

from __future__ import annotations

import heapq
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from tenacity import RetryCallState, Retrying
from tenacity.wait import wait_base, wait_exponential, wait_random

from ._errors import BackendUnavailable

if TYPE_CHECKING:
    from ._lease import Lease

__all__ = ["Scheduler", "backoff", "default_scheduler"]

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class Scheduler:
    """Renews leases and enforces their deadlines from one daemon thread.

    ``clock`` must be monotonic. Tests may drive a scheduler by hand with
    ``run_due()`` instead of starting its thread; renewals then run inline.
    """

    def __init__(self, clock: Clock = time.monotonic, *, autostart: bool = True):
        self.clock = clock
        self._autostart = autostart
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, weakref.ref[Lease]]] = []
        self._sequence = 0
        self._thread: threading.Thread | None = None
        self._wake_at = float("inf")
        self._backoff = backoff(2.0)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0

    def register(self, lease: Lease) -> None:
        """Start renewing ``lease``; its first renewal is due per its schedule."""
        with self._cond:
            self._push(lease, lease._next_event())
            if self._autostart and self._thread is None:
                self._start_thread()

    def wake(self, lease: Lease) -> None:
        """Re-examine ``lease`` now, for example after a reconnect."""
        with self._cond:
            lease._renew_at = self.clock()
            self._push(lease, lease._renew_at)

    def _push(self, lease: Lease, due: float) -> None:
        # Each push supersedes the lease's earlier heap entries, which are
        # skipped when popped because their sequence number is out of date.
        self._sequence += 1
        lease._schedule_sequence = self._sequence
        heapq.heappush(self._heap, (due, self._sequence, weakref.ref(lease)))

        # Waking the thread costs a context switch, so only do it when this
        # lease is due before the time the thread already sleeps until.
        if due < self._wake_at:
            self._cond.notify()

    def _start_thread(self) -> None:
        thread = threading.Thread(
            target=self._run, name="singlewriter-renewal", daemon=True
        )
        self._thread = thread
        thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                delay = self._next_delay()
                self._wake_at = self.clock() + delay
                self._cond.wait(timeout=min(delay, 3600.0))
                self._wake_at = float("inf")
            self.run_due()

    def _next_delay(self) -> float:
        if not self._heap:
            return 3600.0
        return max(0.0, self._heap[0][0] - self.clock())

    def run_due(self) -> None:
        """Renew or expire every lease whose next event is due now."""
        while True:
            with self._cond:
                if not self._heap or self._heap[0][0] > self.clock():
                    return
                _, sequence, ref = heapq.heappop(self._heap)
            lease = ref()
            if lease is None or lease._schedule_sequence != sequence:
                continue
            if not lease._active():
                continue
            self._service(lease)
            if lease._active():
                with self._cond:
                    self._push(lease, lease._next_event())

    def _service(self, lease: Lease) -> None:
        now = self.clock()
        if lease._deadline is not None and now >= lease._deadline:
            lease._mark_lost("no renewal succeeded before the lease deadline")
            return
        if lease._renewing or now < lease._renew_at:
            return

        lease._renewing = True
        pool = self._renewal_pool()
        if pool is None:
            self._renew(lease)
        else:
            pool.submit(self._renew, lease)

    def _renewal_pool(self) -> ThreadPoolExecutor | None:
        if not self._autostart:
            return None
        # Worker threads do not survive fork, so a child needs a new pool.
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ThreadPoolExecutor(
                max_workers=_RENEWAL_WORKERS, thread_name_prefix="singlewriter-renew"
            )
            self._pool_pid = os.getpid()
        return self._pool

    def _renew(self, lease: Lease) -> None:
        sent = self.clock()
        error: Exception | None = None
        still_held = False
        try:
            still_held = lease.lock._renew(lease, lease._call_timeout(sent))
        except BackendUnavailable as exc:
            error = exc
        except Exception as exc:  # a backend bug must not kill the worker
            log.exception("unexpected error renewing lock %r", lease.name)
            error = exc
        finally:
            lease._renewing = False

        # The scheduler thread may have marked the lease lost meanwhile, at
        # its deadline; a late reply then changes nothing.
        if not lease._active():
            return
        if error is not None:
            self._schedule_retry(lease, error)
        elif not still_held:
            lease._mark_lost("the backend reports the lease is no longer held")
            return
        else:
            lease._renewed(sent)

        if self._autostart:
            with self._cond:
                self._push(lease, lease._next_event())

    def _schedule_retry(self, lease: Lease, exc: BaseException) -> None:
        lease._failures += 1
        state = RetryCallState(Retrying(), None, (), {})
        state.attempt_number = lease._failures
        delay = self._backoff(state)
        now = self.clock()
        deadline = lease._deadline if lease._deadline is not None else now + delay
        if now >= deadline:
            lease._mark_lost(f"no renewal succeeded before the lease deadline: {exc}")
            return
        lease._renew_at = min(now + delay, deadline)
        log.warning(
            "renewing lock %r (token %d) failed, attempt %d, retrying in %.2f s,"
            " %.2f s left before the lease counts as lost: %s",
            lease.name,
            lease.token,
            lease._failures,
            lease._renew_at - now,
            deadline - now,
            exc,
        )


# Threads that make the renewal calls of every lease in the process. There
# is more than one, so that one hung backend call does not block the others.
_RENEWAL_WORKERS = 4

_default: Scheduler | None = None
_default_lock = threading.Lock()


def default_scheduler() -> Scheduler:
    """Return the process-wide scheduler, created on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Scheduler()
        return _default


def _forget_after_fork() -> None:
    # The renewal thread does not survive fork. The child starts a fresh
    # scheduler on demand; the parent's leases are not the child's to renew.
    global _default, _default_lock
    _default = None
    _default_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


def backoff(maximum: float) -> wait_base:
    """Return the wait strategy for retries of transient backend errors.

    Exponential from 50 ms, capped at ``maximum`` seconds, plus up to 50 ms
    of jitter so that contenders that failed together do not retry together.
    """
    return wait_exponential(multiplier=0.05, max=maximum) + wait_random(0, 0.05)

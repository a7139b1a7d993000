"""Lease deadlines, renewal and loss, driven by a fake clock.

These tests use an in-memory backend because they check the scheduler's
timing rules, not a backend; the guarantees against real servers are in
test_contract.py.
"""

from __future__ import annotations

import gc
import logging
import threading
import time

import pytest

import singlewriter
from singlewriter import BackendUnavailable, Busy, Grant, Lease, Lock, Scheduler


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class MemoryLock(Lock):
    """A lock whose renew outcome each test scripts."""

    backend = "memory"

    def __init__(self, name: str, **options: object) -> None:
        super().__init__(name, **options)  # type: ignore[arg-type]
        self.holder: str | None = None
        self.token = 0
        self.renew_results: list[bool | Exception] = []
        self.renew_calls = 0

    def _try_acquire(self, timeout: float, owner: str) -> Grant | Busy:
        if self.holder is not None:
            return Busy(retry_after=0.01)
        self.holder = owner
        self.token += 1
        return Grant(self.token, data=owner)

    def _renew(self, lease: Lease, timeout: float) -> bool:
        self.renew_calls += 1
        outcome = self.renew_results.pop(0) if self.renew_results else True
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def _release(self, lease: Lease, timeout: float) -> bool:
        if self.holder != lease.data:
            return False
        self.holder = None
        return True


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def scheduler(clock: FakeClock) -> Scheduler:
    return Scheduler(clock, autostart=False)


def make_lock(scheduler: Scheduler, ttl: float = 30.0) -> MemoryLock:
    return MemoryLock("example.com", ttl=ttl, scheduler=scheduler, sleep=lambda s: None)


def test_deadline_is_ttl_minus_margin_from_send(
    clock: FakeClock, scheduler: Scheduler
) -> None:
    """The deadline counts from when the acquisition was sent."""
    lease = make_lock(scheduler).acquire()
    assert lease.deadline == pytest.approx(1000.0 + 30.0 - 3.0)
    assert lease.remaining() == pytest.approx(27.0)


def test_ensure_held_raises_after_deadline_without_scheduler(
    clock: FakeClock, scheduler: Scheduler
) -> None:
    """ensure_held() checks the clock itself, as after a SIGSTOP."""
    lease = make_lock(scheduler).acquire()
    lease.ensure_held()

    clock.advance(27.0)
    with pytest.raises(singlewriter.LockLost) as lost:
        lease.ensure_held()
    assert lost.value.token == lease.token
    assert lease.lost.is_set()


def test_successful_renewal_moves_deadline(
    clock: FakeClock, scheduler: Scheduler
) -> None:
    """A renewal is due at ttl/3 and extends the deadline from its send time."""
    lock = make_lock(scheduler)
    lease = lock.acquire()

    clock.advance(9.9)
    scheduler.run_due()
    assert lock.renew_calls == 0

    clock.advance(0.2)
    scheduler.run_due()
    assert lock.renew_calls == 1
    assert lease.deadline == pytest.approx(1010.1 + 27.0)


def test_refused_renewal_marks_lost_and_calls_back(
    clock: FakeClock, scheduler: Scheduler, caplog: pytest.LogCaptureFixture
) -> None:
    """A renewal the backend refuses loses the lease at once."""
    lock = make_lock(scheduler)
    lease = lock.acquire()
    seen: list[Lease] = []
    called = threading.Event()

    def on_lost(lost: Lease) -> None:
        seen.append(lost)
        called.set()

    lease.on_lost = on_lost
    lock.renew_results = [False]

    clock.advance(10.0)
    with caplog.at_level(logging.WARNING, logger="singlewriter"):
        scheduler.run_due()

    assert lease.lost.is_set()
    assert called.wait(timeout=10)
    assert seen == [lease]
    assert "lost lock 'example.com'" in caplog.text
    with pytest.raises(singlewriter.LockLost):
        lease.ensure_held()


def test_transient_failures_retry_until_deadline(
    clock: FakeClock, scheduler: Scheduler, caplog: pytest.LogCaptureFixture
) -> None:
    """Unavailable backends are retried with backoff, then the lease is lost."""
    lock = make_lock(scheduler, ttl=3.0)
    lease = lock.acquire()
    lock.renew_results = [BackendUnavailable("down")] * 1000

    with caplog.at_level(logging.WARNING, logger="singlewriter"):
        for _ in range(400):
            clock.advance(0.05)
            scheduler.run_due()

    assert lock.renew_calls > 3
    assert lease.lost.is_set()
    assert "no renewal succeeded before the lease deadline" in (lease.lost_reason or "")
    assert "retrying in" in caplog.text


def test_retry_that_succeeds_keeps_lease(
    clock: FakeClock, scheduler: Scheduler
) -> None:
    """One failed renewal followed by a success keeps the lease held."""
    lock = make_lock(scheduler, ttl=3.0)
    lease = lock.acquire()
    lock.renew_results = [BackendUnavailable("blip"), True]

    for _ in range(40):
        clock.advance(0.05)
        scheduler.run_due()

    assert lock.renew_calls == 2
    assert lease.held


def test_blocking_on_lost_does_not_stall_renewals(
    clock: FakeClock, scheduler: Scheduler
) -> None:
    """One callback that never returns must not stop other leases renewing."""
    lock = make_lock(scheduler)
    other_lock = MemoryLock("other.example", ttl=30.0, scheduler=scheduler)
    doomed = lock.acquire()
    healthy = other_lock.acquire()
    release_callback = threading.Event()
    doomed.on_lost = lambda lease: release_callback.wait()
    lock.renew_results = [False]

    clock.advance(10.0)
    scheduler.run_due()
    clock.advance(10.0)
    scheduler.run_due()

    assert doomed.lost.is_set()
    assert other_lock.renew_calls == 2
    assert healthy.held
    release_callback.set()


def test_on_lost_set_after_loss_still_called(
    clock: FakeClock, scheduler: Scheduler
) -> None:
    """A callback attached after the loss is called at once."""
    lease = make_lock(scheduler).acquire()
    clock.advance(30.0)
    assert not lease.held

    seen: list[Lease] = []
    lease.on_lost = seen.append
    assert seen == [lease]


def test_dropped_lease_stops_renewing(clock: FakeClock, scheduler: Scheduler) -> None:
    """A lease its caller dropped is not renewed forever."""
    lock = make_lock(scheduler)
    lock.acquire()
    gc.collect()

    clock.advance(10.5)
    scheduler.run_due()
    assert lock.renew_calls == 0


def test_released_lease_stops_renewing(clock: FakeClock, scheduler: Scheduler) -> None:
    """After release the scheduler makes no more calls for the lease."""
    lock = make_lock(scheduler)
    lease = lock.acquire()
    assert lease.release() is True

    clock.advance(60.0)
    scheduler.run_due()
    assert lock.renew_calls == 0
    assert not lease.lost.is_set()
    with pytest.raises(singlewriter.LockLost, match="already released"):
        lease.ensure_held()


def test_each_acquire_returns_new_lease(scheduler: Scheduler) -> None:
    """Leases are per acquisition: releasing one leaves another untouched."""
    lock = make_lock(scheduler)
    first = lock.acquire()
    first.release()
    second = lock.acquire()

    assert first is not second
    assert first.release() is False
    assert second.held
    assert lock.holder == second.data


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ttl": None}, "needs a ttl"),
        ({"ttl": 0}, "greater than 0"),
        ({"ttl": float("nan")}, "finite"),
        ({"ttl": "30"}, "number of seconds"),
        ({"ttl": 3.0, "renew_interval": 3.0}, "renew_interval"),
        ({"ttl": 3.0, "safety_margin": 3.0}, "safety_margin"),
        ({"ttl": 3.0, "safety_margin": 5.0}, "safety_margin"),
        ({"ttl": 1e-9}, "out of range"),
        ({"ttl": 1e308}, "out of range"),
        ({"retry_attempts": 0}, "retry_attempts"),
    ],
)
def test_bad_timing_options_rejected(options: dict[str, object], message: str) -> None:
    """Invalid timing options raise ConfigError naming the option."""
    with pytest.raises(singlewriter.ConfigError, match=message):
        MemoryLock("example.com", **options)


@pytest.mark.parametrize("name", ["", "../x", "a/b", "-x", "a..b", "x" * 201, 5])
def test_bad_lock_names_rejected(name: object) -> None:
    """Names that could escape a directory or key space are rejected."""
    with pytest.raises(singlewriter.ConfigError, match="lock name"):
        MemoryLock(name)  # type: ignore[arg-type]


@pytest.mark.parametrize("timeout", [-1, float("nan"), "1", True])
def test_bad_timeout_rejected(scheduler: Scheduler, timeout: object) -> None:
    with pytest.raises(singlewriter.ConfigError, match="timeout"):
        make_lock(scheduler).acquire(timeout=timeout)  # type: ignore[arg-type]


def test_transient_acquire_errors_are_retried_bounded(scheduler: Scheduler) -> None:
    """acquire() retries BackendUnavailable retry_attempts times, then raises."""
    calls = []

    class Flaky(MemoryLock):
        def _try_acquire(self, timeout: float, owner: str) -> Grant | Busy:
            calls.append(owner)
            raise BackendUnavailable("down")

    lock = Flaky("example.com", scheduler=scheduler, sleep=lambda s: None)
    with pytest.raises(BackendUnavailable):
        lock.acquire()
    assert len(calls) == lock.retry_attempts
    assert len(set(calls)) == 1, "one acquire() keeps one owner across retries"


def test_public_names_sorted_and_complete() -> None:
    """__all__ lists every public name, sorted as ruff's isort style sorts it:
    constants, then classes, then functions."""
    exported = singlewriter.__all__

    def style(name: str) -> tuple[int, str]:
        if name.isupper():
            return 0, name
        if name[0].isupper():
            return 1, name
        return 2, name

    assert exported == sorted(exported, key=style)
    public = {n for n in vars(singlewriter) if not n.startswith("_")}
    public -= {"annotations", "backends"}
    assert public <= set(exported) | {"acme", "keystore", "cli", "metrics"}
    for name in exported:
        assert hasattr(singlewriter, name), name


def test_hung_renewal_still_loses_at_deadline() -> None:
    """A renewal call that never returns must not delay the loss.

    Real time: ttl 1 s, so the deadline is 0.9 s after acquisition. The
    assertion allows 1 s of scheduling delay on a loaded machine, still far
    less than the hung call, which blocks until the test ends.
    """
    unblock = threading.Event()

    class Hanging(MemoryLock):
        def _renew(self, lease: Lease, timeout: float) -> bool:
            unblock.wait()
            return True

    lock = Hanging("example.com", ttl=1.0, scheduler=Scheduler())
    lease = lock.acquire()
    try:
        assert lease.deadline is not None
        assert lease.lost.wait(timeout=5)
        assert time.monotonic() - lease.deadline < 1.0
        assert "deadline" in (lease.lost_reason or "")
    finally:
        unblock.set()

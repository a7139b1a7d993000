"""The lock contract, run unchanged against every backend with real processes.

Where real time is needed, the ttl is short (1 s) and every wait has a
timeout several times larger, so that a loaded CI machine does not make
the tests flaky. The assertions compare orderings of events, not speeds.
"""

from __future__ import annotations

import itertools
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import singlewriter
from tests._support import Worker, unique_name

TTL = 1.0


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.close()


def spawn(workers: list[Worker], url: str, name: str, ttl: float = TTL) -> Worker:
    worker = Worker(url, name, ttl)
    workers.append(worker)
    return worker


def test_mutual_exclusion_across_processes(
    backend: tuple[str, str], workers: list[Worker], tmp_path: Path
) -> None:
    """Three processes taking turns never overlap, and tokens rise in order."""
    _, url = backend
    name = unique_name()
    logfile = tmp_path / "turns.log"
    contenders = [spawn(workers, url, name, ttl=5.0) for _ in range(3)]

    for worker in contenders:
        worker.send(f"cycles 8 {logfile} 0.01")
    for worker in contenders:
        assert worker.next_event(timeout=120)["event"] == "done"

    lines = logfile.read_text().splitlines()
    assert len(lines) == 3 * 8 * 2
    tokens = []
    for enter, leave in zip(lines[::2], lines[1::2], strict=True):
        kind_in, pid_in, token_in = enter.split()
        kind_out, pid_out, token_out = leave.split()
        assert (kind_in, kind_out) == ("enter", "exit"), (enter, leave)
        assert pid_in == pid_out
        assert token_in == token_out
        tokens.append(int(token_in))
    assert tokens == sorted(tokens)
    assert len(set(tokens)) == len(tokens)


def test_tokens_increase_across_processes(
    backend: tuple[str, str], workers: list[Worker]
) -> None:
    """Acquisitions alternating between two processes get rising tokens."""
    _, url = backend
    name = unique_name()
    lock = singlewriter.lock_from_url(url, name, ttl=TTL)
    worker = spawn(workers, url, name)
    tokens = []

    for _ in range(4):
        with lock as lease:
            tokens.append(lease.token)
        event = worker.request("acquire 30")
        assert event["event"] == "acquired"
        tokens.append(event["token"])
        assert worker.request("release")["freed"] is True

    assert all(a < b for a, b in itertools.pairwise(tokens)), tokens


def test_timeout_and_busy_while_held(
    backend: tuple[str, str], workers: list[Worker]
) -> None:
    """A held lock makes acquire time out, or fail at once when non-blocking."""
    _, url = backend
    name = unique_name()
    worker = spawn(workers, url, name, ttl=10.0)
    assert worker.request("acquire 30")["event"] == "acquired"
    lock = singlewriter.lock_from_url(url, name, ttl=10.0)

    started = time.monotonic()
    with pytest.raises(singlewriter.LockTimeout) as timed_out:
        lock.acquire(timeout=0.3)
    assert time.monotonic() - started >= 0.3
    assert timed_out.value.lock_name == name
    assert isinstance(timed_out.value, TimeoutError)

    with pytest.raises(singlewriter.LockBusy):
        lock.acquire(blocking=False)


def test_release_frees_lock_at_once(
    backend: tuple[str, str], workers: list[Worker]
) -> None:
    """A waiter gets the lock right after release, long before the ttl."""
    _, url = backend
    name = unique_name()
    worker = spawn(workers, url, name, ttl=30.0)
    held = worker.request("acquire 60")
    assert held["event"] == "acquired"
    lock = singlewriter.lock_from_url(url, name, ttl=30.0)
    result: list[singlewriter.Lease] = []
    waiter = threading.Thread(target=lambda: result.append(lock.acquire(timeout=10)))
    waiter.start()

    time.sleep(0.2)
    assert worker.request("release")["freed"] is True
    waiter.join(timeout=15)

    assert result, "the waiter did not get the lock within 10 s of a 30 s ttl"
    assert result[0].token > held["token"]
    result[0].release()


def test_release_by_former_holder_changes_nothing(
    backend: tuple[str, str], workers: list[Worker]
) -> None:
    """A lease that no longer holds the lock cannot free the new holder's lock."""
    _, url = backend
    name = unique_name()
    lock = singlewriter.lock_from_url(url, name, ttl=TTL)
    old = lock.acquire()
    assert old.release() is True
    worker = spawn(workers, url, name)
    assert worker.request("acquire 30")["event"] == "acquired"

    assert old.release() is False
    with pytest.raises(singlewriter.LockBusy):
        lock.acquire(blocking=False)
    assert worker.request("ensure")["event"] == "held"


def test_expired_lease_cannot_release_successor(
    backend: tuple[str, str], workers: list[Worker], caplog: pytest.LogCaptureFixture
) -> None:
    """After a lease expired and another process took over, its release is a no-op."""
    _, url = backend
    probe = singlewriter.lock_from_url(url, unique_name(), ttl=TTL)
    if not probe.renews:
        pytest.skip(f"{probe.backend} leases never expire while the holder lives")
    name = unique_name()

    # A scheduler that never runs: this lease is not renewed and expires.
    frozen = singlewriter.Scheduler(autostart=False)
    stale = singlewriter.lock_from_url(url, name, ttl=TTL, scheduler=frozen).acquire()
    worker = spawn(workers, url, name)
    assert worker.request("acquire 30")["event"] == "acquired"

    with caplog.at_level("WARNING", logger="singlewriter"):
        assert stale.release() is False
    assert "no longer the holder" in caplog.text
    assert worker.request("ensure")["event"] == "held"


def test_sigkill_of_holder_frees_lock_within_ttl(
    backend: tuple[str, str], workers: list[Worker]
) -> None:
    """A holder killed with SIGKILL blocks others for at most its ttl."""
    _, url = backend
    name = unique_name()
    worker = spawn(workers, url, name)
    held = worker.request("acquire 30")
    assert held["event"] == "acquired"

    worker.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    lease = singlewriter.lock_from_url(url, name, ttl=TTL).acquire(timeout=TTL + 5)

    # Generous bound for a loaded machine; the backend's expiry is TTL.
    assert time.monotonic() - killed_at < TTL + 5
    assert lease.token > held["token"]
    lease.release()


def test_sigstop_past_ttl_then_resume(
    backend: tuple[str, str], workers: list[Worker]
) -> None:
    """A holder frozen past its ttl finds its lease lost before any fenced step."""
    _, url = backend
    name = unique_name()
    worker = spawn(workers, url, name)
    held = worker.request("acquire 30")
    assert held["event"] == "acquired"
    assert worker.request("watch")["event"] == "watching"
    lock = singlewriter.lock_from_url(url, name, ttl=TTL)

    worker.signal(signal.SIGSTOP)
    try:
        if not lock.renews:
            # flock: the kernel keeps the lock of a live, frozen holder.
            with pytest.raises(singlewriter.LockTimeout):
                lock.acquire(timeout=TTL + 0.5)
            return
        successor = lock.acquire(timeout=TTL + 10)
        acquired_at = time.monotonic()
    finally:
        worker.signal(signal.SIGCONT)

    check = worker.request("ensure")
    events = [check]
    if check["event"] == "lost":
        events.append(worker.next_event())
    by_kind = {event["event"]: event for event in events}
    assert "not-held" in by_kind, events

    lost = by_kind.get("lost") or worker.next_event()
    assert lost["event"] == "lost"
    assert lost["deadline"] < acquired_at, "the old holder's deadline must end first"
    assert successor.token > held["token"]
    successor.release()


def test_sigterm_releases_lock(backend: tuple[str, str], workers: list[Worker]) -> None:
    """SIGTERM to a holder that called raise_on_signals() releases at once."""
    _, url = backend
    name = unique_name()
    worker = spawn(workers, url, name, ttl=30.0)
    assert worker.request("acquire 60")["event"] == "acquired"

    worker.signal(signal.SIGTERM)
    assert worker.wait() == 128 + signal.SIGTERM
    started = time.monotonic()
    lease = singlewriter.lock_from_url(url, name, ttl=30.0).acquire(timeout=10)

    assert time.monotonic() - started < 10, "waited for the ttl instead"
    lease.release()

"""The single_writer decorator and raise_on_signals."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

import singlewriter
from tests._support import ROOT, unique_name


@pytest.fixture
def lock_url(tmp_path: Path) -> str:
    return f"file://{tmp_path}"


def test_job_runs_under_lock_and_releases(lock_url: str) -> None:
    """The job runs while the lock is held; afterwards it is free again."""
    seen: list[int] = []

    @singlewriter.single_writer(lock_url, name="job", pass_lease=True)
    def job(value: int, *, lease: singlewriter.Lease) -> int:
        seen.append(lease.token)
        with pytest.raises(singlewriter.LockBusy):
            singlewriter.lock_from_url(lock_url, "job").acquire(blocking=False)
        return value * 2

    assert job(21) == 42
    assert job(1) == 2
    assert seen == [1, 2]
    singlewriter.lock_from_url(lock_url, "job").acquire(blocking=False).release()


def test_skip_when_busy_returns_none(
    lock_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """With wait=False a busy lock skips the job and logs why."""
    calls: list[int] = []

    @singlewriter.single_writer(lock_url, name="job", wait=False)
    def job() -> str:
        calls.append(1)
        return "ran"

    with singlewriter.lock_from_url(lock_url, "job"):
        with caplog.at_level(logging.INFO, logger="singlewriter"):
            assert job() is None
    assert calls == []
    assert "skipped" in caplog.text
    assert job() == "ran"


def test_wait_with_timeout_raises(lock_url: str) -> None:
    @singlewriter.single_writer(lock_url, name="job", timeout=0.1)
    def job() -> None:
        raise AssertionError("must not run")

    with singlewriter.lock_from_url(lock_url, "job"):
        with pytest.raises(singlewriter.LockTimeout):
            job()


def test_job_that_raises_releases_lock(lock_url: str) -> None:
    """A failing job must not keep its lease (or renew it forever)."""
    lock = singlewriter.lock_from_url(lock_url, "job")

    @singlewriter.single_writer(lock)
    def job() -> None:
        raise RuntimeError("job failed")

    with pytest.raises(RuntimeError, match="job failed"):
        job()
    lock.acquire(blocking=False).release()


@pytest.mark.redis
def test_lease_lost_during_job_raises(redis_server: Any) -> None:
    """A result computed after the lease was lost is not returned silently."""
    name = unique_name()
    lock = singlewriter.lock_from_url(redis_server.url, name, ttl=1.0)
    admin = redis.Redis.from_url(redis_server.url)

    @singlewriter.single_writer(lock, pass_lease=True)
    def job(*, lease: singlewriter.Lease) -> str:
        admin.delete(lock.lock_key)  # type: ignore[attr-defined]
        assert lease.lost.wait(timeout=5)
        return "computed without the lock"

    with pytest.raises(singlewriter.LockLost):
        job()


def test_coroutine_function_rejected(lock_url: str) -> None:
    with pytest.raises(TypeError, match="coroutine"):

        @singlewriter.single_writer(lock_url, name="job")
        async def job() -> None:
            return None


def test_sigterm_runs_finally_and_exits_143(tmp_path: Path) -> None:
    """raise_on_signals() turns SIGTERM into an exit that runs finally blocks."""
    marker = tmp_path / "released"
    script = textwrap.dedent(
        f"""
        import os, signal, sys, singlewriter
        singlewriter.raise_on_signals()
        lock = singlewriter.lock_from_url("file://{tmp_path}", "job")
        with lock as lease:
            try:
                print("held", flush=True)
                signal.pause()
            finally:
                open({str(marker)!r}, "w").write(str(lease.token))
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "held"

    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=30) == 128 + signal.SIGTERM
    child.stdout.close()
    assert marker.read_text() == "1"
    singlewriter.lock_from_url(f"file://{tmp_path}", "job").acquire(
        blocking=False
    ).release()


def test_generator_functions_rejected(lock_url: str) -> None:
    """A generator's body would run after the lock was released."""
    decorate = singlewriter.single_writer(lock_url, name="job")

    def numbers() -> Iterator[int]:
        yield 1

    async def async_numbers() -> AsyncIterator[int]:
        yield 1

    with pytest.raises(TypeError, match="generator"):
        decorate(numbers)
    with pytest.raises(TypeError, match="async"):
        decorate(async_numbers)

"""Renewals in separate processes: SIGKILL, SIGTERM and two racing renewers.

Each worker logs every HTTP request it sends to a shared file before the
response comes back, so the number of newOrder POSTs counted here includes
those of killed processes.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import singlewriter
from singlewriter.acme import EXIT_TERMINATED, renew
from singlewriter.keystore import KeyStore
from tests.fixtures_pebble import ACMEEnv, RequestLog, Worker, read_request_log

pytestmark = [pytest.mark.pebble, pytest.mark.timeout(120)]

StartWorker = Callable[[dict[str, Any]], Worker]


def worker_config(env: ACMEEnv, log: Path, **extra: Any) -> dict[str, Any]:
    arguments = env.kwargs()
    arguments.pop("challenge")
    config: dict[str, Any] = {
        "renew": {
            "domains": env.domains,
            "challenge": {"port": env.pebble.http01_port},
            **arguments,
            **extra.pop("renew", {}),
        },
        "request_log": str(log),
    }
    config.update(extra)
    return config


def new_orders(env: ACMEEnv, log: Path) -> int:
    return sum(
        1
        for request in read_request_log(log)
        if request.method == "POST" and request.url == env.pebble.new_order_url
    )


def test_sigkill_after_order_resumes_without_second_order(
    acme_env: ACMEEnv, workers: StartWorker, tmp_path: Path, acme_requests: RequestLog
) -> None:
    """A process killed after placing its order leaves it for the next run."""
    log = tmp_path / "requests.jsonl"
    worker = workers(worker_config(acme_env, log, pause_at="order-placed"))
    worker.wait_for("paused")
    staged = acme_env.order_state()
    assert staged is not None
    assert staged["order_url"] is not None

    worker.signal(signal.SIGKILL)
    assert worker.wait() == -signal.SIGKILL
    assert KeyStore(acme_env.store_path).current() is None

    result = renew(acme_env.domains, **acme_env.kwargs())

    assert result.renewed
    assert result.order_url == staged["order_url"]
    assert new_orders(acme_env, log) == 1
    assert acme_requests.posts_to(acme_env.pebble.new_order_url) == []


def test_racing_renewers_place_one_order(
    acme_env: ACMEEnv, workers: StartWorker, tmp_path: Path
) -> None:
    """Two processes renewing the same names under one flock lock order once."""
    log = tmp_path / "requests.jsonl"
    release = tmp_path / "release"
    first = workers(
        worker_config(acme_env, log, pause_at="order-placed", release_file=str(release))
    )
    first.wait_for("paused")
    second = workers(worker_config(acme_env, log))

    # The second process blocks on the lock while the first holds it.
    time.sleep(0.5)
    assert second.process.poll() is None
    assert not any(e.get("step") == "lock-acquired" for e in second.events)
    release.touch()

    first_result = first.wait_for("result")
    second_result = second.wait_for("result")

    assert first.wait() == 0
    assert second.wait() == 0
    assert first_result["renewed"] is True
    assert second_result["renewed"] is False
    assert second_result["reason"].startswith("not due until")
    assert second_result["generation"] == first_result["generation"]
    assert new_orders(acme_env, log) == 1


@pytest.mark.redis
def test_sigterm_releases_lock_and_keeps_order(
    acme_env: ACMEEnv, workers: StartWorker, tmp_path: Path, redis_server: Any
) -> None:
    """SIGTERM mid-order exits 143, frees the Redis lock and leaves the store alone."""
    # A fresh redis-server grants nothing for one ttl unless the URL turns
    # that guard off, which is safe here: it never held this lock before.
    lock_url = redis_server.url + "?guard_after_data_loss=0"
    renew(acme_env.domains, **acme_env.kwargs())
    before = KeyStore(acme_env.store_path).current()
    log = tmp_path / "requests.jsonl"
    config = worker_config(
        acme_env,
        log,
        renew={"lock": lock_url, "force": True, "ttl": 60},
        pause_at="order-placed",
    )
    worker = workers(config)
    worker.wait_for("paused")

    worker.signal(signal.SIGTERM)

    assert worker.wait() == EXIT_TERMINATED == 143
    # With a 60 s ttl the lock would stay taken for a minute had the
    # process not released it.
    lock = singlewriter.lock_from_url(lock_url, acme_env.domains[0], ttl=60)
    lock.acquire(blocking=False).release()
    assert KeyStore(acme_env.store_path).current() == before
    staged = acme_env.order_state()
    assert staged is not None

    result = renew(acme_env.domains, **acme_env.kwargs(lock=lock_url, force=True))

    assert result.renewed
    assert result.order_url == staged["order_url"]
    assert new_orders(acme_env, log) == 1


def test_sigterm_during_commit_finishes_commit(
    acme_env: ACMEEnv, workers: StartWorker, tmp_path: Path
) -> None:
    """A SIGTERM that arrives during the commit waits until it and its hooks ran."""
    log = tmp_path / "requests.jsonl"
    marker = tmp_path / "deployed"
    config = worker_config(
        acme_env, log, signal_self_at="committing", deploy_marker=str(marker)
    )
    worker = workers(config)

    status = worker.wait()

    assert status == EXIT_TERMINATED, worker.stderr()
    steps = [event.get("step") for event in _drain(worker)]
    assert "committed" in steps
    files = KeyStore(acme_env.store_path).current()
    assert files is not None
    assert marker.read_text() == "1"
    assert acme_env.order_state() is None


def _drain(worker: Worker) -> list[dict[str, Any]]:
    events = list(worker.events)
    while True:
        try:
            events.append(worker.next_event(timeout=2))
        except AssertionError:
            return events

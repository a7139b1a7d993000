"""Failures: bad input, unreachable CAs, failing names, resumed orders, polling."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

import singlewriter
from singlewriter import ConfigError, StaleTokenError
from singlewriter.acme import (
    ACMEError,
    ACMEUnavailable,
    ChallengeError,
    HTTP01Standalone,
    HTTP01Webroot,
    RenewalBackoff,
    renew,
)
from singlewriter.acme._poll import POLL_INITIAL
from singlewriter.keystore import KeyStore
from tests.fixtures_pebble import FAST, ACMEEnv, PebbleServer, RequestLog, unique_domain
from tests.servers import free_port

pytestmark = pytest.mark.pebble


class Crash(Exception):
    """Stands in for a process that dies at a given step."""


def crash_at(wanted: str) -> Any:
    def on_step(step: str) -> None:
        if step == wanted:
            raise Crash(step)

    return on_step


# Bad input: rejected before anything is created or sent.


@pytest.mark.parametrize(
    ("domains", "message"),
    [
        ([], "no domain names"),
        ("example.com", "is a string"),
        ([""], "fully qualified"),
        (["com"], "fully qualified"),
        (["exa mple.com"], "label 'exa mple'"),
        (["-a.example.com"], "label '-a'"),
        (["a..example.com"], "label ''"),
        (["a_b.example.com"], "label 'a_b'"),
        (["192.0.2.1"], "IP address"),
        (["bücher.example"], "ASCII form"),
        (["a.*.example.com"], "label '*'"),
        (["x" * 64 + ".example.com"], "1 to 63"),
        ([None], "expected a string"),
    ],
)
def test_bad_domain_names_are_rejected(
    acme_env: ACMEEnv, acme_requests: RequestLog, domains: Any, message: str
) -> None:
    """Invalid names raise ConfigError before any file or request is made."""
    with pytest.raises(ConfigError, match=message):
        renew(domains, **acme_env.kwargs())

    assert acme_requests.requests == []
    assert not acme_env.store_path.exists()
    assert not acme_env.account_path.exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"directory_url": "not a url"}, "needs an https:// URL"),
        ({"directory_url": "http://127.0.0.1:1/dir"}, "needs an https:// URL"),
        ({"key_type": "dsa-1024"}, "key_type='dsa-1024' is invalid"),
        ({"renew_fraction": 1.0}, "renew_fraction=1.0 is invalid"),
        ({"renew_fraction": 0}, "renew_fraction=0 is invalid"),
        ({"email": "mailto:admin@example.com"}, "without 'mailto:'"),
        ({"email": "a@b.example, c@d.example"}, "is invalid"),
        ({"challenge": None}, "challenge=None is invalid"),
        ({"ca_bundle": "/nonexistent/ca.pem"}, "cannot be read"),
        ({"poll_timeout": 0}, "poll_timeout=0 is invalid"),
        ({"lock": 42}, "lock=42 is invalid"),
    ],
)
def test_bad_arguments_are_rejected(
    acme_env: ACMEEnv,
    acme_requests: RequestLog,
    overrides: dict[str, Any],
    message: str,
) -> None:
    """Invalid arguments raise ConfigError and send nothing."""
    with pytest.raises(ConfigError, match=message):
        renew(acme_env.domains, **acme_env.kwargs(**overrides))

    assert acme_requests.requests == []


def test_wildcard_needs_dns01(acme_env: ACMEEnv) -> None:
    """A wildcard name with an HTTP-01 challenge is a configuration error."""
    with pytest.raises(ConfigError, match="only be validated with DNS-01"):
        renew(["*." + acme_env.domains[0]], **acme_env.kwargs())


def test_unreachable_directory_fails_fast(acme_env: ACMEEnv) -> None:
    """A directory URL on a closed port raises ACMEUnavailable at once."""
    url = f"https://127.0.0.1:{free_port()}/dir"
    started = time.monotonic()

    with pytest.raises(ACMEUnavailable, match="could not be reached") as caught:
        renew(acme_env.domains, **acme_env.kwargs(directory_url=url))

    assert time.monotonic() - started < 5
    assert caught.value.lock_name == acme_env.domains[0]
    # The lock was released on the way out.
    lock = singlewriter.lock_from_url(acme_env.lock_url, acme_env.domains[0])
    lock.acquire(blocking=False).release()


def test_directory_url_that_is_not_acme(acme_env: ACMEEnv) -> None:
    """A URL that serves something else than a directory names the URL to fix."""
    url = acme_env.pebble.management_url + "/roots/0"

    with pytest.raises(ConfigError, match="does not serve an ACME directory"):
        renew(acme_env.domains, **acme_env.kwargs(directory_url=url))


def test_untrusted_tls_names_ca_bundle(acme_env: ACMEEnv) -> None:
    """A server certificate that does not verify points at ca_bundle."""
    with pytest.raises(ACMEUnavailable, match="ca_bundle"):
        renew(acme_env.domains, **acme_env.kwargs(ca_bundle=None))


def test_port_in_use_fails_before_ordering(
    acme_env: ACMEEnv, acme_requests: RequestLog
) -> None:
    """An HTTP-01 port that cannot be bound fails before any order is placed."""
    blocker = HTTP01Standalone(port=acme_env.pebble.http01_port, address="127.0.0.1")
    blocker.start()
    try:
        with pytest.raises(ChallengeError, match="could not listen"):
            renew(acme_env.domains, **acme_env.kwargs())
    finally:
        blocker.stop()

    assert acme_requests.posts_to(acme_env.pebble.new_order_url) == []
    assert acme_env.order_state() is None


# Failing names back off.


def test_failing_name_backs_off(
    acme_env: ACMEEnv, acme_requests: RequestLog, tmp_path: Path
) -> None:
    """A validation failure is recorded, and the next run does not order again."""
    unserved = HTTP01Webroot(tmp_path / "www")
    (tmp_path / "www").mkdir()
    now = datetime.now(timezone.utc)

    with pytest.raises(ChallengeError, match="could not validate") as caught:
        renew(
            acme_env.domains, **acme_env.kwargs(challenge=unserved, clock=lambda: now)
        )
    assert caught.value.problem_type == "urn:ietf:params:acme:error:connection"
    assert acme_env.order_state() is None

    acme_requests.clear()
    soon = now + timedelta(minutes=4)
    with pytest.raises(RenewalBackoff) as backoff:
        renew(
            acme_env.domains, **acme_env.kwargs(challenge=unserved, clock=lambda: soon)
        )
    assert backoff.value.failures == 1
    assert backoff.value.next_attempt == now + timedelta(minutes=5)
    assert acme_requests.requests == []

    # force overrides the backoff; a second failure doubles it.
    with pytest.raises(ChallengeError):
        renew(
            acme_env.domains,
            **acme_env.kwargs(challenge=unserved, clock=lambda: soon, force=True),
        )
    with pytest.raises(RenewalBackoff) as doubled:
        renew(
            acme_env.domains, **acme_env.kwargs(challenge=unserved, clock=lambda: soon)
        )
    assert doubled.value.failures == 2
    assert doubled.value.next_attempt == soon + timedelta(minutes=10)

    # After the backoff a working challenge succeeds and clears the record.
    later = soon + timedelta(minutes=11)
    result = renew(acme_env.domains, **acme_env.kwargs(clock=lambda: later))
    assert result.renewed
    assert not any((d / "failures.json").exists() for d in acme_env.state_directories())


def test_rejected_name_is_recorded(acme_env: ACMEEnv) -> None:
    """A name the CA refuses (rejectedIdentifier) backs off like a failed validation."""
    names = ["blocked-domain.example"]

    with pytest.raises(ACMEError) as caught:
        renew(names, **acme_env.kwargs())
    assert caught.value.problem_code == "rejectedIdentifier"

    with pytest.raises(RenewalBackoff):
        renew(names, **acme_env.kwargs())


def test_backoff_is_capped_at_one_day(acme_env: ACMEEnv) -> None:
    """Many consecutive failures wait at most 24 hours."""
    from singlewriter.acme._policy import BACKOFF_MAX, backoff_delay

    assert backoff_delay(1) == timedelta(minutes=5)
    assert backoff_delay(4) == timedelta(minutes=40)
    assert backoff_delay(30) == BACKOFF_MAX == timedelta(hours=24)
    assert backoff_delay(10**6) == BACKOFF_MAX


# Orders in flight are resumed, not placed again.


def test_crash_after_order_resumes_same_order(
    acme_env: ACMEEnv, acme_requests: RequestLog
) -> None:
    """A run that died after placing its order is finished by the next run."""
    with pytest.raises(Crash):
        renew(acme_env.domains, **acme_env.kwargs(on_step=crash_at("order-placed")))
    state = acme_env.order_state()
    assert state is not None
    assert state["order_url"] is not None
    assert len(acme_requests.posts_to(acme_env.pebble.new_order_url)) == 1

    result = renew(acme_env.domains, **acme_env.kwargs())

    assert result.renewed
    assert result.order_url == state["order_url"]
    assert len(acme_requests.posts_to(acme_env.pebble.new_order_url)) == 1
    files = KeyStore(acme_env.store_path).current()
    assert files is not None
    assert files["privkey.pem"] == state["key_pem"].encode()


def test_crash_before_order_reuses_staged_key(
    acme_env: ACMEEnv, acme_requests: RequestLog
) -> None:
    """A key stored before the newOrder request is used for the order."""
    with pytest.raises(Crash):
        renew(acme_env.domains, **acme_env.kwargs(on_step=crash_at("key-persisted")))
    state = acme_env.order_state()
    assert state is not None
    assert state["order_url"] is None
    assert acme_requests.posts_to(acme_env.pebble.new_order_url) == []

    renew(acme_env.domains, **acme_env.kwargs())

    files = KeyStore(acme_env.store_path).current()
    assert files is not None
    assert files["privkey.pem"] == state["key_pem"].encode()


def test_crash_after_issuance_downloads_without_ordering(
    acme_env: ACMEEnv, acme_requests: RequestLog
) -> None:
    """A valid order left by a dead run is downloaded and committed."""
    with pytest.raises(Crash):
        renew(acme_env.domains, **acme_env.kwargs(on_step=crash_at("downloaded")))
    assert KeyStore(acme_env.store_path).current() is None
    acme_requests.clear()
    steps: list[str] = []

    result = renew(acme_env.domains, **acme_env.kwargs(on_step=steps.append))

    assert result.renewed
    assert acme_requests.posts_to(acme_env.pebble.new_order_url) == []
    assert "order-resumed" in steps
    assert "finalize-sent" not in steps


def test_forgotten_order_is_replaced(
    acme_env: ACMEEnv, acme_requests: RequestLog
) -> None:
    """A stored order the CA no longer has is dropped and a new one placed."""
    with pytest.raises(Crash):
        renew(acme_env.domains, **acme_env.kwargs(on_step=crash_at("order-placed")))
    directory = acme_env.state_directories()[0]
    document = json.loads((directory / "order.json").read_text())
    document["order_url"] = document["order_url"].rsplit("/", 1)[0] + "/unknown"
    (directory / "order.json").write_text(json.dumps(document))
    acme_requests.clear()

    result = renew(acme_env.domains, **acme_env.kwargs())

    assert result.renewed
    assert len(acme_requests.posts_to(acme_env.pebble.new_order_url)) == 1


def test_order_for_other_names_is_dropped(acme_env: ACMEEnv) -> None:
    """State of another key type is not resumed for this request."""
    with pytest.raises(Crash):
        renew(acme_env.domains, **acme_env.kwargs(on_step=crash_at("order-placed")))
    staged = acme_env.order_state()
    assert staged is not None

    result = renew(acme_env.domains, **acme_env.kwargs(key_type="rsa-2048"))

    assert result.renewed
    assert result.order_url != staged["order_url"]


def test_stale_token_commits_nothing(acme_env: ACMEEnv, tmp_path: Path) -> None:
    """A store written with a higher token rejects this renewal's commit."""
    renew(acme_env.domains, **acme_env.kwargs())
    for _ in range(3):
        renew(acme_env.domains, **acme_env.kwargs(force=True))
    before = KeyStore(acme_env.store_path).current()
    fresh_locks = tmp_path / "fresh-locks"
    fresh_locks.mkdir()

    with pytest.raises(StaleTokenError):
        renew(
            acme_env.domains,
            **acme_env.kwargs(lock=f"file://{fresh_locks}", force=True),
        )

    assert KeyStore(acme_env.store_path).current() == before


# Polling.


def test_polling_starts_fast_without_retry_after(acme_env: ACMEEnv) -> None:
    """Without Retry-After, polls start at 25 ms and never wait a second."""
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        time.sleep(seconds)

    renew(acme_env.domains, **acme_env.kwargs(sleep=sleep))

    assert all(delay < 1.0 for delay in sleeps)
    if sleeps:
        assert sleeps[0] == POLL_INITIAL


def test_polling_honours_retry_after(make_pebble: Any, tmp_path: Path) -> None:
    """A Retry-After from the CA is waited for, not replaced by a short poll."""
    pebble: PebbleServer = make_pebble(retry_after_authz=3, retry_after_order=3)
    env = ACMEEnv(pebble=pebble, root=tmp_path, domains=[unique_domain()])
    sleeps: list[float] = []

    renew(env.domains, **env.kwargs(sleep=sleeps.append))

    # Pebble sends "3" or an HTTP-date up to 3 s ahead (whole seconds).
    assert any(2.0 <= delay <= 3.0 for delay in sleeps), sleeps


def test_poll_timeout_keeps_order_for_resume(make_pebble: Any, tmp_path: Path) -> None:
    """An order still processing at the deadline is kept for the next run."""
    pebble: PebbleServer = make_pebble(retry_after_authz=0, retry_after_order=30)
    env = ACMEEnv(pebble=pebble, root=tmp_path, domains=[unique_domain()])

    with pytest.raises(ACMEError, match="polling deadline") as caught:
        renew(env.domains, **env.kwargs(poll_timeout=1, sleep=lambda _: None))
    assert isinstance(caught.value, TimeoutError)
    assert env.order_state() is not None

    result = renew(env.domains, **env.kwargs(sleep=lambda _: None))
    assert result.renewed


def test_fast_pebble_is_default() -> None:
    """The shared Pebble sends no Retry-After, which the fast-polling test needs."""
    assert FAST == {"retry_after_authz": 0, "retry_after_order": 0}


# A lease lost mid-renewal stops the next fenced step.


@pytest.mark.redis
@pytest.mark.parametrize("step", ["key-persisted", "authorized", "downloaded"])
def test_lost_lease_stops_next_fenced_step(
    acme_env: ACMEEnv, acme_requests: RequestLog, redis_server: Any, step: str
) -> None:
    """A holder whose lock was taken over sends no order, finalize or commit.

    Another client overwrites the Redis lock key, so the holder's next lease
    renewal (every ttl/3 = 1 s) fails and marks the lease lost; the renewal
    must stop before the next fenced step and keep its order for resuming.
    This waits 1.6 s of real time for that renewal attempt.
    """
    import redis

    url = redis_server.url + "?guard_after_data_loss=0"
    lock = singlewriter.lock_from_url(url, acme_env.domains[0], ttl=3)
    intruder = redis.Redis.from_url(redis_server.url)

    def take_over(current: str) -> None:
        if current == step:
            intruder.set(lock.lock_key, "intruder 1", px=60_000)  # type: ignore[attr-defined]
            time.sleep(1.6)

    try:
        with pytest.raises(singlewriter.LockLost):
            renew(acme_env.domains, **acme_env.kwargs(lock=lock, on_step=take_over))

        finalized = [r for r in acme_requests.requests if "/finalize-order/" in r.url]
        orders = acme_requests.posts_to(acme_env.pebble.new_order_url)
        assert KeyStore(acme_env.store_path).current() is None
        if step == "key-persisted":
            assert orders == []
        if step == "authorized":
            assert finalized == []
        assert acme_env.order_state() is not None

        intruder.delete(lock.lock_key)  # type: ignore[attr-defined]
        acme_requests.clear()
        result = renew(acme_env.domains, **acme_env.kwargs(lock=lock))
    finally:
        intruder.close()

    assert result.renewed
    resumed = acme_requests.posts_to(acme_env.pebble.new_order_url)
    assert len(resumed) == (1 if step == "key-persisted" else 0)


def test_renewal_survives_frequent_bad_nonces(make_pebble: Any, tmp_path: Path) -> None:
    """A CA that rejects many nonces must not fail the renewal.

    ClientNetwork retries a badNonce only once; with Pebble's default 5 %
    rejection that failed about one POST in 400 and made a whole renewal
    fail now and then. Here Pebble rejects 30 % of good nonces. With only a
    single retry about one POST in eleven fails, and this test failed in
    three of four runs.
    """
    pebble: PebbleServer = make_pebble(
        retry_after_authz=0, retry_after_order=0, nonce_reject=30
    )
    for index in range(2):
        (tmp_path / str(index)).mkdir()
        env = ACMEEnv(
            pebble=pebble, root=tmp_path / str(index), domains=[unique_domain()]
        )
        result = renew(env.domains, **env.kwargs(sleep=lambda _: None))
        assert result.renewed

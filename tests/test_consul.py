"""The Consul backend against a real Consul agent, beyond the contract suite.

Tests that need real time use ttls of 1 to 2 s, since the agent's
session_ttl_min is 1 s, and allow several seconds of slack for a loaded
machine. Takeover times are printed; run with ``-s -k takeover`` to see them.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

import singlewriter
from singlewriter.backends import consul as consul_backend
from singlewriter.backends.consul import LOCK_FLAGS, ConsulLock, ConsulSequencer
from tests._support import Worker, unique_name
from tests.fixtures_consul import ConsulAdmin, consul_url
from tests.servers import free_port

SECRET = "5ec7e7a1-0000-4000-8000-00000000c0de"


@pytest.fixture
def workers() -> Any:
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.close()


def spawn(workers: list[Worker], url: str, name: str, ttl: float) -> Worker:
    worker = Worker(url, name, ttl)
    workers.append(worker)
    return worker


def make_lock(agent: Any, ttl: float, **params: Any) -> ConsulLock:
    """Return a lock with a fresh name on ``agent``; ``params`` go into the URL."""
    options = {
        key: params.pop(key) for key in ("scheduler", "poll_interval") if key in params
    }
    return ConsulLock.from_url(
        consul_url(agent, **params), unique_name(), ttl=ttl, **options
    )


def waiter_thread(lock: singlewriter.Lock, timeout: float) -> tuple[Any, list[Any]]:
    """Start a thread that acquires ``lock``; it appends (lease, monotonic time)."""
    result: list[Any] = []

    def run() -> None:
        lease = lock.acquire(timeout=timeout)
        result.append((lease, time.monotonic()))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


# URLs and settings. Building a lock makes no network call, so these tests
# need no agent; the addresses below are never contacted.


@pytest.mark.parametrize(
    ("url", "name", "key", "address", "scheme"),
    [
        ("consul://127.0.0.1:8500/locks", "a", "locks/a", "127.0.0.1:8500", "http"),
        (
            "consul://127.0.0.1:8500/locks/acme/example.com",
            None,
            "locks/acme/example.com",
            "127.0.0.1:8500",
            "http",
        ),
        (
            "consul://127.0.0.1/example.com",
            None,
            "singlewriter/example.com",
            "127.0.0.1:8500",
            "http",
        ),
        ("consul://127.0.0.1/", "a", "singlewriter/a", "127.0.0.1:8500", "http"),
        ("consuls://127.0.0.1/p", "a", "p/a", "127.0.0.1:8501", "https"),
        ("consul://127.0.0.1:7/p?scheme=https", "a", "p/a", "127.0.0.1:7", "https"),
        ("consul://[::1]:8500/p", "a", "p/a", "[::1]:8500", "http"),
        ("consul://127.0.0.1/a%2Db/c", None, "a-b/c", "127.0.0.1:8500", "http"),
    ],
)
def test_url_key_layout(
    url: str, name: str | None, key: str, address: str, scheme: str
) -> None:
    """The URL path is the key prefix. Without a name, its last segment is the name."""
    lock = ConsulLock.from_url(url, name)

    assert lock.lock_key == key
    assert lock.epoch_key == key.rsplit("/", 1)[0] + "/.epoch/" + lock.name
    assert lock.address == address
    assert lock._http.base_url == f"{scheme}://{address}"


def test_url_parameters_reach_the_lock(tmp_path: Path) -> None:
    """lock_delay, min_session_ttl, dc and ca from the URL are applied."""
    ca = tmp_path / "ca.pem"
    ca.write_text("not parsed until a request is made\n")
    url = f"consuls://127.0.0.1/p?lock_delay=15&min_session_ttl=1&dc=dc2&ca={ca}"

    lock = ConsulLock.from_url(url, "a", ttl=5)

    assert lock.lock_delay == 15.0
    assert lock.min_session_ttl == 1.0
    assert lock._http.dc == "dc2"
    assert lock._http.verify == str(ca)
    assert lock.ttl == 5.0


def test_keyword_options_override_url() -> None:
    """Keyword options given to from_url win over the URL's parameters."""
    lock = ConsulLock.from_url("consul://127.0.0.1/p?lock_delay=15", "a", lock_delay=3)

    assert lock.lock_delay == 3.0


@pytest.mark.parametrize(
    ("url", "kwargs", "fragment"),
    [
        ("consul://127.0.0.1/p?colour=red", {}, "unknown parameter 'colour'"),
        ("consul://127.0.0.1:99999/p", {}, "port"),
        ("consul://127.0.0.1:http/p", {}, "port"),
        ("consul://127.0.0.1:0/p", {}, "port 0"),
        ("consul://127.0.0.1/p?dc=a&dc=b", {}, "more than once"),
        ("consul://127.0.0.1/p?dc=", {}, "empty value"),
        ("consul://user:pw@127.0.0.1/p", {}, "user information"),
        ("consul://127.0.0.1/p#x", {}, "fragment"),
        ("consul://127.0.0.1/", {"name": None}, "names no lock"),
        ("consuls://127.0.0.1/p?scheme=http", {}, "consuls://"),
        ("consul://127.0.0.1/p?scheme=ftp", {}, "http or https"),
        ("consul://127.0.0.1/p?lock_delay=soon", {}, "lock_delay='soon'"),
        ("consul://127.0.0.1/p?lock_delay=61", {}, "0 to 60 seconds"),
        ("consul://127.0.0.1/p?lock_delay=-1", {}, "0 to 60 seconds"),
        ("consul://127.0.0.1/p?ca=/etc/hostname", {}, "only to https"),
        ("consuls://127.0.0.1/p?ca=/nonexistent/ca.pem", {}, "does not exist"),
        ("consul://127.0.0.1/a/../b", {}, "prefix"),
        ("consul://127.0.0.1/p?dc=d%20c", {}, "datacenter"),
        ("consul://127.0.0.1/p", {"ttl": 5}, "session TTL range"),
        ("consul://127.0.0.1/p", {"ttl": 90000}, "session TTL range"),
        ("consul://127.0.0.1/p?min_session_ttl=0", {}, "min_session_ttl=0.0"),
        ("consul://127.0.0.1/p", {"ttl": None}, "needs a ttl"),
        ("consul://127.0.0.1/p", {"name": "../x"}, "lock name"),
    ],
)
def test_invalid_url_raises_config_error(
    url: str, kwargs: dict[str, Any], fragment: str
) -> None:
    """Each invalid URL or setting raises a ConfigError that names the problem."""
    name = kwargs.pop("name", "a")

    with pytest.raises(singlewriter.ConfigError) as raised:
        ConsulLock.from_url(url, name, **kwargs)

    assert fragment in str(raised.value)
    assert isinstance(raised.value, ValueError)


def test_token_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The token comes from the URL, a token file or else CONSUL_HTTP_TOKEN."""
    token_file = tmp_path / "token"
    token_file.write_text(f"{SECRET}\n")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "from-environment")

    def header(url: str) -> str | None:
        return ConsulLock.from_url(url, "a")._http._headers.get("X-Consul-Token")

    assert header("consul://127.0.0.1/p?token=from-url") == "from-url"
    assert header(f"consul://127.0.0.1/p?token_file={token_file}") == SECRET
    assert header("consul://127.0.0.1/p") == "from-environment"

    monkeypatch.delenv("CONSUL_HTTP_TOKEN")
    assert header("consul://127.0.0.1/p") is None


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("consul://127.0.0.1/p?token=a&token_file=/x", "only one"),
        ("consul://127.0.0.1/p?token_file=/nonexistent/token", "cannot read"),
        ("consul://127.0.0.1/p?token=has%20space", "printable ASCII"),
    ],
)
def test_invalid_token_raises_config_error(url: str, fragment: str) -> None:
    """A conflicting, unreadable or malformed token is a ConfigError."""
    with pytest.raises(singlewriter.ConfigError, match=fragment):
        ConsulLock.from_url(url, "a")


def test_token_redacted_in_errors_and_repr() -> None:
    """The token never appears in an error message or a lock's repr."""
    with pytest.raises(singlewriter.ConfigError) as raised:
        singlewriter.lock_from_url(f"consul://127.0.0.1/p?token={SECRET}&x=1", "a")
    lock = singlewriter.lock_from_url(f"consul://127.0.0.1/p?token={SECRET}", "a")

    assert SECRET not in str(raised.value)
    assert "token=***" in str(raised.value)
    assert SECRET not in repr(lock)


# Errors from a real agent, or from none.


@pytest.mark.consul
def test_unreachable_agent_fails_fast() -> None:
    """An agent that does not listen raises BackendUnavailable within seconds."""
    port = free_port()
    lock = singlewriter.lock_from_url(
        f"consul://127.0.0.1:{port}/p?token={SECRET}&min_session_ttl=1", "a", ttl=1
    )

    started = time.monotonic()
    with pytest.raises(singlewriter.BackendUnavailable) as raised:
        lock.acquire(timeout=30)
    elapsed = time.monotonic() - started

    # Five attempts with backoff from 50 ms: well under 3 s, even loaded.
    assert elapsed < 3
    assert f"127.0.0.1:{port}" in str(raised.value)
    assert SECRET not in str(raised.value)
    assert isinstance(raised.value.__cause__, requests.exceptions.ConnectionError)
    assert isinstance(raised.value, ConnectionError)


@pytest.mark.consul
def test_ttl_below_server_minimum(consul_agent: Any) -> None:
    """A ttl below the servers' session_ttl_min fails at acquire with advice."""
    url = consul_url(consul_agent, min_session_ttl=0.5)
    lock = singlewriter.lock_from_url(url, unique_name(), ttl=0.5)

    with pytest.raises(singlewriter.ConfigError) as raised:
        lock.acquire(timeout=5)

    assert "Invalid Session TTL" in str(raised.value)
    assert "session_ttl_min" in str(raised.value)


@pytest.mark.consul
def test_unknown_datacenter_rejected(consul_agent: Any) -> None:
    """A dc the agent cannot reach is a ConfigError, not an outage."""
    url = consul_url(consul_agent, dc="nowhere")
    lock = singlewriter.lock_from_url(url, unique_name(), ttl=1)

    with pytest.raises(singlewriter.ConfigError, match="No path to datacenter"):
        lock.acquire(timeout=5)


@pytest.mark.consul
def test_foreign_key_is_never_overwritten(
    consul_agent: Any, consul_admin: ConsulAdmin
) -> None:
    """A key at the lock path without Consul's lock flags is left alone."""
    lock = make_lock(consul_agent, ttl=1)
    consul_admin.put(lock.lock_key, b"someone's config")

    with pytest.raises(singlewriter.ConfigError, match="not a lock key"):
        lock.acquire(timeout=5)

    entry = consul_admin.key(lock.lock_key)
    assert entry is not None
    assert entry.get("Session") is None
    assert entry["Flags"] == 0


# What an acquisition stores in Consul.


@pytest.mark.consul
def test_sequencer_matches_consul(consul_agent: Any, consul_admin: ConsulAdmin) -> None:
    """lease.data is Consul's sequencer, and the session has the promised settings."""
    lock = make_lock(consul_agent, ttl=2)

    with lock as lease:
        sequencer = lease.data
        entry = consul_admin.key(lock.lock_key)
        session = consul_admin.session(sequencer.session)

    assert isinstance(sequencer, ConsulSequencer)
    assert entry is not None
    assert sequencer.key == lock.lock_key
    assert entry["Session"] == sequencer.session
    assert entry["LockIndex"] == sequencer.lock_index
    assert entry["ModifyIndex"] == sequencer.modify_index
    assert entry["Flags"] == LOCK_FLAGS
    assert lease.token == sequencer.epoch + sequencer.modify_index

    assert session is not None
    assert session["TTL"] == "2s"
    assert session["LockDelay"] == 0
    assert session["Behavior"] == "release"
    assert session["NodeChecks"] == []
    assert consul_admin.session(sequencer.session) is None, "release must destroy it"


@pytest.mark.consul
def test_tokens_increase_across_key_deletion(
    consul_agent: Any, consul_admin: ConsulAdmin
) -> None:
    """Deleting the lock key, or the prefix with the epoch, never lowers tokens."""
    prefix = unique_name("prefix")
    lock = make_lock(consul_agent, ttl=1, prefix=prefix)
    tokens = []

    with lock as lease:
        tokens.append(lease.token)
    consul_admin.delete(lock.lock_key)
    with lock as lease:
        tokens.append(lease.token)
    consul_admin.delete(prefix, recurse=True)
    assert consul_admin.key(lock.epoch_key) is None
    with lock as lease:
        tokens.append(lease.token)
        lock_index = lease.data.lock_index

    assert tokens[0] < tokens[1] < tokens[2], tokens
    assert lock_index == 1, "a recreated key starts LockIndex again"


@pytest.mark.consul
def test_epoch_below_seen_token_is_raised(
    consul_agent: Any, consul_admin: ConsulAdmin, caplog: pytest.LogCaptureFixture
) -> None:
    """An epoch edited downwards is raised, so this process gets no lower token."""
    lock = make_lock(consul_agent, ttl=1)
    with lock as lease:
        first = lease.token
    consul_admin.delete(lock.epoch_key)
    consul_admin.put(lock.epoch_key, b"1000")

    with caplog.at_level(logging.WARNING, logger="singlewriter"), lock as lease:
        second = lease.token

    assert second > first
    assert "raising the epoch" in caplog.text


# Losing the lock.


@pytest.mark.consul
def test_outside_session_destroy_loses_lease(
    consul_agent: Any, consul_admin: ConsulAdmin
) -> None:
    """Destroying the holder's session marks its lease lost at the next renewal."""
    lock = make_lock(consul_agent, ttl=2)
    lease = lock.acquire(timeout=5)

    consul_admin.destroy_session(lease.data.session)

    assert lease.lost.wait(timeout=5), "renewal did not notice the destroyed session"
    assert lease.lost_reason is not None
    assert "no longer held" in lease.lost_reason
    with pytest.raises(singlewriter.LockLost):
        lease.ensure_held()
    with lock.acquire(timeout=5) as successor:
        assert successor.token > lease.token
    assert lease.release() is False


@pytest.mark.consul
def test_key_deleted_from_outside_loses_lease(
    consul_agent: Any, consul_admin: ConsulAdmin
) -> None:
    """Deleting the lock key frees the lock, so the holder counts its lease lost."""
    lock = make_lock(consul_agent, ttl=2)
    lease = lock.acquire(timeout=5)

    consul_admin.delete(lock.lock_key)

    assert lease.lost.wait(timeout=5), "renewal did not notice the deleted key"
    lease.release()


@pytest.mark.consul
def test_agent_restart_loses_lease(
    fresh_consul: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A -dev agent restart drops the session: the holder stops, tokens still rise."""
    lock = make_lock(fresh_consul, ttl=2)

    # Raise the Raft index well above where a restarted agent starts.
    for _ in range(10):
        with lock.acquire(timeout=5):
            pass
    lease = lock.acquire(timeout=5)
    old_index = lease.data.modify_index

    fresh_consul.restart()

    assert lease.lost.wait(timeout=10), "the holder did not notice the restart"
    with caplog.at_level(logging.INFO, logger="singlewriter"):
        successor = lock.acquire(timeout=10)
    assert successor.token > lease.token
    assert successor.data.modify_index < old_index, "the restart lost the Raft index"
    assert "created the token epoch" in caplog.text
    successor.release()


@pytest.mark.consul
def test_renewal_keeps_lease_past_ttl(
    consul_agent: Any, consul_admin: ConsulAdmin
) -> None:
    """A held lease is renewed well past its ttl and its session stays alive."""
    lock = make_lock(consul_agent, ttl=1)

    with lock.acquire(timeout=5) as lease:
        time.sleep(3)  # real time: three ttls of renewals by the scheduler
        lease.ensure_held()
        assert consul_admin.session(lease.data.session) is not None


@pytest.mark.consul
def test_busy_names_the_holder(consul_agent: Any, workers: list[Worker]) -> None:
    """LockBusy names the host and process that hold the lock."""
    url = consul_url(consul_agent)
    name = unique_name()
    holder = spawn(workers, url, name, ttl=2)
    assert holder.request("acquire 30")["event"] == "acquired"

    with pytest.raises(singlewriter.LockBusy) as raised:
        singlewriter.lock_from_url(url, name, ttl=2).acquire(blocking=False)

    assert f"pid {holder.pid}" in str(raised.value)


@pytest.mark.consul
def test_threads_sharing_a_lock_never_overlap(consul_agent: Any) -> None:
    """Threads that share one ConsulLock take turns, with rising tokens."""
    lock = make_lock(consul_agent, ttl=2)
    inside: list[int] = []
    tokens: list[int] = []
    errors: list[BaseException] = []

    def take_turns() -> None:
        try:
            for _ in range(5):
                with lock.acquire(timeout=30) as lease:
                    inside.append(lease.token)
                    assert len(inside) == 1, "two threads held the lock at once"
                    tokens.append(lease.token)
                    time.sleep(0.005)
                    inside.remove(lease.token)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=take_turns) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert not errors, errors
    assert len(tokens) == 20
    assert tokens == sorted(tokens)
    assert len(set(tokens)) == 20


# Takeover after the holder ends.


@pytest.mark.consul
def test_takeover_after_sigterm(consul_agent: Any, workers: list[Worker]) -> None:
    """SIGTERM releases at once, and unlocking first avoids the lock-delay."""
    url = consul_url(consul_agent, lock_delay=10)
    name = unique_name()
    holder = spawn(workers, url, name, ttl=30)
    assert holder.request("acquire 30")["event"] == "acquired"
    lock = singlewriter.lock_from_url(url, name, ttl=30)
    thread, result = waiter_thread(lock, timeout=20)
    time.sleep(0.5)  # let the waiter reach its blocking query

    sent = time.monotonic()
    holder.signal(signal.SIGTERM)
    assert holder.wait() == 128 + signal.SIGTERM
    thread.join(timeout=20)

    assert result, "the waiter did not take over within 20 s"
    lease, acquired_at = result[0]
    takeover = acquired_at - sent
    print(f"\ntakeover after SIGTERM (ttl 30 s, lock_delay 10 s): {takeover:.3f} s")
    assert takeover < 2, "the waiter waited for the ttl or the lock-delay"
    lease.release()


@pytest.mark.consul
def test_takeover_after_sigkill(consul_agent: Any, workers: list[Worker]) -> None:
    """After SIGKILL the lock frees when Consul expires the session: ttl to 2 x ttl."""
    ttl = 2.0
    url = consul_url(consul_agent)
    name = unique_name()
    holder = spawn(workers, url, name, ttl=ttl)
    acquired = holder.request("acquire 30")
    assert acquired["event"] == "acquired"
    lock = singlewriter.lock_from_url(url, name, ttl=ttl)
    thread, result = waiter_thread(lock, timeout=20)
    time.sleep(0.5)

    killed = time.monotonic()
    holder.signal(signal.SIGKILL)
    thread.join(timeout=20)

    assert result, "the waiter did not take over within 20 s"
    lease, acquired_at = result[0]
    takeover = acquired_at - killed
    print(f"\ntakeover after SIGKILL (ttl {ttl} s): {takeover:.3f} s")

    # Consul keeps a session at least its ttl after the last renewal, which
    # the holder sent at most renew_interval = ttl/3 before it was killed.
    assert takeover >= ttl - ttl / 3
    assert takeover < 2 * ttl + 2
    assert lease.token > acquired["token"]
    lease.release()


@pytest.mark.consul
def test_lock_delay_holds_after_outside_destroy(
    consul_agent: Any, consul_admin: ConsulAdmin
) -> None:
    """With lock_delay set, a destroyed session keeps newcomers out that long."""
    delay = 2.0
    lock = make_lock(consul_agent, ttl=2, lock_delay=delay)
    lease = lock.acquire(timeout=5)

    destroyed = time.monotonic()
    consul_admin.destroy_session(lease.data.session)
    successor = lock.acquire(timeout=10)
    waited = time.monotonic() - destroyed

    assert waited >= delay - 0.2, f"took over after {waited:.2f} s"
    assert successor.token > lease.token
    successor.release()


@pytest.mark.consul
def test_waiter_wakes_on_release_without_polling(consul_agent: Any) -> None:
    """A waiter sleeps in a blocking query and wakes as soon as the key is unlocked."""
    url = consul_url(consul_agent)
    name = unique_name()
    holder = singlewriter.lock_from_url(url, name, ttl=2)
    waiter = singlewriter.lock_from_url(url, name, ttl=2, poll_interval=10)
    lease = holder.acquire(timeout=5)
    thread, result = waiter_thread(waiter, timeout=20)
    time.sleep(1)  # the waiter's second attempt is now in its blocking query

    released = time.monotonic()
    lease.release()
    thread.join(timeout=20)

    assert result
    successor, acquired_at = result[0]
    assert acquired_at - released < 1, "the waiter polled instead of blocking"
    successor.release()


# Recovery from a lost reply.


@pytest.mark.consul
def test_lost_acquire_reply_returns_same_lock(
    consul_agent: Any, consul_admin: ConsulAdmin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lock transaction whose reply is lost is recognised on the retry."""
    lock = make_lock(consul_agent, ttl=2)
    real_call = consul_backend._Http.call
    actions: list[str] = []
    lost: list[Any] = []

    def lose_first_acquire_reply(self: Any, method: str, path: str, **kw: Any) -> Any:
        reply = real_call(self, method, path, **kw)
        actions.append(kw["action"])
        if kw["action"] == "acquire" and reply.status == 200 and not lost:
            lost.append(reply)
            raise singlewriter.BackendUnavailable("reply lost on purpose")
        return reply

    monkeypatch.setattr(consul_backend._Http, "call", lose_first_acquire_reply)
    with lock.acquire(timeout=10) as lease:
        entry = consul_admin.key(lock.lock_key)

    assert lost, "no successful lock transaction was sent"
    assert actions.count("session create") == 1, actions
    assert "renew" in actions, "the kept session must be renewed before reuse"
    assert entry is not None
    assert entry["Session"] == lease.data.session
    assert entry["LockIndex"] == 1, "the retry must not count a second lock"


# Writes fenced by the lock.


@pytest.mark.consul
def test_fenced_put_while_held(consul_agent: Any, consul_admin: ConsulAdmin) -> None:
    """fenced_put writes while the lease holds the lock and returns the index."""
    lock = make_lock(consul_agent, ttl=2)
    target = f"singlewriter-test/data/{unique_name()}"

    with lock.acquire(timeout=5) as lease:
        index = lock.fenced_put(lease, target, "v1")

    entry = consul_admin.key(target)
    assert entry is not None
    assert entry["ModifyIndex"] == index
    assert entry["Value"] == "djE="  # base64 of "v1"


@pytest.mark.consul
def test_fenced_put_rejected_after_session_loss(
    consul_agent: Any, consul_admin: ConsulAdmin
) -> None:
    """Without the session, fenced_put raises StaleTokenError and writes nothing."""
    lock = make_lock(consul_agent, ttl=2)
    target = f"singlewriter-test/data/{unique_name()}"
    lease = lock.acquire(timeout=5)
    lock.fenced_put(lease, target, b"before")

    consul_admin.destroy_session(lease.data.session)
    with pytest.raises(singlewriter.StaleTokenError) as raised:
        lock.fenced_put(lease, target, b"after")

    entry = consul_admin.key(target)
    assert entry is not None
    assert entry["Value"] == "YmVmb3Jl"  # base64 of "before"
    assert raised.value.token == lease.token
    lease.release()


@pytest.mark.consul
def test_fenced_put_after_deadline(
    consul_agent: Any, consul_admin: ConsulAdmin
) -> None:
    """A lease past its local deadline may not write, whatever Consul records."""
    frozen = singlewriter.Scheduler(autostart=False)
    lock = make_lock(consul_agent, ttl=1, scheduler=frozen)
    target = f"singlewriter-test/data/{unique_name()}"
    lease = lock.acquire(timeout=5)

    time.sleep(1)  # real time: past the deadline of ttl - safety_margin = 0.9 s
    with pytest.raises(singlewriter.LockLost):
        lock.fenced_put(lease, target, b"late")

    assert consul_admin.key(target) is None


@pytest.mark.consul
def test_fenced_put_rejects_invalid_targets(consul_agent: Any) -> None:
    """fenced_put never writes the lock or epoch key, or with another lock's lease."""
    url = consul_url(consul_agent)
    lock = ConsulLock.from_url(url, unique_name(), ttl=2)
    other = ConsulLock.from_url(url, unique_name(), ttl=2)

    with lock.acquire(timeout=5) as lease:
        for key in (lock.lock_key, lock.epoch_key, "", "/"):
            with pytest.raises(singlewriter.ConfigError):
                lock.fenced_put(lease, key, b"x")
        with pytest.raises(singlewriter.ConfigError, match="another lock"):
            other.fenced_put(lease, "singlewriter-test/data/x", b"x")


# ACLs.

ACL_PREFIX = "acl-locks"
LOCK_RULES = f"""
key_prefix "{ACL_PREFIX}/" {{ policy = "write" }}
session_prefix "" {{ policy = "write" }}
"""


@pytest.fixture(scope="module")
def acl_tokens(acl_consul: Any) -> dict[str, str]:
    """Tokens on the ACL agent: one with the lock's rights, others lacking some."""
    admin = ConsulAdmin(acl_consul)
    return {
        "lock": admin.create_token(LOCK_RULES, "lock"),
        "keys-only": admin.create_token(
            f'key_prefix "{ACL_PREFIX}/" {{ policy = "write" }}', "keys-only"
        ),
        "sessions-only": admin.create_token(
            'session_prefix "" { policy = "write" }', "sessions-only"
        ),
    }


@pytest.mark.consul
def test_acl_token_limited_to_prefix_works(
    acl_consul: Any, acl_tokens: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """A token with key:write on the prefix and session:write does everything."""
    token = acl_tokens["lock"]
    url = consul_url(acl_consul, prefix=ACL_PREFIX, token=token)

    with caplog.at_level(logging.DEBUG, logger="singlewriter"):
        lock = singlewriter.lock_from_url(url, unique_name(), ttl=1)
        lease = lock.acquire(timeout=5)
        time.sleep(1.5)  # real time: renewals past the ttl need the token too
        lease.ensure_held()
        assert lease.release() is True

    assert token not in caplog.text
    assert "acquired lock" in caplog.text


@pytest.mark.consul
def test_acl_token_from_environment(
    acl_consul: Any, acl_tokens: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """CONSUL_HTTP_TOKEN is used when the URL has no token."""
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", acl_tokens["lock"])
    url = consul_url(acl_consul, prefix=ACL_PREFIX)

    with singlewriter.lock_from_url(url, unique_name(), ttl=1).acquire(timeout=5):
        pass


@pytest.mark.consul
@pytest.mark.parametrize(
    ("token_name", "prefix", "fragment"),
    [
        ("keys-only", ACL_PREFIX, "session:write"),
        ("sessions-only", ACL_PREFIX, "'key:read'"),
        ("lock", "outside-policy", "'key:read'"),
        ("unknown", ACL_PREFIX, "ACL not found"),
        (None, ACL_PREFIX, "Permission denied"),
    ],
)
def test_acl_token_without_rights(
    acl_consul: Any,
    acl_tokens: dict[str, str],
    token_name: str | None,
    prefix: str,
    fragment: str,
) -> None:
    """A token that lacks a right, or is unknown, raises a ConfigError naming it."""
    params = {}
    token = None
    if token_name is not None:
        token = acl_tokens.get(token_name, SECRET)
        params["token"] = token
    url = consul_url(acl_consul, prefix=prefix, **params)
    lock = singlewriter.lock_from_url(url, unique_name(), ttl=1)

    started = time.monotonic()
    with pytest.raises(singlewriter.ConfigError) as raised:
        lock.acquire(timeout=10)

    message = str(raised.value)
    assert fragment in message
    assert "key_prefix" in message, "the message must say which rights are needed"
    assert time.monotonic() - started < 5, "a denial must not be retried"
    if token is not None:
        assert token not in message


# Client behaviour.


@pytest.mark.consul
def test_loopback_agent_ignores_http_proxy(
    consul_agent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests to a loopback agent bypass HTTP_PROXY, as Go's net/http does."""
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{free_port()}")
    lock = make_lock(consul_agent, ttl=1)

    with lock.acquire(timeout=5) as lease:
        assert lease.held


# TLS.


@pytest.mark.consul
def test_tls_with_ca_works(tls_consul: Any, tmp_path: Path) -> None:
    """consuls:// or scheme=https, with ca=, verifies the agent and locks over TLS."""
    query = f"ca={tls_consul.ca_path}&min_session_ttl=1"
    https_url = f"consul://{tls_consul.https_addr}/tls?scheme=https&{query}"
    consuls_url = f"consuls://{tls_consul.https_addr}/tls?{query}"

    with singlewriter.lock_from_url(https_url, unique_name(), ttl=1).acquire(timeout=5):
        pass
    with ConsulLock.from_url(consuls_url, unique_name(), ttl=1).acquire(timeout=5):
        pass


@pytest.mark.consul
@pytest.mark.parametrize("with_other_ca", [False, True])
def test_tls_untrusted_certificate(
    tls_consul: Any, tmp_path: Path, with_other_ca: bool
) -> None:
    """A certificate that the CA bundle does not vouch for is a ConfigError."""
    from tests.servers._common import CertificateAuthority

    url = f"consuls://{tls_consul.https_addr}/tls?min_session_ttl=1"
    if with_other_ca:
        other = CertificateAuthority(tmp_path / "other", "some other CA")
        url += f"&ca={other.cert_path}"
    lock = ConsulLock.from_url(url, unique_name(), ttl=1)

    with pytest.raises(singlewriter.ConfigError, match="ca=PATH"):
        lock.acquire(timeout=5)

"""Redis backend specifics, against a real redis-server."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import redis

import singlewriter
from singlewriter.backends.redis import RedisLock
from tests._support import Worker, unique_name
from tests.servers import free_port

pytestmark = pytest.mark.redis


def test_each_operation_is_one_round_trip(
    redis_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Acquire, renew and release each send exactly one command to the server."""
    lock = singlewriter.lock_from_url(redis_server.url, unique_name(), ttl=5.0)
    assert isinstance(lock, RedisLock)
    # Load the three scripts into the server and open the connection.
    warm = lock.acquire(timeout=10)
    assert lock._renew(warm, 1.0) is True
    warm.release()

    # Count what crosses the socket: every request redis-py writes.
    sent: list[bytes] = []
    original = redis.connection.AbstractConnection.send_packed_command

    def counting(self: Any, command: Any, check_health: bool = True) -> None:
        sent.append(b"".join(command) if isinstance(command, list) else command)
        original(self, command, check_health)

    monkeypatch.setattr(
        redis.connection.AbstractConnection, "send_packed_command", counting
    )

    counts = []
    lease = lock.acquire(timeout=10)
    counts.append(len(sent))
    assert lock._renew(lease, 1.0) is True
    counts.append(len(sent))
    assert lease.release() is True
    counts.append(len(sent))

    assert counts == [1, 2, 3], sent


def test_lock_without_ttl_rejected(redis_server: Any) -> None:
    """A Redis lock with no expiry would outlive a killed holder."""
    client = redis.Redis.from_url(redis_server.url)
    with pytest.raises(singlewriter.ConfigError, match="needs a ttl"):
        RedisLock(client, "example.com", ttl=None)


def test_lost_reply_returns_same_grant(redis_server: Any) -> None:
    """A retried attempt with the same owner gets its own grant back."""
    lock = singlewriter.lock_from_url(redis_server.url, unique_name(), ttl=5.0)
    assert isinstance(lock, RedisLock)
    lock.acquire(timeout=10).release()

    first = lock._try_acquire(1.0, "owner-a")
    again = lock._try_acquire(1.0, "owner-a")
    other = lock._try_acquire(1.0, "owner-b")

    assert isinstance(first, singlewriter.Grant)
    assert again == first
    assert isinstance(other, singlewriter.Busy)


def test_restart_without_persistence_keeps_fencing(fresh_redis: Any) -> None:
    """After a data-losing restart, the old holder stops before anyone else
    acquires, and the next token is still higher."""
    ttl = 2.0
    name = unique_name()
    lost_at: list[float] = []
    old = singlewriter.lock_from_url(fresh_redis.url, name, ttl=ttl).acquire(timeout=30)
    old.on_lost = lambda lease: lost_at.append(time.monotonic())

    fresh_redis.restart()
    restarted_at = time.monotonic()

    # The successor runs in another process, so it has no memory of tokens.
    successor = Worker(fresh_redis.url, name, ttl)
    try:
        event = successor.request("acquire 30")
        assert event["event"] == "acquired"
    finally:
        successor.close()

    assert old.lost.wait(timeout=10)
    assert lost_at[0] < event["at"]
    assert old.deadline is not None and old.deadline < event["at"]
    assert event["at"] - restarted_at >= ttl - 1.0  # uptime has 1 s resolution
    assert event["token"] > old.token


def test_reconnect_reverifies_and_keeps_lease(redis_server: Any) -> None:
    """A killed connection is re-established and the lease re-verified."""
    admin = redis.Redis.from_url(redis_server.url)
    lease = singlewriter.lock_from_url(
        redis_server.url, unique_name(), ttl=1.5
    ).acquire(timeout=30)

    admin.client_kill_filter(_type="normal", skipme=True)
    time.sleep(2.0)  # more than one ttl: only renewals keep the lease alive

    assert lease.held
    lease.release()


def test_key_removed_from_outside_loses_lease(redis_server: Any) -> None:
    """When the lock key disappears, the next renewal declares the loss."""
    admin = redis.Redis.from_url(redis_server.url)
    lock = singlewriter.lock_from_url(redis_server.url, unique_name(), ttl=1.5)
    assert isinstance(lock, RedisLock)
    lease = lock.acquire(timeout=30)

    admin.delete(lock.lock_key)
    assert lease.lost.wait(timeout=5)
    assert "no longer held" in (lease.lost_reason or "")
    with pytest.raises(singlewriter.LockLost):
        lease.ensure_held()


def test_unreachable_server_is_unavailable() -> None:
    """Nothing listening: BackendUnavailable after the bounded retries."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    lock = singlewriter.lock_from_url(url, "example.com", ttl=2.0)
    started = time.monotonic()
    with pytest.raises(singlewriter.BackendUnavailable, match="did not respond"):
        lock.acquire(timeout=5)
    assert time.monotonic() - started < 10


def test_wrong_password_is_config_error(tmp_path: Any) -> None:
    """A bad password is a configuration problem, not something to retry."""
    from tests.conftest import unavailable
    from tests.servers import ServerUnavailable
    from tests.servers.redis import start_redis

    try:
        server = start_redis(tmp_path, password="right-password")
    except ServerUnavailable as exc:
        unavailable("redis-server", str(exc))
    try:
        good = singlewriter.lock_from_url(server.url, "example.com", ttl=2.0)
        good.acquire(timeout=10).release()

        bad_url = server.url.replace("right-password", "wrong-password")
        with pytest.raises(singlewriter.ConfigError) as error:
            singlewriter.lock_from_url(bad_url, "example.com", ttl=2.0).acquire()
        assert "wrong-password" not in str(error.value)

        no_auth = f"redis://127.0.0.1:{server.port}/0"
        with pytest.raises(singlewriter.ConfigError):
            singlewriter.lock_from_url(no_auth, "example.com", ttl=2.0).acquire()
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://127.0.0.1:6379/0?guard_after_data_loss=maybe", "true or false"),
        ("redis://127.0.0.1:notaport/0", "invalid"),
        ("redis://127.0.0.1:6379/notadb", "invalid"),
    ],
)
def test_bad_redis_urls(url: str, message: str) -> None:
    with pytest.raises(singlewriter.ConfigError, match=message):
        singlewriter.lock_from_url(url, "example.com")


def test_password_redacted_in_errors() -> None:
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/notadb"
    with pytest.raises(singlewriter.ConfigError) as error:
        singlewriter.lock_from_url(url, "example.com")
    assert "s3cret" not in str(error.value)


def test_concurrent_threads_one_lock_object(redis_server: Any) -> None:
    """Threads sharing one lock object get distinct leases and never overlap."""
    lock = singlewriter.lock_from_url(redis_server.url, unique_name(), ttl=5.0)
    inside: list[int] = []
    overlaps: list[list[int]] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(10):
                with lock as lease:
                    inside.append(lease.token)
                    if len(inside) > 1:
                        overlaps.append(list(inside))
                    time.sleep(0.002)
                    inside.remove(lease.token)
        except BaseException as exc:  # re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    assert not overlaps


def test_tls_url_with_password(tmp_path: Any) -> None:
    """rediss:// with a CA file and a password reaches a TLS-only server."""
    from tests.conftest import unavailable
    from tests.servers import ServerUnavailable
    from tests.servers.redis import start_redis

    try:
        server = start_redis(tmp_path, password="tls-password", tls=True)
    except ServerUnavailable as exc:
        unavailable("redis-server", str(exc))
    try:
        assert server.url.startswith("rediss://")
        lock = singlewriter.lock_from_url(server.url, unique_name(), ttl=2.0)
        with lock.acquire(timeout=10) as lease:
            assert lease.token > 0
            lease.ensure_held()

        plain = f"redis://:tls-password@127.0.0.1:{server.port}/0"
        with pytest.raises(singlewriter.BackendUnavailable):
            singlewriter.lock_from_url(plain, unique_name(), ttl=2.0).acquire()
    finally:
        server.stop()


def test_restart_from_old_snapshot_keeps_exclusion(fresh_redis: Any) -> None:
    """A restart that loads an RDB with the fence but not the lock key must
    not let a second holder in before the old holder's deadline."""
    ttl = 3.0
    name = unique_name()
    admin = redis.Redis.from_url(fresh_redis.url)
    lock = singlewriter.lock_from_url(fresh_redis.url, name, ttl=ttl)
    lock.acquire(timeout=30).release()
    admin.save()  # the snapshot has the fence key and no lock key
    admin.close()

    old = lock.acquire(timeout=30)
    fresh_redis.kill()
    fresh_redis.start()

    successor = Worker(fresh_redis.url, name, ttl)
    try:
        event = successor.request("acquire 30")
    finally:
        successor.close()
    assert event["event"] == "acquired"
    assert old.deadline is not None
    assert event["at"] > old.deadline
    assert event["token"] > old.token


def test_unix_socket_url(fresh_redis: Any) -> None:
    """unix:///PATH reaches Redis over its Unix socket."""
    url = f"unix://{fresh_redis.socket_path}?db=0"
    lock = singlewriter.lock_from_url(url, unique_name(), ttl=2.0)
    with lock.acquire(timeout=30) as lease:
        lease.ensure_held()


def test_interrupted_acquire_frees_grant(redis_server: Any) -> None:
    """A signal that lands after the grant but before the lease exists must
    not leave the lock taken until its ttl."""

    class Interrupted(RedisLock):
        def _try_acquire(self, timeout: float, owner: str) -> Any:
            super()._try_acquire(timeout, owner)
            raise KeyboardInterrupt

    client = redis.Redis.from_url(redis_server.url)
    name = unique_name()
    # The restart guard is off so that the first attempt is granted.
    lock = Interrupted(client, name, ttl=30.0, guard_after_data_loss=False)
    with pytest.raises(KeyboardInterrupt):
        lock.acquire(timeout=30)

    plain = RedisLock(client, name, ttl=30.0, guard_after_data_loss=False)
    plain.acquire(blocking=False).release()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://127.0.0.1:{port}/0?bogus=1", "bogus"),
        ("redis://[::1/0", "invalid"),
    ],
)
def test_bad_redis_url_options(url: str, message: str) -> None:
    with pytest.raises(singlewriter.ConfigError, match=message):
        singlewriter.lock_from_url(url.format(port=free_port()), "example.com")


def test_unknown_keyword_option_rejected() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(singlewriter.ConfigError, match="unknown option"):
        singlewriter.lock_from_url(url, "example.com", colour="blue")


def test_database_out_of_range_is_config_error(redis_server: Any) -> None:
    url = redis_server.url.rsplit("/", 1)[0] + "/99999"
    started = time.monotonic()
    with pytest.raises(singlewriter.ConfigError, match="no such database"):
        singlewriter.lock_from_url(url, unique_name(), ttl=2.0).acquire(timeout=5)
    assert time.monotonic() - started < 2, "a permanent error must not be retried"


def test_acl_without_eval_is_config_error(redis_server: Any) -> None:
    """A user that may not run scripts gets a clear permission error."""
    admin = redis.Redis.from_url(redis_server.url)
    admin.acl_setuser(
        "no-scripts", enabled=True, passwords=["+pw"], keys=["*"], commands=["+get"]
    )
    url = redis_server.url.replace("redis://", "redis://no-scripts:pw@")
    with pytest.raises(singlewriter.ConfigError, match="rejected"):
        singlewriter.lock_from_url(url, unique_name(), ttl=2.0).acquire(timeout=5)

"""A lock in Redis whose acquisition, renewal and release are one script each.

Keys, for prefix P and lock name N (the braces keep both keys in one Redis
Cluster hash slot):

- ``P:{N}:lock`` contains ``OWNER TOKEN`` with a PX expiry of the ttl.
  OWNER is 128 random bits chosen per acquisition.
- ``P:{N}:fence`` contains the last token issued and never expires.

Rules:

- Acquire (one round trip): if the lock key exists, report busy with its
  remaining PTTL, unless it is ours from an attempt whose reply was lost, in
  which case return that grant again. Otherwise the token is the largest of
  fence + 1, the server's TIME in microseconds, and the caller's own highest
  token + 1; store it in both keys.
- Renew and release (one round trip each) act only when the lock key still
  holds this lease's ``OWNER TOKEN``.
- Data loss. A Redis without persistence loses both keys when it
  restarts. Tokens still increase, because a new token is at least the
  server clock in microseconds, which has moved past every earlier token
  unless that clock went backwards. Mutual exclusion survives the restart
  too: while the server has been up for less than one ttl, the script
  grants no lock whose key is missing. A holder from before the restart
  could renew only before it, so its own deadline has passed by then. This
  covers a restart from an older RDB snapshot as well, which brings back
  the fence key but not the lock key. It assumes every process uses the
  same ttl for a name. FLUSHALL or eviction of a live server is not
  detected: run Redis with ``maxmemory-policy noeviction`` (the default).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import redis
import redis.exceptions
from redis.backoff import NoBackoff
from redis.retry import Retry

from .._errors import BackendUnavailable, ConfigError
from .._lease import Lease
from .._lock import Busy, Grant, Lock

__all__ = ["RedisLock"]

log = logging.getLogger(__name__)

# KEYS: lock, fence. ARGV: owner, ttl in ms, caller's token floor, guard flag.
# Returns {1, token} on a grant, {0, pttl_ms, holder} when busy.
# string.format("%.0f") is needed because tostring() prints large Lua
# numbers in exponent form; tokens stay below 2^53, so doubles are exact.
_ACQUIRE = """
local current = redis.call('GET', KEYS[1])
if current then
  local space = string.find(current, ' ', 1, true)
  if space and string.sub(current, 1, space - 1) == ARGV[1] then
    return {1, string.sub(current, space + 1)}
  end
  return {0, redis.call('PTTL', KEYS[1]), 'another process'}
end
if ARGV[4] == '1' then
  local info = redis.call('INFO', 'server')
  local uptime_ms = tonumber(string.match(info, 'uptime_in_seconds:(%d+)')) * 1000
  if uptime_ms < tonumber(ARGV[2]) then
    return {0, tonumber(ARGV[2]) - uptime_ms, 'the restart guard'}
  end
end
local fence = redis.call('GET', KEYS[2])
local now = redis.call('TIME')
local micros = tonumber(now[1]) * 1000000 + tonumber(now[2])
local token = math.max((tonumber(fence) or 0) + 1, micros, tonumber(ARGV[3]) + 1)
local text = string.format('%.0f', token)
redis.call('SET', KEYS[2], text)
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. text, 'PX', ARGV[2])
return {1, text}
"""

# KEYS: lock. ARGV: "OWNER TOKEN", ttl in ms. Returns 1 if renewed.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: lock. ARGV: "OWNER TOKEN". Returns 1 if released.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS: lock. ARGV: owner. Frees a lock this owner got in an attempt whose
# reply never arrived. Returns 1 if it freed one.
_RELEASE_OWNER = """
local current = redis.call('GET', KEYS[1])
if current and string.sub(current, 1, #ARGV[1] + 1) == ARGV[1] .. ' ' then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# Highest token this process has seen per (server, key), passed to the
# acquire script as a floor so tokens increase even if the server clock and
# the fence key both went back.
_seen: dict[tuple[str, str], int] = {}
_seen_lock = threading.Lock()


class RedisLock(Lock):
    """A lock on one Redis server, for holders on any number of hosts.

    ``client`` is a ``redis.Redis``; give it a ``socket_timeout`` shorter
    than the ttl so that a hung call cannot outlast the lease. The lock
    needs a ttl: a Redis lock without expiry would stay held forever after
    its holder is killed.

    ``guard_after_data_loss`` (default True) grants no lock while the
    server has been up for less than one ttl; see the module docstring.
    Turning it off makes acquisitions right after a server start immediate,
    but a restart without persistence can then let two holders overlap.
    Tokens still increase, so a fenced store still rejects the older one.
    """

    backend = "redis"

    def __init__(
        self,
        client: redis.Redis,
        name: str,
        *,
        ttl: float | None = 30.0,
        prefix: str = "singlewriter",
        guard_after_data_loss: bool = True,
        **options: Any,
    ) -> None:
        super().__init__(name, ttl=ttl, **options)
        assert self.ttl is not None
        self.client = client
        self.prefix = prefix
        self.guard_after_data_loss = guard_after_data_loss
        self.lock_key = f"{prefix}:{{{self.name}}}:lock"
        self.fence_key = f"{prefix}:{{{self.name}}}:fence"
        self._ttl_ms = max(1, int(self.ttl * 1000))
        self._acquire_script = client.register_script(_ACQUIRE)
        self._renew_script = client.register_script(_RENEW)
        self._release_script = client.register_script(_RELEASE)
        self._release_owner_script = client.register_script(_RELEASE_OWNER)
        self._server = _describe(client)

        # One connection of this lock's own, taken out of the client's pool:
        # going through the client costs more per call than a round trip on
        # loopback (pool checkout, retry wrapper, event hooks).
        self._connection: Any = None
        self._connection_pid = 0
        self._connection_lock = threading.Lock()

    def close(self) -> None:
        """Close this lock's own connection; the next call opens a new one."""
        with self._connection_lock:
            if self._connection is not None and self._connection_pid == os.getpid():
                self._connection.disconnect()
            self._connection = None

    @classmethod
    def from_url(cls, url: str, name: str, **options: Any) -> RedisLock:
        """Build a lock from ``redis://`` or ``rediss://`` with its own client."""
        _check_url(url, name)
        client_url, client_options, lock_options = _split_url(url, options)
        try:
            client = redis.Redis.from_url(client_url, **client_options)
            # redis-py checks connection options only when it first builds a
            # connection; build one now so a bad option fails here.
            client.connection_pool.make_connection()
        except (ValueError, TypeError, redis.exceptions.RedisError) as exc:
            raise ConfigError(
                f"Redis URL {_redact(url)!r} for lock {name!r} is invalid: {exc}."
                " Use redis://[:PASSWORD@]HOST[:PORT][/DB] or rediss://... for TLS.",
                lock_name=name,
                backend=cls.backend,
            ) from exc
        return cls(client, name, **lock_options)

    def _try_acquire(self, timeout: float, owner: str) -> Grant | Busy:
        floor = _seen.get((self._server, self.lock_key), 0)
        guard = "1" if self.guard_after_data_loss else "0"
        reply = self._call(
            self._acquire_script,
            [self.lock_key, self.fence_key],
            [owner, self._ttl_ms, floor, guard],
            "acquire",
            timeout,
        )

        if int(reply[0]) != 1:
            retry_after = max(0, int(reply[1])) / 1000
            return Busy(retry_after=retry_after or None, holder=_text(reply[2]))

        token = int(reply[1])
        with _seen_lock:
            key = (self._server, self.lock_key)
            _seen[key] = max(_seen.get(key, 0), token)
        return Grant(token, data=f"{owner} {token}")

    def _renew(self, lease: Lease, timeout: float) -> bool:
        reply = self._call(
            self._renew_script,
            [self.lock_key],
            [lease.data, self._ttl_ms],
            "renew",
            timeout,
        )
        return int(reply) == 1

    def _release(self, lease: Lease, timeout: float) -> bool:
        reply = self._call(
            self._release_script, [self.lock_key], [lease.data], "release", timeout
        )
        return int(reply) == 1

    def _abandon_attempt(self, owner: str) -> None:
        try:
            freed = self._call(
                self._release_owner_script, [self.lock_key], [owner], "release"
            )
        except Exception as exc:  # best effort; the ttl frees it otherwise
            log.warning(
                "could not free lock %r after an interrupted acquire: %s. It"
                " expires after its ttl of %s s.",
                self.name,
                exc,
                self.ttl,
            )
            return
        if int(freed) == 1:
            log.info("freed lock %r granted to an interrupted acquire", self.name)

    def _call(
        self,
        script: Any,
        keys: list[str],
        args: list[Any],
        action: str,
        timeout: float | None = None,
    ) -> Any:
        # redis-py reconnects on its own. That is safe here: every script
        # checks the stored owner, so a call over a new connection (perhaps
        # to a restarted server) re-verifies the lease instead of trusting
        # that nothing happened while the connection was down.
        try:
            limit = self.operation_timeout if timeout is None else timeout
            return self._run_script(script, keys, args, limit)
        except redis.exceptions.AuthenticationError as exc:
            raise ConfigError(
                f"Redis at {self._server} rejected the credentials for the"
                f" {action} of lock {self.name!r}: {exc}. Check the password and"
                " user in the lock URL.",
                lock_name=self.name,
                backend=self.backend,
            ) from exc
        except redis.exceptions.ConnectionError as exc:
            if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                raise ConfigError(
                    f"the TLS certificate of Redis at {self._server} did not"
                    f" verify for lock {self.name!r}: {exc}. Pass the CA that"
                    " signed it as ?ssl_ca_certs=PATH in the rediss:// URL.",
                    lock_name=self.name,
                    backend=self.backend,
                ) from exc
            raise self._unavailable(action, exc) from exc
        except redis.exceptions.TimeoutError as exc:
            raise self._unavailable(action, exc) from exc
        except redis.exceptions.ResponseError as exc:
            raise _response_error(self, action, exc) from exc

    def _unavailable(self, action: str, exc: Exception) -> BackendUnavailable:
        return BackendUnavailable(
            f"Redis at {self._server} did not respond to the {action} of lock"
            f" {self.name!r}: {exc}. Check that the server is up and reachable.",
            lock_name=self.name,
            backend=self.backend,
        )

    def _run_script(
        self, script: Any, keys: list[str], args: list[Any], timeout: float
    ) -> Any:
        with self._connection_lock:
            connection = self._own_connection()
            command = (len(keys), *keys, *args)

            # Bound this call by the caller's timeout (for a renewal, the
            # time left before the lease deadline) when that is shorter
            # than the connection's own socket timeout.
            sock = getattr(connection, "_sock", None)
            if sock is not None:
                configured = connection.socket_timeout
                limit = timeout if configured is None else min(timeout, configured)
                sock.settimeout(limit)
            try:
                connection.send_command("EVALSHA", script.sha, *command)
                return connection.read_response()
            except redis.exceptions.NoScriptError:
                # A restarted server or SCRIPT FLUSH forgot the script. EVAL
                # runs it from source and caches it again.
                connection.send_command("EVAL", script.script, *command)
                return connection.read_response()

    def _own_connection(self) -> Any:
        # A forked child must not share the parent's socket: replies would
        # go to whichever process reads first.
        if self._connection is None or self._connection_pid != os.getpid():
            self._connection = self.client.connection_pool.make_connection()
            self._connection_pid = os.getpid()
        return self._connection


def _response_error(
    lock: RedisLock, action: str, exc: redis.exceptions.ResponseError
) -> Exception:
    text = str(exc)
    if "DB index is out of range" in text:
        return ConfigError(
            f"Redis at {lock._server} has no such database for lock"
            f" {lock.name!r}: {text}. Use a database number the server has"
            " (0 to databases - 1) in the URL path.",
            lock_name=lock.name,
            backend=lock.backend,
        )
    permission = isinstance(exc, redis.exceptions.NoPermissionError)
    if permission or text.startswith(("NOAUTH", "WRONGPASS", "NOPERM")):
        return ConfigError(
            f"Redis at {lock._server} rejected the {action} of lock {lock.name!r}:"
            f" {text}. Check the password and ACL user in the URL; the user needs"
            " EVALSHA, EVAL and INFO on the lock's keys.",
            lock_name=lock.name,
            backend=lock.backend,
        )
    # LOADING, BUSY, READONLY (a replica after failover) and the like pass.
    return BackendUnavailable(
        f"Redis at {lock._server} failed the {action} of lock {lock.name!r}: {text}",
        lock_name=lock.name,
        backend=lock.backend,
    )


_URL_LOCK_OPTIONS = ("prefix", "guard_after_data_loss")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _check_url(url: str, name: str) -> None:
    """Reject what redis-py would silently ignore or fail on later."""
    problem = None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsing the port validates it
    except ValueError as exc:
        problem = f"it does not parse ({exc})"
        parts = urlsplit("redis://")
    database = parts.path.strip("/")
    if parts.scheme != "unix" and database and not database.isdigit():
        problem = f"the database {database!r} is not a number"
    if problem is not None:
        raise ConfigError(
            f"Redis URL {_redact(url)!r} for lock {name!r} is invalid: {problem}."
            " Use redis://[:PASSWORD@]HOST[:PORT][/DB] or rediss://... for TLS.",
            lock_name=name,
            backend=RedisLock.backend,
        )


def _split_url(
    url: str, options: dict[str, Any]
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Split the lock's own URL parameters from those redis-py understands.

    Return the URL for redis-py, extra client options, and lock options.
    """
    parts = urlsplit(url)
    query = parse_qs(parts.query, keep_blank_values=True)
    lock_options = dict(options)
    for key in _URL_LOCK_OPTIONS:
        if key in query:
            lock_options.setdefault(key, query.pop(key)[-1])
    client_url = url
    if lock_options.keys() - options.keys():
        # urlunsplit drops the "//" of unix:///PATH, so rebuild by hand.
        base = url.split("?", 1)[0]
        encoded = urlencode(query, doseq=True)
        client_url = f"{base}?{encoded}" if encoded else base
    if "guard_after_data_loss" in lock_options:
        lock_options["guard_after_data_loss"] = _flag(
            "guard_after_data_loss", lock_options["guard_after_data_loss"]
        )

    # A single call must end well inside the ttl; redis-py's own retries are
    # off because the lock retries with its own deadline in mind.
    ttl = float(lock_options.get("ttl") or 30.0)
    timeout = min(5.0, max(0.05, ttl / 4))
    client_options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    for key in ("socket_timeout", "socket_connect_timeout"):
        if key in query:
            client_options.pop(key)
    return client_url, client_options, lock_options


def _flag(field: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"{field}={value!r} is invalid; use true or false")


def _describe(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix:{kwargs['path']}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"


def _redact(url: str) -> str:
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return re.sub(r"//[^@/]*@", "//***@", url)
    if password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[-1]
    user = unquote(parts.username or "")
    return parts._replace(netloc=f"{user}:***@{netloc}").geturl()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

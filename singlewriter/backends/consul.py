"""A lock in Consul's KV store, held by a session and fenced by the Raft index.

Keys, for prefix P and lock name N:

- ``P/N`` is the lock key. A session holds it through the KV ``lock`` verb.
  Its value records the holder's host and pid, and its flags carry the value
  that Consul's Go client uses for lock keys (``LockFlagValue`` in
  api/lock.go), so a Go ``api.Lock`` on the same key contends for it
  instead of reporting a conflict. A key at that path with
  other flags belongs to someone else and is never overwritten.
- ``P/.epoch/N`` holds the epoch: the wall-clock time in microseconds at
  which it was created. Lock names never start with a dot, so no lock key can
  collide with an epoch key.

Rules:

- Acquire. Read the lock key. If another session holds it, report busy;
  from the second attempt of an ``acquire()`` call on, a busy attempt first
  waits in a blocking query until the key changes, so a release wakes the
  waiter at once without polling. When the key is free, create a session
  (TTL = the lock's ttl, no health checks, the configured lock-delay,
  behavior ``release``) and send one transaction: ``lock`` P/N with that
  session, ``get`` P/N and ``get`` P/.epoch/N. If the epoch key is missing,
  create it with check-and-set index 0, so only one process creates it, and
  send the transaction again.
- Token. ``E + ModifyIndex(P/N) - CreateIndex(P/.epoch/N)``, where E is
  the epoch key's value: the epoch's creation time plus the number of Raft
  writes between the epoch's creation and this acquisition. ModifyIndex is
  the Raft index of the transaction that locked the key, so tokens strictly
  increase for as long as Consul keeps its Raft history, also when someone
  deletes the lock key. The lease carries Consul's own sequencer (key,
  LockIndex, session) in ``lease.data``.
- A lost reply. The session created for an ``acquire()`` call is kept for
  its later attempts. If a transaction succeeded but its reply was lost, the
  next attempt finds the key locked by that session, renews the session and
  locks again, which Consul accepts for the session that already holds it.
- Renew. ``PUT /v1/session/renew/ID`` restarts the session's TTL. A 404
  means the session is gone (expired, destroyed, or the servers lost their
  data) and the lease is lost. A read-only transaction then checks that the
  key is still locked by the session, because deleting the key frees the
  lock without touching the session.
- Release. Unlock the key with the session in one transaction, then destroy
  the session. Consul applies the lock-delay only when a session that still
  holds locks is invalidated, so unlocking first lets a waiter in at once.

Why the holder's deadline passes before anyone else can acquire. Consul's
leader starts a session's TTL timer when it applies the create or renew,
which happens after the holder sent the request. It invalidates the session
only when that timer reaches twice the TTL, and a newly elected leader starts
every timer again at full length (agent/consul/session_ttl.go in Consul
v1.14). Without health checks, only this TTL expiry or an explicit destroy
invalidates the session, and nobody else can lock the key before the
session is invalidated. The holder's deadline is ``sent + ttl -
safety_margin``, where ``sent`` is the start of the renewal, or of the
acquisition attempt that created or renewed the session. That is earlier
than ``sent + ttl``, which is no later than the earliest possible expiry.
This holds unless the holder's clock runs slower than the leader's by more
than ``safety_margin / ttl`` (10% by default).

Lock-delay. After a session that holds a key is invalidated, Consul refuses
to lock that key again for the session's lock-delay (0 to 60 s). On a TTL
expiry the holder's deadline has already passed, as redacted_url above, so a
lock-delay would only prolong the wait after a crash. It matters when
someone else destroys the session or deregisters its node: the holder then
learns of the loss only at its next renewal, up to ``renew_interval``
later. The default of 0 lets a new holder in at once in that case, and a
store that checks tokens rejects the old holder's writes. A lock-delay of
at least ``ttl`` keeps the new holder out until the old holder's deadline
has passed, at the price of ``lock_delay`` more waiting after a crash;
since Consul caps the lock-delay at 60 s, this works only for a ttl of up
to 60 s.

Data loss. Consul servers that lose their Raft data (a ``-dev`` agent
restarting, or servers rebuilt without a snapshot) forget every session,
key and lock-delay, and their Raft index starts again near 0. The holder
finds out at its next renewal. Until then, or until its deadline if Consul
stays unreachable, a new holder may already run. Tokens still increase:
the new holder recreates the epoch with the current time in microseconds.
An earlier token is below the time at which it was issued as long as
Consul commits fewer than one Raft write per microsecond, so the new epoch
exceeds it unless the clock of the host that recreates the epoch is behind
the earlier hosts' clocks. A process never accepts a token below the
highest one it has seen: it raises the epoch instead.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import logging
import math
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import requests

from .._errors import BackendUnavailable, ConfigError, StaleTokenError
from .._lease import Lease
from .._lock import Busy, Grant, Lock

__all__ = ["LOCK_FLAGS", "ConsulLock", "ConsulSequencer"]

log = logging.getLogger(__name__)

#: KV flags of a lock key, the same value as ``LockFlagValue`` in Consul's
#: api/lock.go.
LOCK_FLAGS = 0x2DDCCBC058A50C18

# Consul's limits (HTTP API docs for sessions, and the sessions page): a
# session TTL from the servers' session_ttl_min (10 s unless configured) to
# 86,400 s, and a lock-delay from 0 to 60 s.
_DEFAULT_MIN_SESSION_TTL = 10.0
_MAX_SESSION_TTL = 86400.0
_MAX_LOCK_DELAY = 60.0

_DEFAULT_PREFIX = "singlewriter"
_DEFAULT_PORTS = {"http": 8500, "https": 8501}
_URL_PARAMETERS = (
    "ca",
    "dc",
    "lock_delay",
    "min_session_ttl",
    "scheme",
    "token",
    "token_file",
)

# A blocking query may return up to wait/16 late: Consul adds that much
# random jitter to the wait (HTTP API docs, blocking queries).
_JITTER = 1 / 16

# Consul's error texts for the transaction outcomes that are not failures
# of the request itself.
_HELD_BY_OTHER = "lock is already held"
_LOCK_DELAY = "due to lock delay"
_INVALID_SESSION = "invalid session"
_MISSING_KEY = "doesn't exist"

# Consul returns HTTP 500 for these configuration mistakes, as for outages.
# Each marker in the reply text maps to the advice for the fix.
_CONFIG_FAILURES = {
    "Session TTL": (
        "use a ttl in the range Consul names; its lower end is the servers'"
        " session_ttl_min, which min_session_ttl should match"
    ),
    "No path to datacenter": "check dc=: the agent knows no such datacenter",
}

_SEGMENT = re.compile(r"[^\s/?#%]+")
_TOKEN = re.compile(r"[\x21-\x7e]{1,512}")
_DATACENTER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

# Highest token this process has seen per (server, lock key). A new epoch
# starts above it, and a grant below it raises the epoch first.
_seen: dict[tuple[str, str], int] = {}
_seen_lock = threading.Lock()


@dataclass(frozen=True)
class ConsulSequencer:
    """Consul's own record of one acquisition, kept in ``lease.data``.

    ``key``, ``lock_index`` and ``session`` form Consul's sequencer: a
    service that reads the key can check that a request comes from the
    current holder. ``modify_index`` is the Raft index of the acquisition
    and ``epoch`` the offset that turns it into the lease's token.
    """

    key: str
    session: str
    lock_index: int
    modify_index: int
    epoch: int


@dataclass
class _Attempts:
    """State kept between the attempts of one ``acquire()`` call."""

    touched: float
    count: int = 0
    session: str | None = None


@dataclass(frozen=True)
class _Reply:
    status: int
    index: int
    payload: Any


class _Budget:
    """The time left for the requests of one backend step."""

    def __init__(self, clock: Callable[[], float], seconds: float) -> None:
        self._clock = clock
        self._end = clock() + seconds

    def left(self) -> float:
        return max(0.001, self._end - self._clock())


class ConsulLock(Lock):
    """A lock on a Consul cluster, for holders on any number of hosts.

    ``host`` and ``port`` address a Consul agent's HTTP API (port 8500 for
    http and 8501 for https unless given). ``token`` is an ACL token; if
    it and ``token_file`` are None, CONSUL_HTTP_TOKEN is used. The token
    needs ``key:write`` on the prefix and ``session:write`` on the agent's
    node. ``ca`` is a CA bundle file for https. ``dc`` is the datacenter,
    by default the agent's own.

    ``ttl`` becomes the session TTL and must lie between
    ``min_session_ttl`` (the servers' ``session_ttl_min``, 10 s unless
    lowered) and 86,400 s. ``lock_delay`` (0 to 60 s, default 0) is
    explained in the module docstring.
    """

    backend = "consul"

    def __init__(
        self,
        name: str,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        scheme: str = "http",
        prefix: str = _DEFAULT_PREFIX,
        token: str | None = None,
        token_file: str | os.PathLike[str] | None = None,
        ca: str | os.PathLike[str] | None = None,
        dc: str | None = None,
        lock_delay: float = 0.0,
        min_session_ttl: float = _DEFAULT_MIN_SESSION_TTL,
        ttl: float | None = 30.0,
        **options: Any,
    ) -> None:
        super().__init__(name, ttl=ttl, **options)
        assert self.ttl is not None
        self.prefix = _check_prefix(prefix, self.name)
        self.lock_key = f"{self.prefix}/{self.name}"
        self.epoch_key = f"{self.prefix}/.epoch/{self.name}"
        self.lock_delay = _check_lock_delay(lock_delay, self.name)
        self.min_session_ttl = _check_min_session_ttl(min_session_ttl, self.name)
        _check_session_ttl(self.ttl, self.min_session_ttl, self.name)

        self._http = _Http(
            self.name,
            host=host,
            port=port,
            scheme=scheme,
            token=_resolve_token(token, token_file, self.name),
            ca=ca,
            dc=_check_dc(dc, self.name),
            prefix=self.prefix,
        )
        self.address = self._http.address
        self._server = f"{self._http.base_url} dc={dc or ''}"
        self._holder = f"{socket.gethostname()} pid {os.getpid()}"
        self._attempts: dict[str, _Attempts] = {}
        self._attempts_lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"<ConsulLock {self.name!r} key={self.lock_key!r} at {self.address}"
            f" ttl={self.ttl}>"
        )

    @classmethod
    def from_url(cls, url: str, name: str | None = None, **options: Any) -> ConsulLock:
        """Build a lock from ``consul://HOST[:PORT]/PREFIX`` or ``consuls://``.

        The lock key is PREFIX/NAME. Without ``name`` the last path segment
        is the lock name and the rest is the prefix; an empty prefix means
        ``singlewriter``. Query parameters: ``token``, ``token_file``,
        ``scheme=https``, ``ca``, ``dc``, ``lock_delay`` and
        ``min_session_ttl`` (seconds). Keyword ``options`` win over the URL.
        """
        settings = _parse_url(url, name)
        lock_name = settings.pop("name")
        settings.update(options)
        return cls(lock_name, **settings)

    # The three backend steps.

    def _try_acquire(self, timeout: float, owner: str) -> Grant | Busy:
        budget = _Budget(self.clock, timeout)
        attempts = self._attempts_for(owner)

        entry, index = self._read_lock_key(budget)
        holder = entry.get("Session") if entry is not None else None
        if holder and holder != attempts.session:
            if attempts.count == 1:
                return Busy(holder=_describe_holder(entry or {}))

            # This call has already waited, so wait for the key to change
            # instead of polling. The lock itself is left to the next
            # attempt: the lease deadline counts from an attempt's start,
            # which a long wait here would eat into.
            self._wait_for_change(index, budget)
            return Busy(retry_after=0.0, holder=_describe_holder(entry or {}))

        # A session left by an earlier attempt of this call has not been
        # renewed since, so renew it: the new lease's deadline is measured
        # from this attempt. If that attempt's transaction locked the key
        # but its reply was lost, the lock below succeeds again.
        if attempts.session is None:
            attempts.session = self._create_session(budget)
        elif not self._renew_session(attempts.session, budget):
            attempts.session = None
            return Busy(retry_after=0.0)

        result = self._lock_transaction(attempts, owner, budget)
        if isinstance(result, Grant):
            with self._attempts_lock:
                self._attempts.pop(owner, None)
        return result

    def _renew(self, lease: Lease, timeout: float) -> bool:
        # NOTE: an ACL token revoked while a lease is held makes this raise
        # ConfigError. The scheduler logs it and retries until the deadline.
        sequencer: ConsulSequencer = lease.data
        budget = _Budget(self.clock, timeout)
        if not self._renew_session(sequencer.session, budget):
            return False
        return self._still_locked(sequencer, budget)

    def _release(self, lease: Lease, timeout: float) -> bool:
        sequencer: ConsulSequencer = lease.data
        budget = _Budget(self.clock, timeout)
        unlocked = self._unlock(sequencer, budget, "release")

        # The session holds nothing now, so destroying it applies no
        # lock-delay. A failure here is harmless: the TTL ends it.
        try:
            self._destroy_session(sequencer.session, budget)
        except BackendUnavailable as exc:
            log.debug("destroying session of lock %r failed: %s", self.name, exc)
        return unlocked

    def _lease_lost(self, lease: Lease) -> None:
        # A lease lost at its deadline may still hold the key in Consul, for
        # example after a long pause. Unlock it so that a waiter need not
        # wait for the TTL. A thread keeps a slow agent from delaying the
        # renewal of other leases.
        thread = threading.Thread(
            target=self._abandon,
            args=(lease.data,),
            name="singlewriter-consul-abandon",
            daemon=True,
        )
        thread.start()

    # Writes fenced by the lock.

    def fenced_put(
        self, lease: Lease, key: str, value: bytes | str, *, flags: int = 0
    ) -> int:
        """Write ``value`` to ``key`` only if ``lease`` still holds this lock.

        One transaction checks that the lock key is locked by the lease's
        session and sets ``key``, so a holder that lost the lock can never
        write, however long it was paused. Return the write's ModifyIndex.
        Raise LockLost if the lease has passed its local deadline,
        StaleTokenError if Consul reports that the session no longer holds
        the lock (nothing was written), ConfigError for an invalid key or a
        token without ``key:write`` on it, and BackendUnavailable if Consul
        did not reply, in which case the write may or may not have happened.
        """
        if lease.lock is not self:
            raise ConfigError(
                f"lease {lease!r} belongs to another lock, not to {self!r}; pass"
                " a lease that this lock returned",
                lock_name=self.name,
                backend=self.backend,
            )
        target = self._check_fenced_key(key)
        lease.ensure_held()

        sequencer: ConsulSequencer = lease.data
        data = value.encode() if isinstance(value, str) else bytes(value)
        operations = [
            _kv("check-session", self.lock_key, session=sequencer.session),
            _kv("set", target, value=data, flags=flags),
            _kv("get", target),
        ]
        budget = _Budget(self.clock, self.operation_timeout)
        reply = self._http.call(
            "PUT", "/v1/txn", body=operations, action="fenced write", budget=budget
        )
        if reply.status == 200:
            return int(reply.payload["Results"][2]["KV"]["ModifyIndex"])

        errors = _txn_errors(reply)
        detail = "; ".join(errors.values())
        if 0 in errors and "Permission denied" not in detail:
            raise StaleTokenError(
                f"Consul rejected the fenced write to {target!r}: lock"
                f" {self.name!r} (token {lease.token}) is no longer held by this"
                f" lease's session ({errors[0]}). Nothing was written; stop and"
                " acquire the lock again.",
                lock_name=self.name,
                token=lease.token,
                backend=self.backend,
            )
        raise ConfigError(
            f"Consul rejected the fenced write to {target!r} for lock"
            f" {self.name!r}: {detail}. Nothing was written. Check the key, the"
            " value size (at most 512 KiB) and that the token has key:read on"
            " the lock key and key:write on the target.",
            lock_name=self.name,
            token=lease.token,
            backend=self.backend,
        )

    # Steps of an acquisition.

    def _attempts_for(self, owner: str) -> _Attempts:
        now = self.clock()
        assert self.ttl is not None
        stale_after = 2 * self.ttl + 60
        with self._attempts_lock:
            # Forget calls that ended in LockTimeout: their sessions have
            # expired, since nothing renews them.
            for key, state in list(self._attempts.items()):
                if now - state.touched > stale_after:
                    del self._attempts[key]
            attempts = self._attempts.setdefault(owner, _Attempts(touched=now))
            attempts.touched = now
            attempts.count += 1
        return attempts

    def _read_lock_key(self, budget: _Budget) -> tuple[dict[str, Any] | None, int]:
        """Return the lock key's entry (None if missing) and Consul's index."""
        path = f"/v1/kv/{_quote(self.lock_key)}"
        reply = self._http.call("GET", path, action="read", budget=budget, allow=(404,))
        if reply.status == 404:
            return None, reply.index

        entry: dict[str, Any] = reply.payload[0]
        flags = int(entry.get("Flags") or 0)
        if flags != LOCK_FLAGS:
            raise ConfigError(
                f"Consul key {self.lock_key!r} exists with flags {flags:#x} and is"
                f" not a lock key, so lock {self.name!r} will not overwrite it."
                " Use another prefix, or delete the key if it is unused.",
                lock_name=self.name,
                backend=self.backend,
            )
        return entry, reply.index

    def _wait_for_change(self, index: int, budget: _Budget) -> None:
        """Block in a query until the lock key changes or the budget ends."""
        wait = budget.left() * 0.9 / (1 + _JITTER)
        if index <= 0 or wait < 0.01:
            return
        params = {"index": str(index), "wait": f"{int(wait * 1000)}ms"}
        path = f"/v1/kv/{_quote(self.lock_key)}"
        self._http.call(
            "GET", path, params=params, action="wait", budget=budget, allow=(404,)
        )

    def _create_session(self, budget: _Budget) -> str:
        body = {
            "Name": f"singlewriter {self.lock_key} ({self._holder})",
            "TTL": _duration(self.ttl or 0),
            "LockDelay": _duration(self.lock_delay),
            "Behavior": "release",
            # No health checks: only the TTL or an explicit destroy can end
            # the session, so a gossip false alarm never frees the lock.
            "NodeChecks": [],
        }
        reply = self._http.call(
            "PUT",
            "/v1/session/create",
            body=body,
            action="session create",
            budget=budget,
        )
        session = str(reply.payload["ID"])
        log.debug("created session %s for lock %r", session, self.name)
        return session

    def _lock_transaction(
        self, attempts: _Attempts, owner: str, budget: _Budget
    ) -> Grant | Busy:
        assert attempts.session is not None
        holder = json.dumps({"holder": self._holder, "owner": owner})
        operations = [
            _kv(
                "lock",
                self.lock_key,
                value=holder.encode(),
                flags=LOCK_FLAGS,
                session=attempts.session,
            ),
            _kv("get", self.lock_key),
            _kv("get", self.epoch_key),
        ]

        # At most three rounds: one to create a missing epoch and one to
        # raise an epoch that is below a token this process has seen.
        for _ in range(3):
            reply = self._http.call(
                "PUT", "/v1/txn", body=operations, action="acquire", budget=budget
            )
            if reply.status != 200:
                return self._failed_lock(attempts, _txn_errors(reply), budget)

            lock_entry = reply.payload["Results"][1]["KV"]
            epoch_entry = reply.payload["Results"][2]["KV"]
            sequencer = self._sequencer(attempts.session, lock_entry, epoch_entry)
            token = sequencer.epoch + sequencer.modify_index
            floor = _seen.get((self._server, self.lock_key), 0)
            if token > floor:
                _remember(self._server, self.lock_key, token)
                return Grant(token, data=sequencer)
            self._raise_epoch(epoch_entry, floor - token + 1, budget)

        raise BackendUnavailable(
            f"the epoch key {self.epoch_key!r} of lock {self.name!r} kept changing"
            " during the acquisition; try again",
            lock_name=self.name,
            backend=self.backend,
        )

    def _failed_lock(
        self, attempts: _Attempts, errors: dict[int, str], budget: _Budget
    ) -> Busy:
        """Interpret a rolled-back acquisition, or raise if it is an error."""
        first = errors.get(0, "")
        if _HELD_BY_OTHER in first:
            # Another process locked the key after we read it. Our session
            # holds nothing, so destroying it applies no lock-delay.
            self._discard_session(attempts, budget)
            return Busy(holder="another session")
        if _LOCK_DELAY in first:
            return Busy(holder=f"the lock-delay of {self.lock_key!r}")
        if _INVALID_SESSION in first:
            # The session expired between attempts; the next one makes a
            # new session.
            attempts.session = None
            return Busy(retry_after=0.0)
        if set(errors) == {2} and _MISSING_KEY in errors[2]:
            self._create_epoch(budget)
            return Busy(retry_after=0.0)
        if any("Permission denied" in text for text in errors.values()):
            self._discard_session(attempts, budget)
            raise self._http.acl_error("acquire", "; ".join(errors.values()))
        raise BackendUnavailable(
            f"Consul rolled back the acquisition of lock {self.name!r}:"
            f" {'; '.join(errors.values())}",
            lock_name=self.name,
            backend=self.backend,
        )

    def _sequencer(
        self,
        session: str,
        lock_entry: Mapping[str, Any],
        epoch_entry: Mapping[str, Any],
    ) -> ConsulSequencer:
        raw = _decode_value(epoch_entry.get("Value"))
        try:
            epoch_time = int(raw)
        except ValueError:
            raise ConfigError(
                f"Consul key {self.epoch_key!r} of lock {self.name!r} contains"
                f" {raw[:40]!r}, not a number of microseconds. Delete that key:"
                " the next acquisition creates a new epoch and tokens go on"
                " increasing.",
                lock_name=self.name,
                backend=self.backend,
            ) from None
        return ConsulSequencer(
            key=self.lock_key,
            session=session,
            lock_index=int(lock_entry["LockIndex"]),
            modify_index=int(lock_entry["ModifyIndex"]),
            epoch=epoch_time - int(epoch_entry["CreateIndex"]),
        )

    def _create_epoch(self, budget: _Budget) -> None:
        # NOTE: after Consul lost its data, the previous holder may run until
        # its next renewal fails. Only the higher token fences it meanwhile.
        floor = _seen.get((self._server, self.lock_key), 0)
        start = max(time.time_ns() // 1000, floor + 1)
        path = f"/v1/kv/{_quote(self.epoch_key)}"
        reply = self._http.call(
            "PUT",
            path,
            params={"cas": "0"},
            data=str(start).encode(),
            action="epoch create",
            budget=budget,
        )
        if reply.payload is True:
            log.info(
                "created the token epoch %s of lock %r at %d µs; this happens on"
                " first use and after Consul lost its data",
                self.epoch_key,
                self.name,
                start,
            )

    def _raise_epoch(
        self, epoch_entry: Mapping[str, Any], amount: int, budget: _Budget
    ) -> None:
        value = int(_decode_value(epoch_entry.get("Value"))) + amount
        log.warning(
            "lock %r: Consul issued a token below one this process has seen"
            " (the epoch key %s was recreated on a host whose clock is behind,"
            " or edited); raising the epoch by %d",
            self.name,
            self.epoch_key,
            amount,
        )
        path = f"/v1/kv/{_quote(self.epoch_key)}"
        self._http.call(
            "PUT",
            path,
            params={"cas": str(epoch_entry["ModifyIndex"])},
            data=str(value).encode(),
            action="epoch update",
            budget=budget,
        )

    # Session and key steps shared by renew, release and loss.

    def _renew_session(self, session: str, budget: _Budget) -> bool:
        reply = self._http.call(
            "PUT",
            f"/v1/session/renew/{session}",
            action="renew",
            budget=budget,
            allow=(404,),
        )
        # Consul v1.14 returns 404 for an unknown session. A 200 reply
        # without a session entry is treated the same way.
        return reply.status == 200 and bool(reply.payload)

    def _still_locked(self, sequencer: ConsulSequencer, budget: _Budget) -> bool:
        operations = [_kv("check-session", self.lock_key, session=sequencer.session)]
        reply = self._http.call(
            "PUT", "/v1/txn", body=operations, action="renew check", budget=budget
        )
        if reply.status == 200:
            return True
        log.debug(
            "lock %r: key no longer locked by session %s: %s",
            self.name,
            sequencer.session,
            _txn_errors(reply),
        )
        return False

    def _unlock(self, sequencer: ConsulSequencer, budget: _Budget, action: str) -> bool:
        holder = json.dumps({"holder": self._holder, "released": True})
        operations = [
            _kv(
                "unlock",
                self.lock_key,
                value=holder.encode(),
                flags=LOCK_FLAGS,
                session=sequencer.session,
            )
        ]
        reply = self._http.call(
            "PUT", "/v1/txn", body=operations, action=action, budget=budget
        )
        return reply.status == 200

    def _destroy_session(self, session: str, budget: _Budget) -> None:
        self._http.call(
            "PUT",
            f"/v1/session/destroy/{session}",
            action="session destroy",
            budget=budget,
        )

    def _discard_session(self, attempts: _Attempts, budget: _Budget) -> None:
        session, attempts.session = attempts.session, None
        if session is None:
            return
        try:
            self._destroy_session(session, budget)
        except BackendUnavailable as exc:
            log.debug("destroying unused session %s failed: %s", session, exc)

    def _abandon(self, sequencer: ConsulSequencer) -> None:
        budget = _Budget(self.clock, self.operation_timeout)
        try:
            self._unlock(sequencer, budget, "unlock after loss")
            self._destroy_session(sequencer.session, budget)
        except (BackendUnavailable, ConfigError) as exc:
            log.debug("cleaning up the lost lease of lock %r: %s", self.name, exc)

    def _check_fenced_key(self, key: str) -> str:
        target = key.strip("/") if isinstance(key, str) else ""
        if not target or target in (self.lock_key, self.epoch_key):
            raise ConfigError(
                f"key {key!r} is invalid for a fenced write of lock {self.name!r}:"
                " use a non-empty key other than the lock and epoch keys",
                lock_name=self.name,
                backend=self.backend,
            )
        return target


class _Http:
    """Consul's HTTP API for one lock: the one place errors are translated."""

    def __init__(
        self,
        lock_name: str,
        *,
        host: str,
        port: int | None,
        scheme: str,
        token: str | None,
        ca: str | os.PathLike[str] | None,
        dc: str | None,
        prefix: str,
    ) -> None:
        self.lock_name = lock_name
        scheme = _check_scheme(scheme, lock_name)
        host = _check_host(host, lock_name)
        port = _check_port(_DEFAULT_PORTS[scheme] if port is None else port, lock_name)
        bracketed = f"[{host}]" if ":" in host else host
        self.address = f"{bracketed}:{port}"
        self.base_url = f"{scheme}://{self.address}"
        self.verify: bool | str = _check_ca(ca, scheme, lock_name)
        self.dc = dc
        self.prefix = prefix
        self._headers = {"X-Consul-Token": token} if token else {}

        # Go's net/http, which Consul's own clients use, never sends requests
        # for loopback hosts through HTTP_PROXY, but requests would. A None
        # value disables the proxy for that scheme. types-requests does not
        # allow None there, so the dict is typed loosely.
        self._proxies: dict[str, Any] = {}
        if _is_loopback(host):
            self._proxies = {"http": None, "https": None}
        self._local = threading.local()

    def call(
        self,
        method: str,
        path: str,
        *,
        action: str,
        budget: _Budget,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        data: bytes | None = None,
        allow: tuple[int, ...] = (),
    ) -> _Reply:
        """Send one request and return a 200, 409 or ``allow`` reply.

        Raise ConfigError or BackendUnavailable for any other status.
        """
        query = dict(params or {})
        if self.dc:
            query["dc"] = self.dc
        if body is not None:
            data = json.dumps(body).encode()

        # NOTE: requests applies the timeout to the connect and to each read,
        # not to the whole request, so a reply that trickles in can take longer.
        try:
            response = self._session().request(
                method,
                self.base_url + path,
                params=query,
                data=data,
                headers=self._headers,
                timeout=budget.left(),
                verify=self.verify,
                proxies=self._proxies,
                allow_redirects=False,
            )
        except requests.exceptions.SSLError as exc:
            raise self._tls_error(action, exc) from exc
        except requests.exceptions.RequestException as exc:
            raise self._unavailable(action, str(exc)) from exc

        status = response.status_code
        if status not in (200, 409, *allow):
            self._raise_for(action, status, response.text)
        return _Reply(status, _index(response), _payload(self, action, response))

    def _session(self) -> requests.Session:
        # One session per thread and process: requests does not promise
        # that a Session is thread-safe, and a forked child must not share
        # its parent's keep-alive connections.
        pid = os.getpid()
        cached: tuple[int, requests.Session] | None = getattr(
            self._local, "session", None
        )
        if cached is None or cached[0] != pid:
            cached = (pid, requests.Session())
            self._local.session = cached
        return cached[1]

    def _raise_for(self, action: str, status: int, text: str) -> NoReturn:
        detail = text.strip()[:300] or f"HTTP {status}"
        if status == 403 or "Permission denied" in text or "ACL not found" in text:
            raise self.acl_error(action, detail)

        advice = [fix for marker, fix in _CONFIG_FAILURES.items() if marker in text]
        if status == 400 or advice:
            hint = advice[0] if advice else "check the lock's settings"
            raise ConfigError(
                f"Consul at {self.address} rejected the {action} of lock"
                f" {self.lock_name!r} (HTTP {status}): {detail}. To fix it, {hint}.",
                lock_name=self.lock_name,
                backend="consul",
            )
        raise self._unavailable(action, f"HTTP {status}: {detail}")

    def acl_error(self, action: str, detail: str) -> ConfigError:
        rights = (
            f'key_prefix "{self.prefix}/" with policy write and session_prefix ""'
            " with policy write"
        )
        return ConfigError(
            f"Consul at {self.address} denied the {action} of lock"
            f" {self.lock_name!r}: {detail}. Use an ACL token (token=,"
            f" token_file= or CONSUL_HTTP_TOKEN) whose policy grants {rights}.",
            lock_name=self.lock_name,
            backend="consul",
        )

    def _unavailable(self, action: str, detail: str) -> BackendUnavailable:
        return BackendUnavailable(
            f"Consul at {self.address} did not complete the {action} of lock"
            f" {self.lock_name!r}: {detail}. Check that the agent is up and"
            " reachable.",
            lock_name=self.lock_name,
            backend="consul",
        )

    def _tls_error(
        self, action: str, exc: requests.exceptions.SSLError
    ) -> ConfigError | BackendUnavailable:
        # OpenSSL's reason for a certificate that fails verification.
        if "CERTIFICATE_VERIFY_FAILED" in str(exc):
            return ConfigError(
                f"the TLS certificate of Consul at {self.address} failed"
                f" verification during the {action} of lock {self.lock_name!r}:"
                f" {exc}. Pass ca=PATH with the CA that signed it.",
                lock_name=self.lock_name,
                backend="consul",
            )
        return self._unavailable(action, f"TLS error: {exc}")


# Helpers for requests and replies.


def _kv(
    verb: str,
    key: str,
    *,
    value: bytes | None = None,
    flags: int | None = None,
    session: str | None = None,
) -> dict[str, dict[str, Any]]:
    operation: dict[str, Any] = {"Verb": verb, "Key": key}
    if value is not None:
        operation["Value"] = base64.b64encode(value).decode()
    if flags is not None:
        operation["Flags"] = flags
    if session is not None:
        operation["Session"] = session
    return {"KV": operation}


def _txn_errors(reply: _Reply) -> dict[int, str]:
    """Map each failed operation's position to Consul's message."""
    errors = (reply.payload or {}).get("Errors") or []
    return {int(error["OpIndex"]): str(error["What"]) for error in errors}


def _payload(http: _Http, action: str, response: requests.Response) -> Any:
    if response.status_code == 404 or not response.content:
        return None
    try:
        return response.json()
    except ValueError as exc:
        raise http._unavailable(
            action, f"the reply is not JSON: {response.text[:200]!r}"
        ) from exc


def _index(response: requests.Response) -> int:
    try:
        return int(response.headers.get("X-Consul-Index", "0"))
    except ValueError:
        return 0


def _decode_value(value: str | None) -> str:
    if not value:
        return ""
    try:
        return base64.b64decode(value).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        return ""


def _describe_holder(entry: Mapping[str, Any]) -> str:
    session = str(entry.get("Session"))
    try:
        holder = json.loads(_decode_value(entry.get("Value")))["holder"]
    except (ValueError, KeyError, TypeError):
        return f"Consul session {session}"
    return f"{holder} (Consul session {session})"


def _remember(server: str, key: str, token: int) -> None:
    with _seen_lock:
        _seen[(server, key)] = max(_seen.get((server, key), 0), token)


def _quote(key: str) -> str:
    return quote(key, safe="/")


def _duration(seconds: float) -> str:
    """Format seconds as a Go duration, as Consul parses them."""
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# Validation of settings.


def _config_error(message: str, name: str | None) -> ConfigError:
    return ConfigError(message, lock_name=name, backend="consul")


def _check_prefix(prefix: str, name: str) -> str:
    text = prefix.strip("/") if isinstance(prefix, str) else None
    segments = text.split("/") if text else []
    valid = bool(segments) and all(
        _SEGMENT.fullmatch(segment) and segment not in (".", "..")
        for segment in segments
    )
    if not valid:
        raise _config_error(
            f"Consul key prefix {prefix!r} for lock {name!r} is invalid: use one"
            " or more '/'-separated segments without spaces, '?', '#' or '%',"
            " and no '.' or '..' segment, such as 'singlewriter' or 'locks/acme'",
            name,
        )
    return text or ""


def _check_lock_delay(value: float, name: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not 0 <= value <= _MAX_LOCK_DELAY
    ):
        raise _config_error(
            f"lock_delay={value!r} for lock {name!r} is invalid: Consul accepts"
            " 0 to 60 seconds",
            name,
        )
    return float(value)


def _check_min_session_ttl(value: float, name: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not 0 < value <= _MAX_SESSION_TTL
    ):
        raise _config_error(
            f"min_session_ttl={value!r} for lock {name!r} is invalid: use the"
            " servers' session_ttl_min in seconds (10 unless configured)",
            name,
        )
    return float(value)


def _check_session_ttl(ttl: float, minimum: float, name: str) -> None:
    if not minimum <= ttl <= _MAX_SESSION_TTL:
        raise _config_error(
            f"ttl={ttl} s for lock {name!r} is outside the session TTL range"
            f" that Consul accepts, {minimum:g} s to {_MAX_SESSION_TTL:g} s."
            " Use a ttl in that range; if the servers' session_ttl_min is lower"
            " than 10 s, pass it as min_session_ttl.",
            name,
        )


def _check_dc(dc: str | None, name: str) -> str | None:
    if dc is None:
        return None
    if not isinstance(dc, str) or not _DATACENTER.fullmatch(dc):
        raise _config_error(
            f"datacenter {dc!r} for lock {name!r} is invalid: use a Consul"
            " datacenter name such as 'dc1'",
            name,
        )
    return dc


def _check_scheme(scheme: str, name: str) -> str:
    if scheme not in _DEFAULT_PORTS:
        raise _config_error(
            f"scheme={scheme!r} for lock {name!r} is invalid: use http or https",
            name,
        )
    return scheme


def _check_host(host: str, name: str) -> str:
    if not isinstance(host, str) or not host or any(c in host for c in "/?#@ "):
        raise _config_error(
            f"Consul host {host!r} for lock {name!r} is invalid: use a host name"
            " or IP address such as 127.0.0.1",
            name,
        )
    return host.strip("[]")


def _check_port(port: int, name: str) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise _config_error(
            f"Consul port {port!r} for lock {name!r} is invalid: use 1 to 65535,"
            " such as 8500",
            name,
        )
    return port


def _check_ca(ca: str | os.PathLike[str] | None, scheme: str, name: str) -> bool | str:
    if ca is None:
        return True
    path = os.fspath(ca)
    if scheme != "https":
        raise _config_error(
            f"ca={path!r} for lock {name!r} applies only to https; use"
            " consuls:// or scheme=https",
            name,
        )
    if not os.path.isfile(path):
        raise _config_error(
            f"CA file {path!r} for lock {name!r} does not exist or is not a"
            " file; pass the PEM bundle that signed the agent's certificate",
            name,
        )
    return path


def _resolve_token(
    token: str | None, token_file: str | os.PathLike[str] | None, name: str
) -> str | None:
    """Return the ACL token from the argument, the file or CONSUL_HTTP_TOKEN."""
    if token is not None and token_file is not None:
        raise _config_error(
            f"lock {name!r} got both token and token_file; pass only one", name
        )
    source = "token"
    if token_file is not None:
        source = f"token_file {os.fspath(token_file)!r}"
        try:
            with open(token_file, encoding="utf-8") as handle:
                token = handle.read().strip()
        except OSError as exc:
            raise _config_error(
                f"cannot read the Consul token file {os.fspath(token_file)!r} for"
                f" lock {name!r}: {exc.strerror}",
                name,
            ) from exc
    elif token is None:
        source = "CONSUL_HTTP_TOKEN"
        token = os.environ.get("CONSUL_HTTP_TOKEN") or None
    if token is not None and not (isinstance(token, str) and _TOKEN.fullmatch(token)):
        raise _config_error(
            f"the Consul ACL token from {source} for lock {name!r} is invalid: it"
            " must be 1 to 512 printable ASCII characters without spaces",
            name,
        )
    return token


# URL parsing.


def _parse_url(url: str, name: str | None) -> dict[str, Any]:
    """Turn a consul:// URL into constructor arguments, including ``name``."""
    redacted_url = _redact(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _config_error(
            f"Consul URL {redacted_url!r} is invalid: {exc}. Use"
            " consul://HOST[:PORT]/PREFIX with a port from 1 to 65535.",
            name,
        ) from exc

    scheme = parts.scheme.lower()
    if scheme not in ("consul", "consuls"):
        raise _config_error(
            f"Consul URL {redacted_url!r} must start with consul:// or consuls://", name
        )
    if parts.username is not None or parts.password is not None:
        raise _config_error(
            f"Consul URL {redacted_url!r} contains user information; pass the ACL token"
            " as token=, token_file= or CONSUL_HTTP_TOKEN instead",
            name,
        )
    if parts.fragment:
        raise _config_error(
            f"Consul URL {redacted_url!r} must not have a #fragment", name
        )

    settings = _url_query(parts.query, redacted_url, name)
    if scheme == "consuls":
        if settings.get("scheme", "https") != "https":
            raise _config_error(
                f"Consul URL {redacted_url!r} starts with consuls:// (https) but sets"
                f" scheme={settings['scheme']}",
                name,
            )
        settings["scheme"] = "https"

    segments = [unquote(segment) for segment in parts.path.split("/") if segment]
    if name is None:
        if not segments:
            raise _config_error(
                f"Consul URL {redacted_url!r} names no lock: add the lock name as the"
                " last path segment or pass name=",
                name,
            )
        name = segments.pop()
    settings["name"] = name
    settings["prefix"] = "/".join(segments) or _DEFAULT_PREFIX
    settings["host"] = parts.hostname or "127.0.0.1"
    if port is not None:
        settings["port"] = port
    return settings


def _url_query(query: str, redacted_url: str, name: str | None) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in _URL_PARAMETERS:
            raise _config_error(
                f"Consul URL {redacted_url!r} has an unknown parameter {key!r}; the"
                f" accepted parameters are {', '.join(_URL_PARAMETERS)}",
                name,
            )
        if key in settings:
            raise _config_error(
                f"Consul URL {redacted_url!r} sets {key!r} more than once", name
            )
        if not value:
            raise _config_error(
                f"Consul URL {redacted_url!r} has an empty value for {key!r}", name
            )
        settings[key] = value

    for key in ("lock_delay", "min_session_ttl"):
        if key in settings:
            settings[key] = _seconds(key, settings[key], redacted_url, name)
    return settings


def _seconds(key: str, text: str, redacted_url: str, name: str | None) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _config_error(
            f"{key}={text!r} in Consul URL {redacted_url!r} is invalid: use a number of"
            " seconds, such as 15",
            name,
        ) from None
    return value


def _redact(url: str) -> str:
    """Return ``url`` with the value of any token parameter replaced by ***."""
    return re.sub(r"(?i)((?:^|[?&])token=)[^&#]*", r"\1***", str(url))

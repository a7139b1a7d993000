"""Read-only inspection of a lock's backend state, for ``singlewriter status``.

Nothing here takes, renews or releases a lock, so inspecting never delays
a holder or a waiter:

- file: the kernel lists every flock(2) lock in /proc/locks (proc(5)) with
  the holder's pid and the locked file's device and inode, and the token
  file holds the last token issued.
- redis: the lock key holds ``OWNER TOKEN`` with its PTTL, and the fence
  key the last token issued.
- Other backends report that they cannot be inspected.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from singlewriter import Lock

__all__ = ["LockState", "describe_lock"]


@dataclass(frozen=True)
class LockState:
    """A lock's state as its backend reports it; None where it cannot tell.

    ``token`` is the holder's token while the lock is held, and otherwise
    the last token issued. ``expires_in`` is in seconds.
    """

    name: str
    backend: str
    held: bool | None
    holder: str | None = None
    token: int | None = None
    expires_in: float | None = None
    detail: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """Return one line such as ``lock x (file): held by pid 7, token 3``."""
        head = f"lock {self.name} ({self.backend}): "
        if self.held is None:
            return head + f"state unknown: {self.detail or 'not inspectable'}"
        parts = []
        if self.held:
            parts.append("held" + (f" by {self.holder}" if self.holder else ""))
            if self.token is not None:
                parts.append(f"token {self.token}")
            if self.expires_in is not None:
                parts.append(f"expires in {self.expires_in:.1f} s")
        else:
            parts.append("free")
            if self.token is not None:
                parts.append(f"last token {self.token}")
        return head + ", ".join(parts)


def describe_lock(lock: Lock, proc_locks: str = "/proc/locks") -> LockState:
    """Return the backend's view of ``lock`` without changing anything."""
    if lock.backend == "file":
        return _describe_file(lock, proc_locks)
    if lock.backend == "redis":
        return _describe_redis(lock)
    # NOTE: Consul and Kubernetes locks are not inspected yet; their holder
    # is visible with `consul kv get` or `kubectl get lease`.
    return LockState(
        lock.name, lock.backend, None, detail="this backend cannot be inspected yet"
    )


def _describe_file(lock: Any, proc_locks: str) -> LockState:
    from singlewriter.backends.file import _read_token

    lock_path: Path = lock.lock_path
    token = _file_token(lock.token_path, _read_token)
    try:
        info = os.stat(lock_path)
    except FileNotFoundError:
        return LockState(lock.name, lock.backend, False, token=token)

    try:
        with open(proc_locks, encoding="ascii", errors="replace") as handle:
            table = handle.read()
    except OSError as exc:
        return LockState(
            lock.name, lock.backend, None, token=token, detail=f"{proc_locks}: {exc}"
        )

    pid = _flock_holder(
        table, os.major(info.st_dev), os.minor(info.st_dev), info.st_ino
    )
    if pid is None:
        return LockState(lock.name, lock.backend, False, token=token)
    # A pid of 0 or a foreign pid means the holder is in another pid namespace.
    return LockState(lock.name, lock.backend, True, holder=f"pid {pid}", token=token)


def _file_token(path: Path, read_token: Any) -> int | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    try:
        token: int = read_token(fd, path)
    finally:
        os.close(fd)
    return token or None


def _flock_holder(table: str, major: int, minor: int, inode: int) -> int | None:
    """Return the pid holding a FLOCK on the file, from /proc/locks text.

    Lines look like ``1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF``;
    the device numbers are hexadecimal and the inode decimal. Lines with
    ``->`` are waiters, not holders.
    """
    expected = (major, minor, inode)
    for line in table.splitlines():
        fields = line.split()
        if len(fields) < 6 or "->" in fields or fields[1] != "FLOCK":
            continue
        device = fields[5].split(":")
        if len(device) != 3:
            continue
        try:
            found = (int(device[0], 16), int(device[1], 16), int(device[2]))
            pid = int(fields[4])
        except ValueError:
            continue
        if found == expected:
            return pid
    return None


def _describe_redis(lock: Any) -> LockState:
    import redis.exceptions

    try:
        current = lock.client.get(lock.lock_key)
        remaining_ms = lock.client.pttl(lock.lock_key)
        fence = lock.client.get(lock.fence_key)
    except redis.exceptions.RedisError as exc:
        return LockState(
            lock.name, lock.backend, None, detail=f"Redis did not answer: {exc}"
        )

    last_token = int(fence) if fence is not None else None
    if current is None:
        return LockState(lock.name, lock.backend, False, token=last_token)
    owner, _, token_text = current.decode().partition(" ")
    expires_in = remaining_ms / 1000 if remaining_ms >= 0 else None
    return LockState(
        lock.name,
        lock.backend,
        True,
        holder=f"owner {owner[:8]}",
        token=int(token_text) if token_text.isdigit() else last_token,
        expires_in=expires_in,
    )

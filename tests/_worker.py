"""A lock holder in its own process, driven line by line from a test.

Run as ``python -m tests._worker URL NAME TTL``. Each command on stdin
gets one JSON line on stdout. Times are time.monotonic(), which on Linux is
one clock for every process on the host, so a test can order events seen
by different processes.

Commands: ``acquire [TIMEOUT]``, ``ensure``, ``release``, ``watch`` (report
when the lease is lost), ``cycles COUNT LOGFILE HOLD`` (acquire, log entry
and exit with the token, release, COUNT times), ``exit``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import singlewriter

_print_lock = threading.Lock()


def emit(**event: object) -> None:
    event.setdefault("at", time.monotonic())
    with _print_lock:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()


def watch(lease: singlewriter.Lease) -> None:
    lease.lost.wait()
    emit(
        event="lost",
        token=lease.token,
        reason=lease.lost_reason,
        deadline=lease.deadline,
    )


def cycles(lock: singlewriter.Lock, count: int, logfile: str, hold: float) -> None:
    fd = os.open(logfile, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        for _ in range(count):
            with lock as lease:
                os.write(fd, f"enter {os.getpid()} {lease.token}\n".encode())
                time.sleep(hold)
                lease.ensure_held()
                os.write(fd, f"exit {os.getpid()} {lease.token}\n".encode())
    finally:
        os.close(fd)
    emit(event="done")


def main() -> int:
    url, name, ttl = sys.argv[1], sys.argv[2], float(sys.argv[3])
    singlewriter.raise_on_signals()
    lock = singlewriter.lock_from_url(url, name, ttl=ttl)
    lease: singlewriter.Lease | None = None
    emit(event="ready", pid=os.getpid())

    try:
        for line in sys.stdin:
            command, *args = line.split()
            if command == "acquire":
                timeout = float(args[0]) if args else None
                try:
                    lease = lock.acquire(timeout=timeout)
                except singlewriter.LockTimeout:
                    emit(event="timeout")
                    continue
                emit(event="acquired", token=lease.token, deadline=lease.deadline)
            elif command == "ensure":
                assert lease is not None
                try:
                    lease.ensure_held()
                    emit(event="held", token=lease.token)
                except singlewriter.LockLost as exc:
                    emit(event="not-held", token=lease.token, error=str(exc))
            elif command == "release":
                assert lease is not None
                emit(event="released", freed=lease.release())
            elif command == "watch":
                assert lease is not None
                threading.Thread(target=watch, args=(lease,), daemon=True).start()
                emit(event="watching")
            elif command == "cycles":
                cycles(lock, int(args[0]), args[1], float(args[2]))
            elif command == "exit":
                return 0
    finally:
        if lease is not None:
            lease.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())

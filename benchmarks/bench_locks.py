"""Lock cycle cost next to its peers, measured in one run.

Redis: one acquire+release cycle of singlewriter's RedisLock (token
included) next to redis-py's own Lock (which issues no token) and a PING
round trip, all against one redis-server started here on 127.0.0.1.

flock: one cycle of singlewriter's FileLock next to a bare flock cycle on
an open file plus one fdatasync, which is the least any durable token
counter needs.

Run: python -m benchmarks.bench_locks [--rounds N]
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import singlewriter


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def measure(
    cycles: dict[str, Callable[[], None]], rounds: int, repeat: int = 9
) -> list[tuple[str, float]]:
    """Return each cycle's median over ``repeat`` batches of its mean time (s).

    Batches of the contenders alternate, so that a change in machine load
    during the run affects all of them alike.
    """
    for cycle in cycles.values():
        for _ in range(max(10, rounds // 10)):
            cycle()
    batches: dict[str, list[float]] = {label: [] for label in cycles}
    for _ in range(repeat):
        for label, cycle in cycles.items():
            started = time.perf_counter()
            for _ in range(rounds):
                cycle()
            batches[label].append((time.perf_counter() - started) / rounds)
    return [(label, statistics.median(times)) for label, times in batches.items()]


def bench_redis(rounds: int) -> list[tuple[str, float]]:
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        print("redis-server not found; run tests/bootstrap first")
        return []
    workdir = tempfile.mkdtemp(prefix="singlewriter-bench-redis-")
    port = free_port()
    server = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", ""],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(host="127.0.0.1", port=port)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)

        ours = singlewriter.lock_from_url(
            f"redis://127.0.0.1:{port}/0",
            "bench",
            ttl=30.0,
            guard_after_data_loss=False,
        )

        def ours_cycle() -> None:
            ours.acquire().release()

        peer = client.lock("bench-redis-py", timeout=30)

        def peer_cycle() -> None:
            peer.acquire()
            peer.release()

        raw = client.connection_pool.make_connection()

        def raw_ping() -> None:
            raw.send_command("PING")
            raw.read_response()

        return measure(
            {
                "PING round trip (redis-py)": client.ping,
                "PING on a bare redis-py connection": raw_ping,
                "redis-py Lock acquire+release": peer_cycle,
                "singlewriter RedisLock acquire+release": ours_cycle,
            },
            rounds,
        )
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def bench_flock(rounds: int) -> list[tuple[str, float]]:
    directory = Path(tempfile.mkdtemp(prefix="singlewriter-bench-flock-"))
    try:
        ours = singlewriter.lock_from_url(f"file://{directory}", "bench")

        def ours_cycle() -> None:
            ours.acquire().release()

        path = directory / "bare.lock"
        counter = os.open(directory / "bare.counter", os.O_RDWR | os.O_CREAT, 0o644)

        def bare_cycle() -> None:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.pwrite(counter, b"12345678", 0)
            os.fdatasync(counter)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

        results = measure(
            {
                "bare open+flock+fdatasync+unlock": bare_cycle,
                "singlewriter FileLock acquire+release": ours_cycle,
            },
            rounds,
        )
        os.close(counter)
        return results
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def report(title: str, rows: list[tuple[str, float]]) -> None:
    if not rows:
        return
    base = rows[0][1]
    print(f"{title}\n")
    print(f"| {'operation':<42} | {'median (us)':>11} | {'ratio':>6} |")
    print(f"|{'-' * 44}|{'-' * 13}|{'-' * 8}|")
    for label, seconds in rows:
        print(f"| {label:<42} | {seconds * 1e6:>11.1f} | {seconds / base:>6.2f} |")
    print()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000, help="cycles per batch")
    args = parser.parse_args(argv)
    report("Redis (ratio against one PING round trip)", bench_redis(args.rounds))
    report("flock (ratio against a bare flock cycle)", bench_flock(args.rounds))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])

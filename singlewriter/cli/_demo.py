"""``singlewriter demo``: three renewers, one killed mid-renewal, nothing broken.

The demonstration runs on this machine only: a Pebble ACME server and its
DNS helper on 127.0.0.1, three renewer processes that contend for one
flock lock and one key store in a temporary directory. The first renewer
to reach its commit is killed with SIGKILL, and the demo then checks the
guarantees:

1. exactly one generation was committed, by a renewer that held the lock;
2. tokens rose with every acquisition;
3. the killed holder's token wrote nothing;
4. replaying the killed holder's files with its token raises
   StaleTokenError and leaves the store unchanged;
5. the renewer that came last found the certificate not due;
6. ``singlewriter check`` passes on the store.

It exits 0 when every guarantee held, 1 when one was broken and 69 when
Pebble is not built.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from singlewriter import StaleTokenError
from singlewriter.keystore import KeyStore

from . import _exit
from ._certs import certificate_names, load_store
from ._options import CommandParser, Options, positive_seconds, print_line
from ._pebble import (
    LOOPBACK,
    Pebble,
    PebbleMissing,
    environment_without_proxy,
    start_pebble,
)

__all__ = ["add_parser", "run"]

log = logging.getLogger("singlewriter.cli")

DOMAINS = ("demo.singlewriter.example", "www.demo.singlewriter.example")
LOCK_NAME = "demo.singlewriter.example"
RENEWERS = 3

EPILOG = """\
exit status:
  0   every guarantee held
  1   a guarantee was broken, or a renewer failed; the report says which
  69  Pebble is not built: run `bash tests/servers/build.sh pebble` in a
      source checkout (needs Go)
The demo reaches nothing outside this machine: Pebble, its DNS helper and
the HTTP-01 responder all listen on 127.0.0.1."""


def add_parser(subparsers: argparse._SubParsersAction[CommandParser]) -> Options:
    """Add the ``demo`` command and return its options."""
    parser = subparsers.add_parser(
        "demo",
        help="show the guarantees with a local Pebble and three renewers",
        description=(
            "Start Pebble on 127.0.0.1, run three renewers against one lock and"
            " one store, SIGKILL the holder in the middle of its renewal, and"
            " report which guarantees held."
        ),
        epilog=EPILOG,
    )
    options = Options(parser)
    options.add(
        "--workdir",
        type=Path,
        metavar="DIR",
        help="directory for the store, lock, account and logs; kept afterwards",
        show_default="a new temporary directory, removed afterwards",
    )
    options.add(
        "--timeout",
        type=positive_seconds,
        default=90.0,
        metavar="SECONDS",
        help="give up when the renewers have not finished after this long",
    )
    return options


@dataclass
class Renewer:
    """One renewer process and what it reported."""

    index: int
    process: subprocess.Popen[str]
    tokens: list[int] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)
    committing: int | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    killed: bool = False

    def describe(self) -> str:
        tokens = ", ".join(str(token) for token in self.tokens) or "none"
        head = f"renewer {self.index} (pid {self.process.pid}): token {tokens}"
        if self.killed:
            return f"{head}; killed with SIGKILL while about to commit"
        if self.error is not None:
            return f"{head}; failed: {self.error['error']}: {self.error['message']}"
        if self.result is None:
            return f"{head}; no result (exit status {self.process.returncode})"
        if self.result["renewed"]:
            method = "placed a new order"
            if "order-resumed" in self.steps:
                method = "resumed the order in flight"
            return (
                f"{head}; renewed ({method}), committed generation"
                f" {self.result['generation']}"
            )
        return f"{head}; not due: {self.result['reason']}"


@dataclass
class Check:
    """One guarantee and whether it held."""

    passed: bool
    text: str


def run(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """Run the demonstration and print its report; return 0 if all held."""
    started = time.monotonic()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="singlewriter-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print_line(f"singlewriter demo in {workdir}")
    try:
        pebble = start_pebble(workdir / "pebble")
    except PebbleMissing as exc:
        print_line(f"singlewriter demo: {exc}", error=True)
        return _exit.UNAVAILABLE

    try:
        print_line(f"Pebble ACME server at {pebble.directory_url}")
        checks = _demonstrate(pebble, workdir, args.timeout)
    finally:
        pebble.stop()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    broken = [check for check in checks if not check.passed]
    print_line("guarantees:")
    for check in checks:
        print_line(f"  [{'ok' if check.passed else 'BROKEN'}] {check.text}")
    elapsed = time.monotonic() - started
    if broken:
        print_line(f"result: {len(broken)} guarantee(s) broken ({elapsed:.1f} s)")
        return _exit.FAILURE
    print_line(f"result: every guarantee held ({elapsed:.1f} s)")
    return _exit.OK


def _demonstrate(pebble: Pebble, workdir: Path, timeout: float) -> list[Check]:
    paths = _prepare(workdir)
    renewers = [_spawn(index, pebble, paths) for index in range(1, RENEWERS + 1)]
    try:
        victim, acquisitions = _supervise(renewers, paths["go_file"], timeout)
    finally:
        for renewer in renewers:
            if renewer.process.poll() is None:
                renewer.process.kill()
            renewer.process.wait()

    print_line("renewers, in the order they took the lock:")
    for renewer in sorted(renewers, key=_first_token):
        print_line(f"  {renewer.describe()}")
    return _checks(renewers, victim, acquisitions, paths)


def _first_token(renewer: Renewer) -> float:
    return renewer.tokens[0] if renewer.tokens else float("inf")


def _prepare(workdir: Path) -> dict[str, Path]:
    paths = {
        "lock_dir": workdir / "locks",
        "store": workdir / "store",
        "account": workdir / "account",
        "pending_dir": workdir / "pending",
        "go_file": workdir / "go",
        "logs": workdir / "logs",
    }
    for key in ("lock_dir", "pending_dir", "logs"):
        paths[key].mkdir(mode=0o700, exist_ok=True)
    return paths


def _spawn(index: int, pebble: Pebble, paths: dict[str, Path]) -> Renewer:
    config = {
        "index": index,
        "name": LOCK_NAME,
        "domains": list(DOMAINS),
        "lock_dir": str(paths["lock_dir"]),
        "store": str(paths["store"]),
        "account": str(paths["account"]),
        "pending_dir": str(paths["pending_dir"]),
        "go_file": str(paths["go_file"]),
        "directory_url": pebble.directory_url,
        "ca_bundle": str(pebble.ca_bundle),
        "http01_port": pebble.http01_port,
        "address": LOOPBACK,
        "lock_timeout": 60.0,
    }
    log_file = open(paths["logs"] / f"renewer-{index}.log", "w")  # noqa: SIM115
    with log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "singlewriter.cli._demo_worker", json.dumps(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
            env=environment_without_proxy(),
        )
    return Renewer(index, process)


def _supervise(
    renewers: list[Renewer], go_file: Path, timeout: float
) -> tuple[Renewer | None, list[int]]:
    """Collect events; SIGKILL the first renewer that is about to commit.

    Return the killed renewer and the tokens in the order they were
    acquired. The lock serialises acquisitions, and each renewer reports
    its token before the next one can acquire, so the order in which the
    reports arrive is the order of acquisition.
    """
    events: queue.Queue[tuple[Renewer, dict[str, Any] | None]] = queue.Queue()
    for renewer in renewers:
        threading.Thread(
            target=_read_events, args=(renewer, events), daemon=True
        ).start()

    victim = None
    acquisitions: list[int] = []
    running = len(renewers)
    deadline = time.monotonic() + timeout
    while running:
        try:
            renewer, event = events.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            print_line(f"renewers did not finish within {timeout:g} s", error=True)
            break
        if event is None:
            running -= 1
            continue
        kind = event.get("event")
        if kind == "acquired":
            renewer.tokens.append(int(event["token"]))
            acquisitions.append(int(event["token"]))
        elif kind == "step":
            renewer.steps.append(str(event["step"]))
        elif kind == "committing":
            renewer.committing = int(event["token"])
            if victim is None:
                victim = _kill(renewer)
                go_file.touch()
        elif kind == "result":
            renewer.result = event
        elif kind == "error":
            renewer.error = event
    return victim, acquisitions


def _read_events(
    renewer: Renewer, events: queue.Queue[tuple[Renewer, dict[str, Any] | None]]
) -> None:
    assert renewer.process.stdout is not None
    for line in renewer.process.stdout:
        try:
            events.put((renewer, json.loads(line)))
        except ValueError:
            continue
    events.put((renewer, None))


def _kill(renewer: Renewer) -> Renewer:
    os.kill(renewer.process.pid, signal.SIGKILL)
    renewer.process.wait()
    renewer.killed = True
    print_line(
        f"killed renewer {renewer.index} (pid {renewer.process.pid}) with SIGKILL"
        f" in the middle of its renewal, holding token {renewer.committing}"
    )
    return renewer


def _checks(
    renewers: list[Renewer],
    victim: Renewer | None,
    acquisitions: list[int],
    paths: dict[str, Path],
) -> list[Check]:
    store = KeyStore(paths["store"])
    generations = store.generations()
    renewed = [r for r in renewers if r.result is not None and r.result["renewed"]]
    not_due = [r for r in renewers if r.result is not None and not r.result["renewed"]]
    failed = [
        r
        for r in renewers
        if r.error is not None or (r.result is None and not r.killed)
    ]

    checks = [
        Check(victim is not None, "a holder was killed in the middle of its renewal"),
        Check(
            len(generations) == 1 and len(renewed) == 1,
            f"exactly one renewer committed: {len(generations)} generation(s) on"
            f" disk, {len(renewed)} renewer(s) reported a renewal",
        ),
        Check(
            len(acquisitions) >= RENEWERS
            and all(a < b for a, b in itertools.pairwise(acquisitions)),
            "every acquisition got a higher token than the one before:"
            f" {' < '.join(map(str, acquisitions))}",
        ),
        Check(not failed, f"no renewer failed ({len(failed)} did)"),
    ]
    if victim is not None and victim.committing is not None:
        checks.append(_killed_wrote_nothing(generations, victim.committing))
        checks.append(_replay_is_rejected(store, victim.committing, paths))
    checks.append(
        Check(
            len(not_due) == RENEWERS - 2,
            f"the renewer that came last found the certificate not due"
            f" ({len(not_due)} reported not due)",
        )
    )
    checks.append(_live_certificate(paths["store"]))
    checks.append(_check_command(paths["store"]))
    return checks


def _killed_wrote_nothing(generations: list[Any], token: int) -> Check:
    written = [g.sequence for g in generations if g.token == token]
    return Check(not written, f"the killed holder's token {token} wrote nothing")


def _replay_is_rejected(store: KeyStore, token: int, paths: dict[str, Path]) -> Check:
    """Commit the killed holder's own files with its token, as if it resumed."""
    directory = paths["pending_dir"] / f"token-{token}"
    files = {item.name: item.read_bytes() for item in directory.iterdir()}
    before = store.current_generation()
    try:
        with _quiet_store_log():
            store.commit(token, files)
    except StaleTokenError as exc:
        after = store.current_generation()
        unchanged = before == after
        print_line(f"stale writer: token {token} replayed -> rejected: {exc}")
        return Check(
            unchanged,
            f"the stale token {token} was rejected (StaleTokenError) and the"
            f" store {'did not change' if unchanged else 'CHANGED'}",
        )
    return Check(False, f"the stale token {token} was accepted by the store")


@contextlib.contextmanager
def _quiet_store_log() -> Iterator[None]:
    """Hide the store's WARNING for the replay, which the report line states.

    At --log-level debug the warning is still logged.
    """
    store_log = logging.getLogger("singlewriter.keystore")
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    level = store_log.level
    store_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        store_log.setLevel(level)


def _live_certificate(store_path: Path) -> Check:
    try:
        certificate = load_store(store_path).certificate
    except Exception as exc:
        return Check(False, f"the live certificate can be read ({exc})")
    names = certificate_names(certificate)
    expires = certificate.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    print_line(f"live certificate: {', '.join(names)}; expires {expires}")
    return Check(
        sorted(names) == sorted(DOMAINS),
        f"the live certificate names exactly {', '.join(DOMAINS)}",
    )


def _check_command(store_path: Path) -> Check:
    argv = [sys.executable, "-m", "singlewriter", "check", "--store", str(store_path)]
    for domain in DOMAINS:
        argv += ["--domain", domain]
    completed = subprocess.run(
        [*argv, "--min-days", "1"], capture_output=True, text=True, check=False
    )
    line = completed.stdout.strip()
    print_line(
        f"$ singlewriter check --store STORE --domain ... -> {completed.returncode}"
    )
    print_line(f"  {line}")
    return Check(completed.returncode == 0, "singlewriter check passes on the store")

"""Pebble fixtures for the ACME tests, and a renewal worker process.

``pebble`` is one Pebble v2.10.3 with pebble-challtestsrv for the session,
started on first use in about 0.4 s. Tests share it through unique domain
names, which pebble-challtestsrv resolves to 127.0.0.1. Tests that need
another Pebble configuration start their own with ``make_pebble``. Every
directory URL these fixtures build points at a loopback Pebble.

``acme_requests`` records every HTTP request that ``requests`` sends in
this process (the acme package sends all ACME traffic through it), so a
test can count newOrder POSTs without trusting the code under test.

Run as ``python -m tests.fixtures_pebble CONFIG.json``, this module is a
renewal worker that calls ``singlewriter.acme.renew`` with the configured
arguments. It logs each HTTP request to a shared file and reports each
step as a JSON line on stdout. It can pause at a given step, or send
itself SIGTERM there.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partialmethod
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import unavailable
from tests.servers import ServerUnavailable

ROOT = Path(__file__).resolve().parent.parent

# Retry-After intervals of 0 make Pebble send no Retry-After header at all.
FAST = {"retry_after_authz": 0, "retry_after_order": 0}

# Pebble picks a random profile for an order that names none, and its
# "shortlived" profile issues six-day certificates. One profile keeps every
# certificate at 90 days, so results do not depend on chance.
ONE_PROFILE = {
    "default": {"description": "90 days", "validityPeriod": 90 * 86400},
}


def unique_domain(prefix: str = "t") -> str:
    """Return a domain name no other test uses on the shared Pebble."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}.example.com"


# Recording HTTP requests.


@dataclass
class Request:
    method: str
    url: str
    status: int | None = None
    problem: str | None = None
    pid: int = 0


@dataclass
class RequestLog:
    """HTTP requests sent through ``requests`` while the fixture was active."""

    requests: list[Request] = field(default_factory=list)

    def posts_to(self, url: str) -> list[Request]:
        return [r for r in self.requests if r.method == "POST" and r.url == url]

    def gets_under(self, prefix: str) -> list[Request]:
        return [
            r for r in self.requests if r.method == "GET" and r.url.startswith(prefix)
        ]

    def clear(self) -> None:
        self.requests.clear()


def _install_recorder(record: Callable[[Request], None]) -> Callable[..., Any]:
    """Wrap requests.Session.request so that every call is passed to ``record``.

    ``record`` gets the entry before the request is sent, so a process
    killed while waiting for the response has still recorded it. Status and
    problem type are filled in on the same object when the response arrives.
    """
    original = requests.Session.request

    def recording(
        self: requests.Session, method: str, url: str, *args: Any, **kwargs: Any
    ) -> requests.Response:
        entry = Request(method=method.upper(), url=url, pid=os.getpid())
        record(entry)
        response = original(self, method, url, *args, **kwargs)
        entry.status = response.status_code
        if response.status_code >= 400:
            try:
                entry.problem = response.json().get("type")
            except ValueError:
                entry.problem = None
        return response

    requests.Session.request = recording  # type: ignore[method-assign]
    return original


def read_request_log(path: Path) -> list[Request]:
    """Read the requests a worker logged, as sent (without their responses)."""
    if not path.exists():
        return []
    return [Request(**json.loads(line)) for line in path.read_text().splitlines()]


# Pebble.


@dataclass
class PebbleServer:
    """A running Pebble and the URLs the tests need from its directory."""

    handle: Any
    new_order_url: str
    new_account_url: str
    renewal_info_url: str

    def __getattr__(self, name: str) -> Any:
        return getattr(self.handle, name)


def _start(workdir: Path, **options: Any) -> PebbleServer:
    from tests.servers.pebble import start_pebble

    options.setdefault("profiles", ONE_PROFILE)
    try:
        handle = start_pebble(workdir, **options)
    except ServerUnavailable as exc:
        unavailable("pebble", str(exc))
    directory = requests.get(
        handle.directory_url, verify=handle.ca_bundle_path, timeout=10
    ).json()
    return PebbleServer(
        handle=handle,
        new_order_url=directory["newOrder"],
        new_account_url=directory["newAccount"],
        renewal_info_url=directory["renewalInfo"],
    )


@pytest.fixture(scope="session")
def pebble() -> Iterator[PebbleServer]:
    """One Pebble for the session that validates challenges for real."""
    workdir = Path(tempfile.mkdtemp(prefix="singlewriter-pebble-"))
    server = _start(workdir, **FAST)
    yield server
    server.handle.stop()


@pytest.fixture
def make_pebble(tmp_path: Path) -> Iterator[Callable[..., PebbleServer]]:
    """Start a Pebble of the test's own with start_pebble's keyword options."""
    started: list[PebbleServer] = []

    def make(**options: Any) -> PebbleServer:
        server = _start(tmp_path / f"pebble-{len(started)}", **options)
        started.append(server)
        return server

    yield make
    for server in started:
        server.handle.stop()


@pytest.fixture
def acme_requests() -> Iterator[RequestLog]:
    """Record every HTTP request this process sends through requests."""
    log = RequestLog()
    original = _install_recorder(log.requests.append)
    yield log
    requests.Session.request = original  # type: ignore[method-assign]


# A renewal's directories and arguments.


@dataclass
class ACMEEnv:
    """Directories and arguments for renewals against one Pebble."""

    pebble: PebbleServer
    root: Path
    domains: list[str]

    @property
    def lock_directory(self) -> Path:
        path = self.root / "locks"
        path.mkdir(exist_ok=True)
        return path

    @property
    def lock_url(self) -> str:
        return f"file://{self.lock_directory}"

    @property
    def store_path(self) -> Path:
        return self.root / "store"

    @property
    def account_path(self) -> Path:
        return self.root / "account"

    def standalone(self) -> Any:
        from singlewriter.acme import HTTP01Standalone

        return HTTP01Standalone(port=self.pebble.http01_port, address="127.0.0.1")

    def kwargs(self, **overrides: Any) -> dict[str, Any]:
        """Return renew() keyword arguments; ``overrides`` replace any of them."""
        arguments: dict[str, Any] = {
            "lock": self.lock_url,
            "store": str(self.store_path),
            "directory_url": self.pebble.directory_url,
            "account": str(self.account_path),
            "challenge": self.standalone(),
            "ca_bundle": self.pebble.ca_bundle_path,
        }
        arguments.update(overrides)
        return arguments

    def state_directories(self) -> list[Path]:
        state = self.account_path / "state"
        return sorted(state.iterdir()) if state.exists() else []

    def order_state(self) -> dict[str, Any] | None:
        for directory in self.state_directories():
            path = directory / "order.json"
            if path.exists():
                document: dict[str, Any] = json.loads(path.read_text())
                return document
        return None


@pytest.fixture
def acme_env(pebble: PebbleServer, tmp_path: Path) -> ACMEEnv:
    return ACMEEnv(pebble=pebble, root=tmp_path, domains=[unique_domain()])


class WebrootServer:
    """Serves a directory over HTTP on 127.0.0.1:``port`` from a thread."""

    def __init__(self, directory: Path, port: int) -> None:
        handler = partialmethod(
            SimpleHTTPRequestHandler.__init__, directory=str(directory)
        )
        handler_class = type(
            "_Handler",
            (SimpleHTTPRequestHandler,),
            {"__init__": handler, "log_message": lambda self, *args: None},
        )
        self.server = ThreadingHTTPServer(("127.0.0.1", port), handler_class)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


# The renewal worker.


class Worker:
    """A ``python -m tests.fixtures_pebble`` process running one renewal."""

    def __init__(self, config: dict[str, Any], directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.config_path = directory / f"worker-{uuid.uuid4().hex[:8]}.json"
        self.config_path.write_text(json.dumps(config))
        self.process = subprocess_popen(
            [sys.executable, "-m", "tests.fixtures_pebble", str(self.config_path)]
        )
        self.events: list[dict[str, Any]] = []
        self._lines = iter(self.process.stdout)  # type: ignore[arg-type]

    def next_event(self, timeout: float = 30.0) -> dict[str, Any]:
        result: list[dict[str, Any]] = []

        def read() -> None:
            line = next(self._lines, "")
            if line:
                result.append(json.loads(line))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        if not result:
            raise AssertionError(
                f"worker {self.process.pid} sent nothing for {timeout} s; exit"
                f" status {self.process.poll()}; stderr:\n{self.stderr()}"
            )
        self.events.append(result[0])
        return result[0]

    def wait_for(self, event: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            message = self.next_event(max(remaining, 0.1))
            if message.get("event") == event:
                return message

    def wait(self, timeout: float = 30.0) -> int:
        return self.process.wait(timeout=timeout)

    def signal(self, signum: int) -> None:
        os.kill(self.process.pid, signum)

    def stderr(self) -> str:
        if self.process.poll() is None or self.process.stderr is None:
            return "(still running)"
        return str(self.process.stderr.read())

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


def subprocess_popen(argv: list[str]) -> Any:
    import subprocess

    return subprocess.Popen(
        argv,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], Worker]]:
    """Start renewal workers; any still running at teardown are killed."""
    started: list[Worker] = []

    def start(config: dict[str, Any]) -> Worker:
        worker = Worker(config, tmp_path / "workers")
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.close()


def _emit(**event: Any) -> None:
    sys.stdout.write(json.dumps(event, default=str) + "\n")
    sys.stdout.flush()


def _worker_step(config: dict[str, Any]) -> Callable[[str], None]:
    pause_at = config.get("pause_at")
    release_file = config.get("release_file")
    signal_at = config.get("signal_self_at")

    def on_step(step: str) -> None:
        _emit(event="step", step=step)
        if step == signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        if step == pause_at:
            _emit(event="paused", step=step)
            # Sleep in short slices so that a handled SIGTERM is seen at once.
            while release_file is None or not Path(release_file).exists():
                time.sleep(0.01)

    return on_step


def _worker_main(config_path: str) -> int:
    import singlewriter
    from singlewriter.acme import ACMEError, HTTP01Standalone, renew

    config = json.loads(Path(config_path).read_text())
    log_path = config.get("request_log")
    if log_path:

        def append(entry: Request) -> None:
            line = json.dumps(entry.__dict__) + "\n"
            fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)

        _install_recorder(append)

    hooks = []
    marker = config.get("deploy_marker")
    if marker:

        def mark_deployed(generation: Any) -> None:
            Path(marker).write_text(str(generation.sequence))

        hooks.append(mark_deployed)

    arguments = dict(config["renew"])
    challenge = arguments.pop("challenge")
    try:
        result = renew(
            arguments.pop("domains"),
            challenge=HTTP01Standalone(port=challenge["port"], address="127.0.0.1"),
            deploy_hooks=hooks,
            on_step=_worker_step(config),
            **arguments,
        )
    except (ACMEError, singlewriter.SingleWriterError) as exc:
        _emit(event="error", type=type(exc).__name__, message=str(exc))
        return 2
    _emit(event="result", **result.__dict__)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1]))

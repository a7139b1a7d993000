"""``singlewriter exec``: the token, exit statuses, signals and lost leases.

Tests that send signals run exec as a real process. Waits are bounded by
timeouts several times longer than the behaviour needs (the grace periods
are 0.5 to 1 s), so a loaded machine slows them down without failing them.
The assertions check order and outcome, not speed, except where a bound is
the point: exec must stop promptly on a signal.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from singlewriter import Grant, Lease, Lock, LockBusy
from singlewriter.backends.file import FileLock
from singlewriter.cli import _exec, main
from tests._support import ROOT, unique_name

# Every CLI test starts without SINGLEWRITER_* options and leaves logging
# as it found it; the fixture is defined in tests/conftest.py.
pytestmark = pytest.mark.usefixtures("clean_cli_environment")


@pytest.fixture
def locks(tmp_path: Path) -> Path:
    directory = tmp_path / "locks"
    directory.mkdir()
    return directory


def alive(pid: int) -> bool:
    """Return whether ``pid`` runs; an unreaped zombie counts as dead."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_for_file(path: Path, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().strip()):
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.02)
    return path.read_text().strip()


def script(path: Path, body: str) -> str:
    """Write a Python child program and return its path."""
    path.write_text(textwrap.dedent(body))
    return str(path)


class ExecProcess:
    """``python -m singlewriter exec`` as a real process, its log read live."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        environment = dict(os.environ if env is None else env)
        environment["PYTHONPATH"] = str(ROOT)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "singlewriter", "exec", *argv],
            cwd=ROOT,
            env=environment,
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._queue.put(line)

    def wait_for_log(self, text: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            try:
                self.lines.append(self._queue.get(timeout=0.1))
            except queue.Empty:
                assert time.monotonic() < deadline, (
                    f"no log line with {text!r} in {timeout} s:\n{''.join(self.lines)}"
                )

    def wait(self, timeout: float = 30.0) -> int:
        status = self.process.wait(timeout=timeout)
        time.sleep(0.05)
        while not self._queue.empty():
            self.lines.append(self._queue.get())
        return status

    def log(self) -> str:
        return "".join(self.lines)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._reader.join(timeout=10)
        assert self.process.stderr is not None
        self.process.stderr.close()


@pytest.fixture
def spawned() -> Iterator[list[ExecProcess]]:
    started: list[ExecProcess] = []
    yield started
    for process in started:
        process.close()


def spawn(spawned: list[ExecProcess], *argv: str) -> ExecProcess:
    process = ExecProcess(list(argv))
    spawned.append(process)
    return process


# In-process: environment, exit statuses, configuration.


def test_exec_exports_token(locks: Path, tmp_path: Path) -> None:
    out = tmp_path / "env"
    status = main(
        [
            "exec", "--lock", f"file://{locks}", "--name", "example.test", "--",
            "sh", "-c", f'echo "$SINGLEWRITER_TOKEN $SINGLEWRITER_LOCK_NAME" > {out}',
        ]
    )  # fmt: skip

    assert status == 0
    token, name = out.read_text().split()
    assert name == "example.test"
    assert int(token) >= 1
    second = main(
        [
            "exec", "--lock", f"file://{locks}", "--name", "example.test", "--",
            "sh", "-c", f'echo "$SINGLEWRITER_TOKEN" > {out}',
        ]
    )  # fmt: skip
    assert second == 0
    assert int(out.read_text()) > int(token), "each run gets a higher token"


def test_exec_passes_exit_status(locks: Path) -> None:
    status = main(
        ["exec", "--lock", f"file://{locks}", "--name", "n", "--", "sh", "-c", "exit 7"]
    )

    assert status == 7


def test_exec_child_killed_by_signal(locks: Path) -> None:
    """A command ended by signal N gives 128 + N, as a shell reports it."""
    status = main(
        [
            "exec", "--lock", f"file://{locks}", "--name", "n", "--",
            "sh", "-c", "kill -KILL $$",
        ]
    )  # fmt: skip

    assert status == 128 + signal.SIGKILL


def test_exec_releases_lock(locks: Path) -> None:
    """A finished command must not leave its lease held or renewed."""
    main(["exec", "--lock", f"file://{locks}", "--name", "n", "--", "true"])

    with FileLock(locks, "n").acquire(blocking=False) as lease:
        assert lease.token >= 2


def test_exec_not_acquired(
    locks: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A held lock gives 75 after --timeout and never starts the command."""
    marker = tmp_path / "ran"
    with FileLock(locks, "n"):
        started = time.monotonic()
        status = main(
            [
                "exec", "--lock", f"file://{locks}", "--name", "n",
                "--timeout", "0.3", "--", "touch", str(marker),
            ]
        )  # fmt: skip
        elapsed = time.monotonic() - started

    assert status == 75
    assert not marker.exists()
    assert elapsed >= 0.3
    assert any("not acquired" in r.getMessage() for r in caplog.records)


def test_exec_command_not_found(locks: Path) -> None:
    status = main(
        ["exec", "--lock", f"file://{locks}", "--name", "n", "--", "no-such-cmd-x"]
    )

    assert status == 127


def test_exec_command_not_executable(locks: Path, tmp_path: Path) -> None:
    program = tmp_path / "program"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o644)

    status = main(
        ["exec", "--lock", f"file://{locks}", "--name", "n", "--", str(program)]
    )

    assert status == 126


def test_exec_command_without_interpreter(locks: Path, tmp_path: Path) -> None:
    """An executable file without a #! line fails with ENOEXEC: status 126."""
    program = tmp_path / "program"
    program.write_bytes(b"\x00\x01not a program")
    program.chmod(0o755)

    status = main(
        ["exec", "--lock", f"file://{locks}", "--name", "n", "--", str(program)]
    )

    assert status == 126


def test_exec_grace_must_be_below_ttl(
    locks: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(
        [
            "exec", "--lock", f"file://{locks}", "--name", "n",
            "--ttl", "5", "--grace", "3", "--", "true",
        ]
    )  # fmt: skip

    err = capsys.readouterr().err
    assert status == 78
    assert "--grace 3 s is too long for --ttl 5 s" in err
    assert "use a --grace below 2.83333 s" in err
    assert len(err.strip().splitlines()) == 1


def test_exec_margin_covers_grace() -> None:
    """The lease counts as lost grace plus margin before another holder can acquire."""
    assert _exec.safety_margin(30.0, 10.0) == 13.0
    assert _exec.safety_margin(2.0, 0.5) == 1.0


def test_exec_needs_command(locks: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["exec", "--lock", f"file://{locks}", "--name", "n", "--"])

    assert status == 78
    assert "exec needs a command after --" in capsys.readouterr().err


def test_exec_missing_lock_option(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["exec", "--name", "n", "--", "true"])

    assert status == 2
    assert "--lock is required: pass it or set SINGLEWRITER_LOCK" in (
        capsys.readouterr().err
    )


def test_exec_environment(
    locks: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--lock, --name, --ttl, --grace and --timeout come from SINGLEWRITER_*."""
    out = tmp_path / "env"
    monkeypatch.setenv("SINGLEWRITER_LOCK", f"file://{locks}")
    monkeypatch.setenv("SINGLEWRITER_NAME", "from-env")
    monkeypatch.setenv("SINGLEWRITER_TTL", "20")
    monkeypatch.setenv("SINGLEWRITER_GRACE", "2")
    monkeypatch.setenv("SINGLEWRITER_TIMEOUT", "5")

    status = main(["exec", "--", "sh", "-c", f'echo "$SINGLEWRITER_LOCK_NAME" > {out}'])

    assert status == 0
    assert out.read_text().strip() == "from-env"
    assert (locks / "from-env.lock").exists()


def test_exec_environment_timeout(locks: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SINGLEWRITER_TIMEOUT", "0.2")
    with FileLock(locks, "n"):
        status = main(
            ["exec", "--lock", f"file://{locks}", "--name", "n", "--", "true"]
        )

    assert status == 75


def test_exec_kills_leftover_grandchild(locks: Path, tmp_path: Path) -> None:
    """A background job of the wrapped shell must not outlive the lock."""
    pid_file = tmp_path / "sleep.pid"
    status = main(
        [
            "exec", "--lock", f"file://{locks}", "--name", "n", "--grace", "1", "--",
            "sh", "-c", f"sleep 60 & echo $! > {pid_file}; exit 0",
        ]
    )  # fmt: skip

    assert status == 0
    assert not alive(int(pid_file.read_text()))


class VanishingLock(Lock):
    """A lock whose backend refuses every renewal, so leases get lost."""

    backend = "test"

    def _try_acquire(self, timeout: float, owner: str) -> Grant:
        return Grant(1)

    def _renew(self, lease: Lease, timeout: float) -> bool:
        return False

    def _release(self, lease: Lease, timeout: float) -> bool:
        return True


def test_exec_lost_lease_kills_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Lost lease: SIGTERM to the group, then SIGKILL after the grace period.

    The command ignores SIGTERM and so does its grandchild, so only the
    SIGKILL ends them; both must be gone when exec returns.
    """
    monkeypatch.setattr(
        _exec,
        "lock_from_url",
        lambda url, name, ttl, **options: VanishingLock(name, ttl=ttl, **options),
    )
    pids = tmp_path / "pids"
    child = script(
        tmp_path / "child.py",
        f"""
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
        grandchild = subprocess.Popen(sleeper)
        with open({str(pids)!r}, "w") as handle:
            handle.write(f"{{__import__('os').getpid()}} {{grandchild.pid}}")
        time.sleep(60)
        """,
    )

    started = time.monotonic()
    status = main(
        [
            "exec", "--lock", "test://", "--name", "n", "--ttl", "2",
            "--grace", "0.5", "--", sys.executable, child,
        ]
    )  # fmt: skip
    elapsed = time.monotonic() - started

    assert status == 76
    assert elapsed < 20
    child_pid, grandchild_pid = map(int, pids.read_text().split())
    assert not alive(child_pid)
    assert not alive(grandchild_pid)
    messages = [r.getMessage() for r in caplog.records]
    term = next(i for i, m in enumerate(messages) if "sending SIGTERM" in m)
    kill = next(i for i, m in enumerate(messages) if "sending SIGKILL" in m)
    assert term < kill


# Real processes: signals.


def test_exec_signal_while_waiting(
    locks: Path, tmp_path: Path, spawned: list[ExecProcess]
) -> None:
    """SIGTERM while waiting for the lock: exit 143 at once, start nothing."""
    marker = tmp_path / "ran"
    with FileLock(locks, "n"):
        process = spawn(
            spawned, "--lock", f"file://{locks}", "--name", "n", "--",
            "touch", str(marker),
        )  # fmt: skip
        process.wait_for_log("waiting for lock")
        time.sleep(0.3)
        sent = time.monotonic()
        process.process.send_signal(signal.SIGTERM)
        status = process.wait()
        # Prompt means well under the lock's poll interval plus start-up noise.
        assert time.monotonic() - sent < 5

    assert status == 128 + signal.SIGTERM
    assert not marker.exists()
    assert "stopped waiting for lock 'n': got signal 15" in process.log()


def test_exec_sigint_while_waiting(locks: Path, spawned: list[ExecProcess]) -> None:
    with FileLock(locks, "n"):
        process = spawn(
            spawned, "--lock", f"file://{locks}", "--name", "n", "--", "true"
        )
        process.wait_for_log("waiting for lock")
        process.process.send_signal(signal.SIGINT)
        status = process.wait()

    assert status == 128 + signal.SIGINT


def test_exec_forwards_sigterm(
    locks: Path, tmp_path: Path, spawned: list[ExecProcess]
) -> None:
    """SIGTERM to exec reaches the command, whose own status is passed on."""
    ready = tmp_path / "ready"
    received = tmp_path / "received"
    child = script(
        tmp_path / "child.py",
        f"""
        import signal, sys, time
        def stop(signum, frame):
            open({str(received)!r}, "w").write(str(signum))
            sys.exit(42)
        signal.signal(signal.SIGTERM, stop)
        open({str(ready)!r}, "w").write("1")
        time.sleep(60)
        """,
    )
    process = spawn(
        spawned, "--lock", f"file://{locks}", "--name", "n", "--", sys.executable, child
    )
    wait_for_file(ready)

    process.process.send_signal(signal.SIGTERM)
    status = process.wait()

    assert status == 42
    assert received.read_text() == str(int(signal.SIGTERM))
    with FileLock(locks, "n").acquire(blocking=False):
        pass


def test_exec_forwarded_signal_kills_shell_and_grandchild(
    locks: Path, tmp_path: Path, spawned: list[ExecProcess]
) -> None:
    """Killing exec's command must not leave the shell's `sleep` behind."""
    pid_file = tmp_path / "sleep.pid"
    process = spawn(
        spawned, "--lock", f"file://{locks}", "--name", "n", "--",
        "sh", "-c", f"sleep 60 & echo $! > {pid_file}; wait",
    )  # fmt: skip
    sleep_pid = int(wait_for_file(pid_file))

    process.process.send_signal(signal.SIGTERM)
    status = process.wait()

    assert status == 128 + signal.SIGTERM
    assert not alive(sleep_pid)


def test_exec_escalates_to_sigkill(
    locks: Path, tmp_path: Path, spawned: list[ExecProcess]
) -> None:
    """A command that ignores the forwarded SIGTERM is killed after --grace."""
    pid_file = tmp_path / "sleep.pid"
    process = spawn(
        spawned, "--lock", f"file://{locks}", "--name", "n", "--grace", "0.5", "--",
        "sh", "-c", f"trap '' TERM; sleep 60 & echo $! > {pid_file}; wait",
    )  # fmt: skip
    sleep_pid = int(wait_for_file(pid_file))

    process.process.send_signal(signal.SIGTERM)
    status = process.wait()

    assert status == 128 + signal.SIGKILL
    assert not alive(sleep_pid)
    assert "outlived the grace period; sending SIGKILL" in process.log()


@pytest.mark.redis
def test_exec_redis_key_deleted(
    redis_server: object, tmp_path: Path, spawned: list[ExecProcess]
) -> None:
    """Deleting the Redis lock key from outside makes exec stop the command.

    The command and its grandchild ignore SIGTERM, so exec must SIGKILL
    the group after --grace, report 76, and leave no process behind.
    """
    import redis

    url: str = redis_server.url  # type: ignore[attr-defined]
    name = unique_name("exec")
    pids = tmp_path / "pids"
    process = spawn(
        spawned, "--lock", url, "--name", name, "--ttl", "3", "--grace", "1", "--",
        "sh", "-c", f"trap '' TERM; sleep 60 & echo $$ $! > {pids}; wait",
    )  # fmt: skip
    shell_pid, sleep_pid = map(int, wait_for_file(pids).split())

    client = redis.Redis.from_url(url)
    assert client.delete(f"singlewriter:{{{name}}}:lock") == 1
    status = process.wait()

    assert status == 76
    assert not alive(shell_pid)
    assert not alive(sleep_pid)
    log = process.log()
    assert log.index("sending SIGTERM to process group") < log.index("sending SIGKILL")
    assert "was lost while sh ran" in log


class FreezingProxy:
    """A loopback TCP proxy to Redis that stops forwarding once frozen."""

    def __init__(self, port: int) -> None:
        import socket

        self.target = ("127.0.0.1", port)
        self.frozen = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.sockets: list[socket.socket] = []
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            self.sockets += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(
                    target=self._pump, args=(source, sink), daemon=True
                ).start()

    def _pump(self, source: object, sink: object) -> None:
        while True:
            try:
                data = source.recv(65536)  # type: ignore[attr-defined]
            except OSError:
                return
            if not data:
                return
            # A frozen proxy swallows traffic: calls hang as in a partition.
            if not self.frozen.is_set():
                try:
                    sink.sendall(data)  # type: ignore[attr-defined]
                except OSError:
                    return

    def close(self) -> None:
        self.listener.close()
        for connection in self.sockets:
            connection.close()


@pytest.mark.redis
def test_exec_killed_before_next_acquire(
    redis_server: object, tmp_path: Path, spawned: list[ExecProcess]
) -> None:
    """A holder cut off from Redis has its command killed before another acquires."""
    from singlewriter.backends.redis import RedisLock

    url: str = redis_server.url  # type: ignore[attr-defined]
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    proxy = FreezingProxy(port)
    name = unique_name("exec-overlap")
    pids = tmp_path / "pids"
    try:
        process = spawn(
            spawned, "--lock", f"redis://127.0.0.1:{proxy.port}/0", "--name", name,
            "--ttl", "4", "--grace", "1", "--",
            "sh", "-c", f"trap '' TERM; sleep 60 & echo $$ $! > {pids}; wait",
        )  # fmt: skip
        shell_pid, sleep_pid = map(int, wait_for_file(pids).split())
        proxy.frozen.set()

        with RedisLock.from_url(url, name, ttl=4).acquire(timeout=30):
            shell_alive = alive(shell_pid)
            sleep_alive = alive(sleep_pid)
        status = process.wait()
    finally:
        proxy.close()

    assert not shell_alive
    assert not sleep_alive
    assert status == 76


def test_exec_redacts_password(tmp_path: Path, spawned: list[ExecProcess]) -> None:
    """A password in the lock URL never reaches the log."""
    process = spawn(
        spawned, "--lock", "redis://user:hunter2@127.0.0.1:1/0", "--name", "n",
        "--timeout", "0.5", "--", "true",
    )  # fmt: skip

    status = process.wait()

    assert status == 75
    assert "hunter2" not in process.log()
    assert "user:***@127.0.0.1:1" in process.log()


def test_lock_busy_is_not_acquired(locks: Path) -> None:
    """--timeout 0 tries once."""
    with FileLock(locks, "n"):
        status = main(
            ["exec", "--lock", f"file://{locks}", "--name", "n", "--timeout", "0", "--",
             "true"]
        )  # fmt: skip
    assert status == 75
    assert LockBusy  # the library error exec maps to 75 together with LockTimeout


def certbot_lineage(directory: Path) -> Path:
    """Write a fake certbot live/NAME directory with the four PEM files."""
    from tests.test_cli_check import issue

    lineage = directory / "live" / "example.test"
    lineage.mkdir(parents=True)
    for name, data in issue().items():
        (lineage / name).write_bytes(data)
    return lineage


def test_certbot_deploy_hook_commits_with_token(
    locks: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """examples/certbot/deploy-hook.py commits with the token exec exports."""
    from singlewriter.keystore import KeyStore

    lineage = certbot_lineage(tmp_path)
    monkeypatch.setenv("RENEWED_LINEAGE", str(lineage))
    monkeypatch.setenv("CERTIFICATE_STORES", str(tmp_path / "stores"))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    hook = str(ROOT / "examples" / "certbot" / "deploy-hook.py")

    status = main(
        ["exec", "--lock", f"file://{locks}", "--name", "certbot-renew", "--",
         sys.executable, hook]
    )  # fmt: skip

    assert status == 0
    store = KeyStore(tmp_path / "stores" / "example.test")
    generation = store.current_generation()
    assert generation is not None
    assert generation.token == 1
    assert store.current() == {
        name: (lineage / name).read_bytes() for name in sorted(store.current() or {})
    }


def test_certbot_deploy_hook_rejects_stale_token(
    locks: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A certbot whose token is older than the store's last writer is rejected."""
    from singlewriter.keystore import KeyStore
    from tests.test_cli_check import issue

    lineage = certbot_lineage(tmp_path)
    KeyStore(tmp_path / "stores" / "example.test").commit(1000, issue())
    monkeypatch.setenv("RENEWED_LINEAGE", str(lineage))
    monkeypatch.setenv("CERTIFICATE_STORES", str(tmp_path / "stores"))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    hook = str(ROOT / "examples" / "certbot" / "deploy-hook.py")

    status = main(
        ["exec", "--lock", f"file://{locks}", "--name", "certbot-renew", "--",
         sys.executable, hook]
    )  # fmt: skip

    assert status == 76
    generation = KeyStore(tmp_path / "stores" / "example.test").current_generation()
    assert generation is not None
    assert generation.token == 1000

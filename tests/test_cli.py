"""The ``singlewriter`` command line: options, environment, renew, run, status.

``renew`` and ``run`` are tested against a stand-in for
``singlewriter.acme`` that records its arguments and returns or raises
what each test sets. These tests need no ACME server. The demo test runs
the real client against Pebble.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from singlewriter import (
    ConfigError,
    LockLost,
    LockTimeout,
    SingleWriterError,
    StaleTokenError,
    StoreError,
    Terminated,
)
from singlewriter.backends.file import FileLock
from singlewriter.cli import _renewal, _run, _status, build_parser, main
from singlewriter.cli._advice import for_command_line
from singlewriter.cli._hooks import HOOK_NAME
from singlewriter.cli._logging import redact
from singlewriter.keystore import KeyStore
from tests._support import ROOT
from tests.test_cli_check import issue

NOT_AFTER = datetime(2031, 5, 4, 3, 2, 1, tzinfo=timezone.utc)


# Every CLI test starts without SINGLEWRITER_* options and leaves logging
# as it found it; the fixture is defined in tests/conftest.py.
pytestmark = pytest.mark.usefixtures("clean_cli_environment")


@dataclass
class Result:
    """The shape of singlewriter.acme.RenewalResult."""

    renewed: bool
    reason: str
    generation: int | None
    token: int | None
    not_after: datetime | None
    order_url: str | None = None
    renew_at: datetime | None = None


class FakeACME:
    """Stands in for singlewriter.acme: records calls, runs ``behaviour``."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.behaviour: Callable[[dict[str, Any]], Result] = lambda call: Result(
            False, "not due", 1, 5, NOT_AFTER, renew_at=NOT_AFTER - timedelta(days=30)
        )
        self.HTTP01Standalone = lambda port=80, address=None: (
            "standalone",
            port,
            address,
        )
        self.HTTP01Webroot = lambda path: ("webroot", path)
        self.DNS01Hook = lambda argv, wait=0.0: ("dns", argv, wait)

    def renew(self, domains: list[str], **kwargs: Any) -> Result:
        call = {"domains": domains, **kwargs}
        self.calls.append(call)
        return self.behaviour(call)


@pytest.fixture
def acme(monkeypatch: pytest.MonkeyPatch) -> FakeACME:
    fake = FakeACME()
    monkeypatch.setattr(_renewal, "load_acme", lambda: fake)
    return fake


@pytest.fixture
def paths(tmp_path: Path) -> SimpleNamespace:
    locks = tmp_path / "locks"
    locks.mkdir()
    return SimpleNamespace(
        locks=locks, store=tmp_path / "store", account=tmp_path / "account"
    )


def renew_argv(paths: SimpleNamespace, *extra: str) -> list[str]:
    return [
        "renew",
        "--domain", "example.test",
        "--domain", "www.example.test",
        "--lock", f"file://{paths.locks}",
        "--store", str(paths.store),
        "--directory-url", "https://127.0.0.1:14000/dir",
        "--account", str(paths.account),
        *extra,
    ]  # fmt: skip


def commit_and_renew(call: dict[str, Any]) -> Result:
    """A renewal that takes the lock and commits like the real client."""
    with call["lock"] as lease:
        generation = call["store"].commit(lease.token, issue())
    return Result(
        True, "no certificate yet", generation.sequence, lease.token, NOT_AFTER
    )


# Parser and environment.


def test_help_names_every_variable(capsys: pytest.CaptureFixture[str]) -> None:
    """Each option's help names its SINGLEWRITER_* variable and its default."""
    _, by_command = build_parser()
    for command, options in by_command.items():
        for action in options.parser._actions:
            if not action.option_strings or action.dest == "help":
                continue
            variable = "SINGLEWRITER_" + action.dest.upper()
            assert action.help is not None
            assert f"env {variable})" in action.help, (command, action.dest)

    for command in by_command:
        assert main([command, "--help"]) == 0
        text = capsys.readouterr().out
        assert "SINGLEWRITER_FOO_BAR" in text, command
        assert "exit status:" in text, command


def test_help_states_units(capsys: pytest.CaptureFixture[str]) -> None:
    main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())

    assert "--interval SECONDS time between checks (default: 3600.0;" in text
    assert "--ttl SECONDS lease time to live" in text
    assert "(default: wait without limit; env SINGLEWRITER_LOCK_TIMEOUT)" in text


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("singlewriter 0.")


def test_python_dash_m() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "singlewriter", "--version"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )

    assert completed.returncode == 0
    assert completed.stdout.startswith("singlewriter ")


def test_required_option_names_variable(
    paths: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [a for a in renew_argv(paths) if a not in ("--domain", "example.test")]
    argv.remove("www.example.test")

    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        "singlewriter renew: error: --domain is required: pass it or set"
        " SINGLEWRITER_DOMAIN"
    )


def test_invalid_variable_is_usage_error(
    paths: SimpleNamespace,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SINGLEWRITER_KEY_TYPE", "dsa-1024")

    assert main(renew_argv(paths)) == 2
    assert "SINGLEWRITER_KEY_TYPE='dsa-1024' is invalid: use one of ec-p256" in (
        capsys.readouterr().err
    )


def test_invalid_flag_variable(
    paths: SimpleNamespace,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SINGLEWRITER_FORCE", "maybe")

    assert main(renew_argv(paths)) == 2
    err = capsys.readouterr().err
    assert "SINGLEWRITER_FORCE='maybe' is invalid: use 1/0, true/false" in err


def test_renew_from_environment(
    acme: FakeACME, paths: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every renew option can come from the environment alone."""
    variables = {
        "DOMAIN": "example.test www.example.test",
        "LOCK": f"file://{paths.locks}",
        "NAME": "shared-name",
        "STORE": str(paths.store),
        "DIRECTORY_URL": "https://127.0.0.1:14000/dir",
        "ACCOUNT": str(paths.account),
        "EMAIL": "ops@example.test",
        "CA_BUNDLE": "/etc/ca.pem",
        "KEY_TYPE": "rsa-3072",
        "RENEW_FRACTION": "0.25",
        "FORCE": "yes",
        "LOCK_TIMEOUT": "12.5",
        "TTL": "45",
        "HTTP01_PORT": "8080",
        "HTTP01_ADDRESS": "127.0.0.1",
        "LOG_LEVEL": "warning",
    }
    for key, value in variables.items():
        monkeypatch.setenv(f"SINGLEWRITER_{key}", value)

    assert main(["renew"]) == 0

    call = acme.calls[0]
    assert call["domains"] == ["example.test", "www.example.test"]
    assert call["lock"].name == "shared-name"
    assert call["lock_name"] == "shared-name"
    assert call["store"].path == paths.store
    assert call["directory_url"] == "https://127.0.0.1:14000/dir"
    assert call["account"] == paths.account
    assert call["email"] == "ops@example.test"
    assert call["ca_bundle"] == "/etc/ca.pem"
    assert call["key_type"] == "rsa-3072"
    assert call["renew_fraction"] == 0.25
    assert call["force"] is True
    assert call["lock_timeout"] == 12.5
    assert call["ttl"] == 45.0
    assert call["challenge"] == ("standalone", 8080, "127.0.0.1")
    assert logging.getLogger("singlewriter").level == logging.WARNING


def test_command_line_wins(
    acme: FakeACME, paths: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SINGLEWRITER_DOMAIN", "env.example.test")
    monkeypatch.setenv("SINGLEWRITER_TTL", "45")
    monkeypatch.setenv("SINGLEWRITER_FORCE", "1")

    assert main(renew_argv(paths, "--ttl", "90")) == 0

    call = acme.calls[0]
    assert call["domains"] == ["example.test", "www.example.test"]
    assert call["ttl"] == 90.0
    assert call["force"] is True, "an option absent from the command line keeps env"


def test_renew_defaults(acme: FakeACME, paths: SimpleNamespace) -> None:
    assert main(renew_argv(paths)) == 0

    call = acme.calls[0]
    assert call["lock"].name == "example.test"
    assert call["key_type"] == "ec-p256"
    assert call["renew_fraction"] == pytest.approx(1 / 3)
    assert call["force"] is False
    assert call["lock_timeout"] is None
    assert call["ttl"] == 60.0
    assert call["challenge"] == ("standalone", 80, None)


def test_wildcard_lock_name(acme: FakeACME, paths: SimpleNamespace) -> None:
    argv = renew_argv(paths)
    argv[argv.index("example.test")] = "*.example.test"

    assert main(argv) == 0
    assert acme.calls[0]["lock"].name == "example.test"


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--webroot", "/srv/www"], ("webroot", Path("/srv/www"))),
        (
            ["--dns-hook", "/usr/local/bin/dns 'a b'", "--dns-propagation-wait", "30"],
            ("dns", ["/usr/local/bin/dns", "a b"], 30.0),
        ),
    ],
)
def test_challenge_options(
    acme: FakeACME, paths: SimpleNamespace, extra: list[str], expected: object
) -> None:
    assert main(renew_argv(paths, *extra)) == 0
    assert acme.calls[0]["challenge"] == expected


def test_challenges_exclude_each_other(
    acme: FakeACME, paths: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(renew_argv(paths, "--webroot", "/srv", "--dns-hook", "x"))

    assert status == 78
    assert "--webroot and --dns-hook exclude each other" in capsys.readouterr().err


# renew: result lines and exit statuses.


def test_renew_renewed(
    acme: FakeACME, paths: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    acme.behaviour = commit_and_renew

    status = main(renew_argv(paths))

    assert status == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1
    assert out[0].startswith("renewed example.test: generation 1, token ")
    assert out[0].endswith(", expires 2031-05-04T03:02:01Z")


def test_renew_not_due(
    acme: FakeACME, paths: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(renew_argv(paths))

    assert status == 0
    assert capsys.readouterr().out.splitlines() == [
        "not due example.test: not due, expires 2031-05-04T03:02:01Z, renewal"
        " planned at 2031-04-04T03:02:01Z"
    ]


@pytest.mark.parametrize(
    ("error", "status", "prefix"),
    [
        (LockTimeout("held elsewhere"), 75, "not acquired example.test: "),
        (LockLost("lease expired"), 76, "lost example.test: "),
        (StaleTokenError("token 3 is stale"), 76, "lost example.test: "),
        (ConfigError("bad directory URL"), 78, "invalid configuration example.test: "),
        (
            SingleWriterError("CA said no"),
            1,
            "failed example.test: SingleWriterError: ",
        ),
        (OSError("disk on fire"), 1, "failed example.test: OSError: "),
    ],
)
def test_renew_error_statuses(
    acme: FakeACME,
    paths: SimpleNamespace,
    capsys: pytest.CaptureFixture[str],
    error: BaseException,
    status: int,
    prefix: str,
) -> None:
    def fail(call: dict[str, Any]) -> Result:
        raise error

    acme.behaviour = fail

    assert main(renew_argv(paths)) == status
    line = capsys.readouterr().out.strip()
    assert line.startswith(prefix)
    assert str(error) in line


def test_renew_terminated(
    acme: FakeACME, paths: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    def terminated(call: dict[str, Any]) -> Result:
        raise Terminated(signal.SIGTERM)

    acme.behaviour = terminated

    assert main(renew_argv(paths)) == 143
    assert capsys.readouterr().out.strip() == "terminated example.test: signal 15"


def test_renew_restores_signal_handlers(acme: FakeACME, paths: SimpleNamespace) -> None:
    before = signal.getsignal(signal.SIGTERM)
    main(renew_argv(paths))
    assert signal.getsignal(signal.SIGTERM) is before


def test_renew_error_redacts_password(
    acme: FakeACME, paths: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    def fail(call: dict[str, Any]) -> Result:
        raise SingleWriterError("cannot reach redis://:s3cret@10.0.0.1:6379/0")

    acme.behaviour = fail

    assert main(renew_argv(paths)) == 1
    captured = capsys.readouterr()
    assert "s3cret" not in captured.out + captured.err
    assert "redis://:***@10.0.0.1:6379/0" in captured.out


def test_renew_deploy_hook(
    acme: FakeACME, paths: SimpleNamespace, tmp_path: Path
) -> None:
    out = tmp_path / "hook"
    acme.behaviour = commit_and_renew
    command = f"sh -c 'echo $SINGLEWRITER_GENERATION $SINGLEWRITER_TOKEN > {out}'"

    assert main(renew_argv(paths, "--deploy-hook", command)) == 0

    generation, token = out.read_text().split()
    assert generation == "1"
    assert int(token) >= 1


class Crash(BaseException):
    """The process died here."""


def test_pending_deploy_hook_runs_after_crash(
    acme: FakeACME, paths: SimpleNamespace, tmp_path: Path
) -> None:
    """A process killed right after its commit leaves the hook to the next run."""
    out = tmp_path / "hook"

    def die(generation: object) -> None:
        raise Crash

    store = KeyStore(paths.store)
    store.add_deploy_hook(die, name=HOOK_NAME)
    with pytest.raises(Crash):
        store.commit(1, issue())
    assert not out.exists()

    command = f"sh -c 'echo $SINGLEWRITER_GENERATION > {out}'"
    assert main(renew_argv(paths, "--deploy-hook", command)) == 0

    assert out.read_text().strip() == "1"


NAME = (("name", "example.test"),)
NAME_FILE = (("backend", "file"), ("name", "example.test"))


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse Prometheus text into {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_renew_metrics_textfile(
    acme: FakeACME, paths: SimpleNamespace, tmp_path: Path
) -> None:
    pytest.importorskip("prometheus_client")
    textfile = tmp_path / "singlewriter.prom"
    acme.behaviour = commit_and_renew

    assert main(renew_argv(paths, "--metrics-textfile", str(textfile))) == 0

    values = samples(textfile.read_text())
    assert values[("singlewriter_certificate_expiration_timestamp_seconds", NAME)] == (
        NOT_AFTER.timestamp()
    )
    assert values[("singlewriter_renewals_total", NAME)] == 1
    assert values[("singlewriter_renewal_failures_total", NAME)] == 0
    assert values[("singlewriter_lock_held", NAME_FILE)] == 0
    assert values[("singlewriter_locks_lost_total", NAME_FILE)] == 0


def test_renew_metrics_count_failure(
    acme: FakeACME, paths: SimpleNamespace, tmp_path: Path
) -> None:
    pytest.importorskip("prometheus_client")
    textfile = tmp_path / "singlewriter.prom"

    def fail(call: dict[str, Any]) -> Result:
        raise SingleWriterError("CA said no")

    acme.behaviour = fail

    assert main(renew_argv(paths, "--metrics-textfile", str(textfile))) == 1
    values = samples(textfile.read_text())
    assert values[("singlewriter_renewal_failures_total", NAME)] == 1
    assert values[("singlewriter_renewals_total", NAME)] == 0


def test_renew_missing_acme(
    paths: SimpleNamespace,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def missing() -> object:
        raise ConfigError("the ACME client cannot be imported; install it")

    monkeypatch.setattr(_renewal, "load_acme", missing)

    assert main(renew_argv(paths)) == 78
    assert "install it" in capsys.readouterr().err


# run: the loop.


class StopLoop:
    """A sleep for the run loop that ends it with SIGTERM after ``cycles`` waits."""

    def __init__(self, cycles: int, between: Callable[[int], None] | None = None):
        self.cycles = cycles
        self.delays: list[float] = []
        self.between = between

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        if self.between is not None:
            self.between(len(self.delays))
        if len(self.delays) >= self.cycles:
            raise Terminated(signal.SIGTERM)


def run_argv(paths: SimpleNamespace, *extra: str) -> list[str]:
    return ["run", *renew_argv(paths)[1:], *extra]


def test_run_loop_interval_and_jitter(
    acme: FakeACME,
    paths: SimpleNamespace,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    stop = StopLoop(3)
    monkeypatch.setattr(_run, "sleep", stop)

    status = main(run_argv(paths, "--interval", "100", "--jitter", "10"))

    assert status == 143
    assert len(acme.calls) == 3
    assert all(100 <= delay <= 110 for delay in stop.delays), stop.delays
    assert acme.calls[0]["check_interval"] == 100
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("started renewal loop for example.test") for m in messages)
    assert "stopped renewal loop for 'example.test' by signal 15" in messages


def test_run_retries_sooner_after_failure(
    acme: FakeACME,
    paths: SimpleNamespace,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def fail(call: dict[str, Any]) -> Result:
        raise SingleWriterError("CA said no")

    acme.behaviour = fail
    stop = StopLoop(2)
    monkeypatch.setattr(_run, "sleep", stop)

    argv = run_argv(
        paths, "--interval", "100", "--jitter", "0", "--retry-interval", "7"
    )
    assert main(argv) == 143
    assert stop.delays == [7, 7]
    assert any(
        r.levelno == logging.WARNING and "failed example.test" in r.getMessage()
        for r in caplog.records
    )


def test_run_stops_on_config_error(
    acme: FakeACME, paths: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(call: dict[str, Any]) -> Result:
        raise ConfigError("directory URL rejected")

    acme.behaviour = fail
    monkeypatch.setattr(_run, "sleep", StopLoop(5))

    assert main(run_argv(paths)) == 78
    assert len(acme.calls) == 1


def test_run_hook_for_other_writer(
    acme: FakeACME,
    paths: SimpleNamespace,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """A replica that did not renew still runs its hook for the new generation."""
    out = tmp_path / "hook"

    def other_writer_commits(cycle: int) -> None:
        if cycle == 1:
            KeyStore(paths.store).commit(99, issue())

    monkeypatch.setattr(_run, "sleep", StopLoop(2, other_writer_commits))
    command = f"sh -c 'echo $SINGLEWRITER_GENERATION >> {out}'"

    assert main(run_argv(paths, "--deploy-hook", command)) == 143
    assert out.read_text().split() == ["1"]


def runner_script(tmp_path: Path, behaviour: str) -> Path:
    """Write a program that runs main() with a stand-in ACME client."""
    path = tmp_path / "runner.py"
    path.write_text(
        textwrap.dedent(
            f"""
            import sys, time
            from dataclasses import dataclass
            from singlewriter.cli import _renewal, main

            @dataclass
            class Result:
                renewed: bool
                reason: str
                generation: object = None
                token: object = None
                not_after: object = None

            class Fake:
                HTTP01Standalone = staticmethod(lambda port=80, address=None: None)
                def renew(self, domains, **kwargs):
            {textwrap.indent(textwrap.dedent(behaviour), " " * 20)}

            _renewal.load_acme = Fake
            sys.exit(main(sys.argv[1:]))
            """
        )
    )
    return path


def start_runner(script: Path, argv: list[str]) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, str(script), *argv],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def test_renew_sigterm_releases_lock(paths: SimpleNamespace, tmp_path: Path) -> None:
    """SIGTERM mid-renewal exits 143 and frees the lock at once.

    Guards against a terminated renewer leaving the lease held, so that its
    successor waits out the whole ttl.
    """
    holding = tmp_path / "holding"
    script = runner_script(
        tmp_path,
        f"""
        with kwargs["lock"]:
            open({str(holding)!r}, "w").close()
            time.sleep(60)
        """,
    )
    process = start_runner(script, renew_argv(paths))
    try:
        wait_for(holding)
        with pytest.raises(Exception, match="held"):
            FileLock(paths.locks, "example.test").acquire(blocking=False)

        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=20)
    finally:
        process.kill()
        process.communicate()

    assert process.returncode == 143
    assert out.strip() == "terminated example.test: signal 15"
    assert "released lock 'example.test'" in err
    with FileLock(paths.locks, "example.test").acquire(blocking=False):
        pass


def test_run_sigterm_between_checks(paths: SimpleNamespace, tmp_path: Path) -> None:
    """SIGTERM while the loop sleeps ends it at once with 143 and a log line."""
    checked = tmp_path / "checked"
    script = runner_script(
        tmp_path,
        f"""
        open({str(checked)!r}, "w").close()
        return Result(False, "not due")
        """,
    )
    process = start_runner(script, run_argv(paths, "--interval", "3600"))
    try:
        wait_for(checked)
        time.sleep(0.2)
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=20)
        elapsed = time.monotonic() - sent
    finally:
        process.kill()
        process.communicate()

    assert process.returncode == 143
    assert elapsed < 5
    assert "started renewal loop for example.test" in err
    assert "stopped renewal loop for 'example.test' by signal 15" in err


# status.


def test_status_file_lock_held(
    paths: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    with FileLock(paths.locks, "example.test") as lease:
        status = main(
            ["status", "--lock", f"file://{paths.locks}", "--name", "example.test"]
        )
        token = lease.token

    assert status == 0
    assert capsys.readouterr().out.strip() == (
        f"lock example.test (file): held by pid {os.getpid()}, token {token}"
    )


def test_status_file_lock_free(
    paths: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    with FileLock(paths.locks, "n"):
        pass

    assert main(["status", "--lock", f"file://{paths.locks}", "--name", "n"]) == 0
    assert capsys.readouterr().out.strip() == "lock n (file): free, last token 1"


def test_status_store_generations(
    paths: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    store = KeyStore(paths.store)
    store.commit(3, issue())
    store.commit(8, issue())

    assert main(["status", "--store", str(paths.store)]) == 0

    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"store {paths.store}: 2 generations, highest token 8"
    assert lines[1].startswith("  generation 2: token 8, created ")
    assert lines[1].endswith("(current)")
    assert lines[2].startswith("  generation 1: token 3, created ")


def test_status_json(
    paths: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    KeyStore(paths.store).commit(4, issue())

    status = main(
        [
            "status", "--json", "--store", str(paths.store),
            "--lock", f"file://{paths.locks}", "--name", "n",
        ]
    )  # fmt: skip

    assert status == 0
    document = json.loads(capsys.readouterr().out)
    assert document["lock"]["held"] is False
    assert document["lock"]["backend"] == "file"
    assert document["store"]["current"] == 1
    assert document["store"]["generations"][0]["token"] == 4


def test_status_needs_something(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status"]) == 78
    assert "status needs --lock and --name, --store, or both" in capsys.readouterr().err


def test_status_missing_store_created_nothing(
    paths: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", "--store", str(paths.store)]) == 78
    assert not paths.store.exists()


@pytest.mark.redis
def test_status_redis_lock(
    redis_server: object, capsys: pytest.CaptureFixture[str]
) -> None:
    from singlewriter import lock_from_url
    from tests._support import unique_name

    url: str = redis_server.url  # type: ignore[attr-defined]
    name = unique_name("status")
    # A short ttl, because a fresh server grants nothing for one ttl
    # after it starts (the Redis backend's guard against data loss).
    lock = lock_from_url(url, name, ttl=2)

    with lock as lease:
        assert main(["status", "--lock", url, "--name", name]) == 0
        held = capsys.readouterr().out.strip()
    assert main(["status", "--lock", url, "--name", name]) == 0
    free = capsys.readouterr().out.strip()

    assert held.startswith(f"lock {name} (redis): held by owner ")
    assert f"token {lease.token}, expires in " in held
    assert free == f"lock {name} (redis): free, last token {lease.token}"


def test_status_redis_unreachable(capsys: pytest.CaptureFixture[str]) -> None:
    """A backend that does not respond gives status 1 and an explanation."""
    pytest.importorskip("redis")
    status = main(
        [
            "status",
            "--lock",
            "redis://:pw@127.0.0.1:1/0?socket_timeout=0.2",
            "--name",
            "n",
        ]
    )

    assert status == 1
    out = capsys.readouterr().out
    assert out.startswith("lock n (redis): state unknown: Redis did not answer")
    assert "pw@" not in out


# Logging.


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("redis://:hunter2@host:6379/0", "redis://:***@host:6379/0"),
        ("rediss://user:p%40ss@host/0", "rediss://user:***@host/0"),
        (
            "consul://127.0.0.1:8500?token=abcd&x=1",
            "consul://127.0.0.1:8500?token=***&x=1",
        ),
        ("k8s://?password=abc", "k8s://?password=***"),
        ("file:///var/lib/locks", "file:///var/lib/locks"),
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_redact_private_key() -> None:
    key = issue()["privkey.pem"].decode()

    text = redact(f"loaded {key} from disk")

    assert "PRIVATE KEY-----" in text
    assert key.splitlines()[1] not in text


def test_log_lines_are_redacted(
    acme: FakeACME, paths: SimpleNamespace, capfd: pytest.CaptureFixture[str]
) -> None:
    """Every log line on stderr is redacted, whichever module wrote it."""

    def leak(call: dict[str, Any]) -> Result:
        logging.getLogger("singlewriter.acme.test").warning(
            "connecting to rediss://admin:topsecret@cache:6380/1"
        )
        return Result(False, "not due", None, None, None)

    acme.behaviour = leak

    assert main(renew_argv(paths)) == 0
    err = capfd.readouterr().err
    assert "topsecret" not in err
    assert "rediss://admin:***@cache:6380/1" in err


# Examples: every YAML parses and every singlewriter command line in it is
# accepted by the real parser, with the environment the example sets.

EXAMPLES = ROOT / "examples"


def dockerfile_environment() -> dict[str, str]:
    """Return the SINGLEWRITER_* variables the example Dockerfile sets."""
    text = (EXAMPLES / "docker-compose" / "Dockerfile").read_text()
    block = text.split("\nENV ", 1)[1].split("\n\n", 1)[0]
    pairs = block.replace("\\\n", " ").split()
    return dict(pair.split("=", 1) for pair in pairs)


def compose_commands() -> Iterator[tuple[str, list[str], dict[str, str]]]:
    yaml = pytest.importorskip("yaml")
    for path in sorted(EXAMPLES.glob("*/docker-compose.yml")):
        document = yaml.safe_load(path.read_text())
        for name, service in document["services"].items():
            if "singlewriter" not in str(service.get("image", "")):
                continue
            env = dockerfile_environment()
            for key, value in (service.get("environment") or {}).items():
                env[key] = str(value).replace(
                    "${ACME_DIRECTORY_URL:?set the ACME directory URL}",
                    "https://127.0.0.1:14000/dir",
                )
            label = f"{path.parent.name}/{name}"
            yield label, list(service.get("command") or ["run"]), env
            test = (service.get("healthcheck") or {}).get("test")
            if test:
                assert test[:2] == ["CMD", "singlewriter"], label
                yield f"{label} healthcheck", test[2:], env


def kubernetes_commands() -> Iterator[tuple[str, list[str], dict[str, str]]]:
    yaml = pytest.importorskip("yaml")
    for path in sorted((EXAMPLES / "kubernetes").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document.get("kind") != "Deployment":
                continue
            for container in document["spec"]["template"]["spec"]["containers"]:
                if "singlewriter" not in container["image"]:
                    continue
                env = dockerfile_environment()
                env.update({item["name"]: item["value"] for item in container["env"]})
                yield container["name"], container["args"], env
                probe = container["readinessProbe"]["exec"]["command"]
                assert probe[0] == "singlewriter"
                yield "readiness probe", probe[1:], env


def accepted(argv: list[str], env: dict[str, str]) -> argparse.Namespace:
    parser, by_command = build_parser()
    try:
        args = parser.parse_args(argv)
        by_command[args.command].resolve(args, env)
    except SystemExit as exc:
        pytest.fail(f"{argv} was rejected with status {exc.code}")
    return args


def test_examples_yaml_parses() -> None:
    yaml = pytest.importorskip("yaml")
    files = sorted(EXAMPLES.rglob("*.yml")) + sorted(EXAMPLES.rglob("*.yaml"))

    assert len(files) >= 5
    for path in files:
        assert list(yaml.safe_load_all(path.read_text())), path


def test_examples_compose_commands() -> None:
    commands = list(compose_commands())

    assert len(commands) >= 4
    for label, argv, env in commands:
        args = accepted(argv, env)
        assert args.command in ("run", "renew", "check"), label
        if args.command != "check":
            assert args.domain == ["example.com", "www.example.com"], label
            assert str(args.store) == "/var/lib/singlewriter/store", label


def test_examples_kubernetes_commands() -> None:
    commands = list(kubernetes_commands())

    assert [label for label, _, _ in commands] == ["renewer", "readiness probe"]
    run_args = accepted(commands[0][1], commands[0][2])
    assert run_args.lock == "k8s://web?incluster=1"
    assert run_args.name == "example.com"
    assert run_args.dns_hook == "/hooks/dns-hook"
    check_args = accepted(commands[1][1], commands[1][2])
    assert check_args.domain == ["example.com", "www.example.com"]


def test_examples_kubernetes_rbac_is_minimal() -> None:
    """The Role grants only Lease verbs the Kubernetes lock uses."""
    yaml = pytest.importorskip("yaml")
    documents = list(
        yaml.safe_load_all((EXAMPLES / "kubernetes" / "rbac.yaml").read_text())
    )
    role = next(d for d in documents if d["kind"] == "Role")

    verbs = {verb for rule in role["rules"] for verb in rule["verbs"]}
    assert verbs == {"create", "get", "update"}
    for rule in role["rules"]:
        assert rule["apiGroups"] == ["coordination.k8s.io"]
        assert rule["resources"] == ["leases"]


# Against a real ACME server: Pebble on 127.0.0.1.


def cli_process(argv: list[str]) -> subprocess.Popen[str]:
    """Start ``python -m singlewriter`` without proxy variables."""
    from tests.servers._common import no_proxy_environment

    env = {
        key: value
        for key, value in no_proxy_environment({"PYTHONPATH": str(ROOT)}).items()
        if not key.startswith("SINGLEWRITER_") or key == "SINGLEWRITER_SERVER_CACHE"
    }
    return subprocess.Popen(
        [sys.executable, "-m", "singlewriter", *argv],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def pebble_argv(pebble: Any, paths: SimpleNamespace, domain: str) -> list[str]:
    return [
        "--domain", domain,
        "--lock", f"file://{paths.locks}",
        "--store", str(paths.store),
        "--account", str(paths.account),
        "--directory-url", pebble.directory_url,
        "--ca-bundle", pebble.ca_bundle_path,
        "--http01-port", str(pebble.http01_port),
        "--http01-address", "127.0.0.1",
    ]  # fmt: skip


@pytest.mark.pebble
def test_renew_against_pebble(
    pebble: Any, paths: SimpleNamespace, tmp_path: Path
) -> None:
    """renew issues once, then finds the certificate not due; check passes.

    The second run is a new process on the same store, as after a container
    restart with persistent storage: it must not order again.
    """
    pytest.importorskip("prometheus_client")
    from tests.fixtures_pebble import unique_domain

    domain = unique_domain("cli")
    textfile = tmp_path / "renew.prom"
    argv = ["renew", *pebble_argv(pebble, paths, domain)]
    argv += ["--metrics-textfile", str(textfile)]

    first = cli_process(argv)
    first_out, first_err = first.communicate(timeout=120)
    second = cli_process(argv)
    second_out, second_err = second.communicate(timeout=120)
    check = cli_process(["check", "--store", str(paths.store), "--domain", domain])
    check_out, _ = check.communicate(timeout=60)

    assert first.returncode == 0, first_err
    assert first_out.startswith(f"renewed {domain}: generation 1, token 1, expires ")
    assert second.returncode == 0, second_err
    assert second_out.startswith(f"not due {domain}: ")
    assert check.returncode == 0
    assert check_out.startswith(f"healthy: certificate for {domain} expires at ")

    generation = KeyStore(paths.store).current_generation()
    assert generation is not None
    values = samples(textfile.read_text())
    name = (("name", domain),)
    expiration = ("singlewriter_certificate_expiration_timestamp_seconds", name)
    assert values[expiration] == generation.not_after.timestamp()
    assert values[("singlewriter_renewals_total", name)] == 0, "a new process"


@pytest.mark.pebble
def test_run_against_pebble_sigterm(pebble: Any, paths: SimpleNamespace) -> None:
    """run issues a certificate, then SIGTERM stops it with 143, lock released."""
    from tests.fixtures_pebble import unique_domain

    domain = unique_domain("run")
    process = cli_process(["run", *pebble_argv(pebble, paths, domain)])
    lines: list[str] = []

    def read() -> None:
        assert process.stderr is not None
        lines.extend(process.stderr)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any(f"renewed {domain}: generation 1" in line for line in lines):
            assert process.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "no renewal after 120 s"
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()
        reader.join(timeout=10)

    err = "".join(lines)
    assert process.returncode == 143, err
    assert f"stopped renewal loop for '{domain}' by signal 15" in err
    with FileLock(paths.locks, domain).acquire(blocking=False):
        pass


def test_lock_name_ignores_domain_order(acme: FakeACME, paths: SimpleNamespace) -> None:
    """Listing the same names in another order takes the same lock."""
    argv = renew_argv(paths)
    first, second = argv.index("example.test"), argv.index("www.example.test")
    argv[first], argv[second] = argv[second], argv[first]

    assert main(argv) == 0
    assert acme.calls[0]["lock"].name == "example.test"


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("bücher.example", "ASCII form (xn--...)"),
        ("a.*.test", "label '*'"),
        ("::1", "is an IP address"),
        ("a..b.test", "label ''"),
        ("host:443", "fully qualified name"),
    ],
)
def test_bad_domain_reported_as_domain(
    acme: FakeACME,
    paths: SimpleNamespace,
    capsys: pytest.CaptureFixture[str],
    domain: str,
    expected: str,
) -> None:
    """An invalid domain is reported as an invalid domain, not as a bad lock name."""
    argv = renew_argv(paths)
    argv[argv.index("example.test")] = domain

    assert main(argv) == 78
    err = capsys.readouterr().err
    assert f"domain name {domain!r} is invalid" in err or "IP address" in err
    assert expected in err
    assert "lock name" not in err


def test_renew_sigterm_during_hook(paths: SimpleNamespace, tmp_path: Path) -> None:
    """SIGTERM while the deploy hook runs stops it and reports the commit."""
    files = tmp_path / "files.json"
    files.write_text(json.dumps({k: v.decode() for k, v in issue().items()}))
    started = tmp_path / "hook-started"
    script = runner_script(
        tmp_path,
        f"""
        import json
        from singlewriter.acme._interrupt import terminate_on_signals
        with open({str(files)!r}) as handle:
            pem = {{k: v.encode() for k, v in json.load(handle).items()}}
        with terminate_on_signals(True) as guard, kwargs["lock"] as lease:
            with guard.deferred():
                generation = kwargs["store"].commit(lease.token, pem)
        return Result(True, "no certificate yet", generation.sequence, lease.token)
        """,
    )
    hook = f"sh -c 'echo hook output; touch {started}; sleep 60'"
    process = start_runner(script, renew_argv(paths, "--deploy-hook", hook))
    try:
        wait_for(started)
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=20)
        elapsed = time.monotonic() - sent
    finally:
        process.kill()
        process.communicate()

    assert elapsed < 10, "the hook must be stopped, not awaited"
    assert process.returncode == 0
    lines = out.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("renewed example.test: generation 1, token ")
    assert "the deploy hook was stopped by signal 15" in lines[0]
    assert "hook output" in err


def test_renew_hook_output_to_stderr(
    acme: FakeACME, paths: SimpleNamespace, capfd: pytest.CaptureFixture[str]
) -> None:
    """The deploy hook's stdout never mixes into the one result line."""
    acme.behaviour = commit_and_renew

    status = main(renew_argv(paths, "--deploy-hook", "echo from-the-hook"))

    captured = capfd.readouterr()
    assert status == 0
    assert captured.out.count("\n") == 1
    assert captured.out.startswith("renewed example.test: generation 1")
    assert "from-the-hook" in captured.err


def test_renew_failure_no_traceback(
    acme: FakeACME, paths: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    """A failed renewal logs one line at the default level, a traceback at debug."""

    def fail(call: dict[str, Any]) -> Result:
        try:
            raise ConnectionRefusedError("connection refused")
        except OSError as exc:
            raise SingleWriterError("the ACME server could not be reached") from exc

    acme.behaviour = fail

    assert main(renew_argv(paths)) == 1
    err = capsys.readouterr().err
    assert "renewal of 'example.test' failed" in err
    assert "Traceback" not in err

    assert main(renew_argv(paths, "--log-level", "debug")) == 1
    assert "Traceback" in capsys.readouterr().err


def test_renew_store_unopenable(
    acme: FakeACME, paths: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    """A store that cannot be created gives one result line and status 1."""
    argv = renew_argv(paths)
    argv[argv.index(str(paths.store))] = "/proc/sys/store"

    status = main(argv)

    captured = capsys.readouterr()
    assert status == 1
    assert captured.out.startswith("failed example.test: StoreError: ")
    assert captured.out.count("\n") == 1
    assert "Traceback" not in captured.err


def test_status_store_error_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An unexpected store error is one stderr line with status 1."""

    def unopenable(*args: object, **kwargs: object) -> None:
        raise StoreError("creating directory x failed: Read-only file system")

    monkeypatch.setattr(_status, "KeyStore", unopenable)

    status = main(["status", "--store", str(tmp_path)])

    captured = capsys.readouterr()
    assert status == 1
    assert captured.err == (
        "singlewriter status: error: StoreError: creating directory x failed:"
        " Read-only file system\n"
    )


@pytest.mark.parametrize("option", ["--interval", "--jitter", "--retry-interval"])
@pytest.mark.parametrize("value", ["1e12", "1e300"])
def test_run_rejects_huge_waits(
    acme: FakeACME,
    paths: SimpleNamespace,
    capsys: pytest.CaptureFixture[str],
    option: str,
    value: str,
) -> None:
    """Waits above 366 days are a usage error before the first check."""
    assert main(run_argv(paths, option, value)) == 2
    assert "too long" in capsys.readouterr().err
    assert acme.calls == []


@pytest.mark.parametrize(
    ("cause", "expected"),
    [
        (OSError(errno.EADDRINUSE, "Address in use"), "choose another --http01-port"),
        (OSError(errno.EADDRNOTAVAIL, "Cannot assign"), "address of this host"),
        (socket.gaierror(-2, "Name or service not known"), "address of this host"),
    ],
)
def test_bind_advice_names_flags(cause: OSError, expected: str) -> None:
    """Advice for an HTTP-01 listen failure fits the error and names CLI flags."""
    error = SingleWriterError(
        "the HTTP-01 server could not listen on x port 80: failed. Free the port,"
        " run with the right to bind it, or use HTTP01Webroot or DNS01Hook."
    )
    error.__cause__ = cause

    message = for_command_line(str(error), error)

    assert expected in message
    assert "--webroot or --dns-hook" in message
    assert "HTTP01Webroot" not in message


def test_advice_names_ca_bundle_flag() -> None:
    """The TLS failure advice names --ca-bundle, not a Python argument."""
    message = for_command_line("could not be verified. Pass ca_bundle= with the PEM")

    assert message == "could not be verified. Pass --ca-bundle with the PEM"


def test_http01_address_must_be_ip(
    acme: FakeACME, paths: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    """A name in --http01-address is a usage error, not a bind failure."""
    assert main(renew_argv(paths, "--http01-address", "junk")) == 2
    assert "is not an IP address" in capsys.readouterr().err


def test_key_types_match_client() -> None:
    """--key-type accepts every key type that renew() accepts."""
    from singlewriter.acme import KEY_TYPES

    assert _renewal.KEY_TYPES == KEY_TYPES

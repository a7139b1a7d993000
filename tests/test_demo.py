"""``singlewriter demo``: the end-to-end demonstration and its verdicts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from singlewriter.cli import _demo
from singlewriter.keystore import KeyStore
from tests.conftest import unavailable
from tests.servers import find_binary
from tests.test_cli_check import issue

ROOT = Path(__file__).resolve().parent.parent


def run_demo(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, float]:
    started = time.monotonic()
    completed = subprocess.run(
        [sys.executable, "-m", "singlewriter", "demo", *argv],
        cwd=ROOT,
        env=dict(env or os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    elapsed = time.monotonic() - started
    return completed.returncode, completed.stdout + completed.stderr, elapsed


@pytest.mark.pebble
def test_demo_end_to_end(tmp_path: Path) -> None:
    """Three renewers, the holder SIGKILLed mid-renewal, every guarantee kept."""
    for binary in ("pebble", "pebble-challtestsrv"):
        if find_binary(binary) is None:
            unavailable("pebble", f"{binary} is not built (tests/servers/build.sh)")

    status, output, elapsed = run_demo("--workdir", str(tmp_path / "demo"))

    assert status == 0, output
    assert "BROKEN" not in output
    assert output.count("[ok]") >= 9, output
    assert "result: every guarantee held" in output
    assert "killed renewer" in output
    assert "replayed -> rejected" in output
    assert "WARNING" not in output, "the report has no raw log lines"
    assert "healthy: certificate for demo.singlewriter.example" in output
    # The demo promises to fit in about 30 s; allow for a slow CI machine.
    assert elapsed < 90, f"the demo took {elapsed:.1f} s"


def test_demo_without_pebble(tmp_path: Path) -> None:
    """A missing Pebble gives status 69 and the command that builds it."""
    env = dict(os.environ, SINGLEWRITER_SERVER_CACHE=str(tmp_path / "empty"))

    status, output, _ = run_demo(env=env)

    assert status == 69
    assert "bash tests/servers/build.sh pebble" in output
    assert str(tmp_path / "empty") in output


def fake_renewer(index: int, **fields: Any) -> Any:
    renewer = _demo.Renewer(index, SimpleNamespace(pid=100 + index, returncode=0))  # type: ignore[arg-type]
    for key, value in fields.items():
        setattr(renewer, key, value)
    return renewer


def test_demo_reports_double_commit(tmp_path: Path) -> None:
    """Two renewers committing breaks a guarantee, which the report shows."""
    store = tmp_path / "store"
    KeyStore(store).commit(2, issue(("demo.singlewriter.example",)))
    KeyStore(store).commit(3, issue(("demo.singlewriter.example",)))
    paths = {"store": store, "pending_dir": tmp_path / "pending"}
    renewed = {"renewed": True, "generation": 1, "reason": "", "token": 2}
    renewers = [
        fake_renewer(1, tokens=[2], result=renewed),
        fake_renewer(2, tokens=[3], result=dict(renewed, generation=2, token=3)),
        fake_renewer(3, tokens=[4], result={"renewed": False, "reason": "not due"}),
    ]

    checks = _demo._checks(renewers, None, [2, 3, 4], paths)

    broken = [check.text for check in checks if not check.passed]
    assert any(text.startswith("exactly one renewer committed: 2") for text in broken)
    assert any("a holder was killed" in text for text in broken)


def test_demo_reports_tokens_out_of_order(tmp_path: Path) -> None:
    store = tmp_path / "store"
    KeyStore(store).commit(5, issue(("demo.singlewriter.example",)))
    paths = {"store": store, "pending_dir": tmp_path / "pending"}

    checks = _demo._checks([], None, [5, 4, 6], paths)

    assert any(
        not check.passed and check.text.startswith("every acquisition got a higher")
        for check in checks
    )

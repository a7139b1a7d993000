"""Prometheus metrics: names users alert on, lock state, textfile and HTTP."""

from __future__ import annotations

import logging
import os
import stat
import sys
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from singlewriter import ConfigError, Grant, Lease, Lock, Scheduler
from singlewriter.backends.file import FileLock
from singlewriter.metrics import RenewalMetrics, metrics_available

pytest.importorskip("prometheus_client")

from prometheus_client.parser import text_string_to_metric_families

Labels = tuple[tuple[str, str], ...]


def samples(text: str) -> dict[tuple[str, Labels], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def held(metrics: RenewalMetrics, name: str, backend: str) -> float:
    values = samples(metrics.render().decode())
    return values[("singlewriter_lock_held", (("backend", backend), ("name", name)))]


@pytest.fixture
def locks(tmp_path: Path) -> Path:
    directory = tmp_path / "locks"
    directory.mkdir()
    return directory


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class RefusingLock(Lock):
    """A lock whose backend refuses renewals once ``refuse`` is set."""

    backend = "test"

    def __init__(self, name: str, **options: object) -> None:
        super().__init__(name, **options)  # type: ignore[arg-type]
        self.refuse = False

    def _try_acquire(self, timeout: float, owner: str) -> Grant:
        return Grant(7)

    def _renew(self, lease: Lease, timeout: float) -> bool:
        return not self.refuse

    def _release(self, lease: Lease, timeout: float) -> bool:
        return True


def test_expiration_metric_name() -> None:
    """The gauge has the shape of cert-manager's, so alert rules carry over."""
    metrics = RenewalMetrics()
    not_after = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)

    metrics.set_expiration("example.test", not_after)

    values = samples(metrics.render().decode())
    key = (
        "singlewriter_certificate_expiration_timestamp_seconds",
        (("name", "example.test"),),
    )
    assert values[key] == not_after.timestamp()


def test_renewal_counters() -> None:
    metrics = RenewalMetrics()

    metrics.renewal_succeeded("a")
    metrics.renewal_succeeded("a")
    metrics.renewal_failed("a")

    values = samples(metrics.render().decode())
    assert values[("singlewriter_renewals_total", (("name", "a"),))] == 2
    assert values[("singlewriter_renewal_failures_total", (("name", "a"),))] == 1


def test_lock_held_gauge(locks: Path) -> None:
    """The gauge is 1 while a lease is held and 0 after release, with-blocks too."""
    metrics = RenewalMetrics()
    lock = metrics.instrument(FileLock(locks, "n"))

    assert held(metrics, "n", "file") == 0
    lease = lock.acquire()
    assert held(metrics, "n", "file") == 1
    lease.release()
    assert held(metrics, "n", "file") == 0
    with lock:
        assert held(metrics, "n", "file") == 1
    assert held(metrics, "n", "file") == 0


def test_counters_start_at_zero(locks: Path) -> None:
    """Series exist before the first event, so increase() alerts see them."""
    metrics = RenewalMetrics()
    metrics.instrument(FileLock(locks, "n"))

    values = samples(metrics.render().decode())
    assert (
        values[("singlewriter_locks_lost_total", (("backend", "file"), ("name", "n")))]
        == 0
    )
    assert values[("singlewriter_renewals_total", (("name", "n"),))] == 0
    assert values[("singlewriter_renewal_failures_total", (("name", "n"),))] == 0


def test_lost_lease_counted() -> None:
    """A renewal the backend refuses counts one lost lock; held drops to 0."""
    clock = Clock()
    scheduler = Scheduler(clock, autostart=False)
    metrics = RenewalMetrics()
    lock = metrics.instrument(RefusingLock("n", ttl=30, scheduler=scheduler))
    callbacks: list[Lease] = []

    lease = lock.acquire()
    lease.on_lost = callbacks.append
    assert held(metrics, "n", "test") == 1

    lock.refuse = True
    clock.now += 11
    scheduler.run_due()

    values = samples(metrics.render().decode())
    lost_key = ("singlewriter_locks_lost_total", (("backend", "test"), ("name", "n")))
    assert values[lost_key] == 1
    assert held(metrics, "n", "test") == 0
    assert callbacks == [lease], "the caller's on_lost still runs"


def test_lost_by_deadline_counted() -> None:
    """A lease whose deadline passed without renewal counts as lost once."""
    clock = Clock()
    scheduler = Scheduler(clock, autostart=False)
    metrics = RenewalMetrics()
    lock = metrics.instrument(RefusingLock("n", ttl=30, scheduler=scheduler))

    lease = lock.acquire()
    clock.now += 60
    assert held(metrics, "n", "test") == 0
    assert lease.lost.is_set()
    assert held(metrics, "n", "test") == 0

    values = samples(metrics.render().decode())
    lost_key = ("singlewriter_locks_lost_total", (("backend", "test"), ("name", "n")))
    assert values[lost_key] == 1


def test_textfile_written_atomically(locks: Path, tmp_path: Path) -> None:
    """The textfile is rewritten whole on each change; no temporary file remains."""
    textfile = tmp_path / "collector" / "singlewriter.prom"
    textfile.parent.mkdir()
    metrics = RenewalMetrics(textfile=textfile)
    lock = metrics.instrument(FileLock(locks, "n"))

    with lock:
        during = samples(textfile.read_text())
    metrics.flush()
    after = samples(textfile.read_text())

    key = ("singlewriter_lock_held", (("backend", "file"), ("name", "n")))
    assert during[key] == 1
    assert after[key] == 0
    assert os.listdir(textfile.parent) == ["singlewriter.prom"]
    assert stat.S_IMODE(textfile.stat().st_mode) == 0o644


def test_textfile_failure_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A textfile that cannot be written is logged; the renewal goes on."""
    metrics = RenewalMetrics(textfile=tmp_path / "missing" / "x.prom")

    metrics.renewal_succeeded("n")

    assert any(
        r.levelno == logging.WARNING and "could not write metrics" in r.getMessage()
        for r in caplog.records
    )


def test_serve_on_loopback() -> None:
    metrics = RenewalMetrics()
    metrics.renewal_failed("n")
    port = metrics.serve(0, "127.0.0.1")
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            body = response.read().decode()
    finally:
        metrics.close()

    assert 'singlewriter_renewal_failures_total{name="n"} 1.0' in body


def test_serve_port_in_use() -> None:
    first = RenewalMetrics()
    port = first.serve(0, "127.0.0.1")
    try:
        with pytest.raises(
            ConfigError, match=f"cannot serve metrics on 127.0.0.1:{port}"
        ):
            RenewalMetrics().serve(port, "127.0.0.1")
    finally:
        first.close()


@pytest.fixture
def without_prometheus(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make ``import prometheus_client`` fail, as without the extra."""
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    yield


def test_missing_client_message(without_prometheus: None) -> None:
    assert metrics_available() is False
    with pytest.raises(ConfigError, match=r"pip install 'singlewriter\[metrics\]'"):
        RenewalMetrics()


def test_cli_missing_client(
    without_prometheus: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Asking the CLI for metrics without prometheus-client is a config error."""
    from singlewriter.cli import _renewal, main

    locks = tmp_path / "locks"
    locks.mkdir()
    _renewal_load = _renewal.load_acme
    try:
        _renewal.load_acme = lambda: pytest.fail("metrics are checked first")  # type: ignore[assignment]
        status = main(
            [
                "renew", "-d", "example.test", "--lock", f"file://{locks}",
                "--store", str(tmp_path / "store"), "--account", str(tmp_path / "a"),
                "--directory-url", "https://127.0.0.1:1/dir",
                "--metrics-textfile", str(tmp_path / "m.prom"),
            ]
        )  # fmt: skip
    finally:
        _renewal.load_acme = _renewal_load  # type: ignore[method-assign]

    assert status == 78
    assert "pip install 'singlewriter[metrics]'" in capsys.readouterr().err

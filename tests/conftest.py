"""Shared fixtures: real servers on loopback and the backend matrix."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.servers import ServerUnavailable

pytest_plugins = [
    "tests.fixtures_consul",
    "tests.fixtures_kube",
    "tests.fixtures_pebble",
]

REQUIRE_SERVERS = os.environ.get("SINGLEWRITER_REQUIRE_SERVERS") == "1"


def unavailable(component: str, reason: str) -> None:
    """Skip the test because ``component`` cannot be had, or fail under CI.

    With SINGLEWRITER_REQUIRE_SERVERS=1 a missing server is an error: a CI
    run must not pass by skipping the tests that claim a guarantee.
    """
    message = f"{component} unavailable: {reason}"
    if REQUIRE_SERVERS:
        pytest.fail(message + " (SINGLEWRITER_REQUIRE_SERVERS=1 forbids skipping)")
    pytest.skip(message)


@pytest.fixture
def clean_cli_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Drop SINGLEWRITER_* option variables and undo main()'s logging setup."""
    keep = {"SINGLEWRITER_SERVER_CACHE", "SINGLEWRITER_REQUIRE_SERVERS"}
    for name in list(os.environ):
        if name.startswith("SINGLEWRITER_") and name not in keep:
            monkeypatch.delenv(name)

    logger = logging.getLogger("singlewriter")
    handlers, level = list(logger.handlers), logger.level
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[object]:
    """One redis-server for the whole session; tests use unique lock names."""
    from tests.servers.redis import start_redis

    workdir = Path(tempfile.mkdtemp(prefix="singlewriter-redis-"))
    try:
        server = start_redis(workdir)
    except ServerUnavailable as exc:
        unavailable("redis-server", str(exc))
    yield server
    server.stop()


@pytest.fixture
def fresh_redis(tmp_path: Path) -> Iterator[object]:
    """A redis-server of the test's own, for tests that restart it."""
    from tests.servers.redis import start_redis

    try:
        server = start_redis(tmp_path)
    except ServerUnavailable as exc:
        unavailable("redis-server", str(exc))
    yield server
    server.stop()


# The contract suite runs once per backend. Each name X has a fixture
# X_backend that returns a factory: factory(tmp_path) -> lock URL. The
# mark says which real server the backend needs.
BACKENDS: dict[str, tuple[pytest.MarkDecorator, ...]] = {
    "file": (),
    "redis": (pytest.mark.redis,),
    "consul": (pytest.mark.consul,),
    "kubernetes": (pytest.mark.kubernetes,),
}


@pytest.fixture
def file_backend() -> Callable[[Path], str]:
    def make(tmp_path: Path) -> str:
        directory = tmp_path / "locks"
        directory.mkdir(exist_ok=True)
        return f"file://{directory}"

    return make


@pytest.fixture
def redis_backend(redis_server: object) -> Callable[[Path], str]:
    url: str = redis_server.url  # type: ignore[attr-defined]

    def make(tmp_path: Path) -> str:
        return url

    return make


@pytest.fixture(
    params=[pytest.param(name, marks=marks) for name, marks in BACKENDS.items()]
)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(backend name, lock URL) for each backend in the matrix."""
    factory = request.getfixturevalue(f"{request.param}_backend")
    return request.param, factory(tmp_path)

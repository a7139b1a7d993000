"""Consul fixtures: one agent for the whole session, and agents of a test's own.

Every agent is a ``consul agent -dev`` from tests/servers/consul.py on
127.0.0.1, with session_ttl_min lowered to 1 s so that tests can use short
ttls. Lock URLs therefore carry ``min_session_ttl=1``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.conftest import unavailable
from tests.servers import ServerUnavailable

# The launcher's session_ttl_min, in seconds.
MIN_SESSION_TTL = 1


class ConsulAdmin:
    """Calls to an agent's HTTP API that tests make from outside the lock.

    Requests carry the agent's management token when ACLs are on. Only
    http://127.0.0.1 URLs are accepted (see tests/servers/_common.py).
    """

    def __init__(self, agent: Any) -> None:
        self.agent = agent

    def request(
        self, method: str, path: str, body: Any = None, token: str | None = None
    ) -> tuple[int, Any]:
        """Send one request and return (status, decoded JSON or text)."""
        from tests.servers._common import http_request

        headers = dict(self.agent.request_headers())
        if token is not None:
            headers["X-Consul-Token"] = token
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
        status, raw = http_request(
            self.agent.url + path, method=method, body=data, headers=headers
        )
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def key(self, key: str) -> dict[str, Any] | None:
        """Return the KV entry at ``key``, or None if it does not exist."""
        status, payload = self.request("GET", f"/v1/kv/{quote(key)}")
        if status == 404:
            return None
        assert status == 200, (status, payload)
        entry: dict[str, Any] = payload[0]
        return entry

    def delete(self, key: str, *, recurse: bool = False) -> None:
        suffix = "?recurse=true" if recurse else ""
        status, payload = self.request("DELETE", f"/v1/kv/{quote(key)}{suffix}")
        assert status == 200, (status, payload)

    def put(self, key: str, value: bytes, *, flags: int = 0) -> None:
        status, payload = self.request(
            "PUT", f"/v1/kv/{quote(key)}?flags={flags}", body=value
        )
        assert (status, payload) == (200, True), (status, payload)

    def destroy_session(self, session: str) -> None:
        status, payload = self.request("PUT", f"/v1/session/destroy/{session}")
        assert (status, payload) == (200, True), (status, payload)

    def session(self, session: str) -> dict[str, Any] | None:
        status, payload = self.request("GET", f"/v1/session/info/{session}")
        assert status == 200, (status, payload)
        return payload[0] if payload else None

    def create_token(self, rules: str, name: str) -> str:
        """Create a policy with ``rules`` and a token for it. Return its secret."""
        status, payload = self.request(
            "PUT", "/v1/acl/policy", {"Name": name, "Rules": rules}
        )
        assert status == 200, (status, payload)
        status, payload = self.request(
            "PUT", "/v1/acl/token", {"Policies": [{"Name": name}]}
        )
        assert status == 200, (status, payload)
        secret: str = payload["SecretID"]
        return secret


def consul_url(agent: Any, prefix: str = "singlewriter-test", **params: Any) -> str:
    """Return a lock URL for ``agent`` that accepts ttls down to 1 s."""
    query = {"min_session_ttl": MIN_SESSION_TTL, **params}
    text = "&".join(
        f"{key}={quote(str(value), safe='')}" for key, value in query.items()
    )
    return f"consul://{agent.http_addr}/{prefix}?{text}"


def _start(workdir: Path, *, acl: bool = False) -> Any:
    from tests.servers.consul import start_consul

    try:
        return start_consul(workdir, acl=acl)
    except ServerUnavailable as exc:
        unavailable("consul", str(exc))
        raise AssertionError("unreachable") from exc


@pytest.fixture(scope="session")
def consul_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One Consul agent for the session, shared through unique lock names."""
    agent = _start(tmp_path_factory.mktemp("consul"))
    yield agent
    agent.stop()


@pytest.fixture(scope="session")
def acl_consul(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A Consul agent that denies everything without an ACL token."""
    agent = _start(tmp_path_factory.mktemp("consul-acl"), acl=True)
    yield agent
    agent.stop()


@pytest.fixture
def fresh_consul(tmp_path: Path) -> Iterator[Any]:
    """A Consul agent of the test's own, for tests that restart it."""
    agent = _start(tmp_path)
    yield agent
    agent.stop()


@dataclass
class TlsConsul:
    """A Consul agent that serves its HTTP API over TLS as well."""

    process: Any
    https_addr: str
    ca_path: Path

    def stop(self) -> None:
        self.process.stop()


def start_tls_consul(workdir: Path) -> TlsConsul:
    """Start ``consul agent -dev`` with an HTTPS listener on a loopback port.

    tests/servers/consul.py has no TLS option, so this builds the agent's
    configuration itself. A throwaway CA signs the listener's certificate.
    The plain HTTP listener stays on, for the readiness check only.
    """
    from tests.servers._common import (
        LOOPBACK,
        CertificateAuthority,
        ServerProcess,
        free_ports,
        require_binary,
    )
    from tests.servers.consul import _wait_for_leader

    binary = require_binary("consul", "consul")
    directory = workdir / "consul-tls"
    directory.mkdir(parents=True, exist_ok=True)
    authority = CertificateAuthority(directory / "pki", "singlewriter test CA")
    server = authority.issue("consul", hosts=(LOOPBACK,))

    http, https, grpc, serf_lan, serf_wan, rpc = free_ports(6, udp=True)
    config = {
        "node_name": "singlewriter-tls",
        "bind_addr": LOOPBACK,
        "client_addr": LOOPBACK,
        "advertise_addr": LOOPBACK,
        "advertise_addr_wan": LOOPBACK,
        "disable_update_check": True,
        "session_ttl_min": f"{MIN_SESSION_TTL}s",
        "ports": {
            "dns": -1,
            "http": http,
            "https": https,
            "grpc": grpc,
            "grpc_tls": -1,
            "serf_lan": serf_lan,
            "serf_wan": serf_wan,
            "server": rpc,
        },
        "tls": {
            "defaults": {
                "ca_file": str(authority.cert_path),
                "cert_file": str(server.cert_path),
                "key_file": str(server.key_path),
                "verify_incoming": False,
            }
        },
    }
    config_path = directory / "consul.json"
    config_path.write_text(json.dumps(config, indent=2))

    process = ServerProcess(
        "consul-tls",
        [binary, "agent", "-dev", "-config-file", str(config_path)],
        cwd=directory,
        log_dir=directory,
    )
    process.start()
    try:
        _wait_for_leader(f"http://{LOOPBACK}:{http}/v1/status/leader", process, 30)
    except BaseException:
        process.stop()
        raise
    return TlsConsul(process, f"{LOOPBACK}:{https}", authority.cert_path)


@pytest.fixture(scope="session")
def tls_consul(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsConsul]:
    """A Consul agent whose API is also served over TLS."""
    try:
        agent = start_tls_consul(tmp_path_factory.mktemp("consul-tls"))
    except ServerUnavailable as exc:
        unavailable("consul", str(exc))
        raise AssertionError("unreachable") from exc
    yield agent
    agent.stop()


@pytest.fixture
def consul_admin(consul_agent: Any) -> ConsulAdmin:
    return ConsulAdmin(consul_agent)


@pytest.fixture
def consul_backend(consul_agent: Any) -> Callable[[Path], str]:
    """Lock URLs on the session's agent for the contract suite."""
    url = consul_url(consul_agent)

    def make(tmp_path: Path) -> str:
        return url

    return make

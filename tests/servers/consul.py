"""Launcher for a Consul v1.14.11 agent in -dev mode on loopback ports.

A -dev agent is a single server that keeps all data in memory, so a restart
loses every session and key. The DNS, HTTPS and gRPC-TLS listeners are
disabled. The HTTP API, gRPC, Serf LAN, Serf WAN and server RPC listeners
use free ports on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

from ._common import (
    LOOPBACK,
    ServerHandle,
    ServerProcess,
    ServerUnavailable,
    free_ports,
    http_request,
    require_binary,
    wait_for_http,
)


class Consul(ServerHandle):
    """A running consul -dev agent."""

    def __init__(
        self,
        process: ServerProcess,
        *,
        http_port: int,
        management_token: str | None,
        timeout: float,
    ):
        self.process = process
        self.http_port = http_port
        self.management_token = management_token
        self._timeout = timeout

    @property
    def http_addr(self) -> str:
        """Address in the form CONSUL_HTTP_ADDR takes, "127.0.0.1:PORT"."""
        return f"{LOOPBACK}:{self.http_port}"

    @property
    def url(self) -> str:
        return f"http://{self.http_addr}"

    def request_headers(self) -> dict[str, str]:
        """Return headers that authenticate as the management token, if ACLs are on."""
        if self.management_token is None:
            return {}
        return {"X-Consul-Token": self.management_token}

    def start(self) -> None:
        """Start the agent and wait for a leader (and, with ACLs, a working token)."""
        self.process.start()
        try:
            self._wait_until_ready()
        except BaseException:
            self.process.stop()
            raise

    def _wait_until_ready(self) -> None:
        _wait_for_leader(self.url + "/v1/status/leader", self.process, self._timeout)
        if self.management_token is not None:
            # The initial management token is created after leader election.
            wait_for_http(
                self.url + "/v1/acl/token/self",
                headers=self.request_headers(),
                timeout=self._timeout,
                process=self.process,
            )

    def restart(self) -> None:
        """Stop the agent and start it again on the same ports.

        The new agent starts empty, as a -dev agent keeps no data on disk.
        NOTE: another process can take one of the ports while the agent is
        stopped, and start() then raises ServerUnavailable.
        """
        self.process.stop()
        self.start()

    def stop(self) -> None:
        self.process.stop()


def _wait_for_leader(url: str, process: ServerProcess, timeout: float) -> None:
    """Poll /v1/status/leader until it names a leader.

    A -dev server returns an empty string there until it has elected itself.
    """
    deadline = time.monotonic() + timeout
    last_outcome = "no response"
    while True:
        process.check_running()
        try:
            status, body = http_request(url, timeout=2.0)
            if status == 200 and json.loads(body):
                return
            last_outcome = f"HTTP {status}: {body[:200]!r}"
        except (OSError, ValueError) as error:
            last_outcome = str(error)
        if time.monotonic() > deadline:
            raise ServerUnavailable(
                f"timed out after {timeout:.0f} s waiting for a Consul leader at {url} "
                f"(last outcome: {last_outcome})\n{process.describe_failure()}"
            )
        time.sleep(0.2)


def start_consul(
    workdir: str | os.PathLike[str],
    *,
    acl: bool = False,
    session_ttl_min: str = "1s",
    timeout: float = 30.0,
) -> Consul:
    """Start ``consul agent -dev`` on free loopback ports and wait until it is ready.

    ``session_ttl_min`` replaces Consul's 10 s minimum session TTL. Consul
    v1.14.11 destroys a session only after twice its TTL without a renewal
    (structs.SessionTTLMultiplier), so a 1 s session is gone after 2 s. With
    ``acl`` the agent denies by default and the handle's
    ``management_token`` contains the initial management token. Configuration
    and logs go under ``workdir``/consul.

    Raises ServerUnavailable when the binary is missing or the agent does not
    become ready within ``timeout`` seconds.
    """
    binary = require_binary("consul", "consul")
    directory = Path(workdir) / "consul"
    directory.mkdir(parents=True, exist_ok=True)

    http_port, grpc_port, serf_lan_port, serf_wan_port, server_port = free_ports(
        5, udp=True
    )
    config: dict[str, object] = {
        "node_name": "singlewriter-test",
        "bind_addr": LOOPBACK,
        "client_addr": LOOPBACK,
        "advertise_addr": LOOPBACK,
        "advertise_addr_wan": LOOPBACK,
        # The update check would contact a HashiCorp server.
        "disable_update_check": True,
        "log_level": "INFO",
        "session_ttl_min": session_ttl_min,
        "ports": {
            "dns": -1,
            "http": http_port,
            "https": -1,
            "grpc": grpc_port,
            "grpc_tls": -1,
            "serf_lan": serf_lan_port,
            "serf_wan": serf_wan_port,
            "server": server_port,
        },
    }
    management_token = None
    if acl:
        management_token = str(uuid.uuid4())
        config["acl"] = {
            "enabled": True,
            "default_policy": "deny",
            "enable_token_persistence": False,
            "tokens": {
                "initial_management": management_token,
                # The agent registers its own node, which needs a token.
                "agent": management_token,
            },
        }
    config_path = directory / "consul.json"
    config_path.write_text(json.dumps(config, indent=2))
    config_path.chmod(0o600)

    process = ServerProcess(
        "consul",
        [binary, "agent", "-dev", "-config-file", str(config_path)],
        cwd=directory,
        log_dir=directory,
    )
    handle = Consul(
        process,
        http_port=http_port,
        management_token=management_token,
        timeout=timeout,
    )
    handle.start()
    return handle

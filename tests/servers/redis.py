"""A throwaway redis-server on 127.0.0.1 with persistence switched off."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ._common import (
    CertificateAuthority,
    ServerHandle,
    ServerProcess,
    ServerUnavailable,
    free_port,
    wait_for_port,
)

__all__ = ["Redis", "start_redis"]


class Redis(ServerHandle):
    """A running redis-server; ``restart()`` loses every key on purpose."""

    def __init__(
        self,
        workdir: Path,
        binary: str,
        *,
        password: str | None = None,
        tls: bool = False,
    ):
        self.workdir = workdir
        self.port = free_port()
        self.password = password
        self.ca_path: Path | None = None
        self.socket_path = workdir / "redis.sock"
        argv = [
            binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(workdir),
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
            "--unixsocket",
            str(self.socket_path),
        ]
        if password is not None:
            argv += ["--requirepass", password]
        if tls:
            # Plain TCP off, TLS on the same port, no client certificates.
            authority = CertificateAuthority(workdir / "tls", "singlewriter test CA")
            leaf = authority.issue("redis")
            self.ca_path = authority.cert_path
            argv[argv.index("--port") + 1] = "0"
            argv += ["--tls-port", str(self.port), "--tls-auth-clients", "no"]
            argv += ["--tls-cert-file", str(leaf.cert_path)]
            argv += ["--tls-key-file", str(leaf.key_path)]
            argv += ["--tls-ca-cert-file", str(authority.cert_path)]
        self.process = ServerProcess("redis", argv, cwd=workdir, log_dir=workdir)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.ca_path is not None:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.ca_path}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process.start()
        wait_for_port(self.port, timeout=15, process=self.process)

    def stop(self) -> None:
        self.process.stop()

    def kill(self) -> None:
        """SIGKILL the server, as a crash would: nothing is saved on the way out."""
        self.process.kill()

    def restart(self) -> None:
        """Stop and start on the same port. With persistence off, all keys are gone."""
        self.process.stop()
        self.start()


def start_redis(
    workdir: str | os.PathLike[str], *, password: str | None = None, tls: bool = False
) -> Redis:
    """Start redis-server from PATH (Debian package redis-server)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise ServerUnavailable(
            "redis-server not found on PATH: install it with"
            " `apt-get install redis-server`, as tests/bootstrap does"
        )
    server = Redis(Path(workdir), binary, password=password, tls=tls)
    server.start()
    return server

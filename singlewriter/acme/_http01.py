"""HTTP-01 (RFC 8555 section 8.3): a built-in server, or files in a webroot."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from singlewriter._errors import ConfigError

from ._challenges import Challenge, ChallengeItem
from ._errors import ChallengeError

__all__ = ["HTTP01_PREFIX", "HTTP01Standalone", "HTTP01Webroot"]

log = logging.getLogger(__name__)

HTTP01_PREFIX = "/.well-known/acme-challenge/"


class _ChallengeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily) -> None:
        self.address_family = family
        self.responses: dict[str, bytes] = {}
        super().__init__(address, _ChallengeHandler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            # Accept IPv4 too on "::": CAs validate over IPv6 when the name
            # has an AAAA record and over IPv4 otherwise.
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class _ChallengeHandler(BaseHTTPRequestHandler):
    server: _ChallengeServer
    server_version = "singlewriter"

    def do_GET(self) -> None:
        self._respond(send_body=True)

    def do_HEAD(self) -> None:
        self._respond(send_body=False)

    def _respond(self, *, send_body: bool) -> None:
        path = self.path.split("?", 1)[0]
        body = None
        if path.startswith(HTTP01_PREFIX):
            body = self.server.responses.get(path[len(HTTP01_PREFIX) :])

        if body is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("HTTP-01 server: %s %s", self.client_address[0], format % args)


class HTTP01Standalone(Challenge):
    """Serve HTTP-01 responses from a built-in HTTP server on ``address``:``port``.

    ``port`` 80 is where CAs connect (RFC 8555 section 8.3); binding it needs
    root or CAP_NET_BIND_SERVICE, unless a proxy forwards port 80 to another
    port. ``address`` None listens on every IPv6 and IPv4 address ("::" in
    dual-stack mode), or on every IPv4 address where IPv6 is off. The server
    runs in a daemon thread only while a renewal is in progress.
    """

    challenge_type = "http-01"

    def __init__(self, port: int = 80, address: str | None = None) -> None:
        if (
            isinstance(port, bool)
            or not isinstance(port, int)
            or not 0 <= port <= 65535
        ):
            raise ConfigError(f"port={port!r} is invalid: use 1 to 65535 (0 for any)")
        self.port = port
        self.address = address
        self._server: _ChallengeServer | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"HTTP01Standalone(port={self.port}, address={self.address!r})"

    @property
    def bound_port(self) -> int | None:
        """The port the server listens on while started, else None."""
        if self._server is None:
            return None
        return int(self._server.server_address[1])

    def start(self) -> None:
        if self._server is not None:
            return
        self._server = self._bind()
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.01},
            name="singlewriter-http01",
            daemon=True,
        )
        self._thread.start()
        log.debug("HTTP-01 server listening on port %d", self.bound_port)

    def present(self, item: ChallengeItem) -> None:
        server = self._require_server()
        server.responses[item.token] = item.validation.encode()

    def cleanup(self, item: ChallengeItem) -> None:
        if self._server is not None:
            self._server.responses.pop(item.token, None)

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def _bind(self) -> _ChallengeServer:
        candidates: list[tuple[str, socket.AddressFamily]]
        if self.address is None:
            candidates = [("::", socket.AF_INET6), ("0.0.0.0", socket.AF_INET)]  # noqa: S104
        else:
            family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
            candidates = [(self.address, family)]

        for index, (address, family) in enumerate(candidates):
            try:
                return _ChallengeServer((address, self.port), family)
            except OSError as exc:
                unsupported = exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL)
                if unsupported and index + 1 < len(candidates):
                    continue
                raise ChallengeError(
                    f"the HTTP-01 server could not listen on {address} port"
                    f" {self.port}: {exc.strerror or exc}. Free the port, run"
                    " with the right to bind it, or use HTTP01Webroot or DNS01Hook."
                ) from exc
        raise AssertionError("unreachable")

    def _require_server(self) -> _ChallengeServer:
        if self._server is None:
            raise ChallengeError("HTTP01Standalone.present() was called before start()")
        return self._server


# HTTP-01 through a web server's document root.


class HTTP01Webroot(Challenge):
    """Fulfil HTTP-01 by writing files under ``path``/.well-known/acme-challenge/.

    A web server must already serve ``path`` for every name on port 80.
    Files are world-readable (0644) because the web server reads them. They
    are removed after validation, and so are the directories this object
    created, when they are empty.
    """

    challenge_type = "http-01"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._created: list[Path] = []

    def __repr__(self) -> str:
        return f"HTTP01Webroot({str(self.path)!r})"

    @property
    def challenge_directory(self) -> Path:
        return self.path / HTTP01_PREFIX.strip("/")

    def start(self) -> None:
        if not self.path.is_dir():
            raise ChallengeError(
                f"webroot {str(self.path)!r} is not a directory: pass the document"
                " root that the web server serves on port 80"
            )
        directory = self.path
        for part in HTTP01_PREFIX.strip("/").split("/"):
            directory = directory / part
            if directory.is_dir():
                continue
            try:
                directory.mkdir(mode=0o755)
            except OSError as exc:
                raise ChallengeError(
                    f"could not create {directory} for HTTP-01 files:"
                    f" {exc.strerror or exc}; make the webroot writable"
                ) from exc
            self._created.append(directory)

    def present(self, item: ChallengeItem) -> None:
        path = self.challenge_directory / item.token
        try:
            fd = os.open(
                path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644
            )
            try:
                os.fchmod(fd, 0o644)
                os.write(fd, item.validation.encode())
            finally:
                os.close(fd)
        except OSError as exc:
            raise ChallengeError(
                f"could not write the HTTP-01 file {path}: {exc.strerror or exc}"
            ) from exc

    def cleanup(self, item: ChallengeItem) -> None:
        path = self.challenge_directory / item.token
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove HTTP-01 file %s: %s", path, exc)

    def stop(self) -> None:
        created, self._created = self._created, []
        for directory in reversed(created):
            with contextlib.suppress(OSError):
                directory.rmdir()

"""Shared helpers for the test-server launchers.

Every listener these helpers create or wait for is on 127.0.0.1. HTTP requests
go through an opener without proxy handlers, so HTTP_PROXY and similar
variables never send loopback traffic elsewhere.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK = "127.0.0.1"

BUILD_SCRIPT = "tests/servers/build.sh"

# Proxy variables removed from the environment of every server process, so a
# Go program never sends its loopback requests to a proxy.
_PROXY_VARIABLES = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
)

_NO_PROXY_OPENER_HANDLERS = (urllib.request.ProxyHandler({}),)


class ServerUnavailable(Exception):
    """A test server cannot run: its binary is missing or it failed to start.

    ``reason`` is a one-line message suitable for ``pytest.skip``.
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def cache_dir() -> Path:
    """Return the directory that build.sh installs server binaries into."""
    configured = os.environ.get("SINGLEWRITER_SERVER_CACHE")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "singlewriter" / "servers"


def find_binary(name: str, *, search_path: bool = False) -> str | None:
    """Return the path of executable ``name`` from the cache, or None.

    With ``search_path`` the PATH is searched when the cache has no such
    binary. Launchers of servers that build.sh builds leave it off, because a
    distribution package of the same name is usually an older release.
    """
    candidate = cache_dir() / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    if search_path:
        return shutil.which(name)
    return None


def require_binary(name: str, build_target: str) -> str:
    """Return the path of cached binary ``name`` or raise ServerUnavailable."""
    path = find_binary(name)
    if path is None:
        raise ServerUnavailable(
            f"{name} not found in {cache_dir()}: build it with "
            f"`bash {BUILD_SCRIPT} {build_target}`"
        )
    return path


def free_port(*, udp: bool = False) -> int:
    """Return a TCP port on 127.0.0.1 that is free right now.

    With ``udp`` the same port number is also free for UDP. Another process
    can still take the port before the caller binds it.
    """
    return free_ports(1, udp=udp)[0]


def free_ports(count: int, *, udp: bool = False) -> list[int]:
    """Return ``count`` distinct free ports on 127.0.0.1 (see free_port)."""
    open_sockets: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            tcp_socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp_socket.bind((LOOPBACK, 0))
            open_sockets.append(tcp_socket)
            port = tcp_socket.getsockname()[1]
            if udp:
                udp_socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                try:
                    udp_socket.bind((LOOPBACK, port))
                except OSError:
                    udp_socket.close()
                    continue
                open_sockets.append(udp_socket)
            ports.append(port)
    finally:
        for open_socket in open_sockets:
            open_socket.close()
    return ports


def no_proxy_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return a copy of os.environ without proxy variables, plus ``extra``."""
    environment = {
        key: value for key, value in os.environ.items() if key not in _PROXY_VARIABLES
    }
    environment["NO_PROXY"] = "127.0.0.1,localhost"
    environment["no_proxy"] = "127.0.0.1,localhost"
    if extra:
        environment.update(extra)
    return environment


def http_request(
    url: str,
    *,
    method: str = "GET",
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = 10.0,
) -> tuple[int, bytes]:
    """Send one HTTP request without any proxy and return (status, body).

    HTTP error statuses are returned, not raised. Connection errors raise
    OSError (urllib.error.URLError is a subclass).
    """
    if not url.startswith(("http://127.0.0.1:", "https://127.0.0.1:")):
        raise ValueError(
            f"invalid URL {url!r}: only http(s)://127.0.0.1:PORT URLs are allowed"
        )
    handlers: list[urllib.request.BaseHandler] = list(_NO_PROXY_OPENER_HANDLERS)
    if ssl_context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=ssl_context))
    opener = urllib.request.build_opener(*handlers)
    # The URL was checked above to be http(s) on 127.0.0.1.
    request = urllib.request.Request(  # noqa: S310
        url, data=body, method=method, headers=dict(headers or {})
    )
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def post_json(
    url: str,
    payload: object,
    *,
    ssl_context: ssl.SSLContext | None = None,
    headers: Mapping[str, str] | None = None,
) -> bytes:
    """POST ``payload`` as JSON and return the body, raising on a non-2xx status."""
    all_headers = {"Content-Type": "application/json"}
    all_headers.update(headers or {})
    status, body = http_request(
        url,
        method="POST",
        body=json.dumps(payload).encode(),
        headers=all_headers,
        ssl_context=ssl_context,
    )
    if not 200 <= status < 300:
        raise RuntimeError(f"POST {url} failed with HTTP {status}: {body[:500]!r}")
    return body


def wait_for_port(
    port: int,
    *,
    timeout: float = 30.0,
    process: ServerProcess | None = None,
) -> None:
    """Wait until a TCP connection to 127.0.0.1:``port`` succeeds.

    Raises ServerUnavailable if ``process`` exits or the timeout passes.
    """
    deadline = time.monotonic() + timeout
    while True:
        if process is not None:
            process.check_running()
        try:
            with socket.create_connection((LOOPBACK, port), timeout=1.0):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise ServerUnavailable(
                f"timed out after {timeout:.0f} s waiting for 127.0.0.1:{port}"
                + (f"\n{process.describe_failure()}" if process else "")
            )
        time.sleep(0.1)


def wait_for_http(
    url: str,
    *,
    timeout: float = 30.0,
    ssl_context: ssl.SSLContext | None = None,
    headers: Mapping[str, str] | None = None,
    expected_status: int = 200,
    process: ServerProcess | None = None,
    processes: Sequence[ServerProcess] = (),
) -> bytes:
    """Poll ``url`` until it returns ``expected_status`` and return the body.

    Raises ServerUnavailable if one of the given processes exits or the
    timeout passes.
    """
    watched = list(processes) + ([process] if process is not None else [])
    deadline = time.monotonic() + timeout
    last_outcome = "no response"
    while True:
        for watched_process in watched:
            watched_process.check_running()
        try:
            status, body = http_request(
                url, headers=headers, ssl_context=ssl_context, timeout=2.0
            )
            if status == expected_status:
                return body
            last_outcome = f"HTTP {status}: {body[:200]!r}"
        except OSError as error:
            last_outcome = str(error)
        if time.monotonic() > deadline:
            details = "\n".join(p.describe_failure() for p in watched)
            raise ServerUnavailable(
                f"timed out after {timeout:.0f} s waiting for {url} "
                f"(last outcome: {last_outcome})" + (f"\n{details}" if details else "")
            )
        time.sleep(0.2)


class ServerProcess:
    """One server subprocess whose output goes to its own log file.

    The process stays in the test runner's process group, so a Ctrl-C that
    interrupts the tests also ends the servers. The log file is opened in
    append mode, so a restart keeps the earlier output.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        log_dir: str | os.PathLike[str] | None = None,
    ):
        self.name = name
        self.argv = [str(argument) for argument in argv]
        self.env = dict(env) if env is not None else no_proxy_environment()
        self.cwd = str(cwd) if cwd is not None else None
        if log_dir is None:
            log_dir = tempfile.mkdtemp(prefix=f"singlewriter-{name}-")
        self.log_path = Path(log_dir) / f"{name}.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        """Start the process. Raises RuntimeError if it is already running."""
        if self.running():
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            log_file.write(f"--- starting: {' '.join(self.argv)}\n".encode())
            log_file.flush()
            self._process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
            )

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def check_running(self) -> None:
        """Raise ServerUnavailable with the log tail if the process has exited."""
        if self._process is not None and self._process.poll() is not None:
            raise ServerUnavailable(
                f"{self.name} exited with status {self._process.returncode}\n"
                f"{self.describe_failure()}"
            )

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def describe_failure(self) -> str:
        return f"last lines of {self.log_path}:\n{self.log_tail()}"

    def stop(self, timeout: float = 10.0) -> None:
        """Send SIGTERM, then SIGKILL if still running after ``timeout`` s."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)

    def kill(self) -> None:
        """Send SIGKILL at once, as a crash would end the process."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.kill()
        process.wait()

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class ServerHandle:
    """Base of the launcher handles: stop() on context exit."""

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@dataclass(frozen=True)
class CertificateFiles:
    """PEM files of one certificate and its private key."""

    cert_path: Path
    key_path: Path


class CertificateAuthority:
    """A throwaway ECDSA P-256 certificate authority for loopback listeners."""

    def __init__(self, directory: str | os.PathLike[str], common_name: str):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self._certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        self.cert_path = self.directory / "ca.pem"
        self.cert_path.write_bytes(
            self._certificate.public_bytes(serialization.Encoding.PEM)
        )
        self.key_path = self.directory / "ca-key.pem"
        _write_private_key(self.key_path, self._key)

    def issue(
        self,
        name: str,
        *,
        hosts: Sequence[str] = (LOOPBACK, "localhost"),
        server: bool = True,
        client: bool = False,
        common_name: str | None = None,
        organizations: Sequence[str] = (),
    ) -> CertificateFiles:
        """Issue a leaf certificate and write ``name``.pem and ``name``-key.pem.

        ``hosts`` become subject alternative names: IP addresses as IP
        entries, anything else as DNS names.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        attributes: list[x509.NameAttribute] = [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name or name)
        ]
        for organization in organizations:
            attributes.append(
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization)
            )
        alternative_names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                alternative_names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                alternative_names.append(x509.DNSName(host))
        usages = []
        if server:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attributes))
            .issuer_name(self._certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(
                x509.BasicConstraints(ca=False, path_length=None), critical=True
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self._key.public_key()
                ),
                critical=False,
            )
        )
        if alternative_names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(alternative_names), critical=False
            )
        certificate = builder.sign(self._key, hashes.SHA256())
        cert_path = self.directory / f"{name}.pem"
        cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        key_path = self.directory / f"{name}-key.pem"
        _write_private_key(key_path, key)
        return CertificateFiles(cert_path=cert_path, key_path=key_path)

    def ssl_context(self) -> ssl.SSLContext:
        """Return a client SSL context that trusts only this authority."""
        return ssl.create_default_context(cafile=str(self.cert_path))


def _write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)

"""A throwaway Pebble ACME server on loopback ports, for ``singlewriter demo``.

The binaries come from the cache that the source tree's
``tests/servers/build.sh pebble`` fills: ``$SINGLEWRITER_SERVER_CACHE``, or
``~/.cache/singlewriter/servers``. pebble-challtestsrv serves only DNS here
and answers every A query with 127.0.0.1, so Pebble's validation requests
go to a responder on this machine and nowhere else. Every listener binds
127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from ipaddress import IPv4Address
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "LOOPBACK",
    "Pebble",
    "PebbleMissing",
    "cache_dir",
    "free_port",
    "start_pebble",
]

LOOPBACK = "127.0.0.1"
BUILD_COMMAND = "bash tests/servers/build.sh pebble"

# Variables that would send the ACME client's loopback requests to a proxy.
PROXY_VARIABLES = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
)


class PebbleMissing(Exception):
    """The Pebble binaries are not in the cache; the message names the build command."""


def cache_dir() -> Path:
    """Return the directory the server build script installs binaries into."""
    configured = os.environ.get("SINGLEWRITER_SERVER_CACHE")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "singlewriter" / "servers"


def find_binaries() -> tuple[Path, Path]:
    """Return the paths of pebble and pebble-challtestsrv, or raise PebbleMissing."""
    found = []
    for name in ("pebble", "pebble-challtestsrv"):
        path = cache_dir() / name
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise PebbleMissing(
                f"{name} not found in {cache_dir()}: build it from a source"
                f" checkout with `{BUILD_COMMAND}` (needs Go), or point"
                " SINGLEWRITER_SERVER_CACHE at a directory that has it"
            )
        found.append(path)
    return found[0], found[1]


def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct ports on 127.0.0.1 that are free right now."""
    ports: list[int] = []
    while len(ports) < count:
        number = free_port()
        if number not in ports:
            ports.append(number)
    return ports


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now (also for UDP).

    Another process can still take the port before the caller binds it.
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((LOOPBACK, 0))
            number: int = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((LOOPBACK, number))
                except OSError:
                    continue
        return number


def environment_without_proxy() -> dict[str, str]:
    """Return os.environ without proxy variables and with loopback in NO_PROXY."""
    env = {
        key: value for key, value in os.environ.items() if key not in PROXY_VARIABLES
    }
    env["NO_PROXY"] = env["no_proxy"] = f"{LOOPBACK},localhost"
    return env


@dataclass
class Pebble:
    """A running Pebble and pebble-challtestsrv pair."""

    directory: Path
    acme_port: int
    http01_port: int
    ca_bundle: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def directory_url(self) -> str:
        return f"https://{LOOPBACK}:{self.acme_port}/dir"

    def stop(self) -> None:
        """Stop both servers: SIGTERM, then SIGKILL after 5 s."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def log_tail(self, lines: int = 20) -> str:
        """Return the last lines of both servers' logs, for error messages."""
        text = []
        for name in ("pebble.log", "challtestsrv.log"):
            path = self.directory / name
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                text.append(f"--- {path}\n" + "\n".join(tail))
        return "\n".join(text)


def start_pebble(directory: Path, *, timeout: float = 20.0) -> Pebble:
    """Start pebble-challtestsrv (DNS only) and Pebble under ``directory``.

    Raise PebbleMissing without the binaries and RuntimeError when a server
    does not respond within ``timeout`` seconds.
    """
    pebble_binary, challtestsrv_binary = find_binaries()
    directory.mkdir(parents=True, exist_ok=True)
    ca_bundle, cert_path, key_path = _listener_certificate(directory)
    dns_port, acme_port, management_port, http01_port, tls_port, dns_management = (
        free_ports(6)
    )
    config = {
        "pebble": {
            "listenAddress": f"{LOOPBACK}:{acme_port}",
            "managementListenAddress": f"{LOOPBACK}:{management_port}",
            "certificate": str(cert_path),
            "privateKey": str(key_path),
            "httpPort": http01_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
            # Retry-After hints in seconds; short so the demo stays quick.
            "retryAfter": {"authz": 1, "order": 1},
        }
    }
    config_path = directory / "pebble-config.json"
    config_path.write_text(json.dumps(config, indent=2))

    pebble = Pebble(directory, acme_port, http01_port, ca_bundle)
    env = environment_without_proxy()
    try:
        pebble.processes.append(
            _spawn(
                [
                    str(challtestsrv_binary),
                    "-dnsserver",
                    f"{LOOPBACK}:{dns_port}",
                    "-management",
                    f"{LOOPBACK}:{dns_management}",
                    "-http01",
                    "",
                    "-https01",
                    "",
                    "-tlsalpn01",
                    "",
                    "-doh",
                    "",
                    "-defaultIPv4",
                    LOOPBACK,
                    "-defaultIPv6",
                    "",
                ],
                directory / "challtestsrv.log",
                env,
            )
        )
        _wait_for_port(dns_management, timeout, pebble)
        env["PEBBLE_VA_NOSLEEP"] = "1"
        pebble.processes.append(
            _spawn(
                [
                    str(pebble_binary),
                    "-config",
                    str(config_path),
                    "-dnsserver",
                    f"{LOOPBACK}:{dns_port}",
                ],
                directory / "pebble.log",
                env,
            )
        )
        _wait_for_directory(pebble, timeout)
    except BaseException:
        pebble.stop()
        raise
    return pebble


def _spawn(
    argv: list[str], log_path: Path, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def _check_running(pebble: Pebble) -> None:
    for process in pebble.processes:
        if process.poll() is not None:
            raise RuntimeError(
                f"{process.args!r} exited with status {process.returncode}\n"
                + pebble.log_tail()
            )


def _wait_for_port(port: int, timeout: float, pebble: Pebble) -> None:
    deadline = time.monotonic() + timeout
    while True:
        _check_running(pebble)
        try:
            with socket.create_connection((LOOPBACK, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"nothing accepted a connection on {LOOPBACK}:{port} within"
                    f" {timeout:g} s\n" + pebble.log_tail()
                ) from None
            time.sleep(0.05)


def _wait_for_directory(pebble: Pebble, timeout: float) -> None:
    context = ssl.create_default_context(cafile=str(pebble.ca_bundle))
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    deadline = time.monotonic() + timeout
    while True:
        _check_running(pebble)
        try:
            with opener.open(pebble.directory_url, timeout=2.0) as response:
                if response.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"Pebble did not serve {pebble.directory_url} within {timeout:g} s\n"
                + pebble.log_tail()
            )
        time.sleep(0.05)


def _listener_certificate(directory: Path) -> tuple[Path, Path, Path]:
    """Create a CA and a certificate for 127.0.0.1 signed by it.

    Return the CA bundle, the certificate and its key. The ACME client
    trusts only this CA, through --ca-bundle.
    """
    now = datetime.now(timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "singlewriter demo CA")]
    )
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, LOOPBACK)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(IPv4Address(LOOPBACK)), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    ca_path = directory / "listener-ca.pem"
    cert_path = directory / "listener.pem"
    key_path = directory / "listener-key.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return ca_path, cert_path, key_path

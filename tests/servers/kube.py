"""Launcher for etcd v3.7.0 and kube-apiserver v1.37.2 on loopback ports.

No controller manager, scheduler or kubelet runs, so only plain API objects
such as Leases, Secrets and ConfigMaps behave as in a cluster. A deleted
namespace stays in Terminating forever, so tests should use unique object
names rather than namespace teardown.

Clients authenticate with static bearer tokens. "singlewriter-admin" is in
the group system:masters. "singlewriter-limited" is in no group and, under
RBAC, can do nothing until a test binds a Role to it.
"""

from __future__ import annotations

import json
import os
import secrets
import ssl
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ._common import (
    LOOPBACK,
    CertificateAuthority,
    ServerHandle,
    ServerProcess,
    free_ports,
    http_request,
    require_binary,
    wait_for_http,
)

ADMIN_USER = "singlewriter-admin"
LIMITED_USER = "singlewriter-limited"

# The API server only allocates Service addresses from this range, and
# nothing in it is contacted.
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"


class Kube(ServerHandle):
    """A running etcd and kube-apiserver pair."""

    def __init__(
        self,
        *,
        etcd: ServerProcess,
        apiserver: ServerProcess,
        authority: CertificateAuthority,
        etcd_client_port: int,
        secure_port: int,
        admin_token: str,
        limited_token: str,
        timeout: float,
    ):
        self.etcd_process = etcd
        self.apiserver_process = apiserver
        self._authority = authority
        self.etcd_client_port = etcd_client_port
        self.secure_port = secure_port
        self.admin_token = admin_token
        self.limited_token = limited_token
        self._timeout = timeout

    @property
    def host(self) -> str:
        """Base URL of the API server, https://127.0.0.1:PORT."""
        return f"https://{LOOPBACK}:{self.secure_port}"

    @property
    def ca_path(self) -> str:
        """PEM file of the CA that signed the API server's serving certificate."""
        return str(self._authority.cert_path)

    @property
    def etcd_url(self) -> str:
        return f"http://{LOOPBACK}:{self.etcd_client_port}"

    def token_for(self, user: str) -> str:
        """Return the bearer token of ``user``: "admin", "limited" or a user name."""
        if user in ("admin", ADMIN_USER):
            return self.admin_token
        if user in ("limited", LIMITED_USER):
            return self.limited_token
        raise ValueError(f"unknown user {user!r}: expected 'admin' or 'limited'")

    def ssl_context(self) -> ssl.SSLContext:
        """Return a client SSL context that verifies the API server."""
        return self._authority.ssl_context()

    def request(
        self,
        method: str,
        path: str,
        body: object | None = None,
        *,
        user: str = "admin",
        content_type: str = "application/json",
    ) -> tuple[int, object]:
        """Send one API request as ``user`` and return (status, decoded JSON body).

        A body that is not JSON is returned as text.
        """
        headers = {
            "Authorization": f"Bearer {self.token_for(user)}",
            "Accept": "application/json",
        }
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = content_type
        status, raw = http_request(
            self.host + path,
            method=method,
            body=data,
            headers=headers,
            ssl_context=self.ssl_context(),
        )
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def write_kubeconfig(
        self,
        path: str | os.PathLike[str],
        user: str = "admin",
        *,
        namespace: str = "default",
    ) -> Path:
        """Write a kubeconfig for ``user`` ("admin" or "limited") and return its path.

        The file is JSON, which kubeconfig loaders accept because JSON is YAML.
        """
        user_name = ADMIN_USER if user in ("admin", ADMIN_USER) else LIMITED_USER
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "singlewriter-test",
                    "cluster": {
                        "server": self.host,
                        "certificate-authority": self.ca_path,
                    },
                }
            ],
            "users": [{"name": user_name, "user": {"token": self.token_for(user)}}],
            "contexts": [
                {
                    "name": "singlewriter-test",
                    "context": {
                        "cluster": "singlewriter-test",
                        "user": user_name,
                        "namespace": namespace,
                    },
                }
            ],
            "current-context": "singlewriter-test",
        }
        output = Path(path)
        output.write_text(json.dumps(config, indent=2))
        output.chmod(0o600)
        return output

    def start_etcd(self) -> None:
        """Start etcd on its original ports with its existing data directory."""
        self.etcd_process.start()
        try:
            _wait_for_etcd(self.etcd_url, self.etcd_process, self._timeout)
        except BaseException:
            self.etcd_process.stop()
            raise

    def stop_etcd(self) -> None:
        self.etcd_process.stop()

    def start_apiserver(self) -> None:
        """Start kube-apiserver on its original port and wait until /readyz is ok."""
        self.apiserver_process.start()
        try:
            wait_for_http(
                self.host + "/readyz",
                headers={"Authorization": f"Bearer {self.admin_token}"},
                ssl_context=self.ssl_context(),
                timeout=self._timeout,
                processes=(self.apiserver_process, self.etcd_process),
            )
        except BaseException:
            self.apiserver_process.stop()
            raise

    def stop_apiserver(self) -> None:
        """Stop kube-apiserver only; etcd keeps the data for start_apiserver()."""
        self.apiserver_process.stop()

    def stop(self) -> None:
        self.apiserver_process.stop()
        self.etcd_process.stop()


def _wait_for_etcd(url: str, process: ServerProcess, timeout: float) -> None:
    wait_for_http(url + "/health", timeout=timeout, process=process)


def _write_service_account_key(directory: Path) -> tuple[Path, Path]:
    """Write an RSA key pair that signs and verifies service-account tokens."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_path = directory / "service-account-key.pem"
    private_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    private_path.chmod(0o600)
    public_path = directory / "service-account.pub"
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private_path, public_path


def start_kube(workdir: str | os.PathLike[str], *, timeout: float = 90.0) -> Kube:
    """Start etcd and kube-apiserver on free loopback ports; wait for /readyz.

    Data, certificates, tokens and logs go under ``workdir``/kube. Raises
    ServerUnavailable when a binary is missing or a server does not become
    ready within ``timeout`` seconds.
    """
    etcd_binary = require_binary("etcd", "kube")
    apiserver_binary = require_binary("kube-apiserver", "kube")

    directory = Path(workdir) / "kube"
    directory.mkdir(parents=True, exist_ok=True)
    etcd_data = directory / "etcd-data"
    cert_dir = directory / "apiserver-certs"
    cert_dir.mkdir(exist_ok=True)

    authority = CertificateAuthority(
        directory / "tls", "singlewriter test Kubernetes CA"
    )
    serving = authority.issue(
        "apiserver",
        hosts=(
            LOOPBACK,
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
        ),
    )
    service_account_key, service_account_public_key = _write_service_account_key(
        directory
    )

    admin_token = secrets.token_urlsafe(32)
    limited_token = secrets.token_urlsafe(32)
    token_file = directory / "tokens.csv"
    # Format of --token-auth-file: token,user,uid,"group1,group2".
    token_file.write_text(
        f'{admin_token},{ADMIN_USER},{ADMIN_USER},"system:masters"\n'
        f"{limited_token},{LIMITED_USER},{LIMITED_USER}\n"
    )
    token_file.chmod(0o600)

    etcd_client_port, etcd_peer_port, secure_port = free_ports(3)
    etcd_client_url = f"http://{LOOPBACK}:{etcd_client_port}"
    etcd_peer_url = f"http://{LOOPBACK}:{etcd_peer_port}"

    etcd = ServerProcess(
        "etcd",
        [
            etcd_binary,
            "--name",
            "singlewriter-test",
            "--data-dir",
            str(etcd_data),
            "--listen-client-urls",
            etcd_client_url,
            "--advertise-client-urls",
            etcd_client_url,
            "--listen-peer-urls",
            etcd_peer_url,
            "--initial-advertise-peer-urls",
            etcd_peer_url,
            "--initial-cluster",
            f"singlewriter-test={etcd_peer_url}",
            "--unsafe-no-fsync",
            "--log-level",
            "warn",
        ],
        cwd=directory,
        log_dir=directory,
    )
    apiserver = ServerProcess(
        "kube-apiserver",
        [
            apiserver_binary,
            f"--etcd-servers={etcd_client_url}",
            "--bind-address=127.0.0.1",
            f"--secure-port={secure_port}",
            # Without this pair the server advertises the default-route
            # address. The endpoint reconciler of 1.37 rejects 127.0.0.1
            # ("may not be in the loopback range"), so it is turned off.
            "--advertise-address=127.0.0.1",
            "--endpoint-reconciler-type=none",
            # Unused while the TLS files are given, but its default is under /var/run.
            f"--cert-dir={cert_dir}",
            f"--tls-cert-file={serving.cert_path}",
            f"--tls-private-key-file={serving.key_path}",
            f"--service-account-issuer=https://{LOOPBACK}:{secure_port}",
            f"--service-account-key-file={service_account_public_key}",
            f"--service-account-signing-key-file={service_account_key}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            "--authorization-mode=RBAC",
            f"--token-auth-file={token_file}",
            "--disable-admission-plugins=ServiceAccount",
            "--profiling=false",
        ],
        cwd=directory,
        log_dir=directory,
    )
    handle = Kube(
        etcd=etcd,
        apiserver=apiserver,
        authority=authority,
        etcd_client_port=etcd_client_port,
        secure_port=secure_port,
        admin_token=admin_token,
        limited_token=limited_token,
        timeout=timeout,
    )
    try:
        handle.start_etcd()
        handle.start_apiserver()
    except BaseException:
        handle.stop()
        raise
    return handle

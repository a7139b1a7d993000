"""Kubernetes fixtures: a real etcd and kube-apiserver on loopback.

One server runs for the whole session (started on first use, about 5 s);
tests share it through unique Lease, Secret and namespace names. Tests that
stop the API server start their own with ``fresh_kube``.

Every URL these fixtures build names its server, token file and CA
explicitly, so no client here can reach a cluster that KUBECONFIG,
~/.kube/config or an in-cluster service account would point at.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.conftest import unavailable
from tests.servers import ServerUnavailable

LIMITED_USER = "singlewriter-limited"

# Verbs the lock and the Secret store need, found by the RBAC tests.
LEASE_VERBS = ("get", "create", "update")
SECRET_VERBS = ("get", "create", "update")

_PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


class KubeCluster:
    """The session's API server, with helpers to build URLs and RBAC objects."""

    def __init__(self, kube: Any, directory: Path) -> None:
        self.kube = kube
        self.directory = directory
        self.token_files = {
            user: self._write_token(user, kube.token_for(user))
            for user in ("admin", "limited")
        }

    def _write_token(self, user: str, token: str) -> Path:
        path = self.directory / f"{user}.token"
        path.write_text(token)
        path.chmod(0o600)
        return path

    @property
    def host(self) -> str:
        return str(self.kube.host)

    @property
    def ca_path(self) -> str:
        return str(self.kube.ca_path)

    def url(self, namespace: str, name: str | None = None, user: str = "admin") -> str:
        """Return a k8s:// URL with an explicit server, token file and CA."""
        path = f"/{name}" if name else ""
        return (
            f"k8s://{namespace}{path}?server={quote(self.host, safe=':/')}"
            f"&token_file={quote(str(self.token_files[user]), safe='/')}"
            f"&ca={quote(self.ca_path, safe='/')}"
        )

    def api_client(self, user: str = "admin") -> Any:
        """Return a kubernetes ApiClient configured only from this server."""
        import kubernetes.client

        configuration = kubernetes.client.Configuration()
        configuration.host = self.host
        configuration.ssl_ca_cert = self.ca_path
        configuration.api_key["BearerToken"] = self.kube.token_for(user)
        configuration.api_key_prefix["BearerToken"] = "Bearer"
        configuration.retries = False
        configuration.proxy = None
        return kubernetes.client.ApiClient(configuration)

    def new_namespace(self, prefix: str = "sw") -> str:
        """Create a namespace no other test uses and return its name."""
        import kubernetes.client

        name = f"{prefix}-{secrets.token_hex(5)}"
        core = kubernetes.client.CoreV1Api(self.api_client())
        core.create_namespace(
            kubernetes.client.V1Namespace(
                metadata=kubernetes.client.V1ObjectMeta(name=name)
            )
        )
        return name

    def grant(
        self,
        namespace: str,
        role: str,
        rules: list[tuple[str, str, tuple[str, ...]]],
        resource_names: dict[str, list[str]] | None = None,
    ) -> None:
        """Bind a Role with ``rules`` (group, resource, verbs) to the limited user."""
        import kubernetes.client

        rbac = kubernetes.client.RbacAuthorizationV1Api(self.api_client())
        policy = []
        for group, resource, verbs in rules:
            names = (resource_names or {}).get(resource)
            policy.append(
                kubernetes.client.V1PolicyRule(
                    api_groups=[group],
                    resources=[resource],
                    verbs=list(verbs),
                    resource_names=names,
                )
            )
        rbac.create_namespaced_role(
            namespace,
            kubernetes.client.V1Role(
                metadata=kubernetes.client.V1ObjectMeta(name=role), rules=policy
            ),
        )
        rbac.create_namespaced_role_binding(
            namespace,
            kubernetes.client.V1RoleBinding(
                metadata=kubernetes.client.V1ObjectMeta(name=role),
                role_ref=kubernetes.client.V1RoleRef(
                    api_group="rbac.authorization.k8s.io", kind="Role", name=role
                ),
                subjects=[
                    kubernetes.client.RbacV1Subject(
                        kind="User",
                        name=LIMITED_USER,
                        api_group="rbac.authorization.k8s.io",
                    )
                ],
            ),
        )

    def revoke(self, namespace: str, role: str) -> None:
        """Delete the RoleBinding that ``grant`` created."""
        import kubernetes.client

        rbac = kubernetes.client.RbacAuthorizationV1Api(self.api_client())
        rbac.delete_namespaced_role_binding(role, namespace)

    def read_lease(self, namespace: str, name: str) -> Any:
        import kubernetes.client

        leases = kubernetes.client.CoordinationV1Api(self.api_client())
        return leases.read_namespaced_lease(name, namespace)


def _require_client() -> None:
    try:
        import kubernetes  # noqa: F401
    except ImportError as exc:
        unavailable("kubernetes", f"the kubernetes client is not installed: {exc}")


def _start(directory: Path) -> KubeCluster:
    from tests.servers.kube import start_kube

    try:
        kube = start_kube(directory)
    except ServerUnavailable as exc:
        unavailable("kubernetes", str(exc))
        raise AssertionError("unreachable") from exc
    return KubeCluster(kube, directory)


@pytest.fixture(scope="session")
def kube_cluster() -> Iterator[KubeCluster]:
    """One etcd and kube-apiserver for the session."""
    _require_client()
    directory = Path(tempfile.mkdtemp(prefix="singlewriter-kube-"))

    # The kubernetes client honours proxy variables; loopback must bypass them.
    saved = {key: os.environ.get(key) for key in ("NO_PROXY", "no_proxy")}
    if any(os.environ.get(v) or os.environ.get(v.lower()) for v in _PROXY_VARIABLES):
        for key in saved:
            os.environ[key] = ",".join(filter(None, [saved[key], "127.0.0.1"]))

    cluster = _start(directory)
    yield cluster
    cluster.kube.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def kube_namespace(kube_cluster: KubeCluster) -> str:
    """A namespace of the session's own, for tests that need no RBAC setup."""
    return kube_cluster.new_namespace("singlewriter")


@pytest.fixture
def fresh_kube(tmp_path: Path) -> Iterator[KubeCluster]:
    """An etcd and kube-apiserver of the test's own, for tests that stop it."""
    _require_client()
    cluster = _start(tmp_path)
    yield cluster
    cluster.kube.stop()


@pytest.fixture
def kubernetes_backend(
    kube_cluster: KubeCluster, kube_namespace: str
) -> Callable[[Path], str]:
    """Contract-suite factory: a k8s://NAMESPACE URL; tests pass the name."""

    def make(tmp_path: Path) -> str:
        return kube_cluster.url(kube_namespace)

    return make

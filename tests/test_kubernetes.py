"""The Kubernetes Lease lock and the TLS Secret store.

Tests marked ``kubernetes`` run against a real kube-apiserver and etcd on
loopback (tests/fixtures_kube.py). The others use an in-memory fake of the
Lease API and a manual clock, so the expiry rules are checked without
waiting. Real-time tests use a ttl of a few seconds and bounds of at least
0.5 s either side, because a renewal runs every ttl/3 and contenders poll
at most every 0.2 s.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import os
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

import singlewriter
from singlewriter.backends.kubernetes import TOKEN_ANNOTATION, KubernetesLock
from singlewriter.keystore.kubernetes import KubernetesSecretStore
from tests._keystore_support import NOW, fixed_clock, make_files
from tests._support import Worker, unique_name
from tests.fixtures_kube import LEASE_VERBS, SECRET_VERBS, KubeCluster

UTC = dt.timezone.utc


@pytest.fixture(autouse=True)
def forget_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """Give each test an empty per-process token memory, as a new process has."""
    monkeypatch.setattr("singlewriter.backends.kubernetes._seen", {})


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.close()


def spawn(workers: list[Worker], url: str, name: str, ttl: float) -> Worker:
    worker = Worker(url, name, ttl)
    workers.append(worker)
    return worker


def eventually(action: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Run ``action`` until it stops raising ConfigError.

    The RBAC authorizer reads RoleBindings through an informer, so a grant
    takes effect a few milliseconds after it is written.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            return action()
        except singlewriter.ConfigError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# An in-memory Lease API and a manual clock, for the expiry rules.


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class FakeLeases:
    """One namespace's Leases with resourceVersion preconditions, in memory."""

    def __init__(self) -> None:
        self.objects: dict[str, Any] = {}
        self.version = 100
        self.fail_replace: Callable[[Any], Exception | None] = lambda body: None
        self.fail_create: Callable[[Any], Exception | None] = lambda body: None
        self.fail_read: Callable[[], Exception | None] = lambda: None
        self.apply_failed_create = False

    def _stamp(self, body: Any) -> Any:
        self.version += 1
        stored = copy.deepcopy(body)
        stored.metadata.resource_version = str(self.version)
        self.objects[stored.metadata.name] = stored
        return copy.deepcopy(stored)

    def read_namespaced_lease(self, name: str, namespace: str, **_: Any) -> Any:
        error = self.fail_read()
        if error is not None:
            raise error
        if name not in self.objects:
            raise ApiException(status=404, reason="Not Found")
        return copy.deepcopy(self.objects[name])

    def create_namespaced_lease(self, namespace: str, body: Any, **_: Any) -> Any:
        error = self.fail_create(body)
        if error is not None:
            if self.apply_failed_create:
                self._stamp(body)
            raise error
        if body.metadata.name in self.objects:
            raise ApiException(status=409, reason="AlreadyExists")
        return self._stamp(body)

    def replace_namespaced_lease(
        self, name: str, namespace: str, body: Any, **_: Any
    ) -> Any:
        error = self.fail_replace(body)
        if error is not None:
            raise error
        if name not in self.objects:
            raise ApiException(status=404, reason="Not Found")
        current = self.objects[name].metadata.resource_version
        if body.metadata.resource_version != current:
            raise ApiException(status=409, reason="Conflict")
        return self._stamp(body)

    def put_foreign(self, name: str, holder: str | None, **spec: Any) -> None:
        """Store a Lease as another client would write it."""
        self._stamp(
            kubernetes.client.V1Lease(
                metadata=kubernetes.client.V1ObjectMeta(name=name),
                spec=kubernetes.client.V1LeaseSpec(holder_identity=holder, **spec),
            )
        )


def fake_lock(
    leases: FakeLeases, clock: ManualClock, name: str = "example.com", **options: Any
) -> KubernetesLock:
    """A lock on ``leases`` whose renewals run only when the test calls run_due()."""
    configuration = kubernetes.client.Configuration()
    # Never contacted: the Lease API is replaced by the fake below.
    configuration.host = "https://127.0.0.1:9"
    scheduler = singlewriter.Scheduler(clock=clock, autostart=False)
    options.setdefault("ttl", 3.0)
    lock = KubernetesLock(
        kubernetes.client.ApiClient(configuration),
        "default",
        name,
        scheduler=scheduler,
        sleep=clock.sleep,
        **options,
    )
    lock._leases = leases
    return lock


@pytest.mark.parametrize("hours", [1, -1], ids=["future", "past"])
def test_expiry_ignores_renew_time(hours: int) -> None:
    """A renewTime an hour off neither frees the Lease early nor holds it longer."""
    leases, clock = FakeLeases(), ManualClock()
    renewed = dt.datetime.now(UTC) + dt.timedelta(hours=hours)
    leases.put_foreign(
        "example.com", "other", lease_duration_seconds=3, renew_time=renewed
    )
    lock = fake_lock(leases, clock)

    with pytest.raises(singlewriter.LockBusy):
        lock.acquire(blocking=False)
    clock.now += 2.9
    with pytest.raises(singlewriter.LockBusy):
        lock.acquire(blocking=False)
    clock.now += 0.1
    assert lock.acquire(blocking=False).token == 1


def test_expiry_uses_record_duration() -> None:
    """A contender with ttl 1 waits the 10 s the record names, not its own 1 s."""
    leases, clock = FakeLeases(), ManualClock()
    leases.put_foreign("example.com", "other", lease_duration_seconds=10)
    lock = fake_lock(leases, clock, ttl=1.0)

    with pytest.raises(singlewriter.LockBusy):
        lock.acquire(blocking=False)
    clock.now += 9.9
    with pytest.raises(singlewriter.LockBusy):
        lock.acquire(blocking=False)
    clock.now += 0.1
    lease = lock.acquire(blocking=False)

    assert leases.objects["example.com"].spec.lease_duration_seconds == 1
    lease.release()


def test_record_change_restarts_wait() -> None:
    """Every change of the record restarts the contender's wait."""
    leases, clock = FakeLeases(), ManualClock()
    leases.put_foreign("example.com", "other", lease_duration_seconds=3)
    lock = fake_lock(leases, clock)

    with pytest.raises(singlewriter.LockBusy):
        lock.acquire(blocking=False)
    clock.now += 2.0
    leases.put_foreign("example.com", "other", lease_duration_seconds=3)
    with pytest.raises(singlewriter.LockBusy):
        lock.acquire(blocking=False)
    clock.now += 2.9
    with pytest.raises(singlewriter.LockBusy):
        lock.acquire(blocking=False)
    clock.now += 0.1
    assert lock.acquire(blocking=False).token == 1


def test_empty_holder_is_free_at_once() -> None:
    """A released Lease (empty holder) is taken without waiting."""
    leases, clock = FakeLeases(), ManualClock()
    leases.put_foreign(
        "example.com", None, lease_duration_seconds=30, lease_transitions=7
    )
    lease = fake_lock(leases, clock).acquire(blocking=False)
    assert lease.token == 8


def test_conflict_storm_loses_lease_at_deadline() -> None:
    """Renewals that always get 409 end the lease at its deadline, not later."""
    leases, clock = FakeLeases(), ManualClock()
    lock = fake_lock(leases, clock)
    lease = lock.acquire()
    leases.fail_replace = lambda body: ApiException(status=409, reason="Conflict")

    while not lease.lost.is_set():
        assert lease.deadline is not None
        assert clock.now <= lease.deadline
        clock.now += 0.05
        lock.scheduler.run_due()

    assert lease.lost_reason is not None
    assert "deadline" in lease.lost_reason
    with pytest.raises(singlewriter.LockLost):
        lease.ensure_held()


def test_denied_renewal_logs_error_once(caplog: pytest.LogCaptureFixture) -> None:
    """A 403 on renewal is logged once as an error; the lease ends at its deadline."""
    leases, clock = FakeLeases(), ManualClock()
    lock = fake_lock(leases, clock)
    lease = lock.acquire()
    leases.fail_replace = lambda body: ApiException(status=403, reason="Forbidden")

    with caplog.at_level(logging.WARNING, logger="singlewriter"):
        while not lease.lost.is_set():
            clock.now += 0.05
            lock.scheduler.run_due()

    denials = [
        record
        for record in caplog.records
        if record.levelno == logging.ERROR and "was rejected" in record.getMessage()
    ]
    assert len(denials) == 1
    assert "HTTP 403" in denials[0].getMessage()
    assert "deadline" in (lease.lost_reason or "")


def test_foreign_holder_ends_lease_at_once() -> None:
    """A renewal that finds another holder marks the lease lost immediately."""
    leases, clock = FakeLeases(), ManualClock()
    lock = fake_lock(leases, clock)
    lease = lock.acquire()
    stolen = copy.deepcopy(leases.objects["example.com"])
    stolen.spec.holder_identity = "intruder"
    leases._stamp(stolen)

    clock.now += lock.renew_interval
    lock.scheduler.run_due()

    assert lease.lost.is_set()
    assert "no longer held" in (lease.lost_reason or "")
    assert lease.release() is False
    assert leases.objects["example.com"].spec.holder_identity == "intruder"


def test_lost_create_reply_still_grants() -> None:
    """A create that was applied but whose reply was lost is recognised as ours."""
    leases, clock = FakeLeases(), ManualClock()
    lost_once = [urllib3.exceptions.ReadTimeoutError(None, "/", "read timed out")]
    leases.fail_create = lambda body: lost_once.pop() if lost_once else None
    leases.apply_failed_create = True

    lease = fake_lock(leases, clock).acquire(timeout=5)

    assert lease.token == 1
    stored = leases.objects["example.com"].spec
    assert stored.holder_identity == lease.data.identity


def test_tokens_rise_for_each_acquisition() -> None:
    """Each acquisition writes a new identity and leaseTransitions + 1."""
    leases, clock = FakeLeases(), ManualClock()
    lock = fake_lock(leases, clock, identity_prefix="pod-0")
    identities, tokens = set(), []

    for _ in range(3):
        lease = lock.acquire()
        identities.add(lease.data.identity)
        tokens.append(lease.token)
        record = leases.objects["example.com"]
        assert record.spec.lease_transitions == lease.token
        assert record.metadata.annotations[TOKEN_ANNOTATION] == str(lease.token)
        assert lease.release() is True
        assert leases.objects["example.com"].spec.holder_identity is None

    assert tokens == [1, 2, 3]
    assert len(identities) == 3
    assert all(identity.startswith("pod-0_") for identity in identities)


def test_token_never_below_annotation() -> None:
    """A leaseTransitions reset by another tool does not make tokens go back."""
    leases, clock = FakeLeases(), ManualClock()
    leases.put_foreign("example.com", None, lease_transitions=2)
    leases.objects["example.com"].metadata.annotations = {TOKEN_ANNOTATION: "41"}

    assert fake_lock(leases, clock).acquire().token == 42


def test_lease_duration_rounds_up() -> None:
    """leaseDurationSeconds is the ttl rounded up to whole seconds, at least 1."""
    cases = {0.5: 1, 1.0: 1, 1.2: 2, 30.0: 30}
    for ttl, seconds in cases.items():
        lock = fake_lock(FakeLeases(), ManualClock(), ttl=ttl)
        assert lock.lease_duration_seconds == seconds, ttl


def test_exact_second_wall_clock_is_accepted() -> None:
    """A wall clock on an exact second is written with a nonzero fraction."""
    leases, clock = FakeLeases(), ManualClock()
    exact = dt.datetime(2030, 1, 1, tzinfo=UTC)
    fake_lock(leases, clock, wall_clock=lambda: exact).acquire()

    written = leases.objects["example.com"].spec.renew_time
    assert written.microsecond == 1


# URLs and configuration sources.

BAD_URLS = {
    "k8s://": "names no namespace",
    "k8s://Default/x?incluster=1": "namespace 'Default'",
    "k8s://ns/Bad_Name?incluster=1": "Lease name 'Bad_Name'",
    "k8s://ns/x": "exactly one configuration source",
    "k8s://ns/x?incluster=1&kubeconfig=/nonexistent": "found: kubeconfig, incluster",
    "k8s://ns/x?incluster=1&colour=blue": "unknown parameters ['colour']",
    "k8s://ns/x?incluster=1&incluster=1": "repeats parameters ['incluster']",
    "k8s://ns/x?server=http://127.0.0.1:1&token=t": "plain HTTP",
    "k8s://ns/x?server=https://127.0.0.1:1": "exactly one of token_file",
    "k8s://ns/x?server=https://127.0.0.1:1&token=t&token_file=/f": "exactly one of",
    "k8s://ns/x?incluster=1&context=prod": "combines incluster= with ['context']",
    "k8s://ns/x?server=https://127.0.0.1:1&token_file=/nonexistent": "cannot be read",
    "k8s://ns/x?kubeconfig=/nonexistent": "is not a file",
    "k8s://ns/x?incluster=0": "incluster='0'",
    "k8s://user@ns/x?incluster=1": "no user or port",
    "k8s://ns?incluster=1": "names no Lease",
    "redis://ns/x": "expected k8s://",
}


def test_bad_urls_raise_config_error() -> None:
    """Each malformed URL raises ConfigError naming what is wrong."""
    for url, expected in BAD_URLS.items():
        with pytest.raises(singlewriter.ConfigError) as raised:
            KubernetesLock.from_url(url)
        assert expected in str(raised.value), url


def test_name_must_match_url_lease() -> None:
    """A lock name that differs from the URL's Lease name is rejected."""
    with pytest.raises(singlewriter.ConfigError, match="does not match Lease"):
        KubernetesLock.from_url("k8s://ns/example.com?incluster=1", "other.com")


def test_lock_name_must_be_valid_lease_name() -> None:
    """A lock name that is no RFC 1123 subdomain is rejected with the reason."""
    with pytest.raises(singlewriter.ConfigError, match="RFC 1123 subdomain"):
        fake_lock(FakeLeases(), ManualClock(), name="under_score")


def test_token_is_redacted_in_errors() -> None:
    """A token in the URL never appears in an error message."""
    url = "k8s://ns/x?server=https://127.0.0.1:1&token=sekrit-value&ca=/nonexistent"
    with pytest.raises(singlewriter.ConfigError) as raised:
        singlewriter.lock_from_url(url)
    assert "sekrit-value" not in str(raised.value)
    assert "token=***" in str(raised.value)


def test_no_fallback_to_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KUBECONFIG and in-cluster variables are ignored unless the URL names them."""
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text("{}")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "9")

    with pytest.raises(singlewriter.ConfigError, match="KUBECONFIG and"):
        singlewriter.lock_from_url("k8s://ns/x")


def test_incluster_without_service_account(tmp_path: Path) -> None:
    """incluster=1 outside a pod raises ConfigError naming what is missing."""
    with pytest.raises(singlewriter.ConfigError, match="KUBERNETES_SERVICE_HOST"):
        KubernetesLock.from_url(
            "k8s://ns/x?incluster=1", service_account_dir=str(tmp_path), environ={}
        )


# The real API server.

kube = pytest.mark.kubernetes


@kube
def test_kubeconfig_source(kube_cluster: KubeCluster, tmp_path: Path) -> None:
    """kubeconfig= and context= select the server; a wrong context is an error."""
    namespace = kube_cluster.new_namespace()
    path = kube_cluster.kube.write_kubeconfig(tmp_path / "config", "admin")
    url = f"k8s://{namespace}/{unique_name()}?kubeconfig={path}"

    with singlewriter.lock_from_url(f"{url}&context=singlewriter-test") as lease:
        assert lease.token == 1

    with pytest.raises(singlewriter.ConfigError, match="context 'nope'"):
        singlewriter.lock_from_url(f"{url}&context=nope")


@kube
def test_incluster_source(kube_cluster: KubeCluster, tmp_path: Path) -> None:
    """incluster=1 reads the token and CA a pod has and the service variables."""
    (tmp_path / "token").write_text(kube_cluster.kube.admin_token)
    (tmp_path / "ca.crt").write_text(Path(kube_cluster.ca_path).read_text())
    port = kube_cluster.host.rsplit(":", 1)[1]
    environ = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": port}
    namespace = kube_cluster.new_namespace()

    lock = KubernetesLock.from_url(
        f"k8s://{namespace}/{unique_name()}?incluster=1",
        service_account_dir=str(tmp_path),
        environ=environ,
    )
    with lock as lease:
        assert lease.token == 1


@kube
def test_wrong_ca_is_config_error(kube_cluster: KubeCluster, tmp_path: Path) -> None:
    """A CA that did not sign the server's certificate is a ConfigError."""
    from tests.servers._common import CertificateAuthority

    other = CertificateAuthority(tmp_path / "other", "unrelated CA")
    token_file = kube_cluster.token_files["admin"]
    url = (
        f"k8s://default/{unique_name()}?server={kube_cluster.host}"
        f"&token_file={token_file}&ca={other.cert_path}"
    )

    with pytest.raises(singlewriter.ConfigError, match="ca=PATH"):
        singlewriter.lock_from_url(url).acquire(timeout=5)


@kube
def test_lease_record_fields(kube_cluster: KubeCluster, kube_namespace: str) -> None:
    """The Lease records identity, rounded duration and token; release empties it."""
    name = unique_name()
    lock = singlewriter.lock_from_url(kube_cluster.url(kube_namespace), name, ttl=1.5)
    lease = lock.acquire()

    record = kube_cluster.read_lease(kube_namespace, name)
    assert record.spec.holder_identity == lease.data.identity
    assert record.spec.lease_duration_seconds == 2
    assert record.spec.lease_transitions == lease.token
    assert record.metadata.annotations[TOKEN_ANNOTATION] == str(lease.token)
    assert record.metadata.labels["app.kubernetes.io/managed-by"] == "singlewriter"

    assert lease.release() is True
    released = kube_cluster.read_lease(kube_namespace, name)
    assert released.spec.holder_identity is None
    assert released.spec.lease_transitions == lease.token


@kube
def test_exact_second_renew_time_real_server(
    kube_cluster: KubeCluster, kube_namespace: str
) -> None:
    """The API server rejects a MicroTime without fraction; the lock never sends one."""
    exact = dt.datetime(2030, 1, 1, tzinfo=UTC)
    lock = singlewriter.lock_from_url(
        kube_cluster.url(kube_namespace),
        unique_name(),
        ttl=2.0,
        wall_clock=lambda: exact,
    )
    with lock as lease:
        assert lease.token == 1


@kube
def test_reacquire_after_expiry_gets_new_token(
    kube_cluster: KubeCluster, kube_namespace: str
) -> None:
    """The same lock taking back its own expired Lease gets a new identity and token."""
    name = unique_name()
    url = kube_cluster.url(kube_namespace)
    frozen = singlewriter.Scheduler(autostart=False)
    lock = singlewriter.lock_from_url(
        url, name, ttl=1.0, scheduler=frozen, identity_prefix="pod-0"
    )
    first = lock.acquire()

    # Real time: the unrenewed Lease expires after its 1 s duration.
    second = lock.acquire(timeout=10)

    assert second.token == first.token + 1
    assert second.data.identity != first.data.identity
    assert first.release() is False
    assert second.release() is True


@kube
def test_contenders_with_other_ttl_use_record_duration(
    kube_cluster: KubeCluster, kube_namespace: str, workers: list[Worker]
) -> None:
    """After SIGKILL, a contender waits the holder's duration, whatever its own ttl."""
    url = kube_cluster.url(kube_namespace)
    for holder_ttl, contender_ttl in ((4.0, 1.0), (1.0, 30.0)):
        name = unique_name()
        holder = spawn(workers, url, name, holder_ttl)
        assert holder.request("acquire 30")["event"] == "acquired"
        takeover = measure_takeover(
            url, name, contender_ttl, holder, signal.SIGKILL, observe=holder_ttl
        )

        # Contenders saw the last renewal at most ttl/3 before the kill.
        assert takeover >= holder_ttl * 2 / 3 - 0.2, (holder_ttl, takeover)
        assert takeover <= holder_ttl + 2.0, (holder_ttl, takeover)


def measure_takeover(
    url: str,
    name: str,
    ttl: float,
    holder: Worker,
    signum: int,
    observe: float,
) -> float:
    """Signal ``holder`` while a contender waits; return seconds until it takes over.

    The contender polls for ``observe`` seconds first, as a standby replica
    would, so it has seen the holder's renewals before the signal.
    """
    lock = singlewriter.lock_from_url(url, name, ttl=ttl)
    acquired: list[tuple[singlewriter.Lease, float]] = []
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            lease = lock.acquire(timeout=60)
            acquired.append((lease, time.monotonic()))
        except BaseException as exc:
            errors.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(observe)
    assert not acquired, "the contender took a lease that was still renewed"

    holder.signal(signum)
    signalled_at = time.monotonic()
    waiter.join(timeout=70)
    if errors:
        raise errors[0]
    assert acquired, "the contender never got the lock"
    lease, at = acquired[0]
    lease.release()
    return at - signalled_at


@kube
def test_takeover_after_sigterm_measured(
    kube_cluster: KubeCluster, kube_namespace: str, workers: list[Worker]
) -> None:
    """SIGTERM releases the Lease: a waiter takes over well before the 30 s ttl."""
    url = kube_cluster.url(kube_namespace)
    times = []
    for _ in range(5):
        name = unique_name()
        holder = spawn(workers, url, name, 30.0)
        assert holder.request("acquire 30")["event"] == "acquired"
        times.append(measure_takeover(url, name, 30.0, holder, signal.SIGTERM, 1.0))
        assert holder.wait() == 128 + signal.SIGTERM

    print(f"\nMEASURED takeover after SIGTERM, ttl 30 s: {_summary(times)}")
    assert max(times) < 2.0, times


@kube
def test_takeover_after_sigkill_measured(
    kube_cluster: KubeCluster, kube_namespace: str, workers: list[Worker]
) -> None:
    """SIGKILL leaves the Lease held: takeover comes 2/3 to 1 duration later."""
    url = kube_cluster.url(kube_namespace)
    ttl = 5.0
    runs = 4
    times = []
    for run in range(runs):
        name = unique_name()
        holder = spawn(workers, url, name, ttl)
        assert holder.request("acquire 30")["event"] == "acquired"

        # Kill at evenly spread points of the renewal interval (ttl/3), since
        # the time since the last renewal decides the takeover time.
        observe = ttl + run * (ttl / 3) / runs
        times.append(measure_takeover(url, name, ttl, holder, signal.SIGKILL, observe))

    print(f"\nMEASURED takeover after SIGKILL, ttl 5 s: {_summary(times)}")
    for takeover in times:
        assert ttl * 2 / 3 - 0.2 <= takeover <= ttl + 2.0, times


def _summary(times: list[float]) -> str:
    return (
        f"min {min(times):.2f} s, median {statistics.median(times):.2f} s,"
        f" max {max(times):.2f} s over {len(times)} runs"
    )


@kube
def test_clock_offset_does_not_matter(
    kube_cluster: KubeCluster, kube_namespace: str
) -> None:
    """Wall clocks ten minutes apart change neither exclusion nor takeover time."""
    url = kube_cluster.url(kube_namespace)
    skew = dt.timedelta(minutes=10)
    for holder_offset in (-skew, skew):
        name = unique_name()
        scheduler = singlewriter.Scheduler(autostart=False)
        holder = singlewriter.lock_from_url(
            url,
            name,
            ttl=1.0,
            scheduler=scheduler,
            wall_clock=lambda offset=holder_offset: dt.datetime.now(UTC) + offset,
        )
        contender = singlewriter.lock_from_url(
            url,
            name,
            ttl=1.0,
            wall_clock=lambda offset=holder_offset: dt.datetime.now(UTC) - offset,
        )
        lease = holder.acquire()
        written = kube_cluster.read_lease(kube_namespace, name).spec.renew_time
        assert abs(written - (dt.datetime.now(UTC) + holder_offset)) < dt.timedelta(
            seconds=30
        )

        renewing = threading.Event()
        renewing.set()

        def renew(
            scheduler: singlewriter.Scheduler = scheduler,
            renewing: threading.Event = renewing,
        ) -> None:
            while renewing.is_set():
                scheduler.run_due()
                time.sleep(0.02)

        renewer = threading.Thread(target=renew)
        renewer.start()
        try:
            with pytest.raises(singlewriter.LockTimeout):
                contender.acquire(timeout=3.0)
            assert lease.held
        finally:
            renewing.clear()
            renewer.join()

        # The holder stops renewing as if frozen; takeover comes one
        # duration (1 s) after the contender's first look, not ten minutes.
        started = time.monotonic()
        successor = contender.acquire(timeout=10)
        assert time.monotonic() - started < 3.0
        assert successor.token == lease.token + 1
        successor.release()


@kube
def test_lease_deleted_while_held(
    kube_cluster: KubeCluster, kube_namespace: str, workers: list[Worker]
) -> None:
    """Deleting the Lease ends the tenure; a new process then restarts at token 1."""
    name = unique_name()
    url = kube_cluster.url(kube_namespace)
    lock = singlewriter.lock_from_url(url, name, ttl=3.0)
    for _ in range(3):
        with lock:
            pass
    lease = lock.acquire()
    assert lease.token == 4

    leases = kubernetes.client.CoordinationV1Api(kube_cluster.api_client())
    leases.delete_namespaced_lease(name, kube_namespace)
    assert lease.lost.wait(timeout=lock.renew_interval + 2)
    assert "no longer held" in (lease.lost_reason or "")

    # This process remembers token 4 and continues above it; another
    # process cannot, which is the documented limit of deleting a Lease.
    again = lock.acquire(timeout=5)
    assert again.token == 5
    again.release()
    leases.delete_namespaced_lease(name, kube_namespace)
    fresh = spawn(workers, url, name, 3.0)
    assert fresh.request("acquire 10")["token"] == 1


@kube
def test_metadata_writes_do_not_end_lease(
    kube_cluster: KubeCluster, kube_namespace: str
) -> None:
    """Another client touching labels causes 409s that renewal absorbs."""
    name = unique_name()
    lock = singlewriter.lock_from_url(kube_cluster.url(kube_namespace), name, ttl=2.0)
    lease = lock.acquire()
    leases = kubernetes.client.CoordinationV1Api(kube_cluster.api_client())
    stop = threading.Event()
    writes = [0]

    def touch() -> None:
        while not stop.is_set():
            patch = {"metadata": {"labels": {"touched": str(writes[0])}}}
            leases.patch_namespaced_lease(name, kube_namespace, patch)
            writes[0] += 1
            time.sleep(0.05)

    toucher = threading.Thread(target=touch)
    toucher.start()
    try:
        time.sleep(3 * lock.ttl)  # real time: several renewals under conflict
        assert lease.held, lease.lost_reason
    finally:
        stop.set()
        toucher.join()
    assert writes[0] > 20
    assert lease.release() is True


@kube
def test_foreign_overwrite_ends_lease(
    kube_cluster: KubeCluster, kube_namespace: str
) -> None:
    """An admin who writes another holder ends the lease at the next renewal."""
    name = unique_name()
    lock = singlewriter.lock_from_url(kube_cluster.url(kube_namespace), name, ttl=3.0)
    lease = lock.acquire()
    leases = kubernetes.client.CoordinationV1Api(kube_cluster.api_client())
    patch = {"spec": {"holderIdentity": "someone-else"}}
    leases.patch_namespaced_lease(name, kube_namespace, patch)

    assert lease.lost.wait(timeout=lock.renew_interval + 2)
    assert lease.deadline is not None
    assert time.monotonic() < lease.deadline
    assert lease.release() is False


# RBAC.


def _lease_rules(verbs: tuple[str, ...]) -> list[tuple[str, str, tuple[str, ...]]]:
    return [("coordination.k8s.io", "leases", verbs)]


@kube
@pytest.mark.parametrize(
    ("verbs", "precreated", "denied"),
    [
        (LEASE_VERBS, False, None),
        (("get", "update"), True, None),
        (("get", "update"), False, "create"),
        (("create", "update"), False, "read"),
        (("get", "create"), True, "update"),
    ],
    ids=["get-create-update", "no-create-existing", "no-create", "no-get", "no-update"],
)
def test_minimum_lease_verbs(
    kube_cluster: KubeCluster,
    verbs: tuple[str, ...],
    precreated: bool,
    denied: str | None,
) -> None:
    """get and update suffice on an existing Lease; create is needed to make one."""
    namespace = kube_cluster.new_namespace("rbac")
    name = unique_name()
    kube_cluster.grant(namespace, "lease-user", _lease_rules(verbs))
    if precreated:
        leases = kubernetes.client.CoordinationV1Api(kube_cluster.api_client())
        leases.create_namespaced_lease(
            namespace,
            kubernetes.client.V1Lease(
                metadata=kubernetes.client.V1ObjectMeta(name=name),
                spec=kubernetes.client.V1LeaseSpec(),
            ),
        )
    url = kube_cluster.url(namespace, user="limited")
    lock = singlewriter.lock_from_url(url, name, ttl=1.0)

    if denied is not None:
        time.sleep(0.5)  # let the grant reach the authorizer, so 403 is final
        with pytest.raises(singlewriter.ConfigError, match=f"denied the {denied}"):
            lock.acquire(timeout=5)
        return

    lease = eventually(lambda: lock.acquire(timeout=5))
    time.sleep(2 * lock.ttl)  # real time: renewals must pass RBAC too
    lease.ensure_held()
    assert lease.release() is True


@kube
def test_lease_rbac_by_resource_name(kube_cluster: KubeCluster) -> None:
    """get and update may be limited to the one Lease name, as the example Role does."""
    namespace = kube_cluster.new_namespace("rbac")
    name = unique_name()
    kube_cluster.grant(
        namespace, "lease-create", [("coordination.k8s.io", "leases", ("create",))]
    )
    kube_cluster.grant(
        namespace,
        "lease-named",
        [("coordination.k8s.io", "leases", ("get", "update"))],
        resource_names={"leases": [name]},
    )
    url = kube_cluster.url(namespace, user="limited")

    lease = eventually(lambda: singlewriter.lock_from_url(url, name).acquire(5))
    assert lease.release() is True
    with pytest.raises(singlewriter.ConfigError, match="HTTP 403"):
        singlewriter.lock_from_url(url, unique_name()).acquire(timeout=5)


@kube
def test_rbac_revoked_mid_tenure(
    kube_cluster: KubeCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """Revoking RBAC makes the holder log an error and stop by its deadline."""
    namespace = kube_cluster.new_namespace("rbac")
    name = unique_name()
    kube_cluster.grant(namespace, "lease-user", _lease_rules(LEASE_VERBS))
    url = kube_cluster.url(namespace, user="limited")
    lock = singlewriter.lock_from_url(url, name, ttl=2.0)
    lease = eventually(lambda: lock.acquire(timeout=5))

    with caplog.at_level(logging.WARNING, logger="singlewriter"):
        kube_cluster.revoke(namespace, "lease-user")
        assert lease.lost.wait(timeout=10)
        lost_at = time.monotonic()

    assert lease.deadline is not None
    assert lost_at <= lease.deadline + 0.5
    assert "deadline" in (lease.lost_reason or "")
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert any("HTTP 403" in r.getMessage() for r in errors), caplog.text

    kube_cluster.grant(namespace, "lease-again", _lease_rules(LEASE_VERBS))
    successor = eventually(lambda: lock.acquire(timeout=10))
    assert successor.token > lease.token
    successor.release()


# Loss of the API server.


@kube
def test_apiserver_stopped_while_held(fresh_kube: KubeCluster) -> None:
    """Without the API server the holder counts its lease lost by the deadline."""
    namespace = fresh_kube.new_namespace()
    name = unique_name()
    url = fresh_kube.url(namespace)
    lock = singlewriter.lock_from_url(url, name, ttl=3.0)
    lease = lock.acquire()

    fresh_kube.kube.stop_apiserver()
    try:
        assert lease.lost.wait(timeout=10)
        lost_at = time.monotonic()
        assert lease.deadline is not None
        assert lost_at <= lease.deadline + 0.5
        assert "deadline" in (lease.lost_reason or "")
        with pytest.raises(singlewriter.LockLost):
            lease.ensure_held()
    finally:
        fresh_kube.kube.start_apiserver()

    successor = singlewriter.lock_from_url(url, name, ttl=3.0).acquire(timeout=30)
    assert time.monotonic() > lease.deadline
    assert successor.token == lease.token + 1
    assert lease.release() is False
    assert successor.release() is True


@kube
def test_apiserver_down_acquire_fails(fresh_kube: KubeCluster) -> None:
    """acquire() against a stopped API server raises BackendUnavailable."""
    namespace = fresh_kube.new_namespace()
    url = fresh_kube.url(namespace)
    lock = singlewriter.lock_from_url(url, unique_name(), ttl=3.0, retry_attempts=2)
    fresh_kube.kube.stop_apiserver()
    try:
        with pytest.raises(singlewriter.BackendUnavailable, match="did not respond"):
            lock.acquire(timeout=5)
    finally:
        fresh_kube.kube.start_apiserver()
    with lock as lease:
        assert lease.token == 1


# The Secret store.


def secret_store(cluster: KubeCluster, namespace: str, user: str = "admin") -> Any:
    name = unique_name("tls")
    url = cluster.url(namespace, name, user=user)
    return KubernetesSecretStore.from_url(url, clock=fixed_clock)


@kube
def test_secret_commit_and_current(
    kube_cluster: KubeCluster, kube_namespace: str
) -> None:
    """A commit writes a TLS Secret with three keys and the token annotation."""
    store = secret_store(kube_cluster, kube_namespace)
    assert store.current() is None
    files = make_files()

    snapshot = store.commit(7, files)

    assert snapshot.token == 7
    assert store.current() == files
    assert store.highest_token == 7
    core = kubernetes.client.CoreV1Api(kube_cluster.api_client())
    secret = core.read_namespaced_secret(store.name, kube_namespace)
    assert secret.type == "kubernetes.io/tls"
    assert sorted(secret.data) == ["ca.crt", "tls.crt", "tls.key"]
    assert secret.metadata.annotations[TOKEN_ANNOTATION] == "7"


@kube
def test_secret_stale_token_changes_nothing(
    kube_cluster: KubeCluster, kube_namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A lower token raises StaleTokenError and leaves the Secret untouched."""
    store = secret_store(kube_cluster, kube_namespace)
    newer = make_files(subject="new.example.test")
    published = store.commit(5, newer)

    with caplog.at_level(logging.WARNING, logger="singlewriter"):
        with pytest.raises(singlewriter.StaleTokenError) as raised:
            store.commit(4, make_files(subject="old.example.test"))

    assert raised.value.token == 4
    assert "stale token 4" in caplog.text
    after = store.read_current()
    assert after is not None
    assert after.resource_version == published.resource_version
    assert after.files == newer
    assert store.commit(5, newer).token == 5
    assert store.commit(6, newer).token == 6


@kube
def test_secret_rejects_bad_material(
    kube_cluster: KubeCluster, kube_namespace: str
) -> None:
    """Mismatched key, expired certificate or encrypted key publish nothing."""
    store = secret_store(kube_cluster, kube_namespace)
    good = make_files()
    store.commit(1, good)
    other_key = make_files()["privkey.pem"]
    expired = make_files(
        not_before=NOW - dt.timedelta(days=90), not_after=NOW - dt.timedelta(days=1)
    )
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(good["privkey.pem"], None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )

    with pytest.raises(singlewriter.VerificationError, match="does not match"):
        store.commit(2, {**good, "privkey.pem": other_key})
    with pytest.raises(singlewriter.VerificationError, match="expired"):
        store.commit(2, expired)
    with pytest.raises(singlewriter.ConfigError, match="encrypted"):
        store.commit(2, {**good, "privkey.pem": encrypted})
    with pytest.raises(singlewriter.ConfigError, match="missing"):
        store.commit(2, {"privkey.pem": good["privkey.pem"]})

    assert store.current() == good
    assert store.highest_token == 1


@kube
def test_secret_keeps_foreign_fields(
    kube_cluster: KubeCluster, kube_namespace: str
) -> None:
    """Other data keys, labels and annotations survive a commit."""
    store = secret_store(kube_cluster, kube_namespace)
    store.commit(1, make_files())
    core = kubernetes.client.CoreV1Api(kube_cluster.api_client())
    patch = {
        "metadata": {"labels": {"team": "web"}, "annotations": {"note": "keep"}},
        "data": {"extra": "ZXh0cmE="},
    }
    core.patch_namespaced_secret(store.name, kube_namespace, patch)

    store.commit(2, make_files())

    secret = core.read_namespaced_secret(store.name, kube_namespace)
    assert secret.metadata.labels["team"] == "web"
    assert secret.metadata.annotations["note"] == "keep"
    assert secret.data["extra"] == "ZXh0cmE="


@kube
def test_secret_of_other_type_is_refused(
    kube_cluster: KubeCluster, kube_namespace: str
) -> None:
    """An existing Opaque Secret is not overwritten, because its type cannot change."""
    store = secret_store(kube_cluster, kube_namespace)
    core = kubernetes.client.CoreV1Api(kube_cluster.api_client())
    core.create_namespaced_secret(
        kube_namespace,
        kubernetes.client.V1Secret(
            metadata=kubernetes.client.V1ObjectMeta(name=store.name),
            type="Opaque",
            string_data={"a": "b"},
        ),
    )
    with pytest.raises(singlewriter.ConfigError, match="type 'Opaque'"):
        store.commit(1, make_files())


@kube
def test_secret_concurrent_commits_fence(
    kube_cluster: KubeCluster, kube_namespace: str
) -> None:
    """Racing writers: once token 6 has written, token 5 never writes again."""
    store = secret_store(kube_cluster, kube_namespace)
    files = {5: make_files(subject="five.test"), 6: make_files(subject="six.test")}
    outcomes: dict[int, list[str]] = {5: [], 6: []}
    errors: list[BaseException] = []

    def writer(token: int) -> None:
        mine = KubernetesSecretStore(
            kube_cluster.api_client(), kube_namespace, store.name, clock=fixed_clock
        )
        for _ in range(15):
            try:
                mine.commit(token, files[token])
                outcomes[token].append("ok")
            except singlewriter.StaleTokenError:
                outcomes[token].append("stale")
            except BaseException as exc:
                errors.append(exc)
                return

    threads = [threading.Thread(target=writer, args=(t,)) for t in (5, 6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert not errors, errors
    assert outcomes[6] == ["ok"] * 15
    assert store.highest_token == 6
    assert store.current() == files[6]
    fives = outcomes[5]
    if "stale" in fives:
        assert "ok" not in fives[fives.index("stale") :]


@kube
def test_fenced_lock_and_secret(kube_cluster: KubeCluster, kube_namespace: str) -> None:
    """A holder whose lease expired cannot publish over its successor's commit."""
    name = unique_name()
    url = kube_cluster.url(kube_namespace)
    store = secret_store(kube_cluster, kube_namespace)
    frozen = singlewriter.Scheduler(autostart=False)
    stale = singlewriter.lock_from_url(url, name, ttl=1.0, scheduler=frozen).acquire()

    # Real time: the unrenewed lease expires after 1 s and the successor takes over.
    successor = singlewriter.lock_from_url(url, name, ttl=1.0).acquire(timeout=10)
    published = make_files(subject="successor.test")
    store.commit(successor.token, published)

    with pytest.raises(singlewriter.StaleTokenError):
        store.commit(stale.token, make_files(subject="stale.test"))
    assert store.current() == published
    successor.release()


@kube
@pytest.mark.parametrize(
    ("verbs", "precreated", "denied"),
    [
        (SECRET_VERBS, False, None),
        (("get", "update"), True, None),
        (("get", "update"), False, "create"),
        (("get", "create"), True, "update"),
    ],
    ids=["get-create-update", "no-create-existing", "no-create", "no-update"],
)
def test_secret_store_limited_user(
    kube_cluster: KubeCluster,
    verbs: tuple[str, ...],
    precreated: bool,
    denied: str | None,
) -> None:
    """The store needs get and update on the Secret, and create to make it."""
    namespace = kube_cluster.new_namespace("rbac")
    kube_cluster.grant(namespace, "secret-user", [("", "secrets", verbs)])
    admin_store = secret_store(kube_cluster, namespace)
    if precreated:
        admin_store.commit(1, make_files())
    url = kube_cluster.url(namespace, admin_store.name, user="limited")
    store = KubernetesSecretStore.from_url(url, clock=fixed_clock)

    if denied is not None:
        time.sleep(0.5)  # let the grant reach the authorizer, so 403 is final
        with pytest.raises(singlewriter.ConfigError, match=f"denied the {denied}"):
            store.commit(2, make_files())
        return
    snapshot = eventually(lambda: store.commit(2, make_files()))
    assert snapshot.token == 2


class FakeSecrets:
    """One namespace's Secrets with resourceVersion preconditions, in memory."""

    def __init__(self) -> None:
        self.objects: dict[str, Any] = {}
        self.version = 500
        self.lose_reply_of_replace = False
        self.apply_before_losing = True

    def _stamp(self, body: Any) -> Any:
        self.version += 1
        stored = copy.deepcopy(body)
        stored.metadata.resource_version = str(self.version)
        self.objects[stored.metadata.name] = stored
        return copy.deepcopy(stored)

    def read_namespaced_secret(self, name: str, namespace: str, **_: Any) -> Any:
        if name not in self.objects:
            raise ApiException(status=404, reason="Not Found")
        return copy.deepcopy(self.objects[name])

    def create_namespaced_secret(self, namespace: str, body: Any, **_: Any) -> Any:
        if body.metadata.name in self.objects:
            raise ApiException(status=409, reason="AlreadyExists")
        return self._stamp(body)

    def replace_namespaced_secret(
        self, name: str, namespace: str, body: Any, **_: Any
    ) -> Any:
        if (
            body.metadata.resource_version
            != self.objects[name].metadata.resource_version
        ):
            raise ApiException(status=409, reason="Conflict")
        if self.lose_reply_of_replace:
            if self.apply_before_losing:
                self._stamp(body)
            raise urllib3.exceptions.ReadTimeoutError(None, "/", "read timed out")
        return self._stamp(body)


def fake_store(secrets: FakeSecrets) -> KubernetesSecretStore:
    configuration = kubernetes.client.Configuration()
    # Never contacted: the Secret API is replaced by the fake below.
    configuration.host = "https://127.0.0.1:9"
    store = KubernetesSecretStore(
        kubernetes.client.ApiClient(configuration), "default", "tls", clock=fixed_clock
    )
    store._core = secrets
    return store


def test_secret_lost_reply_applied() -> None:
    """An update applied before its reply was lost counts as committed."""
    secrets = FakeSecrets()
    store = fake_store(secrets)
    store.commit(1, make_files())
    secrets.lose_reply_of_replace = True
    files = make_files()

    snapshot = store.commit(2, files)

    assert snapshot.token == 2
    assert snapshot.files == files


def test_secret_lost_reply_not_applied() -> None:
    """An update that never reached the Secret raises StoreError: nothing written."""
    secrets = FakeSecrets()
    store = fake_store(secrets)
    first = make_files()
    store.commit(1, first)
    secrets.lose_reply_of_replace = True
    secrets.apply_before_losing = False

    with pytest.raises(singlewriter.StoreError, match="Nothing was written"):
        store.commit(2, make_files())
    assert store.current() == first
    assert store.highest_token == 1


def test_secret_url_needs_name() -> None:
    """A Secret URL without a Secret name is rejected."""
    with pytest.raises(singlewriter.ConfigError, match="names no Secret"):
        KubernetesSecretStore.from_url("k8s://ns?incluster=1")


@kube
def test_create_cannot_be_limited_by_name(kube_cluster: KubeCluster) -> None:
    """RBAC resourceNames do not authorize create, so the example grants it unnamed."""
    namespace = kube_cluster.new_namespace("rbac")
    name = unique_name()
    kube_cluster.grant(
        namespace,
        "lease-named",
        [("coordination.k8s.io", "leases", ("get", "create", "update"))],
        resource_names={"leases": [name]},
    )
    lock = singlewriter.lock_from_url(kube_cluster.url(namespace, user="limited"), name)
    time.sleep(0.5)  # let the grant reach the authorizer, so 403 is final

    with pytest.raises(singlewriter.ConfigError, match="denied the create"):
        lock.acquire(timeout=5)


# The example deployment.

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "kubernetes-lease"


@kube
def test_example_runs_as_its_service_account(
    kube_cluster: KubeCluster, tmp_path: Path
) -> None:
    """Three renewer replicas with the example's RBAC take turns and fence commits."""
    import subprocess
    import sys

    import kubernetes.utils
    import yaml

    namespace = kube_cluster.new_namespace("example")
    admin = kube_cluster.api_client()
    for document in yaml.safe_load_all((EXAMPLE / "rbac.yaml").read_text()):
        kubernetes.utils.create_from_dict(admin, document, namespace=namespace)
    deployment = yaml.safe_load((EXAMPLE / "deployment.yaml").read_text())
    kubernetes.utils.create_from_dict(
        admin, deployment, namespace=namespace, dry_run="All"
    )

    # A token for the ServiceAccount, as the kubelet would mount it.
    request = kubernetes.client.AuthenticationV1TokenRequest(
        spec=kubernetes.client.V1TokenRequestSpec(audiences=[], expiration_seconds=3600)
    )
    core = kubernetes.client.CoreV1Api(admin)
    token = core.create_namespaced_service_account_token(
        "cert-renewer", namespace, request
    ).status.token
    token_file = tmp_path / "token"
    token_file.write_text(token)
    source = (
        f"server={kube_cluster.host}&token_file={token_file}&ca={kube_cluster.ca_path}"
    )
    environment = {
        **os.environ,
        "PYTHONPATH": str(EXAMPLE.parent.parent),
        "LOCK_URL": f"k8s://{namespace}/cert-renewal-example-com?{source}",
        "SECRET_URL": f"k8s://{namespace}/example-com-tls?{source}",
        "TTL": "5",
        "CHECK_SECONDS": "0.2",
        "ROUNDS": "3",
        "FORCE_RENEW": "1",
    }

    replicas = [
        subprocess.Popen(
            [sys.executable, str(EXAMPLE / "renewer.py")],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = [replica.communicate(timeout=120)[0] for replica in replicas]

    assert [replica.returncode for replica in replicas] == [0, 0, 0], outputs
    tokens = sorted(
        int(line.rsplit(" ", 1)[1])
        for output in outputs
        for line in output.splitlines()
        if "renewed example.com with token" in line
    )
    assert tokens == list(range(1, 10)), outputs
    store = KubernetesSecretStore(admin, namespace, "example-com-tls")
    assert store.highest_token == 9

"""Test helpers for the key store: certificates, fault injection, checks."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import cache
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from singlewriter.keystore import FileSystem, KeyStore
from singlewriter.keystore._fs import StrPath
from singlewriter.keystore._verify import verify_set

# Every test runs on this injected clock, so certificates never expire while
# the suite runs and validity periods can be placed around it exactly.
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)


def fixed_clock() -> datetime:
    return NOW


@dataclass(frozen=True)
class Issuer:
    """A CA certificate and its key."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    subject: str,
    public_key: ec.EllipticCurvePublicKey,
    issuer: Issuer | None,
    signing_key: ec.EllipticCurvePrivateKey,
    *,
    not_before: datetime,
    not_after: datetime,
    ca: bool,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(subject) if issuer is None else issuer.certificate.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    return builder.sign(signing_key, hashes.SHA256())


@cache
def authorities() -> tuple[Issuer, Issuer]:
    """Return a root CA and an intermediate CA it issued, made once per run."""
    start = NOW - timedelta(days=3650)
    end = NOW + timedelta(days=3650)

    root_key = ec.generate_private_key(ec.SECP256R1())
    root_cert = _issue(
        "Test Root CA",
        root_key.public_key(),
        None,
        root_key,
        not_before=start,
        not_after=end,
        ca=True,
    )
    root = Issuer(root_cert, root_key)

    intermediate_key = ec.generate_private_key(ec.SECP256R1())
    intermediate_cert = _issue(
        "Test Intermediate CA",
        intermediate_key.public_key(),
        root,
        root_key,
        not_before=start,
        not_after=end,
        ca=True,
    )
    return root, Issuer(intermediate_cert, intermediate_key)


def same_name_intermediate() -> Issuer:
    """Return a CA named like the test intermediate, with a key of its own."""
    root, _ = authorities()
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = _issue(
        "Test Intermediate CA",
        key.public_key(),
        root,
        root.key,
        not_before=NOW - timedelta(days=3650),
        not_after=NOW + timedelta(days=3650),
        ca=True,
    )
    return Issuer(certificate, key)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_files(
    *,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    subject: str = "www.example.test",
) -> dict[str, bytes]:
    """Return a fresh leaf key and certificate as the four PEM files."""
    root, intermediate = authorities()
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = _issue(
        subject,
        key.public_key(),
        intermediate,
        intermediate.key,
        not_before=not_before or NOW - timedelta(days=1),
        not_after=not_after or NOW + timedelta(days=90),
        ca=False,
    )
    cert = certificate.public_bytes(serialization.Encoding.PEM)
    chain = intermediate.pem + root.pem
    return {
        "privkey.pem": key_pem(key),
        "cert.pem": cert,
        "chain.pem": chain,
        "fullchain.pem": cert + chain,
    }


def open_store(path: Path, **options: object) -> KeyStore:
    """Open a store on the fixed clock."""
    options.setdefault("clock", fixed_clock)
    return KeyStore(path, **options)  # type: ignore[arg-type]


def assert_matching(files: dict[str, bytes], passphrase: bytes | None = None) -> None:
    """Assert that the set verifies: key matches, chain in order, full chain."""
    verify_set(files, passphrase)


def assert_consistent(
    path: Path, expected: list[dict[str, bytes]], **options: object
) -> dict[str, bytes]:
    """Reopen the store and check what readers see; return the current set.

    The current set must equal one of ``expected`` exactly, the live paths
    must show the same bytes, the key must match the certificate, the key
    file must be 0600, and no temporary entry may remain.
    """
    store = open_store(path, **options)
    current = store.current()
    assert current is not None, "nothing is published"
    assert current in expected, "readers see a set that was never committed"
    assert_matching(current)

    for name, data in current.items():
        assert store.live_path(name).read_bytes() == data, f"live {name} differs"
    key_mode = stat.S_IMODE(os.stat(store.live_path("privkey.pem")).st_mode)
    assert key_mode == 0o600, f"privkey.pem has mode {key_mode:#o}"

    leftovers = [name for name in os.listdir(path) if ".tmp-" in name]
    assert leftovers == [], f"temporary entries remain: {leftovers}"
    for generation in path.glob("..gen-*"):
        assert (generation / ".manifest.json").exists(), f"{generation} incomplete"
    return current


class SimulatedCrash(BaseException):
    """The process died at this point: no cleanup code may run."""


MUTATING = (
    "open",
    "write",
    "fsync",
    "close",
    "fchmod",
    "rename",
    "unlink",
    "symlink",
    "mkdir",
    "rmdir",
)


@dataclass
class Step:
    """One recorded filesystem call."""

    operation: str
    target: str

    def __str__(self) -> str:
        return f"{self.operation}({self.target})"


@dataclass
class FaultyFileSystem(FileSystem):
    """A FileSystem that records every call and can fail one of them.

    ``fail_at`` is the index of the call that fails with ``error()``;
    ``fail_when`` instead picks the first call it returns True for. With
    ``torn_write`` a failing write first stores half of its data, as a crash
    in the middle of write(2) would. ``skip_fsync`` makes fsync a no-op: the
    crash tests simulate process death, for which the page cache is enough.
    """

    fail_at: int | None = None
    fail_when: Callable[[Step], bool] | None = None
    error: Callable[[], BaseException] = lambda: SimulatedCrash()
    torn_write: bool = False
    skip_fsync: bool = False
    steps: list[Step] = field(default_factory=list)
    after_crash: list[Step] = field(default_factory=list)
    open_fds: dict[int, str] = field(default_factory=dict)
    crashed: bool = False

    def _step(self, operation: str, target: object) -> bool:
        """Record a call; raise the fault on its turn. Return True to tear."""
        step = Step(operation, _short(target))
        if self.crashed:
            self.after_crash.append(step)
        self.steps.append(step)
        if not self._is_turn(step):
            return False
        if operation == "write" and self.torn_write:
            return True
        self._raise()
        return False

    def _is_turn(self, step: Step) -> bool:
        if self.crashed:
            return False
        if self.fail_when is not None and self.fail_when(step):
            self.fail_when = None
            return True
        return self.fail_at is not None and len(self.steps) - 1 == self.fail_at

    def _raise(self) -> None:
        error = self.error()
        if isinstance(error, SimulatedCrash):
            self.crashed = True
        raise error

    def open(self, path: StrPath, flags: int, mode: int = 0o777) -> int:
        self._step("open", path)
        fd = super().open(path, flags, mode)
        self.open_fds[fd] = _short(path)
        return fd

    def write(self, fd: int, data: memoryview) -> int:
        if self._step("write", self.open_fds.get(fd, fd)):
            super().write(fd, data[: max(1, len(data) // 2)])
            self._raise()
        return super().write(fd, data)

    def fsync(self, fd: int) -> None:
        self._step("fsync", self.open_fds.get(fd, fd))
        if not self.skip_fsync:
            super().fsync(fd)

    def close(self, fd: int) -> None:
        self._step("close", self.open_fds.get(fd, fd))
        self.open_fds.pop(fd, None)
        super().close(fd)

    def fchmod(self, fd: int, mode: int) -> None:
        self._step("fchmod", self.open_fds.get(fd, fd))
        super().fchmod(fd, mode)

    def rename(self, source: StrPath, destination: StrPath) -> None:
        self._step("rename", f"{_short(source)} -> {_short(destination)}")
        super().rename(source, destination)

    def unlink(self, path: StrPath) -> None:
        self._step("unlink", path)
        super().unlink(path)

    def symlink(self, target: str, path: StrPath) -> None:
        self._step("symlink", f"{_short(path)} -> {target}")
        super().symlink(target, path)

    def mkdir(self, path: StrPath, mode: int) -> None:
        self._step("mkdir", path)
        super().mkdir(path, mode)

    def rmdir(self, path: StrPath) -> None:
        self._step("rmdir", path)
        super().rmdir(path)

    def release(self) -> None:
        """Close what the dead process left open, as the kernel would."""
        for fd in list(self.open_fds):
            os.close(fd)
        self.open_fds.clear()


def _short(target: object) -> str:
    """Return the last two components of a path, enough to read a step list."""
    text = os.fspath(target) if isinstance(target, (str, os.PathLike)) else str(target)
    return "/".join(text.split("/")[-2:])


def eio() -> OSError:
    return OSError(errno.EIO, os.strerror(errno.EIO))


def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

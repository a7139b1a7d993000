"""Measure one KeyStore commit against writing the same four files naively.

Run from the repository root:

    PYTHONPATH=. python benchmarks/bench_keystore.py --commits 50

The script prints the filesystem calls one commit makes, counted through an
injected FileSystem. It then prints the median wall time of four things: a
KeyStore commit, the same four files rewritten in place with open, write
and close, the same with an fsync per file, and the verification alone.
All runs use one temporary directory on the filesystem given by --dir.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from singlewriter.keystore import FileSystem, KeyStore
from singlewriter.keystore._fs import StrPath
from singlewriter.keystore._verify import verify_set


class CountingFileSystem(FileSystem):
    """A FileSystem that counts each call by name."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    def open(self, path: StrPath, flags: int, mode: int = 0o777) -> int:
        self.calls["open"] += 1
        return super().open(path, flags, mode)

    def write(self, fd: int, data: memoryview) -> int:
        self.calls["write"] += 1
        return super().write(fd, data)

    def fsync(self, fd: int) -> None:
        self.calls["fsync"] += 1
        super().fsync(fd)

    def close(self, fd: int) -> None:
        self.calls["close"] += 1
        super().close(fd)

    def fstat(self, fd: int) -> os.stat_result:
        self.calls["fstat"] += 1
        return super().fstat(fd)

    def rename(self, source: StrPath, destination: StrPath) -> None:
        self.calls["rename"] += 1
        super().rename(source, destination)

    def unlink(self, path: StrPath) -> None:
        self.calls["unlink"] += 1
        super().unlink(path)

    def symlink(self, target: str, path: StrPath) -> None:
        self.calls["symlink"] += 1
        super().symlink(target, path)

    def mkdir(self, path: StrPath, mode: int) -> None:
        self.calls["mkdir"] += 1
        super().mkdir(path, mode)

    def rmdir(self, path: StrPath) -> None:
        self.calls["rmdir"] += 1
        super().rmdir(path)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    signer: ec.EllipticCurvePrivateKey,
    ca: bool,
) -> x509.Certificate:
    now = datetime.now(timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=90))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(signer, hashes.SHA256())
    )


def make_sets(count: int) -> list[dict[str, bytes]]:
    """Return ``count`` ECDSA P-256 leaf sets issued by one intermediate."""
    pem = serialization.Encoding.PEM
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _certificate("Bench Root", root_key, _name("Bench Root"), root_key, True)
    middle_key = ec.generate_private_key(ec.SECP256R1())
    middle = _certificate("Bench CA", middle_key, root.subject, root_key, True)
    chain = middle.public_bytes(pem) + root.public_bytes(pem)

    sets = []
    for _ in range(count):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate("bench.example", key, middle.subject, middle_key, False)
        key_pem = key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        cert_pem = cert.public_bytes(pem)
        sets.append(
            {
                "privkey.pem": key_pem,
                "cert.pem": cert_pem,
                "chain.pem": chain,
                "fullchain.pem": cert_pem + chain,
            }
        )
    return sets


def time_commits(
    root: Path, sets: list[dict[str, bytes]]
) -> tuple[list[float], Counter[str]]:
    """Commit every set once; return the durations and the calls of the last one."""
    fs = CountingFileSystem()
    store = KeyStore(root / "store", filesystem=fs)
    store.commit(1, sets[0])
    durations = []
    for token, files in enumerate(sets, start=2):
        fs.calls.clear()
        start = time.perf_counter()
        store.commit(token, files)
        durations.append(time.perf_counter() - start)
    return durations, fs.calls


def time_naive(root: Path, sets: list[dict[str, bytes]], fsync: bool) -> list[float]:
    """Rewrite the four files in place, as a renewal without a store would."""
    directory = root / ("naive-fsync" if fsync else "naive")
    directory.mkdir()
    durations = []
    for files in sets:
        start = time.perf_counter()
        for name, data in files.items():
            fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.write(fd, data)
            if fsync:
                os.fsync(fd)
            os.close(fd)
        durations.append(time.perf_counter() - start)
    return durations


def time_verification(sets: list[dict[str, bytes]]) -> list[float]:
    durations = []
    for files in sets:
        start = time.perf_counter()
        verify_set(files, None)
        durations.append(time.perf_counter() - start)
    return durations


def _milliseconds(durations: list[float]) -> str:
    median = statistics.median(durations) * 1000
    low, high = min(durations) * 1000, max(durations) * 1000
    return f"{median:8.2f} ms median  (min {low:.2f}, max {high:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", type=int, default=50, help="commits to time")
    parser.add_argument("--dir", default=None, help="directory for the test files")
    arguments = parser.parse_args()

    sets = make_sets(arguments.commits)
    with tempfile.TemporaryDirectory(dir=arguments.dir) as scratch:
        root = Path(scratch)
        commits, calls = time_commits(root, sets)
        naive = time_naive(root, sets, fsync=False)
        naive_fsync = time_naive(root, sets, fsync=True)
    verification = time_verification(sets)

    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, {scratch}")
    print(f"filesystem calls in one commit: {sum(calls.values())}")
    print("  " + ", ".join(f"{name} {count}" for name, count in sorted(calls.items())))
    print(f"KeyStore.commit          {_milliseconds(commits)}")
    print(f"naive open/write/close   {_milliseconds(naive)}")
    print(f"naive with fsync         {_milliseconds(naive_fsync)}")
    print(f"verification only        {_milliseconds(verification)}")
    ratio = statistics.median(commits) / statistics.median(naive)
    print(f"commit / naive: {ratio:.0f}x")


if __name__ == "__main__":
    main()

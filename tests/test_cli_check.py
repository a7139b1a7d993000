"""``singlewriter check``: the health check's verdicts, output and options."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from singlewriter.backends.file import FileLock
from singlewriter.cli import main
from singlewriter.cli._certs import covers
from singlewriter.keystore import KeyStore

DOMAINS = ("example.test", "www.example.test")


def _name(text: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


def _pem_key(key: ec.EllipticCurvePrivateKey, passphrase: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def issue(
    domains: tuple[str, ...] = DOMAINS,
    *,
    days_left: float = 60.0,
    not_before: datetime | None = None,
    subject_alt_name: bool = True,
) -> dict[str, bytes]:
    """Return the four PEM files of a fresh leaf valid for ``days_left`` more days."""
    now = datetime.now(timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("CLI test CA"))
        .issuer_name(_name("CLI test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=30))
        .not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(domains[0]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=days_left))
    )
    if subject_alt_name:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(d) for d in domains]),
            critical=False,
        )
    leaf = builder.sign(ca_key, hashes.SHA256())
    cert = leaf.public_bytes(serialization.Encoding.PEM)
    chain = ca.public_bytes(serialization.Encoding.PEM)
    return {
        "privkey.pem": _pem_key(key),
        "cert.pem": cert,
        "chain.pem": chain,
        "fullchain.pem": cert + chain,
    }


def write_plain(directory: Path, files: dict[str, bytes]) -> tuple[Path, Path]:
    """Write fullchain.pem and privkey.pem as plain files; return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    cert = directory / "fullchain.pem"
    key = directory / "privkey.pem"
    cert.write_bytes(files["fullchain.pem"])
    key.write_bytes(files["privkey.pem"])
    return cert, key


# Every CLI test starts without SINGLEWRITER_* options and leaves logging
# as it found it; the fixture is defined in tests/conftest.py.
pytestmark = pytest.mark.usefixtures("clean_cli_environment")


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A key store with one healthy generation committed."""
    path = tmp_path / "store"
    KeyStore(path).commit(1, issue())
    return path


def run_check(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str]]:
    status = main(["check", *argv])
    lines = capsys.readouterr().out.splitlines()
    return status, lines


def test_check_healthy_store(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, lines = run_check(
        capsys, "--store", str(store), "-d", DOMAINS[0], "-d", DOMAINS[1]
    )

    assert status == 0
    assert len(lines) == 1
    assert lines[0].startswith("healthy: certificate for example.test, www.example")
    assert "generation 1" in lines[0]


def test_check_plain_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A certificate and key outside any store, the certificate a full chain."""
    cert, key = write_plain(tmp_path / "live", issue())

    status, lines = run_check(capsys, "--cert", str(cert), "--key", str(key))

    assert status == 0
    assert lines[0].startswith("healthy:")


def test_check_missing_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, lines = run_check(capsys, "--store", str(tmp_path / "absent"))

    assert status == 1
    assert lines == [
        f"unhealthy: store {tmp_path / 'absent'} does not exist or is not a directory"
    ]
    assert not (tmp_path / "absent").exists(), "a health check must create nothing"


def test_check_empty_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A store that never had a commit has no certificate to serve."""
    KeyStore(tmp_path / "store")

    status, lines = run_check(capsys, "--store", str(tmp_path / "store"))

    assert status == 1
    assert len(lines) == 1
    assert lines[0].startswith("unhealthy: certificate ")
    assert lines[0].endswith("cert.pem is missing")


def test_check_key_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The failure users hit after a renewal was killed between two files."""
    cert, _ = write_plain(tmp_path / "a", issue())
    _, other_key = write_plain(tmp_path / "b", issue())

    status, lines = run_check(capsys, "--cert", str(cert), "--key", str(other_key))

    assert status == 1
    assert lines == [f"unhealthy: private key does not match {cert}"]


def test_check_expiring(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cert, key = write_plain(tmp_path, issue(days_left=3))

    status, lines = run_check(
        capsys, "--cert", str(cert), "--key", str(key), "--min-days", "7"
    )

    assert status == 1
    assert "below the minimum of 7 days" in lines[0]
    assert "in 3.0 days" in lines[0]


def test_check_fractional_min_days(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Short-lived certificates need thresholds below one day."""
    cert, key = write_plain(tmp_path, issue(days_left=0.75))

    status, _ = run_check(
        capsys, "--cert", str(cert), "--key", str(key), "--min-days", "0.5"
    )

    assert status == 0


def test_check_expired(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cert, key = write_plain(tmp_path, issue(days_left=-1))

    status, lines = run_check(capsys, "--cert", str(cert), "--key", str(key))

    assert status == 1
    assert lines[0].startswith("unhealthy: certificate expired at ")


def test_check_not_yet_valid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    future = datetime.now(timezone.utc) + timedelta(days=2)
    cert, key = write_plain(tmp_path, issue(not_before=future))

    status, lines = run_check(capsys, "--cert", str(cert), "--key", str(key))

    assert status == 1
    assert "is not valid until" in lines[0]


def test_check_names_not_covered(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, lines = run_check(
        capsys, "--store", str(store), "-d", "example.test", "-d", "api.example.test"
    )

    assert status == 1
    assert lines == [
        "unhealthy: certificate does not cover api.example.test (it names"
        " example.test, www.example.test)"
    ]


@pytest.mark.parametrize(
    ("names", "domain", "expected"),
    [
        (["*.example.test"], "www.example.test", True),
        (["*.example.test"], "WWW.Example.Test.", True),
        (["*.example.test"], "example.test", False),
        (["*.example.test"], "a.b.example.test", False),
        (["*.example.test"], "*.example.test", True),
        (["example.test"], "www.example.test", False),
        (["192.0.2.1"], "192.0.2.1", True),
    ],
)
def test_covers_wildcards(names: list[str], domain: str, expected: bool) -> None:
    """A wildcard covers exactly one left-most label (RFC 6125 section 6.4.3)."""
    assert covers(names, domain) is expected


def test_check_environment(
    store: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every option also comes from SINGLEWRITER_*; lists split on commas."""
    monkeypatch.setenv("SINGLEWRITER_STORE", str(store))
    monkeypatch.setenv("SINGLEWRITER_DOMAIN", "example.test, api.example.test")

    status, lines = run_check(capsys)

    assert status == 1
    assert "does not cover api.example.test" in lines[0]


def test_check_command_line_wins(
    store: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SINGLEWRITER_STORE", str(store))
    monkeypatch.setenv("SINGLEWRITER_MIN_DAYS", "1000")

    unhealthy, _ = run_check(capsys)
    healthy, _ = run_check(capsys, "--min-days", "1")

    assert unhealthy == 1
    assert healthy == 0


def test_check_invalid_environment(
    store: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Docker reserves status 2, so even usage errors report unhealthy."""
    monkeypatch.setenv("SINGLEWRITER_MIN_DAYS", "soon")

    status = main(["check", "--store", str(store)])

    assert status == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "singlewriter check: error: SINGLEWRITER_MIN_DAYS='soon' is invalid:"
        " 'soon' is not a number of days"
    ]


def test_check_store_and_files_exclusive(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, lines = run_check(
        capsys, "--store", str(store), "--cert", str(store / "cert.pem")
    )

    assert status == 1
    assert lines == [
        "unhealthy: invalid options: give --store, or --cert and --key, not both"
    ]


def test_check_needs_no_lock(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The check passes while a renewer holds the lock."""
    locks = tmp_path / "locks"
    locks.mkdir()
    with FileLock(locks, "example.test"):
        status, _ = run_check(capsys, "--store", str(store))

    assert status == 0


def test_check_encrypted_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "store"
    KeyStore(path, passphrase="correct horse").commit(1, issue())
    passphrase_file = tmp_path / "passphrase"
    passphrase_file.write_text("correct horse\n")

    without, lines = run_check(capsys, "--store", str(path))
    with_file, _ = run_check(
        capsys, "--store", str(path), "--passphrase-file", str(passphrase_file)
    )

    assert without == 1
    assert "is encrypted; pass --passphrase-file" in lines[0]
    assert with_file == 0


def test_check_reads_one_generation(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """After a second commit the check reads the new set, key and cert alike."""
    KeyStore(store).commit(2, issue())

    status, lines = run_check(capsys, "--store", str(store))

    assert status == 0
    assert "generation 2" in lines[0]


def test_check_common_name_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A certificate with a CN but no subjectAltName covers no name."""
    cert, key = write_plain(
        tmp_path / "live", issue(("cn.test",), subject_alt_name=False)
    )

    status, lines = run_check(
        capsys, "--cert", str(cert), "--key", str(key), "-d", "cn.test"
    )

    assert status == 1
    assert lines == [
        "unhealthy: certificate does not cover cn.test (it names no name in a"
        " subjectAltName)"
    ]


def test_check_input_size_cap(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An endless input such as /dev/zero is rejected after 1 MiB."""
    _, key = write_plain(tmp_path / "live", issue())

    status, lines = run_check(capsys, "--cert", "/dev/zero", "--key", str(key))

    assert status == 1
    assert lines == [
        "unhealthy: certificate /dev/zero is larger than 1048576 bytes (1 MiB);"
        " give the PEM file itself"
    ]

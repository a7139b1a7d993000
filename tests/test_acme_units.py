"""Parts of the ACME renewal that need no ACME server."""

from __future__ import annotations

import os
import signal
import socket
import stat
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import requests
from acme import messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from singlewriter import ConfigError, Terminated
from singlewriter.acme import (
    EXIT_TERMINATED,
    AccountStore,
    ACMEError,
    ACMEUnavailable,
    ChallengeItem,
    HTTP01Standalone,
    cert_id,
)
from singlewriter.acme._client import RenewalInfo, retry_after_seconds
from singlewriter.acme._domains import default_lock_name, normalize_domains
from singlewriter.acme._errors import translate
from singlewriter.acme._interrupt import terminate_on_signals
from singlewriter.acme._keys import generate_key
from singlewriter.acme._policy import CurrentSet, ari_renewal_time, decide
from singlewriter.acme._state import (
    FailureRecord,
    InFlightOrder,
    LineageState,
    lineage_directory,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


def make_certificate(
    names: list[str],
    *,
    key: ec.EllipticCurvePrivateKey | None = None,
    not_before: datetime = NOW - timedelta(days=30),
    not_after: datetime = NOW + timedelta(days=60),
    serial: int = 0x87654321,
    key_identifier: bytes | None = None,
) -> x509.Certificate:
    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, names[0])])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
            critical=False,
        )
    )
    if key_identifier is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier(
                key_identifier=key_identifier,
                authority_cert_issuer=None,
                authority_cert_serial_number=None,
            ),
            critical=False,
        )
    return builder.sign(key, hashes.SHA256())


# The ARI certificate identifier.


def test_cert_id_matches_rfc_9773_example() -> None:
    """The identifier of RFC 9773 section 4.1's example is reproduced.

    The example's AKI key identifier and serial number 0x87654321, whose DER
    form needs a leading zero byte, give aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE.
    """
    certificate = make_certificate(
        ["example.com"],
        key_identifier=bytes.fromhex("69885B6B87464041E1B37B847BA0AE2CDE01C8D4"),
    )

    assert cert_id(certificate) == "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE"


def test_cert_id_without_aki_is_none() -> None:
    """A certificate without an Authority Key Identifier has no ARI identifier."""
    assert cert_id(make_certificate(["example.com"])) is None


# Renewal timing.


def current_set(names: list[str], **options: object) -> CurrentSet:
    key = ec.generate_private_key(ec.SECP256R1())
    from cryptography.hazmat.primitives import serialization

    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    certificate = make_certificate(names, key=key, **options)  # type: ignore[arg-type]
    return CurrentSet(certificate=certificate, key_pem=key_pem, generation=1)


def window(start: datetime, end: datetime, cert: str = "a.b") -> RenewalInfo:
    return RenewalInfo(
        cert_id=cert, start=start, end=end, explanation_url=None, retry_after=3600
    )


def test_ari_time_is_inside_window_and_stable() -> None:
    """The chosen time lies in the window and is the same on every call."""
    suggested = window(NOW, NOW + timedelta(days=2))

    first = ari_renewal_time(suggested)

    assert NOW <= first <= NOW + timedelta(days=2)
    assert ari_renewal_time(suggested) == first


def test_ari_times_spread_over_certificates() -> None:
    """Different certificates get different times across the window."""
    span = timedelta(days=2)
    times = [
        ari_renewal_time(window(NOW, NOW + span, cert=f"id.{n}")) for n in range(200)
    ]
    offsets = sorted((t - NOW) / span for t in times)

    assert offsets[0] < 0.1
    assert offsets[-1] > 0.9
    assert 0.4 < offsets[100] < 0.6


@pytest.mark.parametrize(
    ("names", "key_type", "reason"),
    [
        (["a.example", "b.example"], "ec-p256", "does not cover b.example"),
        (["a.example"], "rsa-2048", "the key is ec-p256, not rsa-2048"),
    ],
)
def test_mismatched_set_is_due(names: list[str], key_type: str, reason: str) -> None:
    """Missing names or another key type make a fresh certificate due."""
    current = current_set(["a.example"])

    decision = decide(
        current,
        NOW,
        domains=tuple(names),
        key_type=key_type,
        window=None,
        renew_fraction=1 / 3,
        check_interval=None,
    )

    assert decision.due
    assert reason in decision.reason


def test_window_beats_lifetime_rule() -> None:
    """An ARI window in the future keeps a certificate past its fraction point."""
    current = current_set(
        ["a.example"],
        not_before=NOW - timedelta(days=80),
        not_after=NOW + timedelta(days=10),
    )
    future = window(NOW + timedelta(days=5), NOW + timedelta(days=6))

    decision = decide(
        current,
        NOW,
        domains=("a.example",),
        key_type="ec-p256",
        window=future,
        renew_fraction=1 / 3,
        check_interval=None,
    )

    assert not decision.due
    assert decision.renew_at == ari_renewal_time(future)


# Retry-After.


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("7", 7.0),
        (" 0 ", 0.0),
        ("Sun, 01 Mar 2026 12:00:05 GMT", 5.0),
        ("Sun, 01 Mar 2026 11:00:00 GMT", 0.0),
        ("soon", None),
        (None, None),
    ],
)
def test_retry_after_parsing(header: str | None, expected: float | None) -> None:
    """Seconds and HTTP-dates are understood; anything else counts as absent."""
    response = requests.Response()
    if header is not None:
        response.headers["Retry-After"] = header

    assert retry_after_seconds(response, NOW) == expected


# Domain names.


def test_domains_are_normalized() -> None:
    """Names are lower-cased, lose a trailing dot and are de-duplicated in order."""
    names = normalize_domains(["WWW.Example.COM.", "example.com", "www.example.com"])

    assert names == ("www.example.com", "example.com")
    assert default_lock_name(("*.example.com", "example.com")) == "example.com"


def test_lock_name_order_independent() -> None:
    """The default lock name and state directory do not depend on the name order."""
    names = ("www.example.com", "*.example.com", "api.example.com")
    swapped = tuple(reversed(names))

    assert default_lock_name(names) == "api.example.com"
    assert default_lock_name(swapped) == "api.example.com"
    assert lineage_directory(Path("/s"), "u", names) == lineage_directory(
        Path("/s"), "u", swapped
    )


def test_too_many_names_are_rejected() -> None:
    """More than 100 names do not fit one certificate."""
    with pytest.raises(ConfigError, match="at most 100"):
        normalize_domains([f"n{i}.example.com" for i in range(101)])


# Error translation.


def test_problem_document_becomes_acme_error() -> None:
    """A problem document keeps its type, and the original is the cause."""
    problem = messages.Error(
        typ="urn:ietf:params:acme:error:rateLimited", detail="too many orders"
    )

    error = translate(problem, "placing the order", domains=("a.example",))

    assert isinstance(error, ACMEError)
    assert error.problem_code == "rateLimited"
    assert "too many orders" in str(error)
    assert error.domains == ("a.example",)


def test_connection_error_becomes_unavailable() -> None:
    """A requests connection error is an ACMEUnavailable, also a ConnectionError."""
    error = translate(requests.ConnectionError("refused"), "fetching the directory")

    assert isinstance(error, ACMEUnavailable)
    assert isinstance(error, ConnectionError)
    assert error.problem_type is None


# State files.


def test_state_files_are_private(tmp_path: Path) -> None:
    """The order state, which contains a private key, is 0600 in a 0700 directory."""
    directory = lineage_directory(tmp_path, "https://ca.test/dir", ("*.a.example",))
    state = LineageState(directory)
    key = generate_key("ec-p256")
    order = InFlightOrder(
        directory_url="https://ca.test/dir",
        domains=("*.a.example",),
        key_type="ec-p256",
        key_pem=key,
        csr_pem=b"csr",
        created=NOW,
        order_url="https://ca.test/order/1",
    )

    state.save_order(order)

    assert directory.name.startswith("a.example-")
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / "order.json").stat().st_mode) == 0o600
    assert state.load_order() == order
    state.clear_order()
    assert state.load_order() is None


def test_corrupt_state_is_ignored(tmp_path: Path) -> None:
    """A damaged order file is treated as absent, not as a crash."""
    state = LineageState(tmp_path)
    (tmp_path / "order.json").write_text("{not json")

    assert state.load_order() is None


# Signals.


def test_signal_during_deferred_block_is_raised_after_it() -> None:
    """SIGTERM inside deferred() lets the block finish, then raises Terminated."""
    finished = []
    before = signal.getsignal(signal.SIGTERM)

    with pytest.raises(Terminated) as caught:
        with terminate_on_signals(True) as guard:
            with guard.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                finished.append(True)

    assert finished == [True]
    assert caught.value.code == EXIT_TERMINATED == 143
    assert signal.getsignal(signal.SIGTERM) is before


def test_handlers_are_restored() -> None:
    """terminate_on_signals puts back the handlers it found."""
    before = signal.getsignal(signal.SIGTERM)

    with terminate_on_signals(True):
        assert signal.getsignal(signal.SIGTERM) is not before

    assert signal.getsignal(signal.SIGTERM) is before


# The built-in HTTP-01 server.


def test_standalone_serves_only_presented_tokens() -> None:
    """The server returns a presented token's validation, and 404 otherwise."""
    server = HTTP01Standalone(port=0, address="127.0.0.1")
    server.start()
    try:
        item = ChallengeItem(domain="a.example", token="tok", validation="tok.thumb")
        server.present(item)
        base = f"http://127.0.0.1:{server.bound_port}/.well-known/acme-challenge/"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

        with opener.open(base + "tok", timeout=5) as response:
            assert response.read() == b"tok.thumb"
        with pytest.raises(urllib.error.HTTPError) as missing:
            opener.open(base + "other", timeout=5)
        missing.value.close()
        assert missing.value.code == 404

        server.cleanup(item)
        with pytest.raises(urllib.error.HTTPError) as removed:
            opener.open(base + "tok", timeout=5)
        removed.value.close()
        assert removed.value.code == 404
    finally:
        server.stop()
    assert server.bound_port is None


def test_standalone_dual_stack_on_ipv6_loopback() -> None:
    """An IPv6 address binds an IPv6 socket."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python")
    server = HTTP01Standalone(port=0, address="::1")
    try:
        server.start()
    except ACMEError as exc:
        pytest.skip(f"IPv6 loopback unavailable: {exc}")
    try:
        server.present(ChallengeItem("a.example", "t6", "v6"))
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        url = f"http://[::1]:{server.bound_port}/.well-known/acme-challenge/t6"
        with opener.open(url, timeout=5) as response:
            assert response.read() == b"v6"
    finally:
        server.stop()


def test_standalone_rejects_bad_port() -> None:
    """A port outside 0..65535 is a configuration error."""
    with pytest.raises(ConfigError):
        HTTP01Standalone(port=70000)


# Owner and mode of the account and state files.


def test_account_directories_ignore_umask(tmp_path: Path) -> None:
    """Directories the renewal creates are 0700 even under umask 000."""
    previous = os.umask(0)
    try:
        accounts = AccountStore(tmp_path / "outer" / "account")
        accounts.load_key()
        state = LineageState(accounts.path / "state" / "example-0")
        state.clear_failures()
        state.save_failures(
            FailureRecord(
                domains=("example.test",),
                failures=1,
                last_failure=datetime(2030, 1, 1, tzinfo=timezone.utc),
                next_attempt=datetime(2030, 1, 1, tzinfo=timezone.utc),
                last_error="",
            )
        )
    finally:
        os.umask(previous)

    for directory in (
        tmp_path / "outer",
        accounts.path,
        accounts.path / "state",
        state.directory,
    ):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory


def test_planted_order_rejected(tmp_path: Path) -> None:
    """An order file another user owns or can write is never used."""
    state = LineageState(tmp_path / "state")
    state.save_order(
        InFlightOrder(
            directory_url="https://ca.test/dir",
            domains=("example.test",),
            key_type="ec-p256",
            key_pem=b"key",
            csr_pem=b"csr",
            created=datetime(2030, 1, 1, tzinfo=timezone.utc),
        )
    )
    order = state.directory / "order.json"

    order.chmod(0o666)
    with pytest.raises(ConfigError, match="writable by group or others"):
        state.load_order()

    order.chmod(0o600)
    if os.geteuid() == 0:
        os.chown(order, 65534, 65534)
        with pytest.raises(ConfigError, match="owned by uid 65534"):
            state.load_order()


def test_account_directory_group_writable(tmp_path: Path) -> None:
    """A group-writable account directory is rejected before its key is read."""
    directory = tmp_path / "account"
    directory.mkdir()
    directory.chmod(0o770)

    with pytest.raises(ConfigError, match="writable by group or others"):
        AccountStore(directory).load_key()


def test_order_key_encrypted_with_passphrase(tmp_path: Path) -> None:
    """With a passphrase, the in-flight order key never reaches disk in clear."""
    key_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    order = InFlightOrder(
        directory_url="https://ca.test/dir",
        domains=("example.test",),
        key_type="ec-p256",
        key_pem=key_pem,
        csr_pem=b"csr",
        created=datetime(2030, 1, 1, tzinfo=timezone.utc),
    )
    LineageState(tmp_path / "state", passphrase=b"secret").save_order(order)

    stored = (tmp_path / "state" / "order.json").read_text()
    assert "BEGIN ENCRYPTED PRIVATE KEY" in stored
    assert "BEGIN PRIVATE KEY" not in stored
    resumed = LineageState(tmp_path / "state", passphrase=b"secret").load_order()
    assert resumed is not None
    assert resumed.key_pem == key_pem

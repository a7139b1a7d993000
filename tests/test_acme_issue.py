"""Issuance against a real Pebble: challenges, key types, accounts, timing."""

from __future__ import annotations

import json
import logging
import stat
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from josepy import jwk

from singlewriter.acme import (
    DNS01Hook,
    DNSRecord,
    HTTP01Webroot,
    renew,
)
from singlewriter.keystore import KeyStore
from tests.fixtures_pebble import ACMEEnv, RequestLog, WebrootServer, unique_domain

pytestmark = pytest.mark.pebble


def published(env: ACMEEnv) -> tuple[x509.Certificate, bytes]:
    """Return the store's current certificate and private key PEM."""
    files = KeyStore(env.store_path).current()
    assert files is not None
    return x509.load_pem_x509_certificate(files["cert.pem"]), files["privkey.pem"]


def dns_names(certificate: x509.Certificate) -> set[str]:
    extension = certificate.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    return set(extension.value.get_values_for_type(x509.DNSName))


def test_first_issuance_http01_standalone(
    acme_env: ACMEEnv, acme_requests: RequestLog
) -> None:
    """An empty store gets a certificate for every name, with one order."""
    names = [acme_env.domains[0], "www." + acme_env.domains[0]]

    result = renew(names, **acme_env.kwargs())

    assert result.renewed
    assert result.reason == "the store has no certificate yet"
    assert result.generation == 1
    assert result.token == 1
    assert result.order_url is not None
    certificate, key_pem = published(acme_env)
    assert dns_names(certificate) == set(names)
    assert result.not_after == certificate.not_valid_after_utc
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"
    assert len(acme_requests.posts_to(acme_env.pebble.new_order_url)) == 1
    assert acme_env.order_state() is None


def test_account_files_are_private_and_reused(
    acme_env: ACMEEnv, acme_requests: RequestLog
) -> None:
    """The account key and registration are stored at 0600 and reused."""
    renew(acme_env.domains, **acme_env.kwargs())
    key_path = acme_env.account_path / "account.key"
    registrations = list((acme_env.account_path / "registrations").iterdir())
    key_before = key_path.read_bytes()

    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(acme_env.account_path.stat().st_mode) == 0o700
    assert len(registrations) == 1
    assert stat.S_IMODE(registrations[0].stat().st_mode) == 0o600
    assert len(acme_requests.posts_to(acme_env.pebble.new_account_url)) == 1

    acme_requests.clear()
    other = unique_domain()
    result = renew([other], **acme_env.kwargs(store=str(acme_env.root / "other")))

    assert result.renewed
    assert acme_requests.posts_to(acme_env.pebble.new_account_url) == []
    assert key_path.read_bytes() == key_before


def test_not_due_sends_no_order(acme_env: ACMEEnv, acme_requests: RequestLog) -> None:
    """A fresh certificate is left alone: no order, no account request."""
    first = renew(acme_env.domains, **acme_env.kwargs())
    acme_requests.clear()

    second = renew(acme_env.domains, **acme_env.kwargs())

    assert not second.renewed
    assert second.reason.startswith("not due until")
    assert second.generation == first.generation
    assert second.not_after == first.not_after
    assert second.renew_at is not None
    assert second.renew_at < first.not_after  # type: ignore[operator]
    assert second.order_url is None
    assert acme_requests.posts_to(acme_env.pebble.new_order_url) == []
    assert acme_requests.posts_to(acme_env.pebble.new_account_url) == []


def test_webroot_issuance(acme_env: ACMEEnv, tmp_path: Path) -> None:
    """HTTP-01 files in a webroot that a web server serves pass validation."""
    webroot = tmp_path / "www"
    webroot.mkdir()
    server = WebrootServer(webroot, acme_env.pebble.http01_port)
    try:
        result = renew(
            acme_env.domains, **acme_env.kwargs(challenge=HTTP01Webroot(webroot))
        )
    finally:
        server.stop()

    assert result.renewed
    assert dns_names(published(acme_env)[0]) == set(acme_env.domains)
    # The challenge files and the directories created for them are gone.
    assert list(webroot.iterdir()) == []


def test_dns01_callable_hook_with_wildcard(acme_env: ACMEEnv) -> None:
    """A callable DNS-01 hook publishes and removes the TXT records."""
    base = acme_env.domains[0]
    calls: list[tuple[str, DNSRecord]] = []

    def hook(action: str, record: DNSRecord) -> None:
        calls.append((action, record))
        if action == "present":
            acme_env.pebble.set_txt(record.name, record.value)
        else:
            acme_env.pebble.clear_txt(record.name)

    result = renew([base, "*." + base], **acme_env.kwargs(challenge=DNS01Hook(hook)))

    assert result.renewed
    assert dns_names(published(acme_env)[0]) == {base, "*." + base}
    actions = [action for action, _ in calls]
    assert actions.count("present") == 2
    assert actions.count("cleanup") == 2
    assert {record.name for _, record in calls} == {f"_acme-challenge.{base}"}


def test_dns01_command_hook(acme_env: ACMEEnv) -> None:
    """A DNS-01 command gets the record in its environment."""
    script = (
        "import json, os, sys, urllib.request\n"
        "opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))\n"
        "name = os.environ['SINGLEWRITER_ACME_RECORD_NAME'] + '.'\n"
        "action = os.environ['SINGLEWRITER_ACME_ACTION']\n"
        "body = {'host': name}\n"
        "if action == 'present':\n"
        "    body['value'] = os.environ['SINGLEWRITER_ACME_RECORD_VALUE']\n"
        "path = '/set-txt' if action == 'present' else '/clear-txt'\n"
        "request = urllib.request.Request(sys.argv[1] + path,"
        " data=json.dumps(body).encode())\n"
        "opener.open(request, timeout=10).read()\n"
    )
    command = [sys.executable, "-c", script, acme_env.pebble.challtestsrv_url]

    result = renew(acme_env.domains, **acme_env.kwargs(challenge=DNS01Hook(command)))

    assert result.renewed


def test_dns01_command_failure_is_reported(acme_env: ACMEEnv) -> None:
    """A hook command that exits non-zero fails the renewal with its stderr."""
    from singlewriter.acme import ChallengeError

    command = [sys.executable, "-c", "import sys; sys.exit('no DNS for you')"]

    with pytest.raises(ChallengeError, match="no DNS for you"):
        renew(acme_env.domains, **acme_env.kwargs(challenge=DNS01Hook(command)))


@pytest.mark.parametrize(("key_type", "size"), [("rsa-2048", 2048), ("rsa-3072", 3072)])
def test_rsa_key_types(acme_env: ACMEEnv, key_type: str, size: int) -> None:
    """RSA keys of the requested size are generated and certified."""
    result = renew(acme_env.domains, **acme_env.kwargs(key_type=key_type))

    assert result.renewed
    certificate, key_pem = published(acme_env)
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    assert key.key_size == size
    assert (
        certificate.public_key().public_numbers() == key.public_key().public_numbers()
    )


def test_key_type_change_renews(acme_env: ACMEEnv) -> None:
    """Asking for another key type replaces a certificate that is not due."""
    renew(acme_env.domains, **acme_env.kwargs())

    result = renew(acme_env.domains, **acme_env.kwargs(key_type="rsa-2048"))

    assert result.renewed
    assert result.reason == "the key is ec-p256, not rsa-2048"
    assert result.generation == 2


def test_added_name_renews(acme_env: ACMEEnv) -> None:
    """A name missing from the current certificate makes it due."""
    renew(acme_env.domains, **acme_env.kwargs())
    extra = "www." + acme_env.domains[0]

    result = renew([*acme_env.domains, extra], **acme_env.kwargs())

    assert result.renewed
    assert result.reason == f"the certificate does not cover {extra}"
    assert extra in dns_names(published(acme_env)[0])


def test_lifetime_fraction_without_ari(
    acme_env: ACMEEnv, acme_requests: RequestLog
) -> None:
    """Without ARI the certificate renews once renew_fraction of it is left."""
    renew(acme_env.domains, **acme_env.kwargs())
    certificate, _ = published(acme_env)
    start = certificate.not_valid_before_utc
    lifetime = certificate.not_valid_after_utc - start
    acme_requests.clear()

    def at(moment: datetime) -> dict[str, object]:
        return acme_env.kwargs(use_ari=False, clock=lambda: moment)

    early = renew(acme_env.domains, **at(start + lifetime * 0.6))
    late = renew(acme_env.domains, **at(start + lifetime * 0.7))

    assert not early.renewed
    assert early.renew_at == certificate.not_valid_after_utc - lifetime / 3
    assert late.renewed
    assert late.reason == "less than 33% of the certificate's lifetime is left"
    assert acme_requests.gets_under(acme_env.pebble.renewal_info_url) == []


def test_expired_certificate_renews_without_ari(
    acme_env: ACMEEnv, acme_requests: RequestLog
) -> None:
    """An expired certificate renews, and its ARI is not fetched (RFC 9773 4.3)."""
    renew(acme_env.domains, **acme_env.kwargs())
    certificate, _ = published(acme_env)
    after_expiry = certificate.not_valid_after_utc + timedelta(days=1)
    acme_requests.clear()

    result = renew(acme_env.domains, **acme_env.kwargs(clock=lambda: after_expiry))

    assert result.renewed
    assert result.reason.startswith("the certificate expired at")
    assert acme_requests.gets_under(acme_env.pebble.renewal_info_url) == []


def test_force_renews_a_fresh_certificate(acme_env: ACMEEnv) -> None:
    """force=True renews although the certificate is not due."""
    renew(acme_env.domains, **acme_env.kwargs())

    result = renew(acme_env.domains, **acme_env.kwargs(force=True))

    assert result.renewed
    assert result.reason == "renewal forced"
    assert result.generation == 2


def test_stale_registration_registers_again(acme_env: ACMEEnv) -> None:
    """A stored account the CA does not know is registered again with the same key."""
    renew(acme_env.domains, **acme_env.kwargs())
    registration = next((acme_env.account_path / "registrations").iterdir())
    document = json.loads(registration.read_text())
    document["uri"] = document["uri"].rsplit("/", 1)[0] + "/0000000000000000"
    registration.write_text(json.dumps(document))

    result = renew(acme_env.domains, **acme_env.kwargs(force=True))

    assert result.renewed
    assert json.loads(registration.read_text())["uri"] != document["uri"]


def test_deploy_hooks_run_after_commit(acme_env: ACMEEnv) -> None:
    """Deploy hooks given to renew() run once for the new generation."""
    seen: list[int] = []

    result = renew(
        acme_env.domains,
        **acme_env.kwargs(
            deploy_hooks=[lambda generation: seen.append(generation.sequence)]
        ),
    )

    assert seen == [result.generation]


def test_logs_never_contain_the_key(
    acme_env: ACMEEnv, caplog: pytest.LogCaptureFixture
) -> None:
    """INFO records name the order and certificate but no private key."""
    caplog.set_level(logging.DEBUG, logger="singlewriter")

    renew(acme_env.domains, **acme_env.kwargs())

    _, key_pem = published(acme_env)
    messages = [record.getMessage() for record in caplog.records]
    assert any(message.startswith("placed order ") for message in messages)
    assert any(message.startswith("downloaded certificate ") for message in messages)
    account_key = (acme_env.account_path / "account.key").read_bytes()
    for message in messages:
        assert "PRIVATE KEY" not in message
        assert key_pem.decode() not in message
        assert account_key.decode() not in message


def test_profile_is_requested(make_pebble: Any, tmp_path: Path) -> None:
    """profile= names the ACME profile, here Pebble's six-day "shortlived"."""
    from tests.servers.pebble import DEFAULT_PROFILES

    pebble = make_pebble(
        retry_after_authz=0, retry_after_order=0, profiles=DEFAULT_PROFILES
    )
    env = ACMEEnv(pebble=pebble, root=tmp_path, domains=[unique_domain()])

    renew(env.domains, **env.kwargs(profile="shortlived"))

    certificate, _ = published(env)
    lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    assert timedelta(days=5) < lifetime <= timedelta(days=6, seconds=1)


def test_damaged_current_set_renews(acme_env: ACMEEnv) -> None:
    """A current set that no longer verifies is renewed instead of blocking renewal."""
    renew(acme_env.domains, **acme_env.kwargs())
    (acme_env.store_path / "..current" / "cert.pem").write_bytes(b"")

    result = renew(acme_env.domains, **acme_env.kwargs())

    assert result.renewed
    assert result.generation == 2
    certificate, _ = published(acme_env)
    assert dns_names(certificate) == set(acme_env.domains)


def test_plain_http_endpoint_rejected(acme_env: ACMEEnv) -> None:
    """An http:// URL or redirect from an https directory is never requested."""
    from singlewriter import ConfigError
    from singlewriter.acme._client import connect

    connection = connect(
        acme_env.pebble.directory_url,
        jwk.JWKEC(key=ec.generate_private_key(ec.SECP256R1())),
        ca_bundle=acme_env.pebble.ca_bundle_path,
        user_agent="test",
        timeout=10,
    )
    plain = "http://127.0.0.1:1/acme/new-order"

    with pytest.raises(ConfigError, match=r"plain-http URL .* refusing to downgrade"):
        connection.net.head(plain)

"""ACME Renewal Information (RFC 9773) against a real Pebble."""

from __future__ import annotations

import logging
import shutil
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from acme import errors as acme_errors
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from singlewriter.acme import cert_id, renew
from singlewriter.acme._account import AccountStore, ensure_registered
from singlewriter.acme._client import Connection, connect
from singlewriter.keystore import KeyStore
from tests.fixtures_pebble import ACMEEnv, PebbleServer, RequestLog

pytestmark = pytest.mark.pebble

ALREADY_REPLACED = "urn:ietf:params:acme:error:alreadyReplaced"


def current_certificate(env: ACMEEnv) -> x509.Certificate:
    files = KeyStore(env.store_path).current()
    assert files is not None
    return x509.load_pem_x509_certificate(files["cert.pem"])


def move_window_into_past(env: ACMEEnv, certificate: x509.Certificate) -> None:
    now = datetime.now(timezone.utc)
    env.pebble.set_renewal_info(
        certificate.public_bytes(Encoding.PEM),
        start=now - timedelta(hours=2),
        end=now - timedelta(hours=1),
    )


def account_connection(env: ACMEEnv) -> Connection:
    """Connect as the test's stored ACME account, outside renew()."""
    accounts = AccountStore(env.account_path)
    connection = connect(
        env.pebble.directory_url,
        accounts.load_key(),
        ca_bundle=env.pebble.ca_bundle_path,
        user_agent="singlewriter-tests",
        timeout=10,
    )
    ensure_registered(connection, accounts, None)
    return connection


def test_ari_window_in_past_renews_with_replaces(
    acme_env: ACMEEnv, acme_requests: RequestLog
) -> None:
    """A window in the past renews at once, and the order names its predecessor."""
    renew(acme_env.domains, **acme_env.kwargs())
    old = current_certificate(acme_env)
    move_window_into_past(acme_env, old)

    result = renew(acme_env.domains, **acme_env.kwargs())

    assert result.renewed
    assert "renewal window" in result.reason
    assert "has reached its chosen time" in result.reason
    assert result.order_url is not None
    assert len(acme_requests.gets_under(acme_env.pebble.renewal_info_url)) == 1

    # RFC 9773 section 5: the server reflects "replaces" in the order.
    connection = account_connection(acme_env)
    order = connection.post_as_get(result.order_url).json()
    assert order["replaces"] == cert_id(old)

    # And it refuses a second replacement of the same certificate.
    with pytest.raises(acme_errors.ConflictError):
        connection.new_order(
            tuple(acme_env.domains), replaces=cert_id(old), profile=None
        )
    assert acme_requests.requests[-1].problem == ALREADY_REPLACED


def test_already_replaced_orders_without_replaces(
    acme_env: ACMEEnv, acme_requests: RequestLog, caplog: pytest.LogCaptureFixture
) -> None:
    """When the predecessor was already replaced, the order is placed without replaces.

    This is the container that lost its state directory after the CA
    issued a replacement but before the store committed it.
    """

    class Crash(Exception):
        pass

    def crash_after_download(step: str) -> None:
        if step == "downloaded":
            raise Crash

    renew(acme_env.domains, **acme_env.kwargs())
    old = current_certificate(acme_env)
    move_window_into_past(acme_env, old)
    with pytest.raises(Crash):
        renew(acme_env.domains, **acme_env.kwargs(on_step=crash_after_download))
    shutil.rmtree(acme_env.account_path / "state")
    acme_requests.clear()
    caplog.set_level(logging.WARNING, logger="singlewriter")

    result = renew(acme_env.domains, **acme_env.kwargs(force=True))

    assert result.renewed
    orders = acme_requests.posts_to(acme_env.pebble.new_order_url)
    assert [request.status for request in orders] == [409, 201]
    assert orders[0].problem == ALREADY_REPLACED
    assert any("alreadyReplaced" in record.getMessage() for record in caplog.records)
    assert current_certificate(acme_env).serial_number != old.serial_number


def test_ari_answer_is_cached_until_retry_after(
    acme_env: ACMEEnv, acme_requests: RequestLog
) -> None:
    """The window is asked again only after Retry-After (six hours from Pebble)."""
    renew(acme_env.domains, **acme_env.kwargs())
    first = renew(acme_env.domains, **acme_env.kwargs())
    assert not first.renewed
    move_window_into_past(acme_env, current_certificate(acme_env))
    acme_requests.clear()

    cached = renew(acme_env.domains, **acme_env.kwargs())

    assert not cached.renewed
    assert acme_requests.gets_under(acme_env.pebble.renewal_info_url) == []

    later = datetime.now(timezone.utc) + timedelta(hours=6, minutes=1)
    refreshed = renew(acme_env.domains, **acme_env.kwargs(clock=lambda: later))

    assert refreshed.renewed
    assert len(acme_requests.gets_under(acme_env.pebble.renewal_info_url)) == 1


def test_check_interval_renews_before_next_run(acme_env: ACMEEnv) -> None:
    """A chosen time before the caller's next run renews now (RFC 9773 4.2 step 5)."""
    renew(acme_env.domains, **acme_env.kwargs())
    now = datetime.now(timezone.utc)
    acme_env.pebble.set_renewal_info(
        current_certificate(acme_env).public_bytes(Encoding.PEM),
        start=now + timedelta(hours=1),
        end=now + timedelta(hours=2),
    )

    every_minute = renew(acme_env.domains, **acme_env.kwargs(check_interval=60))
    every_three_hours = renew(
        acme_env.domains, **acme_env.kwargs(check_interval=3 * 3600)
    )

    assert not every_minute.renewed
    assert every_minute.renew_at is not None
    assert now + timedelta(hours=1) <= every_minute.renew_at
    assert every_minute.renew_at <= now + timedelta(hours=2)
    assert every_three_hours.renewed
    assert every_three_hours.reason.endswith("before the next run")


def test_malformed_ari_falls_back_to_lifetime(
    acme_env: ACMEEnv, acme_requests: RequestLog, caplog: pytest.LogCaptureFixture
) -> None:
    """A broken renewal window is logged, the lifetime rule decides for six hours."""
    renew(acme_env.domains, **acme_env.kwargs())
    acme_env.pebble.set_renewal_info(
        current_certificate(acme_env).public_bytes(Encoding.PEM),
        ari_response="{this is not json",
    )
    caplog.set_level(logging.WARNING, logger="singlewriter")

    result = renew(acme_env.domains, **acme_env.kwargs())

    assert not result.renewed
    assert "renewal window" not in result.reason
    assert any(
        "could not fetch the renewal window" in record.getMessage()
        for record in caplog.records
    )

    # RFC 9773 section 4.3.3: the next fetch waits six hours.
    acme_requests.clear()
    renew(acme_env.domains, **acme_env.kwargs())
    assert acme_requests.gets_under(acme_env.pebble.renewal_info_url) == []
    later = datetime.now(timezone.utc) + timedelta(hours=6, minutes=1)
    renew(acme_env.domains, **acme_env.kwargs(clock=lambda: later))
    assert len(acme_requests.gets_under(acme_env.pebble.renewal_info_url)) == 1


def test_inverted_ari_window_is_ignored(
    acme_env: ACMEEnv, caplog: pytest.LogCaptureFixture
) -> None:
    """A window whose end precedes its start counts as none (RFC 9773 4.2)."""
    renew(acme_env.domains, **acme_env.kwargs())
    now = datetime.now(timezone.utc)
    acme_env.pebble.set_renewal_info(
        current_certificate(acme_env).public_bytes(Encoding.PEM),
        start=now - timedelta(hours=1),
        end=now - timedelta(hours=2),
    )
    caplog.set_level(logging.WARNING, logger="singlewriter")

    result = renew(acme_env.domains, **acme_env.kwargs())

    assert not result.renewed
    assert any("is not after its start" in r.getMessage() for r in caplog.records)


def test_switching_ca_orders_without_replaces(
    acme_env: ACMEEnv,
    acme_requests: RequestLog,
    make_pebble: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A predecessor from another CA is rejected, and the order goes on without it.

    Pebble returns malformed for an identifier of an unknown issuer, so
    the order is placed again without 'replaces'.
    """
    renew(acme_env.domains, **acme_env.kwargs())
    other: PebbleServer = make_pebble(retry_after_authz=0, retry_after_order=0)
    switched = ACMEEnv(pebble=other, root=acme_env.root, domains=acme_env.domains)
    caplog.set_level(logging.WARNING, logger="singlewriter")
    acme_requests.clear()

    result = renew(switched.domains, **switched.kwargs(force=True))

    assert result.renewed
    orders = acme_requests.posts_to(other.new_order_url)
    assert [request.status for request in orders] == [400, 201]
    assert orders[0].problem == "urn:ietf:params:acme:error:malformed"
    assert any("ordering without 'replaces'" in r.getMessage() for r in caplog.records)

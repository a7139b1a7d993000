"""Launcher for Pebble v2.10.3 (a test ACME server) and pebble-challtestsrv.

pebble-challtestsrv serves only DNS here: it answers every A query with
127.0.0.1, no AAAA query (so Pebble never dials ::1), and takes TXT records
for DNS-01 through its management API. Its HTTP-01, HTTPS, TLS-ALPN-01 and
DNS-over-HTTPS listeners are disabled. Pebble validates HTTP-01 by
connecting to 127.0.0.1:``http01_port``, where the test runs its own responder.
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

from ._common import (
    LOOPBACK,
    CertificateAuthority,
    ServerHandle,
    ServerProcess,
    free_ports,
    http_request,
    no_proxy_environment,
    post_json,
    require_binary,
    wait_for_http,
    wait_for_port,
)

# Profiles and retry hints copied from test/config/pebble-config.json of
# Pebble v2.10.3. Validity periods are in seconds.
DEFAULT_PROFILES: dict[str, dict[str, object]] = {
    "default": {
        "description": "The profile you know and love",
        "validityPeriod": 7776000,
    },
    "shortlived": {
        "description": "A short-lived cert profile, without actual enforcement",
        "validityPeriod": 518400,
    },
}


class Pebble(ServerHandle):
    """A running Pebble and pebble-challtestsrv pair on loopback ports."""

    def __init__(
        self,
        *,
        pebble: ServerProcess,
        challtestsrv: ServerProcess,
        authority: CertificateAuthority,
        acme_port: int,
        management_port: int,
        http01_port: int,
        tlsalpn01_port: int,
        dns_port: int,
        challtestsrv_port: int,
    ):
        self.pebble_process = pebble
        self.challtestsrv_process = challtestsrv
        self._authority = authority
        self.acme_port = acme_port
        self.management_port = management_port
        self.http01_port = http01_port
        self.tlsalpn01_port = tlsalpn01_port
        self.dns_port = dns_port
        self.challtestsrv_port = challtestsrv_port

    @property
    def directory_url(self) -> str:
        return f"https://{LOOPBACK}:{self.acme_port}/dir"

    @property
    def ca_bundle_path(self) -> str:
        """PEM file of the CA that signed the ACME and management listeners."""
        return str(self._authority.cert_path)

    @property
    def management_url(self) -> str:
        return f"https://{LOOPBACK}:{self.management_port}"

    @property
    def challtestsrv_url(self) -> str:
        return f"http://{LOOPBACK}:{self.challtestsrv_port}"

    def ssl_context(self) -> ssl.SSLContext:
        """Return a client SSL context that verifies the Pebble listeners."""
        return self._authority.ssl_context()

    def roots_pem(self, index: int = 0) -> str:
        """Fetch the PEM of root ``index`` that signs issued certificates.

        Pebble generates its roots at start, so the result changes after
        every start.
        """
        return self._get_management_pem(f"/roots/{index}")

    def intermediates_pem(self, index: int = 0) -> str:
        """Fetch the PEM of the intermediate certificate under root ``index``."""
        return self._get_management_pem(f"/intermediates/{index}")

    def _get_management_pem(self, path: str) -> str:
        url = self.management_url + path
        status, body = http_request(url, ssl_context=self.ssl_context())
        if status != 200:
            raise RuntimeError(f"GET {url} failed with HTTP {status}: {body[:200]!r}")
        return body.decode()

    def set_txt(self, host: str, value: str) -> None:
        """Make the DNS server answer TXT queries for ``host`` with ``value``.

        A trailing dot is added to ``host`` when missing, because
        pebble-challtestsrv matches fully qualified names. Setting the same
        host again adds a value rather than replacing it.
        """
        post_json(
            self.challtestsrv_url + "/set-txt",
            {"host": _fully_qualified(host), "value": value},
        )

    def clear_txt(self, host: str) -> None:
        """Remove every TXT value for ``host``."""
        post_json(
            self.challtestsrv_url + "/clear-txt", {"host": _fully_qualified(host)}
        )

    def set_renewal_info(
        self,
        cert_pem: str | bytes,
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        explanation_url: str | None = None,
        ari_response: str | None = None,
    ) -> None:
        """Override the ACME Renewal Information (ARI) response for a certificate.

        Pebble reads the first certificate in ``cert_pem`` (a full chain is
        fine), looks it up by serial number and from then on serves the given
        body verbatim at the directory's renewalInfo URL for it.
        Pass either ``start`` and ``end`` (timezone-aware datetimes) for a
        suggested window, or ``ari_response`` to send any text, including
        malformed JSON.
        """
        if ari_response is None:
            if start is None or end is None:
                raise ValueError(
                    "set_renewal_info needs start and end, or ari_response"
                )
            if start.tzinfo is None or end.tzinfo is None:
                raise ValueError("start and end must be timezone-aware datetimes")
            window: dict[str, object] = {
                "suggestedWindow": {"start": _rfc3339(start), "end": _rfc3339(end)}
            }
            if explanation_url is not None:
                window["explanationURL"] = explanation_url
            ari_response = json.dumps(window)
        if isinstance(cert_pem, bytes):
            cert_pem = cert_pem.decode()
        # Field names of the request struct in wfe.SetRenewalInfo of Pebble v2.10.3.
        post_json(
            self.management_url + "/set-renewal-info/",
            {"Certificate": cert_pem, "ARIResponse": ari_response},
            ssl_context=self.ssl_context(),
        )

    def stop(self) -> None:
        self.pebble_process.stop()
        self.challtestsrv_process.stop()


def _fully_qualified(host: str) -> str:
    return host if host.endswith(".") else host + "."


def _rfc3339(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def start_pebble(
    workdir: str | os.PathLike[str],
    *,
    always_valid: bool = False,
    authz_reuse: int = 0,
    nonce_reject: int = 0,
    strict: bool = False,
    chain_length: int | None = None,
    profiles: Mapping[str, Mapping[str, object]] | None = None,
    retry_after_authz: int = 3,
    retry_after_order: int = 5,
    extra_env: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> Pebble:
    """Start pebble-challtestsrv and Pebble with listeners on free loopback ports.

    ``authz_reuse`` and ``nonce_reject`` are percentages (PEBBLE_AUTHZREUSE
    and PEBBLE_WFE_NONCEREJECT). ``always_valid`` sets PEBBLE_VA_ALWAYS_VALID,
    so Pebble marks every challenge valid without contacting anything.
    Random validation delays are always off (PEBBLE_VA_NOSLEEP=1).
    Configuration, certificates and logs go under ``workdir``/pebble.

    Raises ServerUnavailable when a binary is missing or a server does not
    become ready within ``timeout`` seconds.
    """
    pebble_binary = require_binary("pebble", "pebble")
    challtestsrv_binary = require_binary("pebble-challtestsrv", "pebble")
    for name, percentage in (
        ("authz_reuse", authz_reuse),
        ("nonce_reject", nonce_reject),
    ):
        if not 0 <= percentage <= 100:
            raise ValueError(
                f"{name} must be a percentage from 0 to 100, got {percentage}"
            )

    directory = Path(workdir) / "pebble"
    directory.mkdir(parents=True, exist_ok=True)
    authority = CertificateAuthority(directory / "tls", "singlewriter test Pebble CA")
    listener = authority.issue("listener", hosts=(LOOPBACK, "localhost"))

    # The DNS port must be free for both UDP and TCP. Taking all six numbers
    # in one call keeps them distinct.
    (
        dns_port,
        acme_port,
        management_port,
        http01_port,
        tlsalpn01_port,
        challtestsrv_port,
    ) = free_ports(6, udp=True)

    config = {
        "pebble": {
            "listenAddress": f"{LOOPBACK}:{acme_port}",
            "managementListenAddress": f"{LOOPBACK}:{management_port}",
            "certificate": str(listener.cert_path),
            "privateKey": str(listener.key_path),
            "httpPort": http01_port,
            "tlsPort": tlsalpn01_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
            "domainBlocklist": ["blocked-domain.example"],
            "retryAfter": {"authz": retry_after_authz, "order": retry_after_order},
            "keyAlgorithm": "ecdsa",
            "profiles": dict(profiles) if profiles is not None else DEFAULT_PROFILES,
        }
    }
    config_path = directory / "pebble-config.json"
    config_path.write_text(json.dumps(config, indent=2))

    challtestsrv = ServerProcess(
        "pebble-challtestsrv",
        [
            challtestsrv_binary,
            "-dnsserver",
            f"{LOOPBACK}:{dns_port}",
            "-management",
            f"{LOOPBACK}:{challtestsrv_port}",
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
        log_dir=directory,
    )

    pebble_environment = {
        "PEBBLE_VA_NOSLEEP": "1",
        "PEBBLE_WFE_NONCEREJECT": str(nonce_reject),
        "PEBBLE_AUTHZREUSE": str(authz_reuse),
    }
    if always_valid:
        pebble_environment["PEBBLE_VA_ALWAYS_VALID"] = "1"
    if chain_length is not None:
        pebble_environment["PEBBLE_CHAIN_LENGTH"] = str(chain_length)
    if extra_env:
        pebble_environment.update(extra_env)
    pebble_arguments = [
        pebble_binary,
        "-config",
        str(config_path),
        "-dnsserver",
        f"{LOOPBACK}:{dns_port}",
    ]
    if strict:
        pebble_arguments.append("-strict")
    pebble = ServerProcess(
        "pebble",
        pebble_arguments,
        env=no_proxy_environment(pebble_environment),
        cwd=directory,
        log_dir=directory,
    )

    handle = Pebble(
        pebble=pebble,
        challtestsrv=challtestsrv,
        authority=authority,
        acme_port=acme_port,
        management_port=management_port,
        http01_port=http01_port,
        tlsalpn01_port=tlsalpn01_port,
        dns_port=dns_port,
        challtestsrv_port=challtestsrv_port,
    )
    try:
        challtestsrv.start()
        wait_for_port(challtestsrv_port, timeout=timeout, process=challtestsrv)
        wait_for_port(dns_port, timeout=timeout, process=challtestsrv)
        pebble.start()
        wait_for_http(
            handle.directory_url,
            ssl_context=handle.ssl_context(),
            timeout=timeout,
            processes=(pebble, challtestsrv),
        )
        wait_for_port(management_port, timeout=timeout, process=pebble)
    except BaseException:
        handle.stop()
        raise
    return handle

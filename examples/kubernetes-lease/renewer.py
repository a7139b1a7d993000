"""Renew one certificate from any number of replicas; only the Lease holder writes.

Each round a replica takes the lock (waiting while another replica holds it),
reads the TLS Secret, renews the certificate when it expires within
RENEW_BEFORE_DAYS, commits it with the lease's fencing token, and releases
the lock. ``issue()`` makes a throwaway CA and certificate so the example
runs anywhere; replace it with your ACME client.

Environment (seconds unless named otherwise):

LOCK_URL           k8s:// URL of the Lease, e.g. k8s://NS/cert-renewal-example-com?incluster=1
SECRET_URL         k8s:// URL of the TLS Secret, e.g. k8s://NS/example-com-tls?incluster=1
DOMAIN             name on the certificate (default example.com)
TTL                lock ttl (default 30)
CHECK_SECONDS      pause between rounds (default 3600)
RENEW_BEFORE_DAYS  renew when fewer days are left (default 30)
ROUNDS             rounds before exiting, 0 for no limit (default 0)
FORCE_RENEW        1 renews every round, for demonstrations (default 0)
"""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import singlewriter
from singlewriter.keystore.kubernetes import KubernetesSecretStore

log = logging.getLogger("renewer")


def issue(domain: str) -> dict[str, bytes]:
    """Return a new key, certificate and chain for ``domain`` (a stand-in for ACME)."""
    now = datetime.now(timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Example CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=90))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), False)
        .sign(ca_key, hashes.SHA256())
    )

    cert = leaf.public_bytes(serialization.Encoding.PEM)
    chain = ca.public_bytes(serialization.Encoding.PEM)
    return {
        "privkey.pem": key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        "cert.pem": cert,
        "chain.pem": chain,
        "fullchain.pem": cert + chain,
    }


def renewal_due(store: KubernetesSecretStore, renew_before: timedelta) -> bool:
    """Return whether the stored certificate is missing or expires soon."""
    if os.environ.get("FORCE_RENEW") == "1":
        return True
    files = store.current()
    if files is None or "cert.pem" not in files:
        return True
    certificate = x509.load_pem_x509_certificate(files["cert.pem"])
    left = certificate.not_valid_after_utc - datetime.now(timezone.utc)
    return left < renew_before


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    singlewriter.raise_on_signals()

    domain = os.environ.get("DOMAIN", "example.com")
    pause = float(os.environ.get("CHECK_SECONDS", "3600"))
    renew_before = timedelta(days=float(os.environ.get("RENEW_BEFORE_DAYS", "30")))
    rounds = int(os.environ.get("ROUNDS", "0"))
    ttl = float(os.environ.get("TTL", "30"))

    lock = singlewriter.lock_from_url(os.environ["LOCK_URL"], ttl=ttl)
    store = KubernetesSecretStore.from_url(os.environ["SECRET_URL"])

    done = 0
    while rounds == 0 or done < rounds:
        with lock as lease:
            if renewal_due(store, renew_before):
                files = issue(domain)
                lease.ensure_held()
                store.commit(lease.token, files)
                log.info("renewed %s with token %d", domain, lease.token)
        done += 1
        time.sleep(pause)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Reference ACME renewal: one fenced writer per certificate, crash-safe.

``renew()`` takes a singlewriter lock and decides whether the certificate
in a KeyStore is due, with ACME Renewal Information (RFC 9773) when the CA
offers it. It resumes or places an order with the ``acme`` package and
commits the result with the lease's fencing token. See ``docs/acme.md``.

Needs the ``acme`` extra: ``pip install 'singlewriter[acme]'``.
"""

from __future__ import annotations

try:
    import acme as _acme  # noqa: F401
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "singlewriter.acme needs the acme package; install it with"
        " pip install 'singlewriter[acme]'"
    ) from _exc

from ._account import AccountStore
from ._challenges import Challenge, ChallengeItem, DNSRecord
from ._client import cert_id
from ._dns01 import DNS01Hook
from ._errors import (
    ACMEError,
    ACMETimeout,
    ACMEUnavailable,
    ChallengeError,
    RenewalBackoff,
)
from ._http01 import HTTP01Standalone, HTTP01Webroot
from ._interrupt import EXIT_TERMINATED
from ._keys import KEY_TYPES
from ._renew import DEFAULT_USER_AGENT, LETSENCRYPT_DIRECTORY_URL, renew
from ._result import RenewalResult

#: Names passed to ``renew(on_step=...)``, in the order a full run reaches them.
#: "order-resumed" replaces "key-persisted" and "order-placed" when a stored
#: order is resumed; "finalize-sent" is skipped when it was sent before.
STEPS = (
    "lock-acquired",
    "decided",
    "key-persisted",
    "order-placed",
    "order-resumed",
    "authorized",
    "finalize-sent",
    "downloaded",
    "committing",
    "committed",
)

__all__ = [
    "DEFAULT_USER_AGENT",
    "EXIT_TERMINATED",
    "KEY_TYPES",
    "LETSENCRYPT_DIRECTORY_URL",
    "STEPS",
    "ACMEError",
    "ACMETimeout",
    "ACMEUnavailable",
    "AccountStore",
    "Challenge",
    "ChallengeError",
    "ChallengeItem",
    "DNS01Hook",
    "DNSRecord",
    "HTTP01Standalone",
    "HTTP01Webroot",
    "RenewalBackoff",
    "RenewalResult",
    "cert_id",
    "renew",
]

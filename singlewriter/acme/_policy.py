"""When to renew, and how long a failing set of names waits before the next try.

Rules, checked in this order (``force`` skips all of them):

1. No certificate in the store: renew.
2. The certificate misses a requested name, its key does not match, or
   its key is not of the requested type: renew.
3. The certificate has expired: renew.
4. The CA sent a renewal window (RFC 9773 section 4.2): renew once the
   chosen time inside the window has come, or will come before the next
   run when the caller says how often it runs (``check_interval``).
5. Otherwise: renew when at most ``renew_fraction`` of the lifetime is left.

The time inside an ARI window is chosen from a hash of the certificate
identifier and the window. So it is spread uniformly over certificates, as
the RFC recommends, and yet the same on every run. A cron job that runs
hourly therefore does not pull the renewal towards the start of the
window by drawing a new random time each hour.

Backoff: after ``n`` consecutive failures the next attempt waits
``BACKOFF_BASE * 2 ** (n - 1)``, at most ``BACKOFF_MAX`` (RFC 9773 section
4.2 asks cron-based clients to store failures for exactly this).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509

from ._client import RenewalInfo
from ._keys import key_matches, key_type_of, missing_names

__all__ = [
    "BACKOFF_BASE",
    "BACKOFF_MAX",
    "CurrentSet",
    "Decision",
    "ari_renewal_time",
    "backoff_delay",
    "decide",
    "fraction_renewal_time",
]

BACKOFF_BASE = timedelta(minutes=5)
BACKOFF_MAX = timedelta(hours=24)


@dataclass(frozen=True)
class CurrentSet:
    """The certificate and key the store publishes now."""

    certificate: x509.Certificate
    key_pem: bytes
    generation: int

    @property
    def not_after(self) -> datetime:
        return self.certificate.not_valid_after_utc


@dataclass(frozen=True)
class Decision:
    """Whether to renew now, why, and (when not) the planned renewal time."""

    due: bool
    reason: str
    renew_at: datetime | None = None


def decide(
    current: CurrentSet | None,
    now: datetime,
    *,
    domains: tuple[str, ...],
    key_type: str,
    window: RenewalInfo | None,
    renew_fraction: float,
    check_interval: float | None,
) -> Decision:
    """Apply the rules in the module docstring to the store's current set."""
    if current is None:
        return Decision(True, "the store has no certificate yet")

    mismatch = _mismatch(current, domains, key_type)
    if mismatch is not None:
        return Decision(True, mismatch)
    if now >= current.not_after:
        return Decision(
            True,
            f"the certificate expired at {current.not_after:%Y-%m-%d %H:%M:%S} UTC",
        )

    if window is not None:
        return _decide_by_window(window, now, check_interval)

    renew_at = fraction_renewal_time(current.certificate, renew_fraction)
    if now >= renew_at:
        return Decision(
            True,
            f"less than {renew_fraction:.0%} of the certificate's lifetime is left",
            renew_at,
        )
    return Decision(False, f"not due until {renew_at:%Y-%m-%d %H:%M:%S} UTC", renew_at)


def ari_renewal_time(window: RenewalInfo) -> datetime:
    """Return the time inside ``window`` at which this certificate renews."""
    seed = f"{window.cert_id}|{window.start.isoformat()}|{window.end.isoformat()}"
    digest = hashlib.sha256(seed.encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2.0**64
    return window.start + (window.end - window.start) * position


def fraction_renewal_time(certificate: x509.Certificate, fraction: float) -> datetime:
    """Return the time when ``fraction`` of the certificate's lifetime is left."""
    not_before = certificate.not_valid_before_utc
    not_after = certificate.not_valid_after_utc
    return not_after - (not_after - not_before) * fraction


def backoff_delay(failures: int) -> timedelta:
    """Return how long to wait after ``failures`` consecutive failures."""
    if failures <= 0:
        return timedelta(0)
    # Cap the exponent first so that a long failure streak cannot overflow.
    delay: timedelta = BACKOFF_BASE * (1 << min(failures - 1, 20))
    return min(delay, BACKOFF_MAX)


def _mismatch(
    current: CurrentSet, domains: tuple[str, ...], key_type: str
) -> str | None:
    missing = missing_names(current.certificate, domains)
    if missing:
        return f"the certificate does not cover {', '.join(missing)}"
    if not key_matches(current.key_pem, current.certificate):
        return "the published private key does not match the certificate"
    current_type = key_type_of(current.key_pem)
    if current_type != key_type:
        return f"the key is {current_type or 'of another type'}, not {key_type}"
    return None


def _decide_by_window(
    window: RenewalInfo, now: datetime, check_interval: float | None
) -> Decision:
    renew_at = ari_renewal_time(window)
    described = (
        f"the CA's renewal window {window.start:%Y-%m-%d %H:%M} to"
        f" {window.end:%Y-%m-%d %H:%M} UTC"
    )
    if now >= renew_at:
        return Decision(True, f"{described} has reached its chosen time", renew_at)

    # RFC 9773 section 4.2, step 5: renew now if the chosen time comes before
    # the next time the caller will run.
    if check_interval is not None and renew_at < now + timedelta(
        seconds=check_interval
    ):
        return Decision(
            True, f"{described} reaches its chosen time before the next run", renew_at
        )
    return Decision(
        False,
        f"not due until {renew_at:%Y-%m-%d %H:%M:%S} UTC, within {described}",
        renew_at,
    )

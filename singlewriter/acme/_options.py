"""The checked options of one ``renew()`` call."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from singlewriter._errors import ConfigError

from ._challenges import Challenge
from ._client import check_directory_url
from ._domains import normalize_domains
from ._keys import check_key_type

__all__ = ["Options", "StepCallback", "utc_now"]

StepCallback = Callable[[str], None]

# RFC 5321 mailbox, loosely: something@domain, with no spaces, commas
# (acme joins several addresses with commas) or a mailto: prefix.
_EMAIL = re.compile(r"[^@\s,:]+@[^@\s,]+\.[^@\s,]+")


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class Options:
    """Everything a renewal needs besides the lock, the store and the account."""

    domains: tuple[str, ...]
    directory_url: str
    challenge: Challenge
    key_type: str
    email: str | None
    ca_bundle: str | None
    renew_fraction: float
    force: bool
    clock: Callable[[], datetime]
    user_agent: str
    profile: str | None
    use_ari: bool
    check_interval: float | None
    poll_timeout: float
    network_timeout: float
    sleep: Callable[[float], None] = time.sleep
    monotonic: Callable[[], float] = time.monotonic
    on_step: StepCallback | None = None

    def now(self) -> datetime:
        """Return the injected wall clock's time, checked to be timezone-aware."""
        moment = self.clock()
        if moment.tzinfo is None:
            raise ConfigError(
                f"clock() returned the naive datetime {moment!r}; return an aware"
                " one such as datetime.now(timezone.utc)"
            )
        return moment

    def step(self, name: str) -> None:
        if self.on_step is not None:
            self.on_step(name)

    @classmethod
    def build(
        cls,
        *,
        domains: object,
        directory_url: object,
        challenge: object,
        key_type: object,
        email: object,
        ca_bundle: object,
        renew_fraction: object,
        force: bool,
        clock: Callable[[], datetime],
        user_agent: str,
        profile: str | None,
        use_ari: bool,
        check_interval: object,
        poll_timeout: object,
        network_timeout: object,
        sleep: Callable[[float], None],
        monotonic: Callable[[], float],
        on_step: StepCallback | None,
    ) -> Options:
        """Check every value and return the Options, or raise ConfigError."""
        names = normalize_domains(domains)
        return cls(
            domains=names,
            directory_url=check_directory_url(directory_url),
            challenge=_check_challenge(challenge, names),
            key_type=check_key_type(key_type),
            email=_check_email(email),
            ca_bundle=_check_ca_bundle(ca_bundle),
            renew_fraction=_check_fraction(renew_fraction),
            force=bool(force),
            clock=clock,
            user_agent=user_agent,
            profile=profile,
            use_ari=bool(use_ari),
            check_interval=_seconds("check_interval", check_interval, optional=True),
            poll_timeout=_required_seconds("poll_timeout", poll_timeout),
            network_timeout=_required_seconds("network_timeout", network_timeout),
            sleep=sleep,
            monotonic=monotonic,
            on_step=on_step,
        )


def _check_challenge(challenge: object, domains: tuple[str, ...]) -> Challenge:
    if not isinstance(challenge, Challenge):
        raise ConfigError(
            f"challenge={challenge!r} is invalid: pass HTTP01Standalone(),"
            " HTTP01Webroot(path) or DNS01Hook(hook)"
        )
    wildcards = [name for name in domains if name.startswith("*.")]
    if wildcards and challenge.challenge_type != "dns-01":
        raise ConfigError(
            f"{', '.join(wildcards)} can only be validated with DNS-01 (RFC 8555"
            f" section 7.1.3), not {challenge.challenge_type}; pass DNS01Hook(...)"
        )
    return challenge


def _check_email(email: object) -> str | None:
    if email is None:
        return None
    if not isinstance(email, str) or not _EMAIL.fullmatch(email):
        raise ConfigError(
            f"email={email!r} is invalid: pass one address such as"
            " 'admin@example.com', without 'mailto:'"
        )
    return email


def _check_ca_bundle(ca_bundle: object) -> str | None:
    if ca_bundle is None:
        return None
    if not isinstance(ca_bundle, str):
        raise ConfigError(f"ca_bundle={ca_bundle!r} is invalid: pass a file path")
    try:
        with open(ca_bundle, "rb") as handle:
            handle.read(1)
    except OSError as exc:
        raise ConfigError(
            f"ca_bundle {ca_bundle!r} cannot be read: {exc.strerror or exc}; pass"
            " the PEM file of the CA that signed the ACME server's certificate"
        ) from exc
    return ca_bundle


def _check_fraction(value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0 < value < 1
    ):
        raise ConfigError(
            f"renew_fraction={value!r} is invalid: pass the part of the lifetime"
            " left at which to renew, between 0 and 1 exclusive, such as 1/3"
        )
    return float(value)


def _required_seconds(field: str, value: object) -> float:
    seconds = _seconds(field, value)
    assert seconds is not None
    return seconds


def _seconds(field: str, value: object, *, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(
            f"{field}={value!r} is invalid: pass a number of seconds greater than 0"
        )
    return float(value)

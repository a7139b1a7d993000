"""Checks on the DNS names a certificate is requested for."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence

from singlewriter._errors import ConfigError

__all__ = ["default_lock_name", "normalize_domains"]

# RFC 1035 section 2.3.1 preferred name syntax (letters, digits, hyphens; no
# hyphen at either end of a label), with RFC 1123's leading digits allowed.
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_MAX_NAME = 253

# Let's Encrypt's limit on names per certificate; other CAs are lower.
MAX_DOMAINS = 100


def normalize_domains(domains: object) -> tuple[str, ...]:
    """Return ``domains`` lower-cased and de-duplicated, first occurrence first.

    Raise ConfigError for an empty list, a name that is not a valid DNS
    name, an IP address or a non-ASCII name.
    """
    if isinstance(domains, str):
        raise ConfigError(
            f"domains={domains!r} is a string; pass a list of names such as"
            f" [{domains!r}]"
        )
    if not isinstance(domains, Iterable):
        raise ConfigError(
            f"domains={domains!r} is invalid: pass a list of names such as"
            " ['example.com']"
        )
    names: list[str] = []
    for domain in domains:
        name = _check_domain(domain)
        if name not in names:
            names.append(name)

    if not names:
        raise ConfigError(
            "no domain names given: pass at least one, such as ['example.com']"
        )
    if len(names) > MAX_DOMAINS:
        raise ConfigError(
            f"{len(names)} domain names given; a certificate can name at most"
            f" {MAX_DOMAINS}, so split them over several certificates"
        )
    return tuple(names)


def default_lock_name(domains: Sequence[str]) -> str:
    """Return the lock name for ``domains``: the alphabetically first, without ``*.``.

    The name depends on the set of names only, not on their order, so every
    renewer of one certificate takes the same lock however it lists them.
    """
    return min(domain.removeprefix("*.") for domain in domains)


def _check_domain(domain: object) -> str:
    if not isinstance(domain, str):
        raise ConfigError(f"domain name {domain!r} is invalid: expected a string")
    name = domain.strip().lower().removesuffix(".")

    if not name.isascii():
        raise ConfigError(
            f"domain name {domain!r} is invalid: pass internationalized names in"
            " their ASCII form (xn--...), as idna.encode() returns it"
        )
    if _is_ip_address(name):
        raise ConfigError(
            f"domain name {domain!r} is an IP address; certificates for IP"
            " addresses are not supported by this client"
        )

    labels = name.split(".")
    if labels[0] == "*":
        labels = labels[1:]
    if len(labels) < 2 or len(name) > _MAX_NAME:
        raise ConfigError(
            f"domain name {domain!r} is invalid: expected a fully qualified name"
            f" such as 'www.example.com', at most {_MAX_NAME} characters"
        )
    for label in labels:
        if not _LABEL.fullmatch(label):
            raise ConfigError(
                f"domain name {domain!r} is invalid: label {label!r} must be 1 to"
                " 63 letters, digits or hyphens, not starting or ending with a"
                " hyphen ('*.' is allowed only as the first label)"
            )
    return name


def _is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True

"""The interface every challenge implements, and what it is given.

The renewal calls ``start()`` once before any order is placed, then
``present(item)`` for every pending authorization and ``wait_ready(items)``
once, and then it requests validation. ``cleanup(item)`` for every
presented item and ``stop()`` run in ``finally`` blocks, so they also run
when the renewal fails or is interrupted by SIGTERM.

Implementations: ``_http01`` (HTTP01Standalone, HTTP01Webroot) and
``_dns01`` (DNS01Hook).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

__all__ = ["Challenge", "ChallengeItem", "DNSRecord"]


@dataclass(frozen=True)
class ChallengeItem:
    """One challenge to fulfil.

    ``domain`` is the authorization's identifier, without any ``*.``.
    ``token`` names the HTTP-01 resource. ``validation`` is what must be
    published: the key authorization for HTTP-01 (RFC 8555 section 8.3),
    the base64url SHA-256 of it for DNS-01 (section 8.4).
    """

    domain: str
    token: str
    validation: str


@dataclass(frozen=True)
class DNSRecord:
    """The TXT record a DNS-01 hook publishes or removes."""

    domain: str
    name: str
    value: str


class Challenge(abc.ABC):
    """A way to fulfil one ACME challenge type for every name of a renewal."""

    #: The ACME challenge type, such as "http-01".
    challenge_type: ClassVar[str]

    def start(self) -> None:
        """Prepare before any order is placed; raise ChallengeError if impossible."""
        return None

    @abc.abstractmethod
    def present(self, item: ChallengeItem) -> None:
        """Publish ``item`` so that the CA can validate it."""

    def wait_ready(
        self, items: Sequence[ChallengeItem], sleep: Callable[[float], None]
    ) -> None:
        """Wait until every presented item is visible to the CA."""
        return None

    @abc.abstractmethod
    def cleanup(self, item: ChallengeItem) -> None:
        """Remove what ``present`` published. Must not raise for a missing item."""

    def stop(self) -> None:
        """Release what ``start`` took."""
        return None

"""The value ``renew()`` returns."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

__all__ = ["RenewalResult"]


@dataclass(frozen=True)
class RenewalResult:
    """The outcome of one ``renew()`` call.

    ``renewed`` is whether a new certificate was committed, and ``reason``
    why it was or was not due. ``generation`` is the store generation
    published after the call and ``not_after`` the end of its certificate's
    validity (None for both when the store is empty). ``token`` is the
    fencing token the call held. ``order_url`` is the ACME order that
    produced the new certificate. ``renew_at`` is the planned renewal time
    when the certificate was not due.
    """

    renewed: bool
    reason: str
    generation: int | None
    token: int | None
    not_after: datetime | None
    order_url: str | None
    renew_at: datetime | None = None

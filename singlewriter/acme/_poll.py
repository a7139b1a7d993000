"""Waiting between polls of an ACME authorization or order.

RFC 8555 section 7.5.1 leaves the interval to the client and tells it to
honour Retry-After when the server sends one. Without one the wait starts
at ``POLL_INITIAL`` and doubles up to ``POLL_MAX``. So a CA that
validates in milliseconds (a local Pebble) is seen at once. A slow one is
polled a few times a few seconds apart, not once a second for minutes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

import requests

from ._client import retry_after_seconds
from ._errors import ACMETimeout

__all__ = ["POLL_INITIAL", "POLL_MAX", "Poller"]

log = logging.getLogger(__name__)

POLL_INITIAL = 0.025
POLL_MAX = 2.0


class Poller:
    """Sleeps between polls of one resource until a deadline on the monotonic clock."""

    def __init__(
        self,
        what: str,
        *,
        deadline: float,
        monotonic: Callable[[], float],
        now: Callable[[], datetime],
        sleep: Callable[[float], None],
    ) -> None:
        self.what = what
        self.deadline = deadline
        self._monotonic = monotonic
        self._now = now
        self._sleep = sleep
        self._next = POLL_INITIAL

    def wait(self, response: requests.Response) -> None:
        """Sleep before the next poll; raise ACMETimeout if that passes the deadline."""
        delay = retry_after_seconds(response, self._now())
        if delay is None:
            delay = self._next
            self._next = min(self._next * 2, POLL_MAX)
        else:
            log.debug("the server asked to poll %s again in %.1f s", self.what, delay)

        remaining = self.deadline - self._monotonic()
        if delay > remaining:
            raise ACMETimeout(
                f"{self.what} did not complete within the polling deadline (next"
                f" poll due in {delay:.1f} s, {max(remaining, 0.0):.1f} s left);"
                " run the renewal again to resume the order, or raise poll_timeout"
            )
        self._sleep(delay)

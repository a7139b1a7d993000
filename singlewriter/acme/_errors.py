"""ACME errors, and the one place that translates acme and requests errors.

The tree below extends the singlewriter hierarchy::

    SingleWriterError
    └── ACMEError                          the CA rejected a request or an order failed
        ├── ACMEUnavailable (ConnectionError)
        │                                  the directory could not be reached or read
        ├── ACMETimeout (TimeoutError)     an order did not progress before the deadline
        ├── ChallengeError                 a challenge could not be set up or failed
        └── RenewalBackoff                 earlier failures of these names; not tried

Every one of them is raised by ``renew()`` after it released the lock.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import requests
from acme import errors as acme_errors
from acme import messages
from josepy import errors as jose_errors

from singlewriter._errors import SingleWriterError

__all__ = [
    "CLIENT_ERRORS",
    "ACMEError",
    "ACMETimeout",
    "ACMEUnavailable",
    "ChallengeError",
    "RenewalBackoff",
    "translate",
]

# RFC 8555 section 6.7: every standard problem type starts with this.
_PROBLEM_PREFIX = "urn:ietf:params:acme:error:"

# Errors of the acme, josepy and requests packages that ``translate``
# understands. ValueError covers bodies that are not JSON and PEM that does
# not parse; catch SingleWriterError (ConfigError is a ValueError) first.
CLIENT_ERRORS = (
    messages.Error,
    acme_errors.Error,
    requests.RequestException,
    jose_errors.Error,
    ValueError,
)


class ACMEError(SingleWriterError):
    """The ACME server rejected a request, or an order ended without a certificate.

    ``problem_type`` is the RFC 8555 problem type the server sent (for
    example ``urn:ietf:params:acme:error:rejectedIdentifier``), None when
    the failure was not reported by the server. ``domains`` are the names of
    the renewal and ``order_url`` the order involved, if any.

    The lock is released when ``renew()`` raises this. Retrying is safe: an
    order that is still usable is resumed, and a failure the server reported
    is recorded so that the names back off instead of ordering again at once.
    """

    def __init__(
        self,
        message: str,
        *,
        problem_type: str | None = None,
        domains: Sequence[str] = (),
        order_url: str | None = None,
        lock_name: str | None = None,
    ) -> None:
        super().__init__(message, lock_name=lock_name)
        self.problem_type = problem_type
        self.domains = tuple(domains)
        self.order_url = order_url

    @property
    def problem_code(self) -> str | None:
        """The short problem type, such as ``rateLimited``, or None."""
        if self.problem_type is None:
            return None
        return self.problem_type.removeprefix(_PROBLEM_PREFIX)


class ACMEUnavailable(ACMEError, ConnectionError):
    """The ACME server could not be reached, or sent something that is not ACME.

    Nothing is recorded as a failure of the names: the next run tries again
    and resumes any order in flight. Retrying is safe.
    """


class ACMETimeout(ACMEError, TimeoutError):
    """An authorization or order did not progress before the polling deadline.

    The order is kept and resumed by the next run. Retrying is safe.
    """


class ChallengeError(ACMEError):
    """A challenge could not be set up locally, or the server failed to validate it.

    A setup failure (a port in use, a webroot that is not writable, a DNS
    hook that failed) happens before any order is placed. A validation
    failure carries the server's ``problem_type`` and is recorded, so the
    names back off. Retrying is safe once the cause is fixed.
    """


class RenewalBackoff(ACMEError):
    """Earlier attempts for these names failed, and the backoff has not elapsed.

    Nothing was sent to the ACME server. ``next_attempt`` is the earliest
    time of the next attempt and ``failures`` the number of consecutive
    failures. Retry after ``next_attempt``, or pass ``force=True``.
    """

    def __init__(
        self,
        message: str,
        *,
        next_attempt: datetime,
        failures: int,
        domains: Sequence[str] = (),
        lock_name: str | None = None,
    ) -> None:
        super().__init__(message, domains=domains, lock_name=lock_name)
        self.next_attempt = next_attempt
        self.failures = failures


def translate(
    exc: BaseException,
    action: str,
    *,
    domains: Sequence[str] = (),
    order_url: str | None = None,
    lock_name: str | None = None,
) -> ACMEError:
    """Return the ACMEError for ``exc``, raised while doing ``action``.

    ``action`` completes the sentence "... failed", for example "placing
    the order for example.com". The caller raises the result ``from exc``.
    """
    if isinstance(exc, ACMEError):
        return exc

    def context(
        kind: type[ACMEError], message: str, problem: str | None = None
    ) -> ACMEError:
        return kind(
            message,
            problem_type=problem,
            domains=domains,
            order_url=order_url,
            lock_name=lock_name,
        )

    if isinstance(exc, messages.Error):
        return context(
            ACMEError,
            f"{action} failed: the ACME server answered {_describe_problem(exc)}",
            exc.typ,
        )
    if isinstance(exc, requests.exceptions.SSLError):
        return context(
            ACMEUnavailable,
            f"{action} failed: the TLS connection to the ACME server could not be"
            f" verified ({exc}). Pass ca_bundle= with the PEM file of the CA that"
            " signed the server's certificate if it is a private CA.",
        )
    if isinstance(exc, requests.exceptions.RequestException):
        return context(
            ACMEUnavailable,
            f"{action} failed: the ACME server could not be reached ({exc})."
            " Check the directory URL and the network, then try again.",
        )
    if isinstance(exc, acme_errors.ConflictError):
        return context(
            ACMEError,
            f"{action} failed: the ACME server answered 409 Conflict",
            _PROBLEM_PREFIX + "conflict",
        )
    if isinstance(exc, (acme_errors.ClientError, jose_errors.DeserializationError)):
        return context(
            ACMEUnavailable,
            f"{action} failed: the ACME server sent an unexpected response"
            f" ({_short(exc)}). Check that the directory URL names an ACME"
            " directory.",
        )
    return context(ACMEError, f"{action} failed: {_short(exc)}")


def _describe_problem(problem: messages.Error) -> str:
    text = problem.typ
    if problem.detail:
        text += f": {problem.detail}"
    for sub in problem.subproblems or ():
        name = sub.identifier.value if sub.identifier is not None else "?"
        text += f"; {name}: {sub.typ}"
        if sub.detail:
            text += f" ({sub.detail})"
    return text


def _short(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."

"""One ACME order, from placement or resumption to a downloaded chain.

Rules (RFC 8555 section 7.1.6 gives the order states):

- The new private key and CSR are stored before the newOrder request, and
  the order URL right after it, so a killed run resumes the same order.
- A stored order is resumed by its status: ``pending`` continues with the
  authorizations, ``ready`` is finalized, ``processing`` is polled,
  ``valid`` is downloaded. An ``invalid`` or expired order, or one the
  server no longer has, is dropped and a new one placed.
- ``lease.ensure_held()`` runs right before the newOrder request and right
  before the finalize request, so a writer that lost its lock stops before
  either.
- An order that became invalid is dropped from the state before the error
  propagates, because it can never produce a certificate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import requests
from acme import errors as acme_errors
from acme import messages

from singlewriter._errors import SingleWriterError
from singlewriter._lease import Lease

from ._challenges import ChallengeItem
from ._client import Connection
from ._errors import CLIENT_ERRORS, ACMEError, ChallengeError, translate
from ._keys import (
    IssuedChain,
    generate_key,
    key_matches,
    make_csr,
    missing_names,
    split_chain,
)
from ._options import Options
from ._poll import Poller
from ._state import InFlightOrder, LineageState

__all__ = ["Issued", "OrderFlow"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

_PROBLEM = "urn:ietf:params:acme:error:"

# Problems a newOrder with ``replaces`` gets when the server cannot use the
# predecessor. Pebble v2.10 (wfe.validateReplacementOrder) returns malformed
# for an identifier it cannot parse or whose issuer it does not know,
# unauthorized for a certificate of another account and serverInternal for
# a serial it never issued. The order is then placed without ``replaces``.
_RETRY_WITHOUT_REPLACES = frozenset(
    _PROBLEM + code for code in ("malformed", "unauthorized", "serverInternal")
)

# Problems that mean a stored order can never be fetched again: the server
# forgot it (RFC 8555 section 6.7 gives no "not found" type; Pebble and
# Boulder return 404 with malformed) or it belongs to another account.
_ORDER_GONE = frozenset(_PROBLEM + code for code in ("malformed", "unauthorized"))


@dataclass(frozen=True)
class Issued:
    """A downloaded certificate chain with the private key it was issued for."""

    chain: IssuedChain
    key_pem: bytes
    order_url: str


@dataclass
class _ActiveOrder:
    url: str
    body: messages.Order
    request: InFlightOrder


def _order_gone(exc: BaseException) -> bool:
    """Return whether ``exc`` shows that an order URL will never work again."""
    if isinstance(exc, messages.Error):
        return exc.typ in _ORDER_GONE
    # acme raises ClientError(response) for an error without a problem
    # document, such as a plain 404 page.
    if isinstance(exc, acme_errors.ClientError) and exc.args:
        response = exc.args[0]
        return isinstance(response, requests.Response) and response.status_code == 404
    return False


class OrderFlow:
    """Carries one order through its states; see the module docstring."""

    def __init__(
        self,
        connection: Connection,
        options: Options,
        state: LineageState,
        lease: Lease,
        reregister: Callable[[], None],
    ) -> None:
        self.connection = connection
        self.options = options
        self.state = state
        self.lease = lease
        self._reregister = reregister

    # The whole flow.

    def obtain(self, in_flight: InFlightOrder | None, replaces: str | None) -> Issued:
        """Resume ``in_flight`` if possible, else place an order; return the chain."""
        order = None
        if in_flight is not None and in_flight.order_url is not None:
            order = self._resume(in_flight)
            in_flight = None

        if order is None:
            order = self._place(in_flight, replaces)

        self._authorize(order)
        self._finalize(order)
        return self._download(order)

    # Placing and resuming.

    def _place(
        self, staged: InFlightOrder | None, replaces: str | None
    ) -> _ActiveOrder:
        options = self.options
        if staged is None:
            key_pem = generate_key(options.key_type)
            staged = InFlightOrder(
                directory_url=options.directory_url,
                domains=options.domains,
                key_type=options.key_type,
                key_pem=key_pem,
                csr_pem=make_csr(key_pem, options.domains),
                created=options.now(),
                replaces=replaces,
            )
            self.state.save_order(staged)
        options.step("key-persisted")

        self.lease.ensure_held()
        replaces = staged.replaces
        with self._translating("placing the order"):
            url, body, replaced = self._with_account(lambda: self._new_order(replaces))

        # NOTE: a process killed between the newOrder response and this write
        # leaves an order the next run does not know, so it places another.
        staged = dataclasses.replace(staged, order_url=url, replaces=replaced)
        self.state.save_order(staged)
        log.info(
            "placed order %s for %s%s",
            url,
            ", ".join(options.domains),
            f" replacing certificate {replaced}" if replaced else "",
        )
        options.step("order-placed")
        return _ActiveOrder(url, body, staged)

    def _new_order(
        self, replaces: str | None
    ) -> tuple[str, messages.Order, str | None]:
        options = self.options
        try:
            url, body = self.connection.new_order(
                options.domains, replaces=replaces, profile=options.profile
            )
            return url, body, replaces
        except acme_errors.ConflictError:
            # acme 5.x turns every 409 into ConflictError without the problem
            # document; on newOrder, RFC 9773 section 5 gives 409 to
            # alreadyReplaced only.
            if replaces is None:
                raise
            reason = "it was already replaced (alreadyReplaced)"
        except messages.Error as exc:
            if replaces is None or exc.typ not in _RETRY_WITHOUT_REPLACES:
                raise
            reason = f"the server rejected it ({exc.typ})"

        log.warning(
            "new order for %s could not name certificate %s as its predecessor"
            " because %s; ordering without 'replaces'",
            ", ".join(options.domains),
            replaces,
            reason,
        )
        url, body = self.connection.new_order(
            options.domains, replaces=None, profile=options.profile
        )
        return url, body, None

    def _resume(self, request: InFlightOrder) -> _ActiveOrder | None:
        url = request.order_url
        assert url is not None
        try:
            body, _ = self._with_account(lambda: self.connection.fetch_order(url))
        except SingleWriterError:
            raise
        except CLIENT_ERRORS as exc:
            if not _order_gone(exc):
                raise self._error(exc, f"fetching order {url} to resume it") from exc
            log.warning("cannot resume order %s (%s); placing a new one", url, exc)
            self.state.clear_order()
            return None

        expired = body.expires is not None and body.expires <= self.options.now()
        if body.status == messages.STATUS_INVALID or expired:
            log.warning(
                "cannot resume order %s: it is %s; placing a new one",
                url,
                "expired" if expired else "invalid",
            )
            self.state.clear_order()
            return None

        log.info("resuming order %s (%s)", url, body.status)
        self.options.step("order-resumed")
        return _ActiveOrder(url, body, request)

    # Authorizations.

    def _authorize(self, order: _ActiveOrder) -> None:
        pending = []
        for url in order.body.authorizations:
            with self._translating(f"fetching authorization {url}", order):
                authorization, _ = self.connection.fetch_authorization(url)
            status = authorization.body.status
            if status == messages.STATUS_VALID:
                continue
            if status != messages.STATUS_PENDING:
                raise self._dead_order(order, self._authorization_error(authorization))
            pending.append((authorization, self._pick_challenge(authorization)))

        if pending:
            self._fulfil(order, pending)
        self.options.step("authorized")

    def _fulfil(
        self,
        order: _ActiveOrder,
        pending: list[tuple[messages.AuthorizationResource, messages.ChallengeBody]],
    ) -> None:
        challenge = self.options.challenge
        account_key = self.connection.account_key()
        presented: list[ChallengeItem] = []
        try:
            answers = []
            for authorization, body in pending:
                answer, validation = body.chall.response_and_validation(account_key)
                item = ChallengeItem(
                    domain=authorization.body.identifier.value,
                    token=body.chall.encode("token"),
                    validation=str(validation),
                )
                challenge.present(item)
                presented.append(item)
                answers.append((body, answer))
            challenge.wait_ready(presented, self.options.sleep)

            for body, answer in answers:
                # A challenge sent before a crash is already processing.
                if body.status == messages.STATUS_PENDING:
                    with self._translating(f"answering challenge {body.uri}", order):
                        self.connection.answer(body, answer)
            for authorization, _ in pending:
                self._await_authorization(order, authorization)
        finally:
            for item in presented:
                challenge.cleanup(item)

    def _pick_challenge(
        self, authorization: messages.AuthorizationResource
    ) -> messages.ChallengeBody:
        wanted = self.options.challenge.challenge_type
        offered = [body.chall.typ for body in authorization.body.challenges]
        for body in authorization.body.challenges:
            if body.chall.typ == wanted:
                return body
        name = authorization.body.identifier.value
        raise ChallengeError(
            f"the CA offers no {wanted} challenge for {name} (it offers"
            f" {', '.join(offered) or 'none'}); use a challenge of one of those types",
            domains=self.options.domains,
        )

    def _await_authorization(
        self, order: _ActiveOrder, authorization: messages.AuthorizationResource
    ) -> None:
        name = authorization.body.identifier.value
        poller = self._poller(f"the authorization of {name}")
        while True:
            with self._translating(f"polling the authorization of {name}", order):
                current, response = self.connection.fetch_authorization(
                    authorization.uri
                )
            status = current.body.status
            if status == messages.STATUS_VALID:
                log.info("the CA validated %s", name)
                return
            if status != messages.STATUS_PENDING:
                raise self._dead_order(order, self._authorization_error(current))
            poller.wait(response)

    def _authorization_error(
        self, authorization: messages.AuthorizationResource
    ) -> ChallengeError:
        name = authorization.body.identifier.value
        problem = None
        for body in authorization.body.challenges:
            if body.error is not None:
                problem = body.error
        detail = f": {problem.typ}: {problem.detail}" if problem is not None else ""
        return ChallengeError(
            f"the CA could not validate {name} (authorization"
            f" {authorization.body.status}){detail}. Check that the challenge is"
            " reachable by the CA, then run again after the backoff or with force",
            problem_type=problem.typ
            if problem is not None
            else _PROBLEM + "unauthorized",
            domains=self.options.domains,
        )

    # Finalizing and downloading.

    def _finalize(self, order: _ActiveOrder) -> None:
        poller = self._poller("the order")
        with self._translating(f"fetching order {order.url}", order):
            order.body, response = self.connection.fetch_order(order.url)

        while order.body.status != messages.STATUS_VALID:
            status = order.body.status
            if status == messages.STATUS_INVALID:
                raise self._dead_order(order, self._order_error(order))
            if status == messages.STATUS_READY:
                self.lease.ensure_held()
                with self._translating(f"finalizing order {order.url}", order):
                    order.body, response = self._send_finalize(order)
                self.options.step("finalize-sent")
                continue

            poller.wait(response)
            with self._translating(f"polling order {order.url}", order):
                order.body, response = self.connection.fetch_order(order.url)

    def _send_finalize(
        self, order: _ActiveOrder
    ) -> tuple[messages.Order, requests.Response]:
        try:
            return self.connection.finalize(order.body, order.request.csr_pem)
        except messages.Error as exc:
            # A finalize that raced with the order leaving "ready" (for
            # example a retry of a request whose reply was lost) is not fatal.
            if exc.typ != _PROBLEM + "orderNotReady":
                raise
            return self.connection.fetch_order(order.url)

    def _download(self, order: _ActiveOrder) -> Issued:
        certificate_url = order.body.certificate
        if certificate_url is None:
            raise ACMEError(
                f"order {order.url} is valid but names no certificate URL"
                " (RFC 8555 section 7.1.3); report this to the CA",
                domains=self.options.domains,
                order_url=order.url,
            )
        with self._translating(f"downloading certificate {certificate_url}", order):
            chain = split_chain(self.connection.download(certificate_url))

        request = order.request
        missing = missing_names(chain.certificate, self.options.domains)
        if missing or not key_matches(request.key_pem, chain.certificate):
            raise self._dead_order(
                order,
                ACMEError(
                    f"the certificate of order {order.url} does not match the"
                    " request: "
                    + (
                        f"it lacks {', '.join(missing)}"
                        if missing
                        else "its key differs"
                    ),
                    domains=self.options.domains,
                    order_url=order.url,
                ),
            )
        log.info(
            "downloaded certificate %s for %s, valid until %s",
            certificate_url,
            ", ".join(self.options.domains),
            chain.certificate.not_valid_after_utc,
        )
        self.options.step("downloaded")
        return Issued(chain=chain, key_pem=request.key_pem, order_url=order.url)

    def _order_error(self, order: _ActiveOrder) -> ACMEError:
        problem = order.body.error
        detail = f": {problem.typ}: {problem.detail}" if problem is not None else ""
        return ACMEError(
            f"order {order.url} became invalid{detail}",
            problem_type=problem.typ
            if problem is not None
            else _PROBLEM + "orderInvalid",
            domains=self.options.domains,
            order_url=order.url,
        )

    # Helpers.

    def _poller(self, what: str) -> Poller:
        options = self.options
        return Poller(
            what,
            deadline=options.monotonic() + options.poll_timeout,
            monotonic=options.monotonic,
            now=options.now,
            sleep=options.sleep,
        )

    def _with_account(self, call: Callable[[], _T]) -> _T:
        """Run ``call``; if the CA forgot the account, register and retry once."""
        try:
            return call()
        except messages.Error as exc:
            if exc.typ != _PROBLEM + "accountDoesNotExist":
                raise
        self._reregister()
        return call()

    def _dead_order(self, order: _ActiveOrder, error: ACMEError) -> ACMEError:
        self.state.clear_order()
        error.order_url = order.url
        return error

    def _error(
        self, exc: BaseException, action: str, order: _ActiveOrder | None = None
    ) -> ACMEError:
        return translate(
            exc,
            action,
            domains=self.options.domains,
            order_url=order.url if order is not None else None,
        )

    @contextlib.contextmanager
    def _translating(
        self, action: str, order: _ActiveOrder | None = None
    ) -> Iterator[None]:
        try:
            yield
        except SingleWriterError:
            raise
        except CLIENT_ERRORS as exc:
            raise self._error(exc, action, order) from exc

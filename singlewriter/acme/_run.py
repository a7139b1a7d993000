"""One renewal under a held lease: decide, back off, obtain, commit.

The steps, in order:

1. Read the store's current set and decide whether it is due (``_policy``),
   asking the CA for its renewal window when it offers ARI. Another writer
   may have renewed while this one waited for the lock, so this decision
   is made under the lock.
2. Unless forced, refuse while the names are backing off after failures.
3. Resume the stored order, or place a new one that names the current
   certificate in ``replaces``; respond to the challenges, finalize, download
   (``_order``).
4. Commit to the store with the lease's token and clear the order and
   failure state, with termination signals deferred until the commit, its
   deploy hooks and the clearing are done.

A failure that the CA reported is recorded in the state directory, and the
names back off exponentially (``_policy.backoff_delay``).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from cryptography import x509

from singlewriter._errors import SingleWriterError, StoreError
from singlewriter._lease import Lease
from singlewriter.keystore import KeyStore

from ._account import AccountStore, ensure_registered, reregister
from ._client import ARI_DEFAULT_RETRY, Connection, RenewalInfo, cert_id, connect
from ._errors import (
    CLIENT_ERRORS,
    ACMEError,
    ACMEUnavailable,
    RenewalBackoff,
    translate,
)
from ._interrupt import SignalGuard
from ._keys import missing_names
from ._options import Options
from ._order import Issued, OrderFlow
from ._policy import CurrentSet, Decision, backoff_delay, decide
from ._result import RenewalResult
from ._state import CachedWindow, FailureRecord, InFlightOrder, LineageState

__all__ = ["Renewal"]

log = logging.getLogger(__name__)


class Renewal:
    """One renewal under a held lease; see the module docstring."""

    def __init__(
        self,
        options: Options,
        lease: Lease,
        store: KeyStore,
        accounts: AccountStore,
        state: LineageState,
        guard: SignalGuard,
    ) -> None:
        self.options = options
        self.lease = lease
        self.store = store
        self.accounts = accounts
        self.state = state
        self.guard = guard
        self._connection: Connection | None = None

    def run(self) -> RenewalResult:
        options = self.options
        current = self._read_current()
        in_flight = self._load_in_flight()
        decision = self._decide(current)
        options.step("decided")

        if not decision.due and not options.force:
            return self._not_due(current, decision, in_flight)

        reason = decision.reason if decision.due else "renewal forced"
        log.info("renewing %s: %s", ", ".join(options.domains), reason)
        if not options.force:
            self._check_backoff()

        issued = self._obtain(current, in_flight)
        generation = self._commit(issued)
        return RenewalResult(
            renewed=True,
            reason=reason,
            generation=generation,
            token=self.lease.token,
            not_after=issued.chain.certificate.not_valid_after_utc,
            order_url=issued.order_url,
        )

    # Deciding.

    def _read_current(self) -> CurrentSet | None:
        # A damaged or unreadable current set counts as due: committing a new
        # set is what repairs it, so it must never block the renewal.
        try:
            snapshot = self.store.read_current()
        except StoreError as exc:
            log.warning(
                "the current set of %s cannot be read (%s); renewing it",
                self.store.path,
                exc,
            )
            return None
        if snapshot is None:
            return None
        generation, files = snapshot
        try:
            certificate = x509.load_pem_x509_certificate(files["cert.pem"])
            key_pem = files["privkey.pem"]
        except (KeyError, ValueError) as exc:
            log.warning(
                "the current set of %s cannot be read (%s); renewing it",
                self.store.path,
                exc,
            )
            return None
        return CurrentSet(
            certificate=certificate, key_pem=key_pem, generation=generation.sequence
        )

    def _load_in_flight(self) -> InFlightOrder | None:
        options = self.options
        in_flight = self.state.load_order()
        if in_flight is None:
            return None
        if not in_flight.matches(
            options.directory_url, options.domains, options.key_type
        ):
            log.info(
                "dropping the stored order %s: it was for other names or key type",
                in_flight.order_url,
            )
            self.state.clear_order()
            return None
        return in_flight

    def _decide(self, current: CurrentSet | None) -> Decision:
        options = self.options
        now = options.now()
        window = None
        expired = current is not None and now >= current.not_after
        if current is not None and options.use_ari and not expired:
            window = self._renewal_window(current, now)
        return decide(
            current,
            now,
            domains=options.domains,
            key_type=options.key_type,
            window=window,
            renew_fraction=options.renew_fraction,
            check_interval=options.check_interval,
        )

    def _renewal_window(self, current: CurrentSet, now: datetime) -> RenewalInfo | None:
        identifier = cert_id(current.certificate)
        if identifier is None:
            return None
        cached = self.state.load_window(identifier)
        if cached is not None and now < cached.next_fetch:
            return cached.window

        try:
            window = self.connection().renewal_info(current.certificate, now)
        except (ACMEError, *CLIENT_ERRORS) as exc:
            # RFC 9773 section 4.3.3: after a long-term error, fetch again
            # after six hours, and meanwhile renew on the fallback schedule.
            log.warning(
                "could not fetch the renewal window for %s from %s: %s; using"
                " renew_fraction until %s",
                identifier,
                self.options.directory_url,
                exc,
                now + timedelta(seconds=ARI_DEFAULT_RETRY),
            )
            window = None

        retry = window.retry_after if window is not None else ARI_DEFAULT_RETRY
        next_fetch = now + timedelta(seconds=retry)
        self.state.save_window(CachedWindow(identifier, window, next_fetch))
        if window is not None and window.explanation_url:
            log.info(
                "the CA explains the renewal window of %s at %s",
                identifier,
                window.explanation_url,
            )
        return window

    def _not_due(
        self,
        current: CurrentSet | None,
        decision: Decision,
        in_flight: InFlightOrder | None,
    ) -> RenewalResult:
        if in_flight is not None:
            # Another writer renewed while this order was in flight (or the
            # order was committed and the process died before clearing it).
            log.info(
                "dropping the stored order %s: the current certificate is not due",
                in_flight.order_url,
            )
            self.state.clear_order()
        log.info("%s: %s", ", ".join(self.options.domains), decision.reason)
        return RenewalResult(
            renewed=False,
            reason=decision.reason,
            generation=current.generation if current is not None else None,
            token=self.lease.token,
            not_after=current.not_after if current is not None else None,
            order_url=None,
            renew_at=decision.renew_at,
        )

    # Failures.

    def _check_backoff(self) -> None:
        record = self.state.load_failures()
        now = self.options.now()
        if record is None or now >= record.next_attempt:
            return
        raise RenewalBackoff(
            f"renewal of {', '.join(self.options.domains)} failed {record.failures}"
            f" time(s) in a row, last at {record.last_failure:%Y-%m-%d %H:%M:%S} UTC"
            f" ({record.last_error}); the next attempt is not before"
            f" {record.next_attempt:%Y-%m-%d %H:%M:%S} UTC. Fix the cause and pass"
            " force=True to try now.",
            next_attempt=record.next_attempt,
            failures=record.failures,
            domains=self.options.domains,
            lock_name=self.lease.name,
        )

    def _record_failure(self, error: ACMEError) -> None:
        now = self.options.now()
        previous = self.state.load_failures()
        failures = (previous.failures if previous is not None else 0) + 1
        # NOTE: a Retry-After sent with rateLimited is not seen here (acme
        # drops the response), so only the exponential schedule applies.
        record = FailureRecord(
            domains=self.options.domains,
            failures=failures,
            last_failure=now,
            next_attempt=now + backoff_delay(failures),
            last_error=str(error)[:500],
        )
        self.state.save_failures(record)
        log.warning(
            "renewal of %s failed (%d in a row); next attempt not before %s: %s",
            ", ".join(self.options.domains),
            failures,
            record.next_attempt,
            error,
        )

    # Issuing and committing.

    def _obtain(
        self, current: CurrentSet | None, in_flight: InFlightOrder | None
    ) -> Issued:
        options = self.options
        connection = self._registered_connection()
        flow = OrderFlow(connection, options, self.state, self.lease, self._reregister)
        replaces = self._replaces(current, connection)

        try:
            options.challenge.start()
            return flow.obtain(in_flight, replaces)
        except ACMEError as exc:
            exc.lock_name = self.lease.name
            # Only a problem the CA reported about these names counts towards
            # the backoff; a network failure leaves the order to be resumed.
            if exc.problem_type is not None and not isinstance(exc, ACMEUnavailable):
                self._record_failure(exc)
            raise
        finally:
            options.challenge.stop()

    def _replaces(
        self, current: CurrentSet | None, connection: Connection
    ) -> str | None:
        # RFC 9773 section 5: name the predecessor only when the CA offers
        # ARI and the predecessor shares at least one name with the order.
        if current is None or not connection.has_renewal_info:
            return None
        shared = set(self.options.domains) - set(
            missing_names(current.certificate, self.options.domains)
        )
        return cert_id(current.certificate) if shared else None

    def _commit(self, issued: Issued) -> int:
        files = {
            "privkey.pem": issued.key_pem,
            "cert.pem": issued.chain.cert_pem,
            "chain.pem": issued.chain.chain_pem,
            "fullchain.pem": issued.chain.fullchain_pem,
        }
        with self.guard.deferred():
            self.options.step("committing")
            self.lease.ensure_held()
            generation = self.store.commit(self.lease.token, files)
            # Still inside the deferral: a SIGTERM now must not leave the
            # committed order behind as if it were in flight.
            self.state.clear_order()
            self.state.clear_failures()
            self.options.step("committed")
        return generation.sequence

    # The ACME connection.

    def close(self) -> None:
        """Close the HTTP session of the ACME connection, if one was opened."""
        if self._connection is not None:
            self._connection.net.session.close()
            self._connection = None

    def connection(self) -> Connection:
        if self._connection is None:
            options = self.options
            try:
                self._connection = connect(
                    options.directory_url,
                    self.accounts.load_key(),
                    ca_bundle=options.ca_bundle,
                    user_agent=options.user_agent,
                    timeout=options.network_timeout,
                )
            except SingleWriterError:
                raise
            except CLIENT_ERRORS as exc:
                raise translate(
                    exc,
                    f"fetching the ACME directory {options.directory_url}",
                    domains=options.domains,
                    lock_name=self.lease.name,
                ) from exc
        return self._connection

    def _registered_connection(self) -> Connection:
        connection = self.connection()
        if connection.net.account is None:
            try:
                ensure_registered(connection, self.accounts, self.options.email)
            except SingleWriterError:
                raise
            except CLIENT_ERRORS as exc:
                raise translate(
                    exc,
                    f"registering the ACME account at {self.options.directory_url}",
                    domains=self.options.domains,
                    lock_name=self.lease.name,
                ) from exc
        return connection

    def _reregister(self) -> None:
        reregister(self.connection(), self.accounts, self.options.email)

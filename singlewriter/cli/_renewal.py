"""Options and the renewal attempt shared by ``renew`` and ``run``."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import shlex
import signal
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

from singlewriter import (
    ConfigError,
    Lock,
    LockBusy,
    LockLost,
    LockTimeout,
    StaleTokenError,
    Terminated,
    lock_from_url,
    raise_on_signals,
)
from singlewriter.keystore import KeyStore

from . import _exit
from ._advice import for_command_line
from ._hooks import CommandHook
from ._logging import redact, traceback_of
from ._metrics import add_metrics_options, open_metrics
from ._options import Options, fraction, ip_address, port, positive_seconds, seconds

__all__ = [
    "Outcome",
    "Renewer",
    "add_renewal_options",
    "load_acme",
    "lock_name",
    "outcome_of_error",
    "stop_on_signals",
]

log = logging.getLogger("singlewriter.cli")

# The key types renew() accepts (singlewriter.acme.KEY_TYPES), listed here
# so that --help shows them without importing the ACME client.
KEY_TYPES = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096")

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)

RENEWAL_EPILOG = """\
exit status:
  0    renewed, or not due yet; also after a commit that a signal
       interrupted in its deploy hook (the result line says so)
  1    the renewal failed (ACME, store or backend error), or the key
       store could not be opened
  2    invalid command line or environment variable
  75   the lock stayed held elsewhere for the whole --lock-timeout
  76   the lease was lost, or the store rejected this token as stale
  78   invalid configuration (lock URL, store path, option values)
  129, 130, 143  stopped by SIGHUP, SIGINT or SIGTERM (128 + signal
            number) before a commit; the lock was released"""


def add_renewal_options(options: Options) -> None:
    """Add the options of one renewal, shared by ``renew`` and ``run``."""
    _add_certificate_options(options)
    _add_acme_options(options)
    _add_lock_options(options)
    _add_challenge_options(options)
    _add_store_options(options)
    add_metrics_options(options)


def _add_certificate_options(options: Options) -> None:
    options.add(
        "--domain",
        "-d",
        multiple=True,
        required=True,
        metavar="NAME",
        help="a name to put in the certificate; repeat for several, the first is"
        " the subject",
    )
    options.add(
        "--lock",
        required=True,
        metavar="URL",
        help="lock URL: file:///DIR, redis://HOST:PORT/DB, consul://..., k8s://...",
    )
    options.add(
        "--name",
        metavar="NAME",
        help="lock name shared by every renewer of this certificate",
        show_default="the alphabetically first --domain without a leading '*.'",
    )
    options.add(
        "--store", required=True, type=Path, metavar="DIR", help="key store directory"
    )
    options.add(
        "--directory-url",
        required=True,
        metavar="URL",
        help="ACME directory URL of the certificate authority",
    )


def _add_acme_options(options: Options) -> None:
    options.add(
        "--account",
        required=True,
        type=Path,
        metavar="DIR",
        help="ACME account directory (key and registrations), created on first"
        " use; keep it on persistent storage so restarts reuse the account",
    )
    options.add(
        "--email", metavar="ADDRESS", help="contact address for the ACME account"
    )
    options.add(
        "--ca-bundle",
        type=Path,
        metavar="FILE",
        help="PEM bundle to verify the ACME server's TLS certificate with",
        show_default="the system's trust store",
    )
    options.add(
        "--key-type",
        choices=KEY_TYPES,
        default="ec-p256",
        help="type of the new private key",
    )
    options.add(
        "--renew-fraction",
        type=fraction,
        default=1 / 3,
        metavar="FRACTION",
        help="renew when at most this fraction of the lifetime is left, if the"
        " CA sends no renewal window",
        show_default="0.333",
    )
    options.add("--force", flag=True, help="renew even if the certificate is not due")


def _add_lock_options(options: Options) -> None:
    options.add(
        "--lock-timeout",
        type=seconds,
        metavar="SECONDS",
        help="how long to wait for the lock before giving up with status 75",
        show_default="wait without limit",
    )
    options.add(
        "--ttl",
        type=positive_seconds,
        default=60.0,
        metavar="SECONDS",
        help="lease time to live on the lock backend; renewed every ttl/3",
    )


def _add_challenge_options(options: Options) -> None:
    options.add(
        "--http01-port",
        type=port,
        default=80,
        metavar="PORT",
        help="port of the built-in HTTP-01 responder",
    )
    options.add(
        "--http01-address",
        metavar="ADDRESS",
        type=ip_address,
        help="IP address the built-in HTTP-01 responder binds",
        show_default="every address",
    )
    options.add(
        "--webroot",
        type=Path,
        metavar="DIR",
        help="complete HTTP-01 by writing files under DIR/.well-known/acme-challenge"
        " instead of the built-in responder",
    )
    options.add(
        "--dns-hook",
        metavar="COMMAND",
        help="complete DNS-01 by running COMMAND (split like a shell command line)"
        " to set and clear the TXT record; it gets SINGLEWRITER_ACME_ACTION"
        " (present or cleanup), SINGLEWRITER_ACME_RECORD_NAME and"
        " SINGLEWRITER_ACME_RECORD_VALUE in its environment",
    )
    options.add(
        "--dns-propagation-wait",
        type=seconds,
        default=0.0,
        metavar="SECONDS",
        help="wait this long after the DNS hook published the records, for DNS"
        " secondaries that lag behind",
    )


def _add_store_options(options: Options) -> None:
    options.add(
        "--passphrase-file",
        type=Path,
        metavar="FILE",
        help="file with a passphrase to encrypt the stored private key with",
    )
    options.add(
        "--deploy-hook",
        metavar="COMMAND",
        help="command to run after a new certificate is published, such as"
        " 'nginx -s reload' (split like a shell command line, no shell)",
    )
    options.add(
        "--deploy-hook-timeout",
        type=positive_seconds,
        default=300.0,
        metavar="SECONDS",
        help="kill the deploy hook after this long; SIGTERM, SIGHUP or SIGINT"
        " stop it sooner",
    )


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Raise Terminated on SIGTERM, SIGHUP and SIGINT within the block.

    ``renew()`` installs its own handlers while it runs (and defers the
    signals around a commit), then puts these back.
    """
    previous = {signum: signal.getsignal(signum) for signum in _STOP_SIGNALS}
    raise_on_signals(_STOP_SIGNALS)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def load_acme() -> ModuleType:
    """Import the ACME client; a seam that tests replace."""
    try:
        return importlib.import_module("singlewriter.acme")
    except ImportError as exc:
        raise ConfigError(
            f"the ACME client cannot be imported ({exc}); install it with"
            " pip install 'singlewriter[acme]'"
        ) from exc


def default_lock_name(domains: list[str]) -> str:
    """Check ``domains`` and return their lock name, as ``acme.renew`` derives it.

    The domains are validated first, so that an invalid name is reported as
    an invalid domain name rather than as an invalid lock name. Raise
    ConfigError for an invalid name.
    """
    from singlewriter.acme._domains import default_lock_name as derive_name
    from singlewriter.acme._domains import normalize_domains

    return derive_name(normalize_domains(domains))


def lock_name(args: argparse.Namespace) -> str:
    """Return the lock name: --name, or the one derived from the domains."""
    derived_name = default_lock_name(list(args.domain))
    return str(args.name or derived_name)


@dataclass(frozen=True)
class Outcome:
    """The result of one renewal attempt: exit status and one summary line."""

    status: int
    line: str
    renewed: bool = False
    not_after: datetime | None = None


class Renewer:
    """Everything one renewal needs, built once from the parsed options."""

    def __init__(self, args: argparse.Namespace, environ: Mapping[str, str]) -> None:
        self.args = args
        self.metrics = open_metrics(args)
        self.acme = load_acme()
        self.domains: list[str] = list(args.domain)
        # Checked even with --name, so a bad domain is reported as one.
        self.name: str = lock_name(args)
        self.lock: Lock = lock_from_url(args.lock, self.name, ttl=args.ttl)
        if self.metrics is not None:
            self.metrics.instrument(self.lock)
        self.hook = _deploy_hook(args, environ)

        # The hook is registered when the store opens, so a hook left
        # pending by a process killed right after its commit runs now.
        self.store = KeyStore(
            args.store,
            passphrase=_read_passphrase(args.passphrase_file),
            lock_name=self.name,
            hooks=[] if self.hook is None else [self.hook],
        )
        self.challenge = _challenge(self.acme, args)
        self._record_expiration(self.live_not_after())

    def close(self) -> None:
        """Stop serving metrics and write the textfile one last time."""
        if self.metrics is not None:
            self.metrics.close()

    def live_not_after(self) -> datetime | None:
        """Return notAfter of the published certificate, None if none is."""
        generation = self.store.current_generation()
        return None if generation is None else generation.not_after

    def current_sequence(self) -> int | None:
        """Return the sequence of the published generation, None if none is."""
        generation = self.store.current_generation()
        return None if generation is None else generation.sequence

    def committed_since(self, sequence: int | None) -> Outcome | None:
        """Return the renewed outcome if a generation after ``sequence`` is live.

        A signal during renew() waits for a commit that has begun, so after
        Terminated the new certificate may be live; None means it is not.
        """
        try:
            generation = self.store.current_generation()
        except Exception as exc:
            log.debug("store state after the signal is unknown: %s", exc)
            return None
        if generation is None or generation.sequence == sequence:
            return None
        line = (
            f"renewed {self.name}: generation {generation.sequence}, token"
            f" {generation.token}, expires {_iso(generation.not_after)}"
        )
        return Outcome(_exit.OK, line, renewed=True, not_after=generation.not_after)

    def renew_once(self, check_interval: float | None = None) -> Outcome:
        """Run one renewal and return its outcome; Terminated propagates.

        ``check_interval`` (seconds) is how often the caller checks, which
        the ACME client uses to renew early enough within an ARI window.
        """
        try:
            result = self.acme.renew(
                self.domains,
                lock=self.lock,
                store=self.store,
                directory_url=self.args.directory_url,
                account=self.args.account,
                challenge=self.challenge,
                key_type=self.args.key_type,
                email=self.args.email,
                ca_bundle=None
                if self.args.ca_bundle is None
                else str(self.args.ca_bundle),
                renew_fraction=self.args.renew_fraction,
                lock_name=self.name,
                lock_timeout=self.args.lock_timeout,
                ttl=self.args.ttl,
                force=bool(self.args.force),
                check_interval=check_interval,
            )
        except Terminated:
            raise
        except Exception as exc:
            outcome = outcome_of_error(exc, self.name)
            if outcome.status == _exit.FAILURE and self.metrics is not None:
                self.metrics.renewal_failed(self.name)
            self._record_expiration(self.live_not_after())
            return outcome

        outcome = _outcome_of_result(result, self.name)
        if outcome.renewed and self.metrics is not None:
            self.metrics.renewal_succeeded(self.name)
        self._record_expiration(outcome.not_after or self.live_not_after())
        return outcome

    def _record_expiration(self, not_after: datetime | None) -> None:
        if self.metrics is not None and not_after is not None:
            self.metrics.set_expiration(self.name, not_after)
        elif self.metrics is not None:
            self.metrics.flush()


def _outcome_of_result(result: Any, name: str) -> Outcome:
    not_after: datetime | None = getattr(result, "not_after", None)
    expires = "" if not_after is None else f", expires {_iso(not_after)}"
    if result.renewed:
        line = (
            f"renewed {name}: generation {_sequence(result.generation)},"
            f" token {result.token}{expires}"
        )
        return Outcome(_exit.OK, line, renewed=True, not_after=not_after)
    renew_at: datetime | None = getattr(result, "renew_at", None)
    planned = "" if renew_at is None else f", renewal planned at {_iso(renew_at)}"
    line = f"not due {name}: {result.reason}{expires}{planned}"
    return Outcome(_exit.OK, line, not_after=not_after)


def _sequence(generation: Any) -> Any:
    return getattr(generation, "sequence", generation)


def outcome_of_error(exc: BaseException, name: str) -> Outcome:
    """Map an error from a renewal to its exit status and summary line."""
    message = redact(for_command_line(str(exc), exc))
    if isinstance(exc, (LockTimeout, LockBusy)):
        log.warning("lock %r not acquired: %s", name, message)
        return Outcome(_exit.NOT_ACQUIRED, f"not acquired {name}: {message}")
    if isinstance(exc, (LockLost, StaleTokenError)):
        log.error("lock %r lost during the renewal: %s", name, message)
        return Outcome(_exit.LOST, f"lost {name}: {message}")
    if isinstance(exc, ConfigError):
        log.error("invalid configuration for %r: %s", name, message)
        return Outcome(_exit.CONFIG, f"invalid configuration {name}: {message}")
    log.error(
        "renewal of %r failed: %s", name, message, exc_info=traceback_of(log, exc)
    )
    return Outcome(_exit.FAILURE, f"failed {name}: {type(exc).__name__}: {message}")


def _deploy_hook(
    args: argparse.Namespace, environ: Mapping[str, str]
) -> CommandHook | None:
    if not args.deploy_hook:
        return None
    try:
        return CommandHook(
            args.deploy_hook, str(args.store), args.deploy_hook_timeout, environ
        )
    except ValueError as exc:
        raise ConfigError(
            f"--deploy-hook {args.deploy_hook!r} is invalid: {exc}"
        ) from exc


def _read_passphrase(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes().rstrip(b"\r\n")
    except OSError as exc:
        raise ConfigError(
            f"passphrase file {path} cannot be read: {exc.strerror}; check"
            " --passphrase-file"
        ) from exc


def _challenge(acme: ModuleType, args: argparse.Namespace) -> Any:
    chosen = [
        flag
        for flag, value in (("--webroot", args.webroot), ("--dns-hook", args.dns_hook))
        if value
    ]
    if len(chosen) > 1:
        raise ConfigError(f"{' and '.join(chosen)} exclude each other; give one")
    if args.webroot:
        return acme.HTTP01Webroot(args.webroot)
    if args.dns_hook:
        argv = shlex.split(args.dns_hook)
        if not argv:
            raise ConfigError("--dns-hook is empty; give a command")
        return acme.DNS01Hook(argv, args.dns_propagation_wait)
    if args.http01_address is None:
        return acme.HTTP01Standalone(args.http01_port)
    return acme.HTTP01Standalone(args.http01_port, args.http01_address)


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

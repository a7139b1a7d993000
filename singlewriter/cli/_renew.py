"""``singlewriter renew``: one renewal attempt with a one-line result."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping

from singlewriter import ConfigError, Terminated

from ._options import CommandParser, Options, print_line
from ._renewal import (
    RENEWAL_EPILOG,
    Renewer,
    add_renewal_options,
    lock_name,
    outcome_of_error,
    stop_on_signals,
)

__all__ = ["add_parser", "run"]

log = logging.getLogger("singlewriter.cli")


def add_parser(subparsers: argparse._SubParsersAction[CommandParser]) -> Options:
    """Add the ``renew`` command and return its options."""
    parser = subparsers.add_parser(
        "renew",
        help="renew the certificate once if it is due, under the lock",
        description=(
            "Take the lock, renew the certificate through ACME if it is due,"
            " commit it to the key store with the lease's fencing token, and"
            " print one line with the result."
        ),
        epilog=RENEWAL_EPILOG,
    )
    options = Options(parser)
    add_renewal_options(options)
    return options


def run(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """Renew once and print the result line; return the exit status."""
    with stop_on_signals():
        return _renew(args, environ)


def _renew(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    try:
        renewer = Renewer(args, environ)
    except (ConfigError, Terminated):
        raise
    except Exception as exc:
        # The store, lock or metrics could not be opened: still one result line.
        outcome = outcome_of_error(exc, lock_name(args))
        print_line(outcome.line)
        return outcome.status
    try:
        before = renewer.current_sequence()
        outcome = renewer.renew_once()
    except Terminated as exc:
        committed = renewer.committed_since(before)
        if committed is not None:
            # The signal waited for the commit; only the deploy hook was cut.
            line = f"{committed.line}; {_interruption(renewer, exc.signum)}"
            log.warning("%s", line)
            print_line(line)
            return committed.status
        log.warning("renewal of %r stopped by signal %d", renewer.name, exc.signum)
        print_line(f"terminated {renewer.name}: signal {exc.signum}")
        return int(exc.code or 1)
    finally:
        renewer.close()
    print_line(outcome.line)
    return outcome.status


def _interruption(renewer: Renewer, signum: int) -> str:
    hook = renewer.hook
    if hook is not None and hook.interrupted_by is not None:
        return (
            f"the deploy hook was stopped by signal {signum}; run it by hand to"
            " reload the new certificate"
        )
    return f"stopped by signal {signum} after the commit"

"""``singlewriter renew``: one renewal attempt with a one-line result."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping

from singlewriter import Terminated

from ._options import CommandParser, Options, print_line
from ._renewal import RENEWAL_EPILOG, Renewer, add_renewal_options, stop_on_signals

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
    renewer = Renewer(args, environ)
    try:
        outcome = renewer.renew_once()
    except Terminated as exc:
        log.warning("renewal of %r stopped by signal %d", renewer.name, exc.signum)
        print_line(f"terminated {renewer.name}: signal {exc.signum}")
        return int(exc.code or 1)
    finally:
        renewer.close()
    print_line(outcome.line)
    return outcome.status

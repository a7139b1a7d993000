"""``singlewriter check``: a health check for Docker and Kubernetes probes."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

from . import _exit
from ._certs import CertificateSet, Unhealthy, evaluate, load_files, load_store
from ._options import CommandParser, Options, days, print_line

__all__ = ["add_parser", "run"]

EPILOG = """\
exit status:
  0  healthy: key matches, names covered, at least --min-days left
  1  unhealthy, or invalid options (Docker HEALTHCHECK reserves 2)
Exactly one line on stdout gives the reason. The check takes no lock and writes
nothing, so it works on a read-only mount."""


def add_parser(subparsers: argparse._SubParsersAction[CommandParser]) -> Options:
    """Add the ``check`` command and return its options."""
    parser = subparsers.add_parser(
        "check",
        help="check that the live certificate is usable (exit 0 or 1)",
        description=(
            "Check the live certificate: present, matching its private key,"
            " valid now, covering every --domain and with at least --min-days"
            " left. Give --store, or --cert and --key."
        ),
        epilog=EPILOG,
    )
    parser.usage_status = _exit.UNHEALTHY
    options = Options(parser)
    options.add(
        "--store",
        type=Path,
        metavar="DIR",
        help="key store directory (or any directory with cert.pem and privkey.pem)",
    )
    options.add(
        "--cert",
        type=Path,
        metavar="FILE",
        help="certificate file, when not using --store; the first PEM is the leaf",
    )
    options.add("--key", type=Path, metavar="FILE", help="private key file for --cert")
    options.add(
        "--domain",
        "-d",
        multiple=True,
        default=[],
        metavar="NAME",
        help="a name the certificate must cover; repeat for several",
        show_default="no name check",
    )
    options.add(
        "--min-days",
        type=days,
        default=7.0,
        metavar="DAYS",
        help="unhealthy when fewer days than this are left; fractions allowed",
    )
    options.add(
        "--passphrase-file",
        type=Path,
        metavar="FILE",
        help="file with the passphrase of an encrypted private key",
    )
    return options


def run(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """Print one line saying whether the certificate is healthy; return 0 or 1."""
    try:
        loaded = _load(args)
    except Unhealthy as exc:
        print_line(f"unhealthy: {exc}")
        return _exit.UNHEALTHY

    health = evaluate(loaded, args.domain, args.min_days)
    print_line(health.line)
    return _exit.OK if health.healthy else _exit.UNHEALTHY


def _load(args: argparse.Namespace) -> CertificateSet:
    passphrase = _passphrase(args.passphrase_file)
    if args.store is not None:
        if args.cert is not None or args.key is not None:
            raise Unhealthy(
                "invalid options: give --store, or --cert and --key, not both"
            )
        return load_store(args.store, passphrase)
    if args.cert is None or args.key is None:
        raise Unhealthy("invalid options: give --store, or both --cert and --key")
    return load_files(args.cert, args.key, passphrase)


def _passphrase(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes().rstrip(b"\r\n")
    except OSError as exc:
        raise Unhealthy(
            f"passphrase file {path} cannot be read: {exc.strerror}"
        ) from None

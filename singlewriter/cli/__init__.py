"""The ``singlewriter`` command-line tool.

Commands: ``renew`` (once), ``run`` (loop), ``check`` (health check),
``status`` (lock and store), ``exec`` (run a command under the lock) and
``demo``. Each command lives in its own module; this one builds the parser,
fills options from SINGLEWRITER_* variables and maps errors to exit
statuses.
"""

from __future__ import annotations

import argparse
import logging
import textwrap
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType

from singlewriter import ConfigError, Terminated, __version__

from . import _check, _demo, _exec, _exit, _renew, _run, _status
from ._advice import for_command_line
from ._logging import LEVELS, configure, redact, traceback_of
from ._options import (
    ENVIRONMENT_EPILOG,
    CommandParser,
    Options,
    environment,
    print_line,
)

__all__ = ["main"]

log = logging.getLogger("singlewriter.cli")

_COMMANDS: tuple[ModuleType, ...] = (_renew, _run, _check, _status, _exec, _demo)


def build_parser() -> tuple[CommandParser, dict[str, Options]]:
    """Return the parser and, per command name, its environment-aware options."""
    parser = CommandParser(
        prog="singlewriter",
        description=(
            "Renew certificates with one writer at a time: fencing-token locks"
            " and a crash-safe key store."
        ),
        epilog=ENVIRONMENT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}"
    )
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=CommandParser
    )

    by_command: dict[str, Options] = {}
    for module in _COMMANDS:
        options: Options = module.add_parser(subparsers)
        command_parser = options.parser
        # Raw formatting keeps the epilog's tables; the description is
        # wrapped here instead.
        command_parser.formatter_class = argparse.RawDescriptionHelpFormatter
        command_parser.description = textwrap.fill(command_parser.description or "", 79)
        command_parser.epilog = f"{command_parser.epilog or ''}\n\n{ENVIRONMENT_EPILOG}"
        options.add(
            "--log-level",
            choices=LEVELS,
            default="info",
            help="lowest level of log lines written to stderr",
        )
        by_command[command_parser.prog.split()[-1]] = options
    return parser, by_command


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``singlewriter`` command line and return its exit status."""
    environ = environment()
    parser, by_command = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return _exit.USAGE
        by_command[args.command].resolve(args, environ)
    except SystemExit as exc:
        return _exit_code(exc)

    configure(args.log_level)
    command: Callable[[argparse.Namespace, Mapping[str, str]], int] = _runner(
        args.command
    )
    return _run_command(args.command, command, args, environ)


def _runner(name: str) -> Callable[[argparse.Namespace, Mapping[str, str]], int]:
    module = {
        "renew": _renew,
        "run": _run,
        "check": _check,
        "status": _status,
        "exec": _exec,
        "demo": _demo,
    }[name]
    runner: Callable[[argparse.Namespace, Mapping[str, str]], int] = module.run
    return runner


def _run_command(
    name: str,
    command: Callable[[argparse.Namespace, Mapping[str, str]], int],
    args: argparse.Namespace,
    environ: Mapping[str, str],
) -> int:
    try:
        return command(args, environ)
    except ConfigError as exc:
        message = redact(for_command_line(str(exc), exc))
        print_line(f"singlewriter {name}: error: {message}", error=True)
        return _exit.UNHEALTHY if name == "check" else _exit.CONFIG
    except Terminated as exc:
        log.info("singlewriter %s stopped by signal %d", name, exc.signum)
        return _exit.signal_status(exc.signum)
    except KeyboardInterrupt:
        return _exit.signal_status(2)
    except Exception as exc:
        # An error the command did not map to a status of its own, such as a
        # store that cannot be opened: one line, the traceback only at debug.
        message = redact(for_command_line(str(exc), exc))
        log.debug("singlewriter %s failed", name, exc_info=traceback_of(log, exc))
        print_line(
            f"singlewriter {name}: error: {type(exc).__name__}: {message}", error=True
        )
        return _exit.FAILURE


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return _exit.OK
    if isinstance(exc.code, int):
        return exc.code
    print_line(str(exc.code), error=True)
    return _exit.FAILURE

"""``singlewriter run``: the long-running renewal loop for a container.

Rules:

- Each check runs one renewal attempt; the next check comes after
  --interval seconds plus a random jitter of up to --jitter seconds, so
  replicas started together spread their checks out. After a failure the
  next check comes after --retry-interval instead.
- SIGTERM, SIGINT and SIGHUP stop the loop at once, also in the middle of
  a renewal: the exception unwinds through the lease's with-block, which
  releases the lock, and the process exits with 128 + the signal number.
- When another process publishes a new generation, the --deploy-hook runs
  here too, so every replica reloads its own server.
- Invalid configuration ends the loop with status 78; every other error
  is logged and retried.
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from collections.abc import Callable, Mapping

from singlewriter import Terminated

from . import _exit
from ._logging import redact
from ._options import CommandParser, Options, positive_seconds, seconds
from ._renewal import Outcome, Renewer, add_renewal_options, stop_on_signals

__all__ = ["add_parser", "run"]

log = logging.getLogger("singlewriter.cli")

_random = random.SystemRandom()

RUN_EPILOG = """\
exit status:
  The loop logs each failed check and tries again after --retry-interval;
  it ends only for these reasons:
  1    the key store, lock or metrics could not be opened at start
  2    invalid command line or environment variable, such as an
       --interval, --jitter or --retry-interval above 366 days
  78   invalid configuration (lock URL, store path, option values)
  129, 130, 143  stopped by SIGHUP, SIGINT or SIGTERM (128 + signal
            number); the lock was released"""

#: The longest --interval, --jitter and --retry-interval, in seconds (366
#: days). Longer waits exceed what datetime and time.sleep() accept, and no
#: certificate of a public CA lives longer than 398 days.
MAX_WAIT = 366 * 86400.0


def _wait(text: str) -> float:
    """Parse seconds from 0 to MAX_WAIT."""
    return _at_most_max_wait(text, seconds(text))


def _positive_wait(text: str) -> float:
    """Parse seconds above 0 and at most MAX_WAIT."""
    return _at_most_max_wait(text, positive_seconds(text))


def _at_most_max_wait(text: str, value: float) -> float:
    if value > MAX_WAIT:
        raise argparse.ArgumentTypeError(
            f"{text!r} is too long; use at most {MAX_WAIT:.0f} seconds (366 days)"
        )
    return value


#: The sleep between checks; tests replace it.
sleep: Callable[[float], None] = time.sleep


def add_parser(subparsers: argparse._SubParsersAction[CommandParser]) -> Options:
    """Add the ``run`` command and return its options."""
    parser = subparsers.add_parser(
        "run",
        help="check and renew in a loop, for a container entrypoint",
        description=(
            "Run renewal checks every --interval seconds until stopped."
            " SIGTERM stops it promptly and releases the lock."
        ),
        epilog=RUN_EPILOG,
    )
    options = Options(parser)
    add_renewal_options(options)
    options.add(
        "--interval",
        type=_positive_wait,
        default=3600.0,
        metavar="SECONDS",
        help="time between checks",
    )
    options.add(
        "--jitter",
        type=_wait,
        default=300.0,
        metavar="SECONDS",
        help="random extra delay of up to this long before each check",
    )
    options.add(
        "--retry-interval",
        type=_positive_wait,
        default=300.0,
        metavar="SECONDS",
        help="time before the next check after a failed one",
    )
    return options


def run(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """Check and renew until a signal arrives; return the exit status."""
    with stop_on_signals():
        return _run(args, environ)


def _run(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    renewer = Renewer(args, environ)
    log.info(
        "started renewal loop for %s: lock %r at %s, store %s, every %g s"
        " plus up to %g s of jitter",
        ", ".join(renewer.domains),
        renewer.name,
        redact(args.lock),
        args.store,
        args.interval,
        args.jitter,
    )
    try:
        return _loop(renewer, args)
    except Terminated as exc:
        log.info("stopped renewal loop for %r by signal %d", renewer.name, exc.signum)
        return int(exc.code or 1)
    finally:
        renewer.close()


def _loop(renewer: Renewer, args: argparse.Namespace) -> int:
    seen = _current_sequence(renewer)
    while True:
        outcome = renewer.renew_once(check_interval=args.interval)
        _log_outcome(outcome)
        if outcome.status == _exit.CONFIG:
            log.error(
                "stopped renewal loop for %r: invalid configuration", renewer.name
            )
            return outcome.status

        current = _current_sequence(renewer)
        if current != seen and not outcome.renewed:
            _run_hook_for_other(renewer, current)
        seen = current

        failed = outcome.status not in (_exit.OK, _exit.NOT_ACQUIRED)
        delay = args.retry_interval if failed else args.interval
        delay += _random.uniform(0, args.jitter)
        log.debug("next check of %r in %.0f s", renewer.name, delay)
        sleep(delay)


def _log_outcome(outcome: Outcome) -> None:
    if outcome.status == _exit.OK:
        log.info("%s", outcome.line)
    else:
        log.warning("%s", outcome.line)


def _current_sequence(renewer: Renewer) -> int | None:
    generation = renewer.store.current_generation()
    return None if generation is None else generation.sequence


def _run_hook_for_other(renewer: Renewer, sequence: int | None) -> None:
    generation = renewer.store.current_generation()
    if renewer.hook is None or generation is None:
        return
    log.info(
        "generation %s of %s was published by another process; running the"
        " deploy hook here too",
        sequence,
        renewer.store.path,
    )
    try:
        renewer.hook(generation)
    except Exception as exc:
        log.error("deploy hook for generation %s failed: %s", sequence, exc)

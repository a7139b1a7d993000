"""Exit statuses of the ``singlewriter`` commands.

The numbers follow sysexits.h where one fits (75 is EX_TEMPFAIL) and the
shell convention of 128 + N for a process ended by signal N.
"""

from __future__ import annotations

__all__ = [
    "CONFIG",
    "FAILURE",
    "LOST",
    "NOT_ACQUIRED",
    "OK",
    "UNAVAILABLE",
    "UNHEALTHY",
    "USAGE",
    "signal_status",
]

#: Renewed, not due, healthy, or the wrapped command succeeded.
OK = 0

#: A renewal or command failed; retrying later may help.
FAILURE = 1

#: ``check`` found the certificate unhealthy (Docker HEALTHCHECK reads 1).
UNHEALTHY = 1

#: Invalid command line or environment variable (argparse's status).
USAGE = 2

#: Invalid configuration found after parsing: lock URL, store path, values.
CONFIG = 78

#: A program or server the command needs is missing (EX_UNAVAILABLE).
UNAVAILABLE = 69

#: The lock stayed held by another process for the whole --timeout.
NOT_ACQUIRED = 75

#: The lease was lost, or a store rejected this process's token as stale,
#: so another process may hold the lock now.
LOST = 76


def signal_status(signum: int) -> int:
    """Return the status of a process ended by signal ``signum``."""
    return 128 + signum

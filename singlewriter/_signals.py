"""Turning SIGTERM into an exception so that held leases are released."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable
from types import FrameType

__all__ = ["Terminated", "raise_on_signals"]


class Terminated(SystemExit):
    """Raised in the main thread when a handled signal arrives.

    It derives from SystemExit, not Exception, so ``except Exception``
    blocks let it pass while ``with`` blocks and ``finally`` clauses still
    run and release their leases. Its exit code is 128 + the signal number.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


def raise_on_signals(
    signals: Iterable[int] = (signal.SIGTERM, signal.SIGHUP),
) -> None:
    """Install handlers that raise Terminated for ``signals``.

    Without this, Python's default SIGTERM action ends the process without
    running ``finally`` clauses, so a held lease stays taken until its ttl
    runs out (or, for flock, until the process is gone, which is at once).
    Call it from the main thread; signal handlers can only be set there.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            "raise_on_signals() must be called from the main thread, because"
            " Python only lets the main thread install signal handlers"
        )
    for signum in signals:
        signal.signal(signum, _raise_terminated)


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated(signum)

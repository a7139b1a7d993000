"""SIGTERM during a renewal: abandon an order, never a commit.

While ``renew()`` runs in the main thread, SIGTERM and SIGHUP raise
``singlewriter.Terminated`` (exit status 128 + signal number, so 143 for
SIGTERM), which unwinds through the ``finally`` blocks that stop the
challenge server and release the lock. The order state stays on disk, so
the next run resumes the order.

Around the commit the handlers only record the signal, SIGINT included.
The first recorded signal is delivered again once the commit and its
deploy hooks returned. Python runs signal handlers in the main thread only,
so a signal that the kernel delivers to another thread (the lease renewal
thread, for example) is still recorded by the main thread's handler.

Outside the main thread no handler can be installed, the signal keeps its
previous disposition, and a commit is not protected from it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

from singlewriter._signals import Terminated

__all__ = ["EXIT_TERMINATED", "SignalGuard", "terminate_on_signals"]

#: Exit status of a process that ``renew()`` stopped on SIGTERM (128 + 15).
EXIT_TERMINATED = 128 + signal.SIGTERM

_TERMINATING = (signal.SIGTERM, signal.SIGHUP)
_DEFERRED = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)

_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class SignalGuard:
    """Lets a block run to its end while termination signals wait."""

    def __init__(self, active: bool) -> None:
        self.active = active

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Run the block with termination signals recorded, then raise the first."""
        if not self.active:
            yield
            return

        received: list[int] = []

        def record(signum: int, frame: FrameType | None) -> None:
            received.append(signum)

        previous = _install(_DEFERRED, record)
        try:
            yield
        finally:
            _restore(previous)

        # Deliver the first recorded signal again, now that the handlers in
        # force before the block are back: Terminated for SIGTERM and SIGHUP,
        # KeyboardInterrupt for SIGINT, or whatever the caller installed.
        if received:
            signal.raise_signal(received[0])


@contextlib.contextmanager
def terminate_on_signals(enabled: bool) -> Iterator[SignalGuard]:
    """Raise Terminated on SIGTERM and SIGHUP within the block, in the main thread."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield SignalGuard(active=False)
        return

    previous = _install(_TERMINATING, _raise_terminated)
    try:
        yield SignalGuard(active=True)
    finally:
        _restore(previous)


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated(signum)


def _install(
    signums: tuple[signal.Signals, ...],
    handler: Callable[[int, FrameType | None], None],
) -> dict[signal.Signals, _Handler]:
    previous: dict[signal.Signals, _Handler] = {}
    for signum in signums:
        previous[signum] = signal.getsignal(signum)
        signal.signal(signum, handler)
    return previous


def _restore(previous: dict[signal.Signals, _Handler]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

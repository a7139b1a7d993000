"""Running the user's --deploy-hook command after a new certificate is live."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from types import FrameType

from singlewriter.keystore import Generation

__all__ = ["HOOK_NAME", "CommandHook", "HookInterrupted"]

log = logging.getLogger("singlewriter.cli")


class HookInterrupted(RuntimeError):
    """A stop signal arrived while the deploy hook ran, so the hook was stopped."""


class CommandHook:
    """A deploy hook that runs one command, split like a shell command line.

    The command runs without a shell; wrap it as ``sh -c '...'`` for shell
    syntax. It gets SINGLEWRITER_STORE, SINGLEWRITER_GENERATION and
    SINGLEWRITER_TOKEN (the token that committed the generation) in its
    environment, and its stdout goes to stderr, so that stdout keeps only
    the command's result line. A non-zero status, a timeout or a signal
    raises, which the store logs at ERROR; the hook is not retried.

    SIGTERM, SIGHUP or SIGINT during the hook stop its process group at once
    (SIGTERM, then SIGKILL after ``STOP_GRACE`` seconds) and
    ``interrupted_by`` records the signal. The signal still reaches the
    handler that was in force before.
    """

    #: Seconds between SIGTERM and SIGKILL when the hook is stopped.
    STOP_GRACE = 5.0

    def __init__(
        self,
        command: str,
        store: str,
        timeout: float,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.argv = shlex.split(command)
        if not self.argv:
            raise ValueError(
                "--deploy-hook is empty; give a command such as 'nginx -s reload'"
            )
        self.store = store
        self.timeout = timeout
        self.environ = dict(environ if environ is not None else os.environ)
        self.interrupted_by: int | None = None

    def __call__(self, generation: Generation) -> None:
        env = dict(self.environ)
        env.update(
            SINGLEWRITER_STORE=self.store,
            SINGLEWRITER_GENERATION=str(generation.sequence),
            SINGLEWRITER_TOKEN=str(generation.token),
        )
        log.info(
            "running deploy hook %s for generation %d",
            self.argv[0],
            generation.sequence,
        )
        # A process group of its own lets _stop() reach the hook's children
        # too, such as the commands of an 'sh -c' script.
        process = subprocess.Popen(
            self.argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=_stderr_fd(),
            start_new_session=True,
        )
        try:
            with _signals_recorded() as received:
                returncode = self._wait(process, received, generation)
        except BaseException:
            _stop(process, self.STOP_GRACE)
            raise
        if returncode != 0:
            raise RuntimeError(
                f"deploy hook {self.argv[0]} exited with status"
                f" {returncode} for generation {generation.sequence}"
            )
        log.info(
            "deploy hook %s finished for generation %d",
            self.argv[0],
            generation.sequence,
        )

    def _wait(
        self,
        process: subprocess.Popen[bytes],
        received: list[int],
        generation: Generation,
    ) -> int:
        deadline = time.monotonic() + self.timeout
        while True:
            if received:
                self.interrupted_by = received[0]
                _stop(process, self.STOP_GRACE)
                raise HookInterrupted(
                    f"deploy hook {self.argv[0]} was stopped by signal"
                    f" {received[0]} for generation {generation.sequence}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _stop(process, self.STOP_GRACE)
                raise RuntimeError(
                    f"deploy hook {self.argv[0]} timed out after {self.timeout:g} s"
                    f" for generation {generation.sequence}; raise"
                    " --deploy-hook-timeout if it needs longer"
                )
            try:
                return process.wait(timeout=min(remaining, _POLL_INTERVAL))
            except subprocess.TimeoutExpired:
                continue


# Seconds between checks for a signal while the hook runs.
_POLL_INTERVAL = 0.05

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


@contextlib.contextmanager
def _signals_recorded() -> Iterator[list[int]]:
    """Record stop signals in the yielded list, then call the previous handler.

    The previous handler may raise (Terminated outside a commit) or only
    record the signal itself (inside renew()'s commit). Outside the main
    thread no handler can be installed and nothing is recorded.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    previous = {signum: signal.getsignal(signum) for signum in _STOP_SIGNALS}

    def record(signum: int, frame: FrameType | None) -> None:
        handler = previous[signal.Signals(signum)]
        if handler == signal.SIG_IGN:
            return
        received.append(signum)
        if callable(handler):
            handler(signum, frame)

    for signum in _STOP_SIGNALS:
        signal.signal(signum, record)
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
    # A signal whose previous disposition was the default ends the process
    # as it would have without the hook, now that the hook is stopped.
    for number in received:
        if previous[signal.Signals(number)] == signal.SIG_DFL:
            signal.raise_signal(number)


def _stop(process: subprocess.Popen[bytes], grace: float) -> None:
    """Send SIGTERM to the hook's process group, then SIGKILL after ``grace`` s."""
    _signal_group(process, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace)
    # Children that outlived the hook itself get SIGKILL as well.
    _signal_group(process, signal.SIGKILL)
    process.wait()


def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)


def _stderr_fd() -> int:
    """Return the file descriptor of stderr, for the hook's stdout."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        # sys.stderr replaced by an object without a descriptor (a test's
        # capture): the process's own descriptor 2.
        return 2


#: The name the KeyStore registers the hook under: its module and qualified
#: class name. A process that opens the store after a crash runs a hook
#: that is still pending only under the same name, so renaming or moving
#: CommandHook leaves markers written before the change pending forever.
HOOK_NAME = f"{CommandHook.__module__}.{CommandHook.__qualname__}"

"""``singlewriter exec``: run any command while holding the lock.

Rules:

- The lock is awaited for up to --timeout seconds. SIGTERM, SIGINT or
  SIGHUP while waiting ends the wait at once: the command is never
  started and the status is 128 + the signal number.
- The command runs in a new session, so it leads its own process group.
  Its environment adds SINGLEWRITER_TOKEN (the lease's fencing token) and
  SINGLEWRITER_LOCK_NAME.
- SIGTERM, SIGINT and SIGHUP that reach exec while the command runs are
  forwarded to the whole group. If the group is still there --grace
  seconds later, it gets SIGKILL.
- If the lease is lost while the command runs, the group gets SIGTERM at
  once and SIGKILL after --grace seconds, and the status is 76. Another
  process may acquire the lock one ttl after the last renewal was sent,
  and the lease counts as lost safety_margin before that, so exec builds
  its lock with safety_margin = grace + margin_for(ttl): the group gets
  SIGTERM at least grace + margin, and SIGKILL at least margin, before
  another holder can acquire.
- When the command exits, processes it left in its group (a background
  job of a wrapped shell, say) get SIGTERM, then SIGKILL after --grace,
  before the lock is released, so none of them runs without the lock.
- The lock is released last, whatever happened before.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from types import FrameType

from singlewriter import (
    BackendUnavailable,
    ConfigError,
    Lease,
    Lock,
    LockBusy,
    LockTimeout,
    lock_from_url,
)

from . import _exit
from ._logging import redact
from ._options import CommandParser, Options, positive_seconds, seconds

__all__ = ["add_parser", "run"]

log = logging.getLogger("singlewriter.cli")

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

#: Status when the command cannot be executed or is not found (as in sh).
CANNOT_EXECUTE = 126
NOT_FOUND = 127

EPILOG = """\
exit status:
  the command's own status when it ran to the end with the lock held
  128+N  the command was killed by signal N, or exec got signal N while
         waiting for the lock (the command was then never started)
  75     the lock was not acquired within --timeout, or the backend did
         not answer; the command was not started
  76     the lease was lost while the command ran; the command's process
         group got SIGTERM, then SIGKILL after --grace seconds
  78     invalid configuration (lock URL, a --grace that leaves no time
         to renew within --ttl)
  126    the command could not be executed; 127: it was not found
A command that itself exits with 75 or 76 cannot be distinguished from
these; the log lines on stderr show which it was.

The command gets SINGLEWRITER_TOKEN (the fencing token) and
SINGLEWRITER_LOCK_NAME in its environment.

If the lease is lost, the command gets SIGTERM at least GRACE + margin
before another holder can acquire, and SIGKILL before that; margin is
max(ttl/10, 0.5) seconds. --grace must stay below 2*ttl/3 - margin so
that renewals every ttl/3 fit before the lease counts as lost.

example:
  singlewriter exec --lock file:///var/lib/singlewriter/locks \\
      --name example.com -- certbot renew"""


def add_parser(subparsers: argparse._SubParsersAction[CommandParser]) -> Options:
    """Add the ``exec`` command and return its options."""
    parser = subparsers.add_parser(
        "exec",
        help="run a command (certbot, for example) while holding the lock",
        description=(
            "Acquire the lock, run COMMAND in its own process group with the"
            " fencing token in SINGLEWRITER_TOKEN, and release the lock when"
            " it exits. Put -- before the command."
        ),
        epilog=EPILOG,
    )
    options = Options(parser)
    options.add(
        "--lock",
        required=True,
        metavar="URL",
        help="lock URL: file:///DIR, redis://HOST:PORT/DB, consul://..., k8s://...",
    )
    options.add("--name", required=True, metavar="NAME", help="lock name")
    options.add(
        "--ttl",
        type=positive_seconds,
        default=30.0,
        metavar="SECONDS",
        help="lease time to live on the backend; renewed every ttl/3",
    )
    options.add(
        "--timeout",
        type=seconds,
        metavar="SECONDS",
        help="how long to wait for the lock; 0 tries once",
        show_default="wait without limit",
    )
    options.add(
        "--grace",
        type=seconds,
        default=10.0,
        metavar="SECONDS",
        help="time between SIGTERM and SIGKILL for the command's process group;"
        " must be below 2*ttl/3 - max(ttl/10, 0.5)",
    )
    parser.add_argument(
        "argv",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND...",
        help="the command and its arguments",
    )
    return options


def run(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """Run the command under the lock; return the exit status."""
    command = list(args.argv)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise ConfigError("exec needs a command after --, such as -- certbot renew")
    margin = safety_margin(args.ttl, args.grace)
    renew_interval = args.ttl / 3
    if renew_interval >= args.ttl - margin:
        limit = max(0.0, args.ttl - renew_interval - (margin - args.grace))
        raise ConfigError(
            f"--grace {args.grace:g} s is too long for --ttl {args.ttl:g} s:"
            f" the lease must count as lost {margin:g} s (grace + margin) before"
            f" it expires, which leaves no time to renew every {renew_interval:g} s;"
            f" use a --grace below {limit:g} s or a longer --ttl"
        )

    lock = lock_from_url(args.lock, args.name, ttl=args.ttl, safety_margin=margin)
    signals = _Signals()
    signals.install()
    try:
        return _run_locked(lock, command, args, environ, signals)
    finally:
        signals.restore()


def safety_margin(ttl: float, grace: float) -> float:
    """Return the lock's safety_margin in seconds for exec's --ttl and --grace.

    The lease counts as lost safety_margin before another process can
    acquire, so the group gets SIGTERM then and SIGKILL grace seconds later,
    still max(ttl/10, 0.5) s before the lock can change hands.
    """
    return grace + max(ttl / 10, 0.5)


def _run_locked(
    lock: Lock,
    command: list[str],
    args: argparse.Namespace,
    environ: Mapping[str, str],
    signals: _Signals,
) -> int:
    lease = _acquire(lock, args.timeout, signals, args.lock)
    if not isinstance(lease, Lease):
        return lease

    try:
        if signals.received is not None:
            log.info("not starting %s: got signal %d", command[0], signals.received)
            return _exit.signal_status(signals.received)
        return _supervise(lease, command, args.grace, environ, signals)
    finally:
        lease.release()


def _acquire(
    lock: Lock, timeout: float | None, signals: _Signals, url: str
) -> Lease | int:
    """Return the lease, or the exit status when none was acquired."""
    lock.sleep = signals.interruptible_sleep
    log.info(
        "waiting for lock %r at %s%s",
        lock.name,
        redact(url),
        "" if timeout is None else f" for up to {timeout:g} s",
    )
    # A signal during one backend call takes effect when that call returns,
    # which the lock bounds by its operation_timeout.
    try:
        if signals.received is not None:
            raise _Interrupted
        return lock.acquire(timeout=timeout)
    except _Interrupted:
        assert signals.received is not None
        log.info(
            "stopped waiting for lock %r: got signal %d", lock.name, signals.received
        )
        return _exit.signal_status(signals.received)
    except (LockTimeout, LockBusy) as exc:
        log.error("lock %r not acquired: %s", lock.name, exc)
        return _exit.NOT_ACQUIRED
    except BackendUnavailable as exc:
        log.error("lock %r not acquired from %s: %s", lock.name, redact(url), exc)
        return _exit.NOT_ACQUIRED
    finally:
        lock.sleep = time.sleep


def _supervise(
    lease: Lease,
    command: list[str],
    grace: float,
    environ: Mapping[str, str],
    signals: _Signals,
) -> int:
    env = dict(environ)
    env["SINGLEWRITER_TOKEN"] = str(lease.token)
    env["SINGLEWRITER_LOCK_NAME"] = lease.name

    # NOTE: a process that leaves the group (setsid, setpgid) is not
    # stopped, and if exec itself is SIGKILLed the group keeps running
    # without the lock; only the token then fences its writes.
    try:
        process = subprocess.Popen(command, env=env, start_new_session=True)
    except FileNotFoundError:
        log.error("command %s not found", command[0])
        return NOT_FOUND
    except OSError as exc:
        # EACCES, ENOEXEC (no #! line) and the like, as a shell reports them.
        log.error("command %s cannot be executed: %s", command[0], exc.strerror)
        return CANNOT_EXECUTE
    log.info(
        "started %s as pid %d with lock %r, token %d",
        command[0],
        process.pid,
        lease.name,
        lease.token,
    )

    watch = _Watch(process, lease, signals)
    signals.start_forwarding(process.pid, watch.wake)
    try:
        lost = watch.wait(grace)
    finally:
        signals.stop_forwarding()
        if process.poll() is None:
            _signal_group(process.pid, signal.SIGKILL)
            process.wait()
        _stop_leftovers(process.pid, grace)

    if lost or not lease.held:
        log.error(
            "lease on lock %r (token %d) was lost while %s ran: %s",
            lease.name,
            lease.token,
            command[0],
            lease.lost_reason,
        )
        return _exit.LOST
    status = _status_of(process.returncode)
    log.info("%s exited with status %d", command[0], status)
    return status


def _status_of(returncode: int) -> int:
    if returncode < 0:
        return _exit.signal_status(-returncode)
    return returncode


class _Interrupted(Exception):
    """A handled signal arrived while waiting for the lock."""


class _Signals:
    """Handlers for the forwarded signals: record them, then forward them.

    Before the command starts, a signal is only recorded, and the sleep
    between lock attempts raises _Interrupted. While the command runs, a
    signal goes to its whole process group at once, from the handler.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.event = threading.Event()
        self.wake: threading.Event | None = None
        self._group: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for signum in FORWARDED_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]

    def interruptible_sleep(self, seconds: float) -> None:
        if self.event.wait(seconds):
            raise _Interrupted

    def start_forwarding(self, group: int, wake: threading.Event) -> None:
        # A signal that arrived between the last check and the start of the
        # command is forwarded now, so the command receives it too.
        self.wake = wake
        self._group = group
        if self.received is not None:
            _signal_group(group, self.received)
            wake.set()

    def stop_forwarding(self) -> None:
        self._group = None
        self.wake = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        self.event.set()
        group = self._group
        if group is not None:
            log.info("forwarding signal %d to process group %d", signum, group)
            _signal_group(group, signum)
        if self.wake is not None:
            self.wake.set()


class _Watch:
    """The wait for the command's exit, a lost lease or a forwarded signal."""

    def __init__(
        self, process: subprocess.Popen[bytes], lease: Lease, signals: _Signals
    ):
        self.process = process
        self.lease = lease
        self.signals = signals
        self.wake = threading.Event()
        self.lost = threading.Event()

        previous = lease.on_lost

        def on_lost(lost_lease: Lease) -> None:
            self.lost.set()
            self.wake.set()
            if previous is not None:
                previous(lost_lease)

        lease.on_lost = on_lost
        threading.Thread(
            target=self._reap, name="singlewriter-exec-wait", daemon=True
        ).start()

    def _reap(self) -> None:
        self.process.wait()
        self.wake.set()

    def wait(self, grace: float) -> bool:
        """Wait for the command to exit, sending SIGKILL after the grace period.

        Return whether the lease was lost.
        """
        group = self.process.pid
        kill_at: float | None = None
        killed = False
        while self.process.poll() is None:
            timeout = 1.0
            if kill_at is not None and not killed:
                timeout = max(0.0, kill_at - time.monotonic())
            self.wake.wait(timeout)
            self.wake.clear()
            if self.process.poll() is not None:
                break

            if kill_at is None and self.lost.is_set():
                log.warning(
                    "lease on lock %r lost; sending SIGTERM to process group %d,"
                    " SIGKILL in %g s",
                    self.lease.name,
                    group,
                    grace,
                )
                _signal_group(group, signal.SIGTERM)
                kill_at = time.monotonic() + grace
            elif kill_at is None and self.signals.event.is_set():
                kill_at = time.monotonic() + grace
            elif kill_at is not None and not killed and time.monotonic() >= kill_at:
                log.warning(
                    "process group %d outlived the grace period; sending SIGKILL",
                    group,
                )
                _signal_group(group, signal.SIGKILL)
                killed = True
        return self.lost.is_set()


def _signal_group(group: int, signum: int) -> bool:
    """Send ``signum`` to process group ``group``; return whether it exists."""
    try:
        os.killpg(group, signum)
    except ProcessLookupError:
        return False
    return True


def _stop_leftovers(group: int, grace: float) -> None:
    """Terminate what is left of the command's group after it exited."""
    if not _group_running(group):
        return

    log.warning(
        "processes of group %d are still running after the command ended;"
        " sending SIGTERM, SIGKILL in %g s",
        group,
        grace,
    )
    _signal_group(group, signal.SIGTERM)
    if _wait_group_gone(group, grace):
        return
    log.warning("process group %d outlived the grace period; sending SIGKILL", group)
    _signal_group(group, signal.SIGKILL)
    if not _wait_group_gone(group, 5.0):
        log.error("process group %d still runs 5 s after SIGKILL", group)


def _wait_group_gone(group: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _group_running(group):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def _group_running(group: int) -> bool:
    """Return whether a process of ``group`` runs; zombies do not count.

    Orphans of the group become children of this process when it is PID 1
    (a container entrypoint) or a subreaper, so they are reaped here. Other
    orphans are reaped by init, maybe later, which is why a zombie left in
    /proc does not count as running. Only called after the command itself
    was waited for, so reaping never steals its exit status.
    """
    _reap_group(group)
    if not _signal_group(group, 0):
        return False
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True
    return any(_runs_in_group(entry, group) for entry in entries if entry.isdigit())


def _runs_in_group(pid: str, group: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            stat = handle.read()
    except OSError:
        return False
    # proc(5): "pid (comm) state ppid pgrp ..."; comm may contain spaces and
    # parentheses, so split after the last ")".
    fields = stat.rsplit(")", 1)[-1].split()
    return len(fields) > 2 and fields[2] == str(group) and fields[0] != "Z"


def _reap_group(group: int) -> None:
    while True:
        try:
            pid, _ = os.waitpid(-group, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return

"""The ``single_writer`` decorator for jobs."""

from __future__ import annotations

import functools
import inspect
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from ._errors import LockBusy, LockTimeout
from ._lock import Lock
from ._urls import lock_from_url

__all__ = ["single_writer"]

log = logging.getLogger("singlewriter.job")

F = TypeVar("F", bound=Callable[..., Any])


def single_writer(
    lock: Lock | str,
    *,
    name: str | None = None,
    wait: bool = True,
    timeout: float | None = None,
    pass_lease: bool = False,
    check_at_end: bool = True,
    **options: Any,
) -> Callable[[F], F]:
    """Run the decorated job only while holding ``lock``.

    ``lock`` is a Lock or a URL (then ``name`` and ``options`` go to
    ``lock_from_url``, built on the first call). With ``wait`` the job waits
    up to ``timeout`` seconds, then raises LockTimeout. Without it, a busy
    lock makes the call return None at once, logged at INFO.
    ``pass_lease`` passes the Lease as the keyword argument ``lease``.
    The lease is released when the job returns or raises. With
    ``check_at_end`` a lease lost while the job ran raises LockLost after
    the job returns, because its result may have been computed without the
    lock.
    """

    def decorate(job: F) -> F:
        if inspect.iscoroutinefunction(job) or inspect.isasyncgenfunction(job):
            raise TypeError(
                f"single_writer cannot wrap async function {job.__qualname__};"
                " acquire the lock with asyncio.to_thread(lock.acquire) instead"
            )
        if inspect.isgeneratorfunction(job):
            # The body of a generator runs only when it is iterated, after
            # the wrapper has already released the lock.
            raise TypeError(
                f"single_writer cannot wrap generator function {job.__qualname__};"
                " hold the lock with `with lock as lease:` inside the generator"
            )
        resolved: list[Lock] = []
        guard = threading.Lock()

        def get_lock() -> Lock:
            with guard:
                if not resolved:
                    if isinstance(lock, Lock):
                        resolved.append(lock)
                    else:
                        resolved.append(lock_from_url(lock, name, **options))
                return resolved[0]

        @functools.wraps(job)
        def run(*args: Any, **kwargs: Any) -> Any:
            the_lock = get_lock()
            try:
                lease = the_lock.acquire(timeout=timeout, blocking=wait)
            except (LockBusy, LockTimeout) as exc:
                if wait:
                    raise
                log.info("skipped %s: %s", job.__qualname__, exc)
                return None

            with lease:
                if pass_lease:
                    kwargs["lease"] = lease
                result = job(*args, **kwargs)
                if check_at_end:
                    lease.ensure_held()
                return result

        return run  # type: ignore[return-value]

    return decorate

"""Reading the published set through the pointer, without any lock.

A reader opens ``..current`` once and reads every file through that
directory descriptor, so all files come from one generation even while
another process commits. A commit may also delete the generation that a reader has just
opened: it swaps the pointer first and prunes old generations afterwards.
The reader then finds files missing, sees that the pointer names another
directory now, and starts again with the new generation.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

from singlewriter._errors import StoreError

from ._layout import StoreLayout
from ._manifest import InvalidGeneration, open_directory

__all__ = ["READ_ATTEMPTS", "CurrentUnreadable", "read_published"]

# A reader starts again at most this many times. Each retry needs at least
# two commits during one read, the second of which deletes the generation.
# A commit fsyncs several times and usually takes longer than reading a few
# small files, so five failures in a row mean commits arrive faster than a
# read completes.
READ_ATTEMPTS = 5

T = TypeVar("T")


class CurrentUnreadable(Exception):
    """The generation the pointer still names is damaged or missing."""


def _replaced(layout: StoreLayout, fd: int) -> bool:
    """Return whether the pointer names another directory than ``fd`` now."""
    try:
        now = os.stat(layout.pointer)
    except OSError:
        return True
    opened = os.fstat(fd)
    return (now.st_dev, now.st_ino) != (opened.st_dev, opened.st_ino)


def read_published(layout: StoreLayout, read: Callable[[int], T]) -> T | None:
    """Call ``read`` with a descriptor of the current generation; return its result.

    Returns None when there is no pointer. Raises CurrentUnreadable when the
    generation that the pointer names is damaged or missing and the pointer
    did not move, and StoreError when every attempt found the generation
    replaced and deleted.
    """
    dangling: str | None = None
    for _ in range(READ_ATTEMPTS):
        try:
            fd = open_directory(layout.pointer)
        except FileNotFoundError:
            try:
                target = os.readlink(layout.pointer)
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise CurrentUnreadable(f"the pointer is unreadable: {exc}") from exc
            if target == dangling:
                raise CurrentUnreadable(
                    f"the pointer names {target}, which does not exist"
                ) from None
            dangling = target
            continue
        except OSError as exc:
            raise CurrentUnreadable(f"the pointer cannot be opened: {exc}") from exc

        try:
            return read(fd)
        except (InvalidGeneration, OSError) as exc:
            if not _replaced(layout, fd):
                raise CurrentUnreadable(str(exc)) from exc
        finally:
            os.close(fd)

    raise StoreError(
        f"the current generation of {layout.root} was replaced and deleted "
        f"{READ_ATTEMPTS} times while it was read, because other processes "
        "commit faster than a read completes: read again, or commit with a "
        "larger keep"
    )

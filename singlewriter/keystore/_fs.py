"""Filesystem primitives of the key store, and the injectable layer under them.

Rules every function here keeps:

* A file is created with ``O_CREAT | O_EXCL`` and its final mode, so a
  private key is never readable by others, not even for the first byte.
  A secret file's mode is checked with fstat and never changed afterwards.
* Every file is fsynced before it is renamed into place, and the directory
  is fsynced after the rename. Without the first fsync a crash can leave the
  new name pointing at an empty file; without the second the rename itself
  may be lost.
* A failed write, fsync or close fails the whole operation. An fsync is never
  retried: after a writeback error Linux may mark the dirty pages clean and
  report the error only once, so a second fsync can succeed for data that
  never reached the disk.
* Cleanup runs only in ``except Exception``. A simulated process death (any
  BaseException) leaves the filesystem exactly as a real crash would.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Union

from singlewriter._errors import ConfigError, StoreError

from ._layout import temp_name
from ._paths import path_argument

__all__ = [
    "FileSystem",
    "StrPath",
    "atomic_write",
    "create_file",
    "failure",
    "file_lock",
    "fsync_directory",
    "remove_quietly",
    "remove_tree",
    "replace_symlink",
    "store_lock",
]

logger = logging.getLogger(__name__)

StrPath = Union[str, "os.PathLike[str]"]

_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class FileSystem:
    """The system calls the key store makes to change files, one method each.

    The default implementation calls :mod:`os` directly. Tests subclass it to
    record the calls or to fail one of them. Reads that change nothing
    (readlink, listdir, read) go to :mod:`os` directly.
    """

    def open(self, path: StrPath, flags: int, mode: int = 0o777) -> int:
        return os.open(path, flags, mode)

    def write(self, fd: int, data: memoryview) -> int:
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def fstat(self, fd: int) -> os.stat_result:
        return os.fstat(fd)

    def fchmod(self, fd: int, mode: int) -> None:
        os.fchmod(fd, mode)

    def rename(self, source: StrPath, destination: StrPath) -> None:
        os.rename(source, destination)

    def unlink(self, path: StrPath) -> None:
        os.unlink(path)

    def symlink(self, target: str, path: StrPath) -> None:
        os.symlink(target, path)

    def mkdir(self, path: StrPath, mode: int) -> None:
        os.mkdir(path, mode)

    def rmdir(self, path: StrPath) -> None:
        os.rmdir(path)


def failure(action: str, path: StrPath, exc: OSError) -> StoreError:
    """Return a StoreError that names the failed action and path."""
    reason = exc.strerror or str(exc)
    return StoreError(f"{action} {os.fspath(path)} failed: {reason}")


def _close_quietly(fs: FileSystem, fd: int) -> None:
    with contextlib.suppress(OSError):
        fs.close(fd)


def remove_quietly(fs: FileSystem, path: StrPath) -> None:
    """Unlink ``path`` during cleanup, logging instead of raising."""
    try:
        fs.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.warning("Could not remove %s during cleanup: %s", path, exc)


def _write_all(fs: FileSystem, fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = fs.write(fd, view)
        if written <= 0:
            # A regular file reports a full disk as ENOSPC or a short write.
            # A write of 0 bytes would loop forever, so it counts as ENOSPC.
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]


def _check_mode(
    fs: FileSystem, fd: int, path: StrPath, mode: int, *, exact_mode: bool
) -> None:
    """Check the new file's mode, widening it only where that is allowed.

    The umask can only remove bits. A secret file that lost a bit is rejected
    rather than changed with fchmod, so its mode is never touched after
    creation. Any other file is widened back to ``mode``, which shows nothing
    more than the caller asked for.
    """
    actual = stat.S_IMODE(fs.fstat(fd).st_mode)
    if actual == mode:
        return

    if exact_mode:
        raise StoreError(
            f"{os.fspath(path)} was created with mode {actual:#o} instead of "
            f"{mode:#o}, because the umask or the filesystem removed bits. Set "
            "a umask that keeps the owner's bits, such as 0o077, and use a "
            "filesystem with POSIX file modes."
        )
    fs.fchmod(fd, mode)


def create_file(
    fs: FileSystem, path: StrPath, data: bytes, mode: int, *, exact_mode: bool
) -> None:
    """Create ``path`` with ``mode``, write ``data`` and fsync it.

    The file must not exist. On an error the partial file is removed and a
    StoreError naming the path is raised.
    """
    try:
        fd = fs.open(path, _CREATE_FLAGS, mode)
    except OSError as exc:
        raise failure("creating", path, exc) from exc

    action = "checking the mode of"
    try:
        _check_mode(fs, fd, path, mode, exact_mode=exact_mode)
        action = "writing"
        _write_all(fs, fd, data)
        action = "fsyncing"
        fs.fsync(fd)
    except Exception as exc:
        _close_quietly(fs, fd)
        remove_quietly(fs, path)
        if isinstance(exc, OSError) and not isinstance(exc, StoreError):
            raise failure(action, path, exc) from exc
        raise

    try:
        fs.close(fd)
    except OSError as exc:
        # close(2) releases the descriptor even when it reports an error, so
        # it is not closed again. NFS reports delayed write errors at close.
        remove_quietly(fs, path)
        raise failure("closing", path, exc) from exc


def fsync_directory(fs: FileSystem, path: StrPath) -> None:
    """Fsync a directory so that renames and new entries in it are durable."""
    try:
        fd = fs.open(path, _DIRECTORY_FLAGS)
    except OSError as exc:
        raise failure("opening directory", path, exc) from exc

    try:
        fs.fsync(fd)
    except OSError as exc:
        _close_quietly(fs, fd)
        raise failure("fsyncing directory", path, exc) from exc

    try:
        fs.close(fd)
    except OSError as exc:
        raise failure("closing directory", path, exc) from exc


def replace_symlink(fs: FileSystem, target: str, path: Path, purpose: str) -> None:
    """Point the symlink ``path`` at ``target`` with one atomic rename.

    rename(2) replaces the old link in one step, so a reader resolves either
    the old or the new target, never a missing name. The caller fsyncs the
    directory.
    """
    temporary = path.parent / temp_name("..tmp-", purpose)
    try:
        fs.symlink(target, temporary)
    except OSError as exc:
        raise failure("creating symlink", temporary, exc) from exc

    try:
        fs.rename(temporary, path)
    except OSError as exc:
        remove_quietly(fs, temporary)
        raise failure("renaming symlink over", path, exc) from exc


def remove_tree(fs: FileSystem, directory: Path, first: str | None = None) -> None:
    """Remove a flat directory, unlinking the entry ``first`` before the others.

    Generation directories contain only files, so no recursion is needed.
    """
    names = sorted(os.listdir(directory))
    if first is not None and first in names:
        names.remove(first)
        names.insert(0, first)

    for name in names:
        with contextlib.suppress(FileNotFoundError):
            fs.unlink(directory / name)
    fs.rmdir(directory)


def atomic_write(
    path: StrPath,
    data: bytes,
    *,
    mode: int = 0o600,
    fs: FileSystem | None = None,
) -> None:
    """Replace the file at ``path`` with ``data`` so that readers never see a
    partial or empty file, even after a crash or a full disk.

    The data goes to a new file in the same directory, created with ``mode``
    (``O_EXCL``, never chmod-ed narrower afterwards), fsynced, renamed over
    ``path``, and then the directory is fsynced. A mode that grants nothing
    to group and others is treated as secret: if the umask removed bits, a
    StoreError is raised instead of calling fchmod. A symlink at ``path`` is
    replaced by the file, its target is left alone.

    Raises ConfigError for an invalid path, data or mode, and StoreError
    when a step fails. Up to the rename, ``path`` still contains the old
    content. If only the final directory fsync fails, the new content is in
    place but may not survive a power loss. A process that dies part way may
    leave a temporary file named ``.NAME.tmp-*``.
    """
    target = path_argument(path, "atomic_write path")
    if not isinstance(data, bytes):
        raise ConfigError(
            f"invalid data for {target}: pass bytes, not {type(data).__name__}. "
            "Encode text first, for example text.encode()"
        )
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o777:
        mode_text = f"{mode:#o}" if isinstance(mode, int) else repr(mode)
        raise ConfigError(
            f"invalid mode {mode_text} for {target}: pass permission bits from "
            "0o000 to 0o777, such as 0o600"
        )
    fs = fs if fs is not None else FileSystem()
    temporary = target.parent / temp_name(f".{target.name}.tmp-", "write")
    exact_mode = mode & 0o077 == 0

    create_file(fs, temporary, data, mode, exact_mode=exact_mode)

    try:
        fs.rename(temporary, target)
    except OSError as exc:
        remove_quietly(fs, temporary)
        raise failure("renaming over", target, exc) from exc

    fsync_directory(fs, target.parent)


@contextlib.contextmanager
def file_lock(path: Path, *, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive flock(2) on ``path`` for the duration of the block.

    Yields True when the lock is held. With ``wait=False`` a lock that
    another open file holds is not waited for, and the block gets False.
    The lock file is never deleted: a process that unlinked it could let
    the next two lockers lock different inodes at the same time. flock gives
    no exclusion between NFS clients, so a store on NFS needs one writer host.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise failure("opening lock file", path, exc) from exc

    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            acquired = True
        except BlockingIOError:
            acquired = False
        yield acquired
    finally:
        # Closing the descriptor releases the lock, as the kernel does when
        # the process dies, so this runs for every exception.
        os.close(fd)


@contextlib.contextmanager
def store_lock(path: Path) -> Iterator[None]:
    """Hold the store lock at ``path``, waiting as long as another writer holds it.

    Deploy hooks run after this lock is released, so a writer waits here
    only for another writer's commit, rollback or recovery.
    """
    # TODO: add a timeout; a process stopped while it holds the lock (for
    # example with SIGSTOP) blocks every writer and every repairing open.
    with file_lock(path):
        yield

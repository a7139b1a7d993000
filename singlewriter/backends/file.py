"""A lock on one host through flock(2), with a durable token counter.

Rules:

- ``DIR/NAME.lock`` is the lock file. It is never deleted: if a holder
  removed it on release, a waiter that had already opened the old file could
  lock the old inode while a newcomer locks a new one, and both would hold
  "the" lock.
- ``DIR/NAME.token`` contains the last token issued. It is written only while
  the flock is held, and fsynced before the token is handed out, so a token
  is never issued twice, even across a power loss.
- The kernel drops a flock the moment the last descriptor of its open file
  description closes, which happens when the holder dies, however it dies.
  It never drops it while the holder lives: a holder frozen by SIGSTOP keeps
  the lock, so these leases have no ttl and need no renewal. The token still
  fences a holder that resumes after someone else acquired in between.
- flock(2) and fcntl(2) record locks do not see each other on Linux. certbot
  locks its directories with fcntl.lockf, so this lock does not exclude a
  certbot that runs on its own; run certbot under ``singlewriter exec`` so
  that every writer takes this lock.
- flock gives no exclusion between NFS clients (Linux emulates it with
  byte-range locks there, and other network filesystems differ again), so a
  lock directory on a network filesystem is rejected unless the caller sets
  ``allow_network_fs=True``.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct
import zlib
from pathlib import Path
from typing import Any

from .._errors import BackendUnavailable, ConfigError
from .._lease import Lease
from .._lock import Busy, Grant, Lock

__all__ = ["NETWORK_FILESYSTEMS", "FileLock", "filesystem_type"]

log = logging.getLogger(__name__)

# Filesystem types, as /proc/self/mountinfo names them, on which flock does
# not exclude processes on other hosts.
NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "9p",
        "ceph",
        "glusterfs",
        "lustre",
        "afs",
        "ncpfs",
        "fuse",
        "fuseblk",
    }
)

# The token file has two slots of this size. Token N goes into slot N % 2,
# so a torn write can only damage the slot being written, while the other
# still contains the previous token. A slot is "SWT1", the token and a CRC32.
_SLOT = struct.Struct("<4sQI")
_SLOT_SIZE = 64
_MAGIC = b"SWT1"


class _Flock:
    """An open, flocked lock file descriptor, closed when the lease is dropped.

    Closing the descriptor releases the flock, so a lease that its caller
    dropped without release() frees the lock when it is garbage collected
    instead of keeping it until the process exits.
    """

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd
        self.pid = os.getpid()

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        # A forked child closing its copy would not release the parent's
        # lock, but there is no reason for it to keep the copy open either.
        self.close()


class FileLock(Lock):
    """An flock(2)-based lock in directory ``directory`` for processes on one host.

    ``ttl`` is accepted for a uniform API and ignored (the lock's ``ttl``
    is None): the kernel releases the lock when the holder dies. See the
    module docstring for what this lock does and does not exclude.
    """

    backend = "file"
    renews = False

    def __init__(
        self,
        directory: str | os.PathLike[str],
        name: str,
        *,
        ttl: float | None = None,
        allow_network_fs: bool = False,
        mode: int = 0o644,
        mountinfo: str = "/proc/self/mountinfo",
        **options: Any,
    ) -> None:
        super().__init__(name, ttl=None, **options)
        self.directory = Path(directory)
        self.mode = mode
        self._check_directory(allow_network_fs, mountinfo)
        self.lock_path = self.directory / f"{self.name}.lock"
        self.token_path = self.directory / f"{self.name}.token"

    def _check_directory(self, allow_network_fs: bool, mountinfo: str) -> None:
        if not self.directory.is_absolute():
            raise ConfigError(
                f"lock directory {str(self.directory)!r} for lock {self.name!r} is"
                " not absolute; pass an absolute path such as /var/lib/singlewriter",
                lock_name=self.name,
                backend=self.backend,
            )
        if not self.directory.is_dir():
            raise ConfigError(
                f"lock directory {str(self.directory)!r} for lock {self.name!r} does"
                " not exist or is not a directory; create it first",
                lock_name=self.name,
                backend=self.backend,
            )
        self._check_directory_owner()
        fstype = filesystem_type(self.directory, mountinfo)
        if fstype is not None and _is_network(fstype) and not allow_network_fs:
            raise ConfigError(
                f"lock directory {str(self.directory)!r} for lock {self.name!r} is"
                f" on a {fstype} filesystem, where flock does not exclude"
                " processes on other hosts. Use a local directory, a Redis,"
                " Consul or Kubernetes lock, or pass allow_network_fs=True if"
                " only this host ever takes the lock.",
                lock_name=self.name,
                backend=self.backend,
            )

    def _check_directory_owner(self) -> None:
        # A user who can replace NAME.lock or NAME.token can let a second
        # holder in or send tokens backwards. The sticky bit stops other
        # users from replacing files they do not own (and files they created
        # first are rejected when opened).
        info = os.stat(self.directory)
        problem = None
        if info.st_uid not in (os.geteuid(), 0):
            problem = f"is owned by uid {info.st_uid}, another user"
        elif info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX:
            problem = "is writable by every user and has no sticky bit"
        if problem is not None:
            raise ConfigError(
                f"lock directory {str(self.directory)!r} for lock {self.name!r}"
                f" {problem}, so another user could replace the lock or token"
                " file. Use a directory owned by this user (or root) that only"
                " its owner can write to.",
                lock_name=self.name,
                backend=self.backend,
            )

    def _try_acquire(self, timeout: float, owner: str) -> Grant | Busy:
        fd = self._open_locked()
        if fd is None:
            return Busy()
        handle = _Flock(fd)
        try:
            token = self._next_token()
        except BaseException:
            handle.close()
            raise
        return Grant(token, data=handle)

    def _open_locked(self) -> int | None:
        """Open and flock the lock file; return the descriptor, None if busy."""
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self.lock_path, flags, self.mode)
        except OSError as exc:
            raise self._os_error("open the lock file", self.lock_path, exc) from exc

        try:
            self._check_owner(fd, self.lock_path)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as exc:
            os.close(fd)
            raise self._os_error("flock the lock file", self.lock_path, exc) from exc
        except BaseException:
            os.close(fd)
            raise

        # The file is never deleted by this library, but if someone removed
        # or replaced it, our lock is on an inode that others no longer open.
        if not self._still_linked(fd):
            os.close(fd)
            log.warning(
                "lock file %s was replaced while being locked; retrying",
                self.lock_path,
            )
            return None
        return fd

    def _check_owner(self, fd: int, path: Path) -> os.stat_result:
        # In a shared directory (even with the sticky bit) another user can
        # create these files first and then rewrite the token at will.
        info = os.fstat(fd)
        owner = info.st_uid
        if owner not in (os.geteuid(), 0):
            raise ConfigError(
                f"{str(path)!r} for lock {self.name!r} is owned by uid {owner},"
                f" not by this process (uid {os.geteuid()}) or root, so that user"
                " could change the lock or its tokens. Use a lock directory that"
                " only this user can write to.",
                lock_name=self.name,
                backend=self.backend,
            )
        return info

    def _still_linked(self, fd: int) -> bool:
        try:
            path_stat = os.stat(self.lock_path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        fd_stat = os.fstat(fd)
        return (path_stat.st_dev, path_stat.st_ino) == (fd_stat.st_dev, fd_stat.st_ino)

    def _next_token(self) -> int:
        """Read, increment and durably store the token; the flock must be held."""
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self.token_path, flags, self.mode)
        except OSError as exc:
            raise self._os_error("open the token file", self.token_path, exc) from exc

        try:
            # An empty file was just created (or never written before a
            # crash): its directory entry must reach the disk too.
            fresh = self._check_owner(fd, self.token_path).st_size == 0
            token = _read_token(fd, self.token_path) + 1
            os.pwrite(fd, _encode_slot(token), (token % 2) * _SLOT_SIZE)
            os.fdatasync(fd)
            if fresh:
                _fsync_directory(self.directory)
        except OSError as exc:
            raise self._os_error("update the token file", self.token_path, exc) from exc
        finally:
            os.close(fd)
        return token

    def _release(self, lease: Lease, timeout: float) -> bool:
        handle: _Flock = lease.data
        fd = handle.fd
        if fd is None:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            handle.close()
        return True

    def _check_held(self, lease: Lease) -> str | None:
        handle: _Flock = lease.data
        if handle.fd is None:
            return "the lock file descriptor was closed"
        if not self._still_linked(handle.fd):
            return (
                f"the lock file {str(self.lock_path)!r} was removed or replaced"
                " while held, so another process may have locked a new file"
            )
        return None

    def _os_error(self, action: str, path: Path, exc: OSError) -> Exception:
        message = (
            f"could not {action} {str(path)!r} for lock {self.name!r}:"
            f" {exc.strerror or exc}"
        )
        permanent = (
            errno.EACCES,
            errno.EPERM,
            errno.EROFS,
            errno.ELOOP,
            errno.EISDIR,
            errno.ENOTDIR,
        )
        if exc.errno in permanent:
            return ConfigError(
                message + "; check the directory's owner, mode and mount options"
                " (symbolic links are not followed)",
                lock_name=self.name,
                backend=self.backend,
            )
        return BackendUnavailable(message, lock_name=self.name, backend=self.backend)


def _encode_slot(token: int) -> bytes:
    body = _SLOT.pack(_MAGIC, token, 0)[:-4]
    record = body + struct.pack("<I", zlib.crc32(body))
    return record.ljust(_SLOT_SIZE, b"\0")


def _read_token(fd: int, path: Path) -> int:
    data = os.pread(fd, 2 * _SLOT_SIZE, 0)
    tokens = [0]
    for offset in (0, _SLOT_SIZE):
        record = data[offset : offset + _SLOT.size]
        if len(record) < _SLOT.size:
            continue
        magic, token, crc = _SLOT.unpack(record)
        if magic == _MAGIC and crc == zlib.crc32(record[:-4]):
            tokens.append(token)
    if data.strip(b"\0") and len(tokens) == 1:
        raise ConfigError(
            f"token file {str(path)!r} is corrupt: neither slot has a valid"
            " checksum. It is not safe to reuse old tokens; move the file away"
            " and write a token above every one issued before, or start a new"
            " lock name."
        )
    return max(tokens)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def filesystem_type(path: Path, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """Return the type of the filesystem ``path`` is on, None if unknown.

    Reads mountinfo (proc(5)): the mount with the longest mount point that
    contains the resolved path wins.
    """
    resolved = os.path.realpath(path)
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None

    best: tuple[int, str] | None = None
    for line in lines:
        mount_point, fstype = _parse_mountinfo_line(line)
        if mount_point is None or fstype is None:
            continue
        # Later lines win ties: they are mounts stacked over earlier ones.
        longer = best is None or len(mount_point) >= best[0]
        if longer and _contains(mount_point, resolved):
            best = (len(mount_point), fstype)
    return None if best is None else best[1]


def _parse_mountinfo_line(line: str) -> tuple[str | None, str | None]:
    # Fields: id parent major:minor root mount-point options [optional...] -
    # fstype source super-options. Mount points escape spaces as \040.
    fields = line.split()
    if "-" not in fields or len(fields) < 5:
        return None, None
    separator = fields.index("-")
    if separator + 1 >= len(fields):
        return None, None
    mount_point = fields[4].encode().decode("unicode_escape")
    return mount_point, fields[separator + 1]


def _contains(mount_point: str, path: str) -> bool:
    if mount_point == "/":
        return True
    return path == mount_point or path.startswith(mount_point.rstrip("/") + "/")


def _is_network(fstype: str) -> bool:
    return fstype in NETWORK_FILESYSTEMS or fstype.startswith("fuse.")

"""flock backend specifics: the lock file, the token file, fork and NFS."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

import singlewriter
from singlewriter.backends.file import FileLock, filesystem_type


@pytest.fixture
def lock_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "locks"
    directory.mkdir()
    return directory


def test_lock_file_never_deleted(lock_dir: Path) -> None:
    """Release keeps the lock file so waiters never lock different inodes."""
    lock = FileLock(lock_dir, "example.com")
    with lock:
        inode = (lock_dir / "example.com.lock").stat().st_ino
    assert (lock_dir / "example.com.lock").stat().st_ino == inode


def test_token_survives_new_lock_objects(lock_dir: Path) -> None:
    """The counter lives on disk, not in the lock object."""
    tokens = []
    for _ in range(3):
        with FileLock(lock_dir, "example.com") as lease:
            tokens.append(lease.token)
    assert tokens == [1, 2, 3]


def test_torn_token_slot_falls_back_to_other(lock_dir: Path) -> None:
    """A torn write damages one slot only; the next token is still higher."""
    lock = FileLock(lock_dir, "example.com")
    for _ in range(5):
        lock.acquire().release()

    # Token 5 went into slot 1; corrupt it as a torn write would.
    path = lock_dir / "example.com.token"
    data = bytearray(path.read_bytes())
    data[64 + 6] ^= 0xFF
    path.write_bytes(bytes(data))

    with lock as lease:
        # Slot 0 still contains 4, so token 5 is issued again. That is safe
        # because the write of 5 was torn, so no caller received token 5.
        assert lease.token == 5


def test_corrupt_token_file_rejected(lock_dir: Path) -> None:
    """With both slots unreadable the lock refuses to guess a token."""
    lock = FileLock(lock_dir, "example.com")
    lock.acquire().release()
    (lock_dir / "example.com.token").write_bytes(b"garbage" * 20)

    with pytest.raises(singlewriter.ConfigError, match="corrupt"):
        lock.acquire()

    # The failed acquisition released its flock: with the token file moved
    # away, a non-blocking acquire succeeds at once.
    (lock_dir / "example.com.token").unlink()
    lock.acquire(blocking=False).release()


def test_forked_child_cannot_release_parent_lock(lock_dir: Path) -> None:
    """A child created by fork neither releases nor uses the parent's lease."""
    lock = FileLock(lock_dir, "example.com")
    lease = lock.acquire()

    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        status = 0
        if lease.release() is not False:
            status |= 1
        try:
            lease.ensure_held()
            status |= 2
        except singlewriter.LockLost:
            pass
        os._exit(status)
    _, status = os.waitpid(pid, 0)

    assert os.waitstatus_to_exitcode(status) == 0
    with pytest.raises(singlewriter.LockBusy):
        FileLock(lock_dir, "example.com").acquire(blocking=False)
    lease.release()


def test_threads_sharing_lock_object_exclude(lock_dir: Path) -> None:
    """Two threads using one lock object in with-blocks never overlap."""
    lock = FileLock(lock_dir, "example.com")
    inside = []
    overlaps = []

    def work() -> None:
        for _ in range(20):
            with lock as lease:
                inside.append(lease.token)
                if len(inside) > 1:
                    overlaps.append(list(inside))
                time.sleep(0.001)
                inside.remove(lease.token)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not overlaps


def test_network_filesystem_rejected(lock_dir: Path, tmp_path: Path) -> None:
    """A directory on NFS is rejected unless allow_network_fs is set."""
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 1 0:21 / / rw - ext4 /dev/vda rw\n"
        f"40 22 0:50 / {lock_dir} rw,relatime - nfs4 server:/export rw\n"
    )
    assert filesystem_type(lock_dir, str(mountinfo)) == "nfs4"

    with pytest.raises(singlewriter.ConfigError, match="nfs4"):
        FileLock(lock_dir, "example.com", mountinfo=str(mountinfo))
    FileLock(lock_dir, "example.com", mountinfo=str(mountinfo), allow_network_fs=True)


def test_fuse_filesystem_rejected(lock_dir: Path, tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"40 22 0:50 / {lock_dir} rw - fuse.sshfs host:/ rw\n")
    with pytest.raises(singlewriter.ConfigError, match=r"fuse\.sshfs"):
        FileLock(lock_dir, "example.com", mountinfo=str(mountinfo))


def test_local_filesystem_accepted(lock_dir: Path) -> None:
    """The real mount table of this machine reports a local filesystem."""
    fstype = filesystem_type(lock_dir)
    assert fstype is not None
    FileLock(lock_dir, "example.com")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("file://otherhost/tmp", "names host"),
        ("file:///no/such/dir", "does not exist"),
        ("file:///tmp?color=blue", "unknown parameters"),
        ("file:///tmp?allow_network_fs=maybe", "flag value"),
        ("gopher://x", "not supported"),
        ("no-scheme", "expected SCHEME"),
    ],
)
def test_bad_file_urls(url: str, message: str) -> None:
    with pytest.raises(singlewriter.ConfigError, match=message):
        singlewriter.lock_from_url(url, "example.com")


def test_file_url_needs_name(lock_dir: Path) -> None:
    with pytest.raises(singlewriter.ConfigError, match="needs a lock name"):
        singlewriter.lock_from_url(f"file://{lock_dir}")


def test_symlinked_lock_file_not_followed(lock_dir: Path, tmp_path: Path) -> None:
    """A symlink planted at the lock path is not followed."""
    target = tmp_path / "elsewhere"
    target.write_text("do not touch")
    (lock_dir / "example.com.lock").symlink_to(target)

    with pytest.raises(singlewriter.ConfigError, match="symbolic links"):
        FileLock(lock_dir, "example.com").acquire()
    assert target.read_text() == "do not touch"


def test_lock_file_removed_while_held_is_lost(lock_dir: Path) -> None:
    """Removing the lock file under a holder makes its ensure_held() fail."""
    lock = FileLock(lock_dir, "example.com")
    lease = lock.acquire()
    (lock_dir / "example.com.lock").unlink()

    newcomer = FileLock(lock_dir, "example.com").acquire(blocking=False)
    with pytest.raises(singlewriter.LockLost, match="removed or replaced"):
        lease.ensure_held()
    assert newcomer.token > lease.token
    newcomer.release()


def test_files_owned_by_other_user_rejected(lock_dir: Path) -> None:
    """Lock files another user created could be rewritten by that user."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a file owned by another user")
    (lock_dir / "example.com.lock").touch()
    os.chown(lock_dir / "example.com.lock", 65534, 65534)

    with pytest.raises(singlewriter.ConfigError, match="owned by uid 65534"):
        FileLock(lock_dir, "example.com").acquire(blocking=False)


def test_foreign_token_file_rejected(lock_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to create a file owned by another user")
    (lock_dir / "example.com.token").touch()
    os.chown(lock_dir / "example.com.token", 65534, 65534)

    with pytest.raises(singlewriter.ConfigError, match="owned by uid 65534"):
        FileLock(lock_dir, "example.com").acquire(blocking=False)
    # The failed attempt left the lock free.
    (lock_dir / "example.com.token").unlink()
    FileLock(lock_dir, "example.com").acquire(blocking=False).release()


def test_dropped_lease_frees_flock(lock_dir: Path) -> None:
    """A lease dropped without release() frees the lock once collected."""
    import gc

    lock = FileLock(lock_dir, "example.com")
    lock.acquire()
    gc.collect()

    lock.acquire(blocking=False).release()


def test_lock_path_that_is_directory_rejected(lock_dir: Path) -> None:
    """A permanent filesystem problem is a ConfigError, not retried."""
    (lock_dir / "example.com.lock").mkdir()
    with pytest.raises(singlewriter.ConfigError, match=r"example\.com\.lock"):
        FileLock(lock_dir, "example.com").acquire(blocking=False)


def test_world_writable_lock_directory_rejected(tmp_path: Path) -> None:
    """Anyone could replace the lock file in a world-writable directory."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(singlewriter.ConfigError, match="no sticky bit"):
        FileLock(shared, "example.com")

    shared.chmod(0o1777)
    FileLock(shared, "example.com").acquire(blocking=False).release()


def test_lock_directory_of_other_user_rejected(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to create a directory owned by another user")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    os.chown(foreign, 65534, 65534)
    with pytest.raises(singlewriter.ConfigError, match="owned by uid 65534"):
        FileLock(foreign, "example.com")

"""Behaviour of the key store: publishing, fencing, recovery, hooks, input checks."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

import singlewriter.keystore._manifest as manifest_module
from singlewriter._errors import (
    ConfigError,
    StaleTokenError,
    StoreError,
    VerificationError,
)
from singlewriter.keystore import REQUIRED_NAMES, Generation, KeyStore, atomic_write
from singlewriter.keystore._fs import StrPath
from tests._keystore_support import (
    NOW,
    FaultyFileSystem,
    SimulatedCrash,
    assert_consistent,
    assert_matching,
    authorities,
    eio,
    enospc,
    make_files,
    open_store,
)

STORE_LOGGER = "singlewriter.keystore"


def _tree(path: Path) -> dict[str, object]:
    """Return every entry below ``path`` with its link target or content."""
    entries: dict[str, object] = {}
    for root, directories, files in os.walk(path):
        for name in directories + files:
            full = Path(root, name)
            relative = str(full.relative_to(path))
            if full.is_symlink():
                entries[relative] = ("link", os.readlink(full))
            elif full.is_file():
                entries[relative] = ("file", full.read_bytes())
            else:
                entries[relative] = ("dir", None)
    return entries


@pytest.fixture
def umask() -> Iterator[None]:
    """Restore the process umask after a test that changes it."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield
    os.umask(previous)


# Publishing and reading.


def test_commit_publishes_live_symlinks(tmp_path: Path) -> None:
    """Each live name is a symlink through the pointer into the generation."""
    store = open_store(tmp_path / "store")
    files = make_files()

    generation = store.commit(7, files)

    assert generation.sequence == 1
    assert generation.token == 7
    assert generation.names == tuple(sorted(REQUIRED_NAMES))
    assert generation.previous is None
    assert os.readlink(tmp_path / "store" / "..current") == "..gen-00000001"
    for name in REQUIRED_NAMES:
        live = store.live_path(name)
        assert live == tmp_path / "store" / name
        assert os.readlink(live) == f"..current/{name}"
        assert live.read_bytes() == files[name]
    assert store.current() == files
    assert store.current_generation() == generation
    assert store.highest_token == 7


def test_current_is_none_before_commit(tmp_path: Path) -> None:
    """A new store publishes nothing and records no token."""
    store = open_store(tmp_path / "store")

    assert store.current() is None
    assert store.read_current() is None
    assert store.current_generation() is None
    assert store.generations() == []
    assert store.highest_token is None


def test_commit_replaces_whole_set(tmp_path: Path) -> None:
    """A second commit replaces all files at once and links to its predecessor."""
    store = open_store(tmp_path / "store")
    store.commit(1, make_files())
    second = make_files()

    generation = store.commit(2, second)

    assert store.current() == second
    assert generation.previous == 1
    assert [g.sequence for g in store.generations()] == [1, 2]


def test_commit_logs_info(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A commit logs one INFO record without key material."""
    store = open_store(tmp_path / "store")
    files = make_files()

    with caplog.at_level(logging.INFO, logger=STORE_LOGGER):
        store.commit(3, files)

    records = [r for r in caplog.records if r.levelno == logging.INFO]
    assert any("Committed generation 1" in r.getMessage() for r in records)
    key_text = files["privkey.pem"].decode()
    assert all(key_text not in r.getMessage() for r in caplog.records)


def test_read_current_uses_one_generation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit between two file reads does not mix generations in current()."""
    path = tmp_path / "store"
    reader = open_store(path)
    writer = open_store(path)
    old = make_files()
    new = make_files()
    writer.commit(1, old)
    original = manifest_module.read_file_at
    committed: list[int] = []

    def read_then_commit(directory_fd: int, name: str) -> tuple[bytes, os.stat_result]:
        if not committed:
            committed.append(2)
            writer.commit(2, new)
        return original(directory_fd, name)

    monkeypatch.setattr(manifest_module, "read_file_at", read_then_commit)
    snapshot = reader.read_current()

    assert committed, "the commit did not run during the read"
    assert snapshot is not None
    generation, files = snapshot
    assert generation.sequence == 1
    assert files == old
    assert reader.current() == new


def test_live_paths_can_mix_across_swap(tmp_path: Path) -> None:
    """Opening live paths one by one can straddle a swap; current() cannot."""
    store = open_store(tmp_path / "store")
    old = make_files()
    new = make_files()
    store.commit(1, old)

    key = store.live_path("privkey.pem").read_bytes()
    store.commit(2, new)
    cert = store.live_path("cert.pem").read_bytes()

    assert key == old["privkey.pem"]
    assert cert == new["cert.pem"]
    with pytest.raises(VerificationError, match=r"does not match"):
        assert_matching({**new, "privkey.pem": key})


def test_extra_names_are_published(tmp_path: Path) -> None:
    """Extra names are published: certificate-only PEM 0644, anything else 0600."""
    store = open_store(tmp_path / "store")
    files = make_files()
    files["combined.pem"] = files["privkey.pem"] + files["fullchain.pem"]
    files["ocsp.der"] = b"\x30\x03\x0a\x01\x00"
    files["issuer.pem"] = authorities()[1].pem

    store.commit(1, files)

    assert store.current() == files
    combined = store.live_path("combined.pem")
    assert stat.S_IMODE(os.stat(combined).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(store.live_path("ocsp.der")).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(store.live_path("issuer.pem")).st_mode) == 0o644


def test_dropped_name_loses_live_link(tmp_path: Path) -> None:
    """A name missing from the next commit has its live symlink removed."""
    store = open_store(tmp_path / "store")
    files = make_files()
    store.commit(1, {**files, "extra.pem": files["cert.pem"]})

    store.commit(2, make_files())

    assert not os.path.lexists(store.live_path("extra.pem"))


# File modes.


@pytest.mark.parametrize("mask", [0o000, 0o077, 0o022], ids=oct)
def test_key_mode_0600_under_umask(tmp_path: Path, umask: None, mask: int) -> None:
    """privkey.pem is 0600 and the other files 0644 whatever the umask."""
    os.umask(mask)
    store = open_store(tmp_path / "store")

    generation = store.commit(1, make_files())

    key = generation.path / "privkey.pem"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    for name in ("cert.pem", "chain.pem", "fullchain.pem"):
        assert stat.S_IMODE(os.stat(generation.path / name).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(generation.path).st_mode) == 0o755


def test_key_created_with_final_mode(tmp_path: Path) -> None:
    """The key file is opened with mode 0600 and never passed to fchmod."""
    fs = FaultyFileSystem()
    modes: dict[str, int] = {}
    original_open = fs.open

    def recording_open(path: StrPath, flags: int, mode: int = 0o777) -> int:
        modes[os.fspath(path)] = mode
        return original_open(path, flags, mode)

    fs.open = recording_open  # type: ignore[method-assign]
    store = open_store(tmp_path / "store", filesystem=fs)

    generation = store.commit(1, make_files())

    assert modes[str(generation.path / "privkey.pem")] == 0o600
    assert all(step.operation != "fchmod" for step in fs.steps)


def test_umask_removing_owner_bits_fails(tmp_path: Path, umask: None) -> None:
    """A umask that strips the key's owner bits fails the commit; no fchmod."""
    store = open_store(tmp_path / "store")
    old = make_files()
    store.commit(1, old)
    os.umask(0o277)

    with pytest.raises(StoreError, match=r"mode 0o400 instead of 0o600"):
        store.commit(2, make_files())

    os.umask(0o022)
    assert store.current() == old
    assert [g.sequence for g in store.generations()] == [1]


# Fencing.


def test_stale_token_rejected(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A lower token raises StaleTokenError, logs WARNING and changes nothing."""
    path = tmp_path / "store"
    store = open_store(path, lock_name="renew-example")
    store.commit(5, make_files())
    before = _tree(path)

    with (
        caplog.at_level(logging.WARNING, logger=STORE_LOGGER),
        pytest.raises(StaleTokenError) as caught,
    ):
        store.commit(4, make_files())

    assert caught.value.token == 4
    assert caught.value.lock_name == "renew-example"
    assert "token 5 has already written" in str(caught.value)
    assert _tree(path) == before
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "stale token 4" in warnings[0].getMessage()


def test_equal_token_commits_again(tmp_path: Path) -> None:
    """The same lease may commit twice: an equal token is accepted."""
    store = open_store(tmp_path / "store")
    store.commit(5, make_files())
    again = make_files()

    generation = store.commit(5, again)

    assert generation.token == 5
    assert store.current() == again
    assert store.highest_token == 5


def test_highest_token_survives_rollback_and_reopen(tmp_path: Path) -> None:
    """Rolling back to an older token does not lower the recorded highest."""
    path = tmp_path / "store"
    store = open_store(path)
    store.commit(3, make_files())
    store.commit(7, make_files())

    store.rollback(9)

    reopened = open_store(path)
    assert reopened.current_generation() is not None
    assert reopened.current_generation().token == 3  # type: ignore[union-attr]
    assert reopened.highest_token == 9
    with pytest.raises(StaleTokenError):
        reopened.commit(8, make_files())


def test_failed_commit_still_fences(tmp_path: Path) -> None:
    """A token that began writing fences lower tokens even if its commit failed."""
    path = tmp_path / "store"
    store = open_store(path)
    old = make_files()
    store.commit(1, old)
    fs = FaultyFileSystem(error=eio, fail_when=lambda step: step.operation == "mkdir")
    failing = open_store(path, filesystem=fs)

    with pytest.raises(StoreError):
        failing.commit(10, make_files())

    assert store.current() == old
    with pytest.raises(StaleTokenError):
        store.commit(9, make_files())


@pytest.mark.parametrize("token", ["1", 1.0, None, True])
def test_invalid_token_type(tmp_path: Path, token: object) -> None:
    """A token that is not an int raises ConfigError."""
    store = open_store(tmp_path / "store")

    with pytest.raises(ConfigError, match=r"invalid token"):
        store.commit(token, make_files())  # type: ignore[arg-type]


# Recovery.


def _commit_expiring(store: KeyStore, token: int, days: int) -> Generation:
    files = make_files(not_after=NOW + timedelta(days=days))
    return store.commit(token, files)


def test_regression_recovery_skips_newer_expired(tmp_path: Path) -> None:
    """Regression: recovery must not publish the highest-numbered expired set.

    With the pointer lost, generation 2 is newer but expired at the time of
    the next open, while generation 1 is still valid.
    """
    path = tmp_path / "store"
    store = open_store(path)
    _commit_expiring(store, 1, days=90)
    _commit_expiring(store, 2, days=10)
    (path / "..current").unlink()
    later = NOW + timedelta(days=30)

    reopened = open_store(path, clock=lambda: later)

    generation = reopened.current_generation()
    assert generation is not None
    assert generation.sequence == 1
    assert os.readlink(path / "..current") == "..gen-00000001"


def test_recovery_keeps_expired_current(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An intact current generation that expired stays published, with WARNING."""
    path = tmp_path / "store"
    store = open_store(path)
    _commit_expiring(store, 1, days=90)
    _commit_expiring(store, 2, days=10)
    later = NOW + timedelta(days=30)

    with caplog.at_level(logging.WARNING, logger=STORE_LOGGER):
        reopened = open_store(path, clock=lambda: later)

    assert reopened.current_generation().sequence == 2  # type: ignore[union-attr]
    assert any("expired" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("damage", ["corrupt key", "missing file", "bad manifest"])
def test_recovery_replaces_broken_current(tmp_path: Path, damage: str) -> None:
    """A damaged current generation loses to the newest intact one."""
    path = tmp_path / "store"
    store = open_store(path)
    first = make_files()
    store.commit(1, first)
    second = store.commit(2, make_files())
    target = second.path / (
        "privkey.pem" if damage != "bad manifest" else ".manifest.json"
    )
    target.chmod(0o600)
    if damage == "corrupt key":
        target.write_bytes(target.read_bytes().replace(b"A", b"B", 1))
    elif damage == "missing file":
        target.unlink()
    else:
        target.write_bytes(b'{"format": 1}')

    reopened = open_store(path)

    assert reopened.current() == first
    assert second.path.exists(), "a damaged generation is kept for inspection"


def test_recovery_skips_incomplete_newer(tmp_path: Path) -> None:
    """A newer directory without a manifest is never published, and is removed."""
    path = tmp_path / "store"
    store = open_store(path)
    first = make_files()
    store.commit(1, first)
    partial = path / "..gen-00000002"
    partial.mkdir()
    for name, data in make_files().items():
        (partial / name).write_bytes(data)
    os.symlink("..gen-00000002", path / "..current.new")
    os.replace(path / "..current.new", path / "..current")

    reopened = open_store(path)

    assert reopened.current() == first
    assert not partial.exists()


def test_recovery_dangling_pointer(tmp_path: Path) -> None:
    """A pointer to a missing generation is replaced by the newest valid one."""
    path = tmp_path / "store"
    store = open_store(path)
    store.commit(1, make_files())
    second = make_files()
    store.commit(2, second)
    (path / "..current").unlink()
    os.symlink("..gen-00000009", path / "..current")

    reopened = open_store(path)

    assert reopened.current() == second
    assert_consistent(path, [second])


def test_recovery_removes_leftovers(tmp_path: Path) -> None:
    """Temporary symlinks, files and incomplete generations are removed on open."""
    path = tmp_path / "store"
    store = open_store(path)
    files = make_files()
    generation = store.commit(1, files)
    os.symlink("..gen-00000001", path / "..tmp-current-1-deadbeef")
    (path / "..token.tmp-write-1-0123abcd").write_bytes(b"9")
    (generation.path / ".tmp-deploy-1-0123abcd").write_bytes(b"{}")
    (path / "..gen-00000005").mkdir()
    (path / "..gen-00000005" / "cert.pem").write_bytes(b"partial")

    open_store(path)

    assert sorted(os.listdir(path)) == sorted(
        [".lock", ".token", "..current", "..gen-00000001", *REQUIRED_NAMES]
    )
    assert not (generation.path / ".tmp-deploy-1-0123abcd").exists()
    assert store.current() == files


def test_recovery_without_valid_generation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With every generation expired and the pointer lost, nothing is published."""
    path = tmp_path / "store"
    store = open_store(path)
    _commit_expiring(store, 1, days=5)
    (path / "..current").unlink()
    later = NOW + timedelta(days=30)

    with caplog.at_level(logging.ERROR, logger=STORE_LOGGER):
        reopened = open_store(path, clock=lambda: later)

    assert reopened.current() is None
    assert any("No valid generation" in r.getMessage() for r in caplog.records)


# Rollback and retention.


def test_rollback_walks_back(tmp_path: Path) -> None:
    """Each rollback publishes the generation that was current before."""
    store = open_store(tmp_path / "store")
    sets = [make_files() for _ in range(3)]
    for token, files in enumerate(sets, start=1):
        store.commit(token, files)

    assert store.rollback(3).sequence == 2
    assert store.current() == sets[1]
    assert store.rollback(3).sequence == 1
    assert store.current() == sets[0]
    with pytest.raises(StoreError, match=r"no earlier valid generation"):
        store.rollback(3)
    assert store.current() == sets[0]


def test_rollback_skips_expired(tmp_path: Path) -> None:
    """Rollback passes over a previous generation whose certificate expired."""
    path = tmp_path / "store"
    store = open_store(path)
    _commit_expiring(store, 1, days=90)
    _commit_expiring(store, 2, days=10)
    _commit_expiring(store, 3, days=90)
    later = NOW + timedelta(days=30)
    reopened = open_store(path, clock=lambda: later)

    assert reopened.rollback(3).sequence == 1


def test_rollback_requires_current_token(tmp_path: Path) -> None:
    """Rollback is a write: a stale token is rejected."""
    store = open_store(tmp_path / "store")
    store.commit(4, make_files())
    store.commit(5, make_files())

    with pytest.raises(StaleTokenError):
        store.rollback(4)
    assert store.current_generation().sequence == 2  # type: ignore[union-attr]


def test_rollback_of_empty_store_fails(tmp_path: Path) -> None:
    """Rollback with nothing published raises StoreError."""
    store = open_store(tmp_path / "store")

    with pytest.raises(StoreError, match=r"nothing is published"):
        store.rollback(1)


def test_commit_after_rollback_links_back(tmp_path: Path) -> None:
    """A commit after a rollback records the rolled-back-to generation as previous."""
    store = open_store(tmp_path / "store")
    for token in (1, 2, 3):
        store.commit(token, make_files())
    store.rollback(3)

    generation = store.commit(4, make_files())

    assert generation.sequence == 4
    assert generation.previous == 2
    assert store.rollback(4).sequence == 2


def test_retention_keeps_newest(tmp_path: Path) -> None:
    """keep=3 leaves the three newest generations."""
    store = open_store(tmp_path / "store", keep=3)
    for token in range(1, 7):
        store.commit(token, make_files())

    assert [g.sequence for g in store.generations()] == [4, 5, 6]
    assert sorted(p.name for p in (tmp_path / "store").glob("..gen-*")) == [
        "..gen-00000004",
        "..gen-00000005",
        "..gen-00000006",
    ]


def test_retention_keeps_current_and_previous(tmp_path: Path) -> None:
    """keep=1 still keeps the previous generation, also after a rollback."""
    store = open_store(tmp_path / "store", keep=1)
    for token in (1, 2, 3):
        store.commit(token, make_files())
    assert [g.sequence for g in store.generations()] == [2, 3]

    store.rollback(3)
    store.commit(4, make_files())

    assert [g.sequence for g in store.generations()] == [2, 4]
    assert store.rollback(4).sequence == 2


# Deploy hooks.


class HookRecorder:
    """A deploy hook that records the sequence numbers it ran for."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, generation: Generation) -> None:
        self.calls.append(generation.sequence)


def test_hook_runs_once_per_commit(tmp_path: Path) -> None:
    """A hook runs once for each commit and not again on reopen."""
    path = tmp_path / "store"
    hook = HookRecorder()
    store = open_store(path, hooks=[hook])

    store.commit(1, make_files())
    store.commit(2, make_files())
    open_store(path, hooks=[hook])

    assert hook.calls == [1, 2]
    assert not (path / "..gen-00000002" / ".deploy-pending").exists()


def test_regression_hook_runs_after_death(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: a deploy hook must run after the process died right after commit.

    The process dies after the pointer swap and before any hook runs. The
    next open with the same hook runs it once; a further open does not.
    """
    import singlewriter.keystore._store as store_module

    path = tmp_path / "store"
    hook = HookRecorder()
    store = open_store(path, hooks=[hook])
    store.commit(1, make_files())

    def die(*args: object, **kwargs: object) -> None:
        raise SimulatedCrash

    with monkeypatch.context() as patch:
        patch.setattr(store_module, "run_pending_hooks", die)
        with pytest.raises(SimulatedCrash):
            store.commit(2, make_files())
    assert hook.calls == [1]

    open_store(path, hooks=[hook])
    open_store(path, hooks=[hook])

    assert hook.calls == [1, 2]


def _crash_hook(generation: Generation) -> None:
    raise SimulatedCrash


def test_hook_pending_until_registered(tmp_path: Path) -> None:
    """A store opened without the hook leaves it pending for one that has it."""
    path = tmp_path / "store"
    store = open_store(path, hooks={"deploy": _crash_hook})
    with pytest.raises(SimulatedCrash):
        store.commit(1, make_files())
    hook = HookRecorder()

    reader = open_store(path)
    assert reader.current() is not None
    assert (path / "..gen-00000001" / ".deploy-pending").exists()
    late = open_store(path)
    late.add_deploy_hook(hook, name="deploy")
    assert hook.calls == []

    late.commit(2, make_files())

    assert hook.calls == [1, 2]


def test_hook_killed_while_running_runs_again(tmp_path: Path) -> None:
    """A process killed inside a hook runs that hook again on the next open."""
    path = tmp_path / "store"
    store = open_store(path, hooks={"deploy": _crash_hook})
    with pytest.raises(SimulatedCrash):
        store.commit(1, make_files())
    hook = HookRecorder()

    open_store(path, hooks={"deploy": hook})
    open_store(path, hooks={"deploy": hook})

    assert hook.calls == [1]


def test_superseded_pending_hook_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A commit over a generation whose hook never ran logs WARNING naming it."""
    path = tmp_path / "store"
    store = open_store(path, hooks={"deploy": _crash_hook})
    with pytest.raises(SimulatedCrash):
        store.commit(1, make_files())

    with caplog.at_level(logging.WARNING, logger=STORE_LOGGER):
        open_store(path).commit(2, make_files())

    assert any("deploy never ran" in r.getMessage() for r in caplog.records)


def test_hook_failure_logged_not_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A hook that raises is logged at ERROR, the commit succeeds, no retry."""
    path = tmp_path / "store"
    attempts = []

    def failing(generation: Generation) -> None:
        attempts.append(generation.sequence)
        raise RuntimeError("reload failed")

    store = open_store(path)
    store.add_deploy_hook(failing, name="reload")

    with caplog.at_level(logging.ERROR, logger=STORE_LOGGER):
        generation = store.commit(1, make_files())

    assert store.current_generation() == generation
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "Deploy hook reload failed" in errors[0].getMessage()
    reopened = open_store(path)
    reopened.add_deploy_hook(failing, name="reload")
    open_store(path, hooks=[failing])
    assert attempts == [1]


def test_hook_cannot_commit_same_store(tmp_path: Path) -> None:
    """A hook that commits to its own store gets ConfigError instead of a deadlock."""
    errors: list[Exception] = []
    store = open_store(tmp_path / "store")

    def recursive(generation: Generation) -> None:
        try:
            store.commit(9, make_files())
        except ConfigError as exc:
            errors.append(exc)

    store.add_deploy_hook(recursive)
    store.commit(1, make_files())

    assert len(errors) == 1
    assert "hooks must not commit" in str(errors[0])


def test_rollback_runs_hooks(tmp_path: Path) -> None:
    """Publishing an older generation by rollback runs the hooks for it."""
    hook = HookRecorder()
    store = open_store(tmp_path / "store", hooks=[hook])
    store.commit(1, make_files())
    store.commit(2, make_files())

    store.rollback(2)

    assert hook.calls == [1, 2, 1]


def test_duplicate_hook_name(tmp_path: Path) -> None:
    """Registering two hooks under one name raises ConfigError."""
    store = open_store(tmp_path / "store")
    store.add_deploy_hook(HookRecorder(), name="deploy")

    with pytest.raises(ConfigError, match=r"already registered"):
        store.add_deploy_hook(HookRecorder(), name="deploy")


# Bad input.


BAD_NAMES = [
    "",
    ".",
    "..",
    "a/b",
    "../x",
    "/etc/passwd",
    ".hidden",
    "a\x00b",
    "x" * 101,
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_name_rejected(tmp_path: Path, name: str) -> None:
    """A name with a separator, dots only, a leading dot or too long is rejected."""
    path = tmp_path / "store"
    store = open_store(path)
    store.commit(1, make_files())
    before = _tree(path)

    with pytest.raises(ConfigError, match=r"invalid file name"):
        store.commit(2, {**make_files(), name: b"data"})
    with pytest.raises(ConfigError, match=r"invalid file name"):
        store.live_path(name)
    assert _tree(path) == before


def test_missing_required_name(tmp_path: Path) -> None:
    """A commit without chain.pem raises ConfigError naming it."""
    store = open_store(tmp_path / "store")
    files = make_files()
    del files["chain.pem"]

    with pytest.raises(ConfigError, match=r"missing chain.pem"):
        store.commit(1, files)


def test_content_must_be_bytes(tmp_path: Path) -> None:
    """A str instead of bytes raises ConfigError naming the file."""
    store = open_store(tmp_path / "store")
    files: dict[str, object] = {**make_files(), "cert.pem": "text"}

    with pytest.raises(ConfigError, match=r"invalid content for cert.pem"):
        store.commit(1, files)  # type: ignore[arg-type]


def _make_symlink_owned_by(tmp_path: Path, uid: int) -> Path:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    os.lchown(link, uid, uid)
    return link


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a symlink owner needs root")
def test_symlink_owned_by_other_user(tmp_path: Path) -> None:
    """A store path through another user's symlink raises ConfigError."""
    link = _make_symlink_owned_by(tmp_path, 65534)

    with pytest.raises(ConfigError, match=r"symlink .*link owned by uid 65534"):
        KeyStore(link / "store")
    assert not (tmp_path / "real" / "store").exists()


def test_symlink_owned_by_self_accepted(tmp_path: Path) -> None:
    """A store path through the caller's own symlink is accepted."""
    link = _make_symlink_owned_by(tmp_path, os.geteuid())

    store = open_store(link / "store")

    assert store.path == link / "store"
    assert (tmp_path / "real" / "store").is_dir()


def test_world_writable_parent_rejected(tmp_path: Path) -> None:
    """A parent writable by everyone without the sticky bit raises ConfigError."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)

    with pytest.raises(ConfigError, match=r"world-writable without the sticky bit"):
        KeyStore(shared / "store")

    shared.chmod(0o1777)
    assert open_store(shared / "store").current() is None


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a directory owner needs root")
def test_parent_owned_by_other_user(tmp_path: Path) -> None:
    """A parent directory owned by another user raises ConfigError."""
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    os.chown(foreign, 65534, 65534)

    with pytest.raises(ConfigError, match=r"owned by uid 65534"):
        KeyStore(foreign / "store")


def test_store_path_not_directory(tmp_path: Path) -> None:
    """A store path that is a regular file raises ConfigError."""
    (tmp_path / "file").write_bytes(b"")

    with pytest.raises(ConfigError, match=r"not a directory"):
        KeyStore(tmp_path / "file")


def test_store_path_dangling_symlink(tmp_path: Path) -> None:
    """A store path that is a symlink to nothing raises ConfigError."""
    (tmp_path / "store").symlink_to(tmp_path / "missing")

    with pytest.raises(ConfigError, match=r"dangling symlink"):
        KeyStore(tmp_path / "store")


@pytest.mark.parametrize("name", sorted(REQUIRED_NAMES))
def test_empty_file_rejected(tmp_path: Path, name: str) -> None:
    """An empty PEM raises VerificationError naming the file; nothing changes."""
    path = tmp_path / "store"
    store = open_store(path)
    old = make_files()
    store.commit(1, old)
    before = _tree(path)

    with pytest.raises(VerificationError, match=f"{name} is empty"):
        store.commit(2, {**make_files(), name: b""})

    assert _tree(path) == before
    assert store.current() == old


@pytest.mark.parametrize("name", sorted(REQUIRED_NAMES))
def test_unparsable_pem_rejected(tmp_path: Path, name: str) -> None:
    """Garbage instead of PEM raises VerificationError naming the file."""
    store = open_store(tmp_path / "store")

    with pytest.raises(VerificationError, match=name):
        store.commit(1, {**make_files(), name: b"-----BEGIN NOTHING-----\n"})
    assert store.current() is None


def test_regression_mismatched_key_rejected(tmp_path: Path) -> None:
    """Regression: a key that does not match the certificate is never published."""
    store = open_store(tmp_path / "store")
    files = make_files()
    files["privkey.pem"] = make_files()["privkey.pem"]

    with pytest.raises(VerificationError, match=r"privkey.pem does not match cert.pem"):
        store.commit(1, files)
    assert store.generations() == []


def test_expired_certificate_rejected(tmp_path: Path) -> None:
    """An expired certificate raises VerificationError that asks for renewal."""
    store = open_store(tmp_path / "store")
    files = make_files(
        not_before=NOW - timedelta(days=90), not_after=NOW - timedelta(seconds=1)
    )

    with pytest.raises(VerificationError, match=r"expired at .*Renew"):
        store.commit(1, files)


def test_future_certificate_rejected(tmp_path: Path) -> None:
    """A certificate not valid yet raises VerificationError."""
    store = open_store(tmp_path / "store")
    files = make_files(not_before=NOW + timedelta(hours=1))

    with pytest.raises(VerificationError, match=r"not valid yet"):
        store.commit(1, files)


def test_chain_out_of_order_rejected(tmp_path: Path) -> None:
    """A chain listing the root before the intermediate is rejected."""
    store = open_store(tmp_path / "store")
    root, intermediate = authorities()
    files = make_files()
    files["chain.pem"] = root.pem + intermediate.pem
    files["fullchain.pem"] = files["cert.pem"] + files["chain.pem"]

    with pytest.raises(VerificationError, match=r"chain.pem is out of order"):
        store.commit(1, files)


def test_chain_missing_issuer_rejected(tmp_path: Path) -> None:
    """A chain whose second certificate did not issue the first is rejected."""
    store = open_store(tmp_path / "store")
    _, intermediate = authorities()
    files = make_files()
    files["chain.pem"] = intermediate.pem + intermediate.pem
    files["fullchain.pem"] = files["cert.pem"] + files["chain.pem"]

    with pytest.raises(VerificationError, match=r"certificate 1 of chain.pem"):
        store.commit(1, files)


def test_fullchain_mismatch_rejected(tmp_path: Path) -> None:
    """fullchain.pem that is not cert.pem plus chain.pem is rejected."""
    store = open_store(tmp_path / "store")
    files = make_files()
    files["fullchain.pem"] = files["cert.pem"]

    with pytest.raises(VerificationError, match=r"fullchain.pem is not cert.pem"):
        store.commit(1, files)


def test_cert_with_two_certificates_rejected(tmp_path: Path) -> None:
    """cert.pem must contain only the leaf."""
    store = open_store(tmp_path / "store")
    files = make_files()
    files["cert.pem"] = files["fullchain.pem"]

    with pytest.raises(VerificationError, match=r"cert.pem contains 3 certificates"):
        store.commit(1, files)


@pytest.mark.parametrize(
    ("option", "value"),
    [("keep", 0), ("keep", "5"), ("key_mode", 0o604), ("key_mode", 0o200)],
)
def test_invalid_options(tmp_path: Path, option: str, value: object) -> None:
    """keep below 1 and key modes readable by others raise ConfigError."""
    with pytest.raises(ConfigError, match=f"invalid {option}"):
        KeyStore(tmp_path / "store", **{option: value})  # type: ignore[arg-type]


# Encryption at rest.


def test_encryption_round_trip(tmp_path: Path) -> None:
    """With a passphrase the live key is encrypted and current() decrypts it."""
    path = tmp_path / "store"
    store = open_store(path, passphrase="correct horse")
    files = make_files()

    store.commit(1, files)

    on_disk = store.live_path("privkey.pem").read_bytes()
    assert on_disk.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert stat.S_IMODE(os.stat(store.live_path("privkey.pem")).st_mode) == 0o600
    current = open_store(path, passphrase=b"correct horse").current()
    assert current is not None
    assert current["cert.pem"] == files["cert.pem"]
    original = serialization.load_pem_private_key(files["privkey.pem"], None)
    decrypted = serialization.load_pem_private_key(current["privkey.pem"], None)
    assert decrypted.private_numbers() == original.private_numbers()  # type: ignore[union-attr]


def test_wrong_passphrase(tmp_path: Path) -> None:
    """Opening with a wrong passphrase raises ConfigError and moves nothing."""
    path = tmp_path / "store"
    store = open_store(path, passphrase="right")
    store.commit(1, make_files())
    store.commit(2, make_files())
    before = _tree(path)

    with pytest.raises(ConfigError, match=r"passphrase is wrong"):
        open_store(path, passphrase="wrong")
    with pytest.raises(ConfigError, match=r"has no passphrase"):
        open_store(path)

    assert _tree(path) == before


def test_encrypted_input_key(tmp_path: Path) -> None:
    """A key already encrypted with the store's passphrase is accepted."""
    store = open_store(tmp_path / "store", passphrase=b"pw")
    files = make_files()
    key = serialization.load_pem_private_key(files["privkey.pem"], None)
    files["privkey.pem"] = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )

    store.commit(1, files)

    assert store.current() is not None


# atomic_write.


def test_atomic_write_content_and_mode(tmp_path: Path, umask: None) -> None:
    """atomic_write replaces the content, 0600 by default, exact under umask 0."""
    os.umask(0)
    target = tmp_path / "account.key"

    atomic_write(target, b"first")
    atomic_write(target, b"second")

    assert target.read_bytes() == b"second"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["account.key"]


def test_atomic_write_public_mode_widened(tmp_path: Path, umask: None) -> None:
    """A shared mode such as 0644 is restored when the umask removed bits."""
    os.umask(0o077)
    target = tmp_path / "config.json"

    atomic_write(target, b"{}", mode=0o644)

    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_atomic_write_secret_mode_not_widened(tmp_path: Path, umask: None) -> None:
    """A secret file whose owner bits the umask removed raises StoreError."""
    target = tmp_path / "account.key"
    atomic_write(target, b"old")
    os.umask(0o277)

    with pytest.raises(StoreError, match=r"instead of 0o600"):
        atomic_write(target, b"new")

    assert target.read_bytes() == b"old"


def test_atomic_write_replaces_symlink(tmp_path: Path) -> None:
    """A symlink at the target is replaced; the file it pointed to is untouched."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"keep")
    target = tmp_path / "link"
    target.symlink_to(elsewhere)

    atomic_write(target, b"new")

    assert not target.is_symlink()
    assert elsewhere.read_bytes() == b"keep"


# Regressions named for the failures they guard against.


def test_regression_kill_between_key_and_cert(tmp_path: Path) -> None:
    """Regression: death after writing the key, before the cert, left a mismatch.

    The new key is written first, but only into an unpublished directory, so
    after a crash at any step up to the certificate the live key and
    certificate still belong together.
    """
    path = tmp_path / "store"
    store = open_store(path)
    old = make_files()
    store.commit(1, old)
    probe = FaultyFileSystem(skip_fsync=True)
    open_store(path, filesystem=probe).commit(2, make_files())
    operations = [str(step) for step in probe.steps]
    key_written = next(
        i for i, op in enumerate(operations) if "write(" in op and "privkey" in op
    )
    cert_written = next(
        i for i, op in enumerate(operations) if "write(" in op and "/cert.pem" in op
    )
    assert key_written < cert_written
    current_before = store.current()

    for index in range(key_written + 1, cert_written + 1):
        fs = FaultyFileSystem(skip_fsync=True)
        dying = open_store(path, filesystem=fs)
        fs.steps.clear()
        fs.fail_at = index
        with pytest.raises(SimulatedCrash):
            dying.commit(3, make_files())
        fs.release()

        current = assert_consistent(path, [current_before])  # type: ignore[list-item]
        assert_matching(current)


def test_regression_no_empty_files_after_full_disk(tmp_path: Path) -> None:
    """Regression: a full disk during a rewrite left empty files behind.

    Nothing is rewritten in place, so every live file keeps its content.
    """
    path = tmp_path / "store"
    store = open_store(path)
    old = make_files()
    store.commit(1, old)
    fs = FaultyFileSystem(error=enospc, torn_write=True)
    full = open_store(path, filesystem=fs)
    fs.fail_when = lambda step: step.operation == "write" and "privkey" in step.target

    with pytest.raises(StoreError, match=r"No space left"):
        full.commit(2, make_files())

    for name in REQUIRED_NAMES:
        assert store.live_path(name).read_bytes() == old[name]
    assert_consistent(path, [old])


def test_regression_no_empty_files_after_crash(tmp_path: Path) -> None:
    """Regression: a crash during a rewrite left empty files behind."""
    path = tmp_path / "store"
    store = open_store(path)
    old = make_files()
    store.commit(1, old)
    probe = FaultyFileSystem(skip_fsync=True)
    open_store(path, filesystem=probe).commit(1, make_files())
    store.rollback(1)
    rename = next(i for i, step in enumerate(probe.steps) if "..current" in step.target)

    for index in range(rename + 1):
        fs = FaultyFileSystem(torn_write=True, skip_fsync=True)
        dying = open_store(path, filesystem=fs)
        fs.steps.clear()
        fs.fail_at = index
        with pytest.raises(SimulatedCrash):
            dying.commit(1, make_files())
        fs.release()

        for name in REQUIRED_NAMES:
            assert store.live_path(name).read_bytes() == old[name], probe.steps[index]
        assert_consistent(path, [old])

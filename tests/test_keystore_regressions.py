"""Regressions of the key store, each test named for a failure it once had."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

import singlewriter.keystore._manifest as manifest_module
from singlewriter._errors import (
    ConfigError,
    StaleTokenError,
    StoreError,
    VerificationError,
)
from singlewriter.keystore import Generation, KeyStore, atomic_write
from singlewriter.keystore._hooks import encode_marker, new_publication
from tests._keystore_support import (
    SimulatedCrash,
    authorities,
    make_files,
    open_store,
    same_name_intermediate,
)

STORE_LOGGER = "singlewriter.keystore"

# A token as the Redis backend issues it: the server time in microseconds.
REDIS_TOKEN = 1_796_401_000_000_000


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _run_with_timeout(
    target: Callable[[], object], timeout: float = 30
) -> list[object]:
    """Run ``target`` in a thread; fail if it is still running after ``timeout``."""
    results: list[object] = []

    def call() -> None:
        try:
            results.append(target())
        except Exception as exc:  # the test inspects it
            results.append(exc)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still blocked after {timeout} s"
    return results


# File modes.


def test_regression_der_and_p12_key_world_readable(tmp_path: Path) -> None:
    """Regression: a key in an extra DER or PKCS#12 file was stored at 0644."""
    store = open_store(tmp_path / "store")
    files = make_files()
    key = serialization.load_pem_private_key(files["privkey.pem"], None)
    certificate = x509.load_pem_x509_certificate(files["cert.pem"])
    files["key.der"] = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    files["site.p12"] = pkcs12.serialize_key_and_certificates(
        b"site",
        key,  # type: ignore[arg-type]
        certificate,
        None,
        serialization.NoEncryption(),
    )

    generation = store.commit(1, files)

    assert _mode(generation.path / "key.der") == 0o600
    assert _mode(generation.path / "site.p12") == 0o600
    assert _mode(store.live_path("key.der")) == 0o600
    assert store.current() == files


def _cert_only_cases() -> dict[str, tuple[bytes, int]]:
    root, intermediate = authorities()
    files = make_files()
    body = intermediate.pem.split(b"\n", 1)[1]
    return {
        "one certificate": (intermediate.pem, 0o644),
        "two certificates with blank lines": (
            b"\n" + intermediate.pem + b"\n\n" + root.pem,
            0o644,
        ),
        "CRLF line ends": (intermediate.pem.replace(b"\n", b"\r\n"), 0o644),
        "text before the block": (b"Bag Attributes\n" + intermediate.pem, 0o600),
        "certificate and key": (files["cert.pem"] + files["privkey.pem"], 0o600),
        "key label hidden as certificate": (
            files["privkey.pem"].replace(b"PRIVATE KEY", b"CERTIFICATE"),
            0o600,
        ),
        "trusted certificate block": (
            b"-----BEGIN TRUSTED CERTIFICATE-----\n"
            + body.replace(b"END CERTIFICATE", b"END TRUSTED CERTIFICATE"),
            0o600,
        ),
        "DER certificate": (
            intermediate.certificate.public_bytes(serialization.Encoding.DER),
            0o600,
        ),
        "empty file": (b"", 0o600),
        "plain text": (b"hello\n", 0o600),
    }


@pytest.mark.parametrize("case", sorted(_cert_only_cases()))
def test_file_mode_only_for_certificate_pem(tmp_path: Path, case: str) -> None:
    """An extra file gets 0644 only when it is PEM of CERTIFICATE blocks alone."""
    content, expected = _cert_only_cases()[case]
    store = open_store(tmp_path / "store")

    generation = store.commit(1, {**make_files(), "extra": content})

    assert _mode(generation.path / "extra") == expected
    assert _mode(generation.path / "cert.pem") == 0o644


# Store paths.


def test_regression_empty_path_uses_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: KeyStore("") built a store in the current directory."""
    monkeypatch.chdir(tmp_path)

    with pytest.raises(ConfigError, match=r"the path is empty.*'\.'"):
        KeyStore("")

    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("spelling", ["/", "//", "/tmp/..", "symlink"])
def test_regression_store_at_filesystem_root(tmp_path: Path, spelling: str) -> None:
    """Regression: KeyStore("/") built a store at the filesystem root."""
    (tmp_path / "symlink").symlink_to("/")
    path = tmp_path / "symlink" if spelling == "symlink" else Path(spelling)

    with pytest.raises(ConfigError, match=r"resolves to the filesystem root"):
        KeyStore(path)

    assert not os.path.lexists("/..current")
    assert not os.path.lexists("/.token")


def test_regression_nul_in_path_value_error(tmp_path: Path) -> None:
    """Regression: a store path with a NUL byte raised a bare ValueError."""
    with pytest.raises(ConfigError, match=r"NUL byte"):
        KeyStore(f"{tmp_path}/a\x00b")


def test_store_path_bytes_rejected(tmp_path: Path) -> None:
    """A store path given as bytes raises ConfigError asking for str or Path."""
    with pytest.raises(ConfigError, match=r"pass the path as a str"):
        KeyStore(os.fsencode(tmp_path / "store"))  # type: ignore[arg-type]


# File modes changed by an operator.


def test_regression_chmod_rolls_back_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: chmod 640 on the live key made the next open publish the old key."""
    path = tmp_path / "store"
    store = open_store(path)
    store.commit(1, make_files())
    new = make_files()
    store.commit(2, new)
    os.chmod(store.live_path("privkey.pem"), 0o640)

    with caplog.at_level(logging.WARNING, logger=STORE_LOGGER):
        reopened = open_store(path)

    assert reopened.current() == new
    assert os.readlink(path / "..current") == "..gen-00000002"
    assert _mode(store.live_path("privkey.pem")) == 0o640, "the mode was changed"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("privkey.pem is 0o640, recorded 0o600" in text for text in warnings)
    assert [g.sequence for g in reopened.generations()] == [1, 2]


def test_chmod_current_survives_commit_recovery(tmp_path: Path) -> None:
    """The recovery inside a commit also keeps a chmod-ed current generation."""
    path = tmp_path / "store"
    store = open_store(path)
    store.commit(1, make_files())
    store.commit(2, make_files())
    os.chmod(store.live_path("cert.pem"), 0o600)

    generation = store.commit(3, make_files())

    assert generation.previous == 2
    assert _mode(generation.path / "privkey.pem") == 0o600
    assert _mode(generation.path / "cert.pem") == 0o644
    assert store.rollback(3).sequence == 2


# Deploy hooks and the store lock.


def test_regression_hook_reading_store_deadlocks(tmp_path: Path) -> None:
    """Regression: a deploy hook that opened the store blocked the commit forever."""
    path = tmp_path / "store"
    seen: list[dict[str, bytes] | None] = []

    def read_store(generation: Generation) -> None:
        seen.append(open_store(path).current())

    store = open_store(path, hooks={"read": read_store})
    files = make_files()

    results = _run_with_timeout(lambda: store.commit(1, files))

    assert isinstance(results[0], Generation), results
    assert seen == [files]


def test_hooks_run_without_store_lock(tmp_path: Path) -> None:
    """A hook runs after the store lock is released, so another writer can take it."""
    path = tmp_path / "store"
    free: list[bool] = []

    def probe(generation: Generation) -> None:
        fd = os.open(path / ".lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            free.append(True)
        except BlockingIOError:
            free.append(False)
        finally:
            os.close(fd)

    store = open_store(path, hooks={"probe": probe})
    store.commit(1, make_files())
    store.commit(2, make_files())
    store.rollback(2)

    assert free == [True, True, True]


def test_current_not_blocked_by_running_hook(tmp_path: Path) -> None:
    """current() and a new open return while another thread's hook is running."""
    path = tmp_path / "store"
    started = threading.Event()
    release = threading.Event()

    def slow(generation: Generation) -> None:
        started.set()
        release.wait(30)

    writer = open_store(path, hooks={"slow": slow})
    reader = open_store(path)
    files = make_files()
    committer = threading.Thread(target=writer.commit, args=(1, files), daemon=True)
    committer.start()
    try:
        assert started.wait(30), "the hook did not start"
        assert _run_with_timeout(reader.current) == [files]
        assert _run_with_timeout(lambda: open_store(path).current()) == [files]
    finally:
        release.set()
        committer.join(30)


def test_open_in_good_order_takes_no_lock(tmp_path: Path) -> None:
    """Opening a store that needs no repair does not wait for the store lock."""
    path = tmp_path / "store"
    files = make_files()
    open_store(path).commit(1, files)
    fd = os.open(path / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        results = _run_with_timeout(lambda: open_store(path).current())
    finally:
        os.close(fd)

    assert results == [files]


def _record_hook(log: Path) -> Callable[[Generation], None]:
    def record(generation: Generation) -> None:
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, b"%d\n" % generation.sequence)
        finally:
            os.close(fd)
        time.sleep(0.2)

    return record


def test_pending_hook_claimed_once_by_two_processes(tmp_path: Path) -> None:
    """Two processes that see the same pending hook run it once between them."""
    path = tmp_path / "store"
    store = open_store(path, hooks={"deploy": lambda generation: _crash()})
    with pytest.raises(SimulatedCrash):
        store.commit(1, make_files())
    log = tmp_path / "calls"
    sets = {2: make_files(), 3: make_files()}

    children = []
    for token, files in sets.items():
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child never returns
            code = 1
            try:
                child = open_store(path)
                child.add_deploy_hook(_record_hook(log), name="deploy")
                with contextlib.suppress(StaleTokenError):
                    child.commit(token, files)
                code = 0
            finally:
                os._exit(code)
        children.append(pid)

    for pid in children:
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status), "a child was killed"
        assert os.WEXITSTATUS(status) == 0, "a child raised"
    calls = [int(line) for line in log.read_text().split()]
    assert calls.count(1) == 1, calls
    assert len(calls) == len(set(calls)), f"a hook ran twice: {calls}"


def _crash() -> None:
    raise SimulatedCrash


def test_hook_runs_again_for_new_publication(tmp_path: Path) -> None:
    """A generation published again while its hook runs gets the hook again."""
    calls: list[int] = []

    def republish(generation: Generation) -> None:
        calls.append(generation.sequence)
        if len(calls) == 1:
            # What a rollback to this generation in another process writes.
            marker = encode_marker(["deploy"], new_publication())
            (generation.path / ".deploy-pending").write_bytes(marker)

    store = open_store(tmp_path / "store", hooks={"deploy": republish})
    generation = store.commit(1, make_files())

    assert calls == [1, 1]
    assert not (generation.path / ".deploy-pending").exists()


def test_hook_cannot_commit_through_other_object(tmp_path: Path) -> None:
    """A hook that commits through a second KeyStore of its store gets ConfigError."""
    path = tmp_path / "store"
    errors: list[Exception] = []

    def recursive(generation: Generation) -> None:
        try:
            open_store(path).commit(9, make_files())
        except ConfigError as exc:
            errors.append(exc)

    store = open_store(path, hooks={"recursive": recursive})
    results = _run_with_timeout(lambda: store.commit(1, make_files()))

    assert isinstance(results[0], Generation), results
    assert len(errors) == 1
    assert "hooks must not commit" in str(errors[0])


# Readers during commits.


def test_regression_reader_fails_on_pruned_generation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: current() raised StoreError when keep=1 deleted its generation."""
    path = tmp_path / "store"
    reader = open_store(path, keep=1)
    writer = open_store(path, keep=1)
    writer.commit(1, make_files())
    newest = make_files()
    original = manifest_module.read_file_at
    committed: list[int] = []

    def read_then_replace(directory_fd: int, name: str) -> tuple[bytes, os.stat_result]:
        if not committed:
            committed.append(1)
            writer.commit(2, make_files())
            writer.commit(3, newest)
        return original(directory_fd, name)

    monkeypatch.setattr(manifest_module, "read_file_at", read_then_replace)
    snapshot = reader.read_current()

    assert committed, "the commits did not run during the read"
    assert not (path / "..gen-00000001").exists()
    assert snapshot is not None
    generation, files = snapshot
    assert generation.sequence == 3
    assert files == newest


def test_reader_gives_up_after_replacements(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read whose generation is deleted at every attempt raises StoreError."""
    path = tmp_path / "store"
    reader = open_store(path, keep=1)
    writer = open_store(path, keep=1)
    writer.commit(1, make_files())
    original = manifest_module.read_file_at
    tokens = iter(range(2, 100))
    busy: list[int] = []

    def replace_during_read(
        directory_fd: int, name: str
    ) -> tuple[bytes, os.stat_result]:
        if not busy:
            busy.append(1)
            try:
                writer.commit(next(tokens), make_files())
                writer.commit(next(tokens), make_files())
            finally:
                busy.clear()
        return original(directory_fd, name)

    monkeypatch.setattr(manifest_module, "read_file_at", replace_during_read)

    with pytest.raises(StoreError, match=r"replaced and deleted 5 times") as caught:
        reader.current()
    assert "recovery" not in str(caught.value)


def test_current_of_damaged_generation_raises(tmp_path: Path) -> None:
    """A damaged current generation that the pointer still names raises StoreError."""
    store = open_store(tmp_path / "store")
    generation = store.commit(1, make_files())
    (generation.path / "cert.pem").write_bytes(b"tampered")

    with pytest.raises(StoreError, match=r"open the store again to run recovery"):
        store.current()


# Tokens.


@pytest.mark.parametrize("token", [10**100, 2**63, -1])
def test_regression_huge_token_locks_store(tmp_path: Path, token: int) -> None:
    """Regression: a token of 10**100 was recorded and locked the store for good."""
    store = open_store(tmp_path / "store")
    store.commit(5, make_files())

    with pytest.raises(ConfigError, match=r"from 0 to 2\*\*63 - 1"):
        store.commit(token, make_files())
    with pytest.raises(ConfigError, match=r"from 0 to 2\*\*63 - 1"):
        store.rollback(token)

    assert store.highest_token == 5
    store.commit(6, make_files())


def test_largest_token_accepted(tmp_path: Path) -> None:
    """The token 2**63 - 1 is valid and recorded."""
    store = open_store(tmp_path / "store")

    store.commit(2**63 - 1, make_files())

    assert store.highest_token == 2**63 - 1


def test_reset_fence_after_backend_switch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """After reset_fence, a store fenced by Redis tokens accepts file lock tokens."""
    path = tmp_path / "store"
    store = open_store(path)
    store.commit(REDIS_TOKEN, make_files())
    with pytest.raises(StaleTokenError, match=r"reset_fence"):
        store.commit(1, make_files())

    with caplog.at_level(logging.WARNING, logger=STORE_LOGGER):
        previous = store.reset_fence(0, confirm=str(store.path))

    assert previous == REDIS_TOKEN
    assert store.highest_token == 0
    assert any("Reset the fence" in r.getMessage() for r in caplog.records)
    files = make_files()
    generation = store.commit(1, files)
    assert generation.sequence == 2
    assert store.current() == files
    assert (path / ".token").read_text() == "1\nfence-reset-after-generation 1\n"

    reopened = open_store(path)
    assert reopened.highest_token == 1
    with pytest.raises(StaleTokenError):
        reopened.commit(0, make_files())
    assert reopened.rollback(1).sequence == 1
    assert reopened.highest_token == 1
    assert reopened.commit(2, make_files()).sequence == 3


def test_reset_fence_numbers_above_reset(tmp_path: Path) -> None:
    """Generations deleted after a reset do not bring back their sequence numbers."""
    path = tmp_path / "store"
    store = open_store(path, keep=1)
    for token in (REDIS_TOKEN, REDIS_TOKEN + 1, REDIS_TOKEN + 2):
        store.commit(token, make_files())
    store.reset_fence(1, confirm=str(store.path))
    for generation in store.generations():
        for entry in generation.path.iterdir():
            entry.unlink()
        generation.path.rmdir()
    (path / "..current").unlink()

    generation = store.commit(1, make_files())

    assert generation.sequence == 4
    assert open_store(path).highest_token == 1


def test_reset_fence_requires_confirmation(tmp_path: Path) -> None:
    """reset_fence without the store path as confirm raises ConfigError."""
    path = tmp_path / "store"
    store = open_store(path)
    store.commit(REDIS_TOKEN, make_files())
    before = (path / ".token").read_bytes()

    with pytest.raises(ConfigError, match=r"not confirmed"):
        store.reset_fence(0, confirm="yes")
    with pytest.raises(ConfigError, match=r"invalid token"):
        store.reset_fence(-1, confirm=str(store.path))

    assert (path / ".token").read_bytes() == before
    assert store.highest_token == REDIS_TOKEN


# Errors of other libraries that reached the caller.


@pytest.mark.parametrize("files", [[("cert.pem", b"x")], None, "cert.pem"])
def test_regression_files_list_attribute_error(tmp_path: Path, files: object) -> None:
    """Regression: commit(token, list) and commit(token, None) raised AttributeError."""
    store = open_store(tmp_path / "store")

    with pytest.raises(ConfigError, match=r"pass a mapping of file name to bytes"):
        store.commit(1, files)  # type: ignore[arg-type]


def test_regression_long_passphrase_value_error(tmp_path: Path) -> None:
    """Regression: a passphrase over 1023 bytes raised cryptography's ValueError."""
    with pytest.raises(ConfigError, match=r"at most 1023 bytes"):
        open_store(tmp_path / "long", passphrase="x" * 1024)

    store = open_store(tmp_path / "limit", passphrase="x" * 1023)
    files = make_files()
    store.commit(1, files)
    current = store.current()
    assert current is not None
    assert current["cert.pem"] == files["cert.pem"]


@pytest.mark.parametrize(
    "returned", [datetime(2026, 6, 1, 12), "now", None], ids=["naive", "str", "None"]
)
def test_regression_naive_clock_type_error(tmp_path: Path, returned: object) -> None:
    """Regression: a clock returning a naive datetime or a str raised TypeError."""
    store = open_store(tmp_path / "store", clock=lambda: returned)

    with pytest.raises(ConfigError, match=r"must return an aware datetime"):
        store.commit(1, make_files())

    assert store.current() is None


def test_clock_not_callable_rejected(tmp_path: Path) -> None:
    """A clock that is not callable raises ConfigError at open."""
    with pytest.raises(ConfigError, match=r"invalid clock"):
        KeyStore(tmp_path / "store", clock=datetime.now())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"data": "text"}, r"pass bytes, not str"),
        ({"data": None}, r"pass bytes, not NoneType"),
        ({"path": ""}, r"the path is empty"),
        ({"path": "a\x00b"}, r"NUL byte"),
        ({"mode": 0o1000}, r"invalid mode"),
        ({"mode": True}, r"invalid mode"),
    ],
    ids=["str", "None", "empty path", "NUL", "mode too large", "bool mode"],
)
def test_regression_atomic_write_str_type_error(
    tmp_path: Path, arguments: dict[str, object], message: str
) -> None:
    """Regression: atomic_write(path, str) raised TypeError from memoryview."""
    target = tmp_path / "config.json"
    atomic_write(target, b"old")
    call: dict[str, object] = {"path": target, "data": b"new", **arguments}
    path = call.pop("path")
    data = call.pop("data")

    with pytest.raises(ConfigError, match=message):
        atomic_write(path, data, **call)  # type: ignore[arg-type]

    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


# Options accepted that should not be.


@pytest.mark.parametrize(
    "hooks",
    [{"x": 5}, [None], lambda generation: None, 5],
    ids=["mapping to int", "list with None", "bare callable", "int"],
)
def test_regression_non_callable_hook_accepted(tmp_path: Path, hooks: object) -> None:
    """Regression: hooks={"x": 5} was accepted and failed only after a commit."""
    with pytest.raises(ConfigError, match=r"invalid (deploy )?hook"):
        KeyStore(tmp_path / "store", hooks=hooks)  # type: ignore[arg-type]


def test_add_deploy_hook_rejects_non_callable(tmp_path: Path) -> None:
    """add_deploy_hook with a non-callable or an empty name raises ConfigError."""
    store = open_store(tmp_path / "store")

    with pytest.raises(ConfigError, match=r"pass a callable"):
        store.add_deploy_hook("reload nginx", name="reload")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"invalid deploy hook name"):
        store.add_deploy_hook(lambda generation: None, name="")


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("directory_mode", 0o777),
        ("directory_mode", 0o775),
        ("directory_mode", 0o600),
        ("file_mode", 0o666),
        ("file_mode", 0o664),
        ("file_mode", 0o044),
        ("key_mode", 0o660),
        ("key_mode", 0o1600),
    ],
    ids=lambda value: value if isinstance(value, str) else oct(value),
)
def test_regression_writable_modes_accepted(
    tmp_path: Path, option: str, value: int
) -> None:
    """Regression: directory_mode=0o777 and file_mode=0o666 were accepted."""
    with pytest.raises(ConfigError, match=f"invalid {option} {value:#o}"):
        KeyStore(tmp_path / "store", **{option: value})  # type: ignore[arg-type]

    assert not (tmp_path / "store").exists()


def test_narrow_modes_accepted(tmp_path: Path) -> None:
    """Modes that only narrow access are accepted and used."""
    store = open_store(
        tmp_path / "store", key_mode=0o640, file_mode=0o640, directory_mode=0o750
    )

    generation = store.commit(1, make_files())

    assert _mode(generation.path) == 0o750
    assert _mode(generation.path / "privkey.pem") == 0o640
    assert _mode(generation.path / "cert.pem") == 0o640


# Chain messages.


def test_regression_chain_other_ca_same_name(tmp_path: Path) -> None:
    """Regression: a same-name CA's chain was reported "out of order ... ()"."""
    store = open_store(tmp_path / "store")
    root, _ = authorities()
    files = make_files()
    files["chain.pem"] = same_name_intermediate().pem + root.pem
    files["fullchain.pem"] = files["cert.pem"] + files["chain.pem"]

    with pytest.raises(VerificationError) as caught:
        store.commit(1, files)

    message = str(caught.value)
    assert "signature does not verify" in message
    assert "'CN=www.example.test'" in message
    assert "certificate 1 of chain.pem 'CN=Test Intermediate CA'" in message
    assert "out of order" not in message
    assert "()" not in message
    assert store.current() is None


def test_chain_issuer_name_mismatch_message(tmp_path: Path) -> None:
    """A chain whose first certificate has another name says which issuer is named."""
    store = open_store(tmp_path / "store")
    root, _ = authorities()
    files = make_files()
    files["chain.pem"] = root.pem
    files["fullchain.pem"] = files["cert.pem"] + files["chain.pem"]

    with pytest.raises(VerificationError) as caught:
        store.commit(1, files)

    message = str(caught.value)
    assert "names the issuer 'CN=Test Intermediate CA'" in message
    assert "certificate 1 of chain.pem is 'CN=Test Root CA'" in message

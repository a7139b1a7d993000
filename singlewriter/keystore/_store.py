"""KeyStore: one certificate's key material, published as one atomic set."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path

from singlewriter._errors import (
    ConfigError,
    SingleWriterError,
    StaleTokenError,
    StoreError,
    VerificationError,
)

from ._context import StoreContext
from ._fs import FileSystem, StrPath, atomic_write, failure, remove_tree, store_lock
from ._hooks import (
    DeployHook,
    hook_name,
    read_marker,
    replace_marker,
    run_pending_hooks,
)
from ._layout import MANIFEST_NAME, REQUIRED_NAMES, StoreLayout
from ._manifest import (
    FileRecord,
    Generation,
    InvalidGeneration,
    Manifest,
    open_directory,
    read_generation,
    read_manifest,
)
from ._paths import check_store_path, validate_name
from ._publish import (
    check_written,
    file_mode_for,
    generation_sequences,
    prune,
    publish,
    remove_stale_links,
    write_generation,
)
from ._recovery import (
    check_generation,
    load_manifest,
    pointer_sequence,
    recorded_token,
    recover,
    token_file_value,
    verify_generation,
)
from ._verify import (
    KEY_NAME,
    check_validity_period,
    decrypt_private_key,
    encrypt_private_key,
    verify_set,
)

__all__ = ["KeyStore"]

logger = logging.getLogger(__name__)


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _check_mode(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o777:
        raise ConfigError(
            f"invalid {name} {value!r}: pass permission bits such as 0o600"
        )
    return value


def _check_options(keep: int, key_mode: int) -> None:
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ConfigError(
            f"invalid keep={keep!r}: pass how many generations to keep, at least 1"
        )
    if key_mode & 0o007 or not key_mode & 0o400:
        raise ConfigError(
            f"invalid key_mode {key_mode:#o}: a private key must be readable by "
            "its owner and by nobody outside its group, for example 0o600 or 0o640"
        )


def _encode_passphrase(passphrase: str | bytes | None) -> bytes | None:
    if passphrase is None:
        return None
    encoded = passphrase.encode() if isinstance(passphrase, str) else passphrase
    if not isinstance(encoded, bytes) or not encoded:
        raise ConfigError("invalid passphrase: pass a non-empty str or bytes")
    return encoded


class KeyStore:
    """One certificate's key material under ``path``, published as one set.

    Servers read the stable paths :meth:`live_path` returns. Each is a
    symlink through ``..current`` into an immutable generation directory, so
    opening one path always gives a file of the current complete set.
    :meth:`commit` publishes a new set with one atomic rename after writing,
    fsyncing and verifying it. A crash at any point leaves either the old or
    the new set published, never a mix, and never an empty or partial file.

    Fencing: the store records the highest lease token that has written to
    it. A commit or rollback with a lower token raises StaleTokenError and
    changes nothing. An equal token may commit again, because one lease may
    legitimately publish twice. The token check and the publish happen under
    an flock(2) on ``.lock``, which excludes other writers on this host only.

    Opening a store creates the directory if needed and runs recovery (see
    ``_recovery``). Methods are safe to call from several threads. Deploy
    hooks run in the thread that commits, with the store lock held, so a
    hook must not commit or roll back the same store.

    ``hooks`` is a list of callables, named by their qualified names, or a
    mapping from stable names to callables. Hooks that a crashed process
    left pending run during the open only if they are passed here. Hooks
    added later with :meth:`add_deploy_hook` run at the next commit or
    rollback.
    """

    def __init__(
        self,
        path: StrPath,
        *,
        keep: int = 5,
        passphrase: str | bytes | None = None,
        clock: Callable[[], datetime] | None = None,
        hooks: Mapping[str, DeployHook] | Iterable[DeployHook] = (),
        key_mode: int = 0o600,
        file_mode: int = 0o644,
        directory_mode: int = 0o755,
        filesystem: FileSystem | None = None,
        lock_name: str | None = None,
    ) -> None:
        _check_mode("key_mode", key_mode)
        _check_options(keep, key_mode)
        root = check_store_path(Path(path))

        self._context = StoreContext(
            layout=StoreLayout(root),
            fs=filesystem if filesystem is not None else FileSystem(),
            passphrase=_encode_passphrase(passphrase),
            clock=clock if clock is not None else _utc_now,
            keep=keep,
            key_mode=key_mode,
            file_mode=_check_mode("file_mode", file_mode),
            directory_mode=_check_mode("directory_mode", directory_mode),
            lock_name=lock_name,
        )
        self._hooks: dict[str, DeployHook] = {}
        self._thread_lock = threading.Lock()
        self._hook_thread: int | None = None
        if isinstance(hooks, Mapping):
            for name, hook in hooks.items():
                self.add_deploy_hook(hook, name=name)
        else:
            for hook in hooks:
                self.add_deploy_hook(hook)

        self._create_root()
        with self._locked():
            self._recover()

    def __repr__(self) -> str:
        return f"KeyStore({str(self.path)!r})"

    @property
    def path(self) -> Path:
        """The store directory."""
        return self._context.layout.root

    @property
    def highest_token(self) -> int | None:
        """The highest token that has written to the store, or None."""
        return recorded_token(self._context)

    def live_path(self, name: str) -> Path:
        """Return the stable path of ``name`` that a server is configured with."""
        return self._context.layout.live(validate_name(name))

    def add_deploy_hook(self, hook: DeployHook, *, name: str | None = None) -> None:
        """Register ``hook`` to run once for each generation this store publishes.

        ``name`` identifies the hook in the durable pending marker and defaults
        to the hook's module and qualified name. A process that opens the
        store after a crash runs a pending hook only if it registered a hook
        of the same name, so use a stable name for lambdas and closures.
        """
        key = name if name is not None else hook_name(hook)
        if key in self._hooks:
            raise ConfigError(
                f"a deploy hook named {key!r} is already registered on {self.path}: "
                "pass a distinct name="
            )
        self._hooks[key] = hook

    # Reading.

    def read_current(self) -> tuple[Generation, dict[str, bytes]] | None:
        """Return the current generation and its files, or None if none is published.

        The pointer is opened once and every file is read through that
        directory descriptor, so the result comes from a single generation
        even while another process commits. With a passphrase, ``privkey.pem``
        is returned decrypted as unencrypted PKCS#8 PEM.
        """
        layout = self._context.layout
        try:
            fd = open_directory(layout.pointer)
        except FileNotFoundError:
            return None

        try:
            manifest, files = read_generation(fd, None)
        except (InvalidGeneration, OSError) as exc:
            raise StoreError(
                f"the current generation of {self.path} cannot be read ({exc}): "
                "open the store again to run recovery, or commit a new set",
                lock_name=self._context.lock_name,
            ) from exc
        finally:
            os.close(fd)

        if KEY_NAME in files:
            files[KEY_NAME] = decrypt_private_key(files[KEY_NAME], self._passphrase)
        generation = manifest.generation(layout.generation(manifest.sequence))
        return generation, dict(sorted(files.items()))

    def current(self) -> dict[str, bytes] | None:
        """Return the published set as name to bytes, or None if none is published."""
        snapshot = self.read_current()
        return None if snapshot is None else snapshot[1]

    def current_generation(self) -> Generation | None:
        """Return the generation the pointer names, or None."""
        layout = self._context.layout
        try:
            fd = open_directory(layout.pointer)
        except FileNotFoundError:
            return None
        try:
            manifest = read_manifest(fd, None)
        except InvalidGeneration:
            return None
        finally:
            os.close(fd)
        return manifest.generation(layout.generation(manifest.sequence))

    def generations(self) -> list[Generation]:
        """Return every complete generation on disk, oldest first.

        A generation is listed when its files match its manifest. Its
        certificate may have expired, and it may never have been published
        if a commit died between writing it and swapping the pointer.
        """
        layout = self._context.layout
        result = []
        for sequence in generation_sequences(layout):
            try:
                manifest, _ = check_generation(self._context, sequence)
            except InvalidGeneration:
                continue
            result.append(manifest.generation(layout.generation(sequence)))
        return result

    # Writing.

    def commit(self, token: int, files: Mapping[str, bytes]) -> Generation:
        """Verify ``files`` and publish them as the new current set.

        ``files`` maps names to content and must contain privkey.pem,
        cert.pem, chain.pem and fullchain.pem. Raises StaleTokenError when a
        higher token has written to the store, VerificationError or
        ConfigError for bad input, and StoreError when a filesystem step
        fails. In every one of these cases the previous set stays published,
        and a StoreError is not retried in place: call commit again.

        One exception: if the directory fsync after the pointer swap fails and
        setting the pointer back fails too, the new set stays visible with
        unknown durability, which is logged at ERROR.
        """
        token = self._check_token_type(token)
        content = self._check_files(files)
        with self._locked():
            self._reject_stale(token)
            try:
                return self._commit_locked(token, content)
            except SingleWriterError as exc:
                raise self._failed("commit", token, exc) from exc
            except OSError as exc:
                error = failure("reading", self.path, exc)
                raise self._failed("commit", token, error) from exc

    def rollback(self, token: int) -> Generation:
        """Publish the generation that was current before the current one.

        Generations that no longer verify (expired or damaged) are skipped
        along the way back. Raises StoreError when there is none, and
        StaleTokenError like :meth:`commit`. Deploy hooks run for the
        generation published.
        """
        token = self._check_token_type(token)
        with self._locked():
            self._reject_stale(token)
            try:
                return self._rollback_locked(token)
            except SingleWriterError as exc:
                raise self._failed("rollback", token, exc) from exc
            except OSError as exc:
                error = failure("reading", self.path, exc)
                raise self._failed("rollback", token, error) from exc

    # Internals.

    @property
    def _passphrase(self) -> bytes | None:
        return self._context.passphrase

    def _create_root(self) -> None:
        """Create the store directory and any missing parents."""
        missing = []
        directory = self.path
        while not os.path.lexists(directory):
            missing.append(directory)
            directory = directory.parent

        for directory in reversed(missing):
            try:
                self._context.fs.mkdir(directory, self._context.directory_mode)
            except FileExistsError:
                continue
            except OSError as exc:
                raise failure("creating directory", directory, exc) from exc

        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            raise ConfigError(
                f"store path {self.path} is a dangling symlink: point it at a "
                "directory or remove it"
            ) from None
        if not stat.S_ISDIR(info.st_mode):
            raise ConfigError(f"store path {self.path} is not a directory")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if self._hook_thread == threading.get_ident():
            raise ConfigError(
                f"a deploy hook tried to change {self.path} while the store runs "
                "its hooks: hooks must not commit or roll back the same store"
            )
        with self._thread_lock, store_lock(self._context.layout.lock):
            yield

    def _check_token_type(self, token: int) -> int:
        if isinstance(token, bool) or not isinstance(token, int):
            raise ConfigError(
                f"invalid token {token!r}: pass the integer fencing token of the "
                "lease that is committing",
                lock_name=self._context.lock_name,
            )
        return token

    def _check_files(self, files: Mapping[str, bytes]) -> dict[str, bytes]:
        content = {}
        for name, data in files.items():
            validate_name(name)
            if not isinstance(data, bytes):
                raise ConfigError(
                    f"invalid content for {name}: pass bytes, not {type(data).__name__}"
                )
            content[name] = data

        missing = sorted(set(REQUIRED_NAMES) - set(content))
        if missing:
            raise ConfigError(
                f"commit to {self.path} is missing {', '.join(missing)}: pass "
                f"all of {', '.join(REQUIRED_NAMES)}"
            )
        return content

    def _reject_stale(self, token: int) -> None:
        highest = recorded_token(self._context)
        if highest is None or token >= highest:
            return

        logger.warning(
            "Rejected write to %s with stale token %d: token %d has already written",
            self.path,
            token,
            highest,
        )
        raise StaleTokenError(
            f"token {token} is stale for {self.path}: token {highest} has already "
            "written to it, so this process no longer holds the lease. Nothing "
            "was changed; stop and let the current holder renew",
            lock_name=self._context.lock_name,
            token=token,
        )

    def _failed(
        self, action: str, token: int, exc: SingleWriterError
    ) -> SingleWriterError:
        """Log a failed commit or rollback and return the error to raise."""
        logger.error("%s of %s with token %d failed: %s", action, self.path, token, exc)
        kind = type(exc) if isinstance(exc, (ConfigError, StoreError)) else StoreError
        message = (
            f"{action} of {self.path} with token {token} failed and the set "
            f"published before, if any, is unchanged: {exc}"
        )
        return kind(message, lock_name=self._context.lock_name, token=token)

    def _prepare(self, files: dict[str, bytes]) -> tuple[dict[str, bytes], datetime]:
        """Return the bytes to store and the leaf's expiry, after verifying them."""
        stored = dict(files)
        if self._passphrase is not None:
            stored[KEY_NAME] = encrypt_private_key(files[KEY_NAME], self._passphrase)

        certificate = verify_set(stored, self._passphrase)
        check_validity_period(certificate, self._context.clock())
        return stored, certificate.not_valid_after_utc

    def _record_token(self, token: int) -> None:
        recorded = token_file_value(self._context)
        if recorded is not None and recorded >= token:
            return
        path = self._context.layout.token
        atomic_write(path, b"%d\n" % token, mode=0o644, fs=self._context.fs)

    def _warn_superseded(self, current: Generation | None) -> None:
        if current is None:
            return
        pending = read_marker(current.path)
        if pending:
            logger.warning(
                "Deploy hooks %s never ran for generation %d of %s, which is now "
                "replaced: no process with those hooks opened the store",
                ", ".join(pending),
                current.sequence,
                self.path,
            )

    def _commit_locked(self, token: int, files: dict[str, bytes]) -> Generation:
        stored, not_after = self._prepare(files)
        current = self._recover()
        self._warn_superseded(current)
        self._record_token(token)

        sequences = generation_sequences(self._context.layout)
        manifest = Manifest(
            sequence=(sequences[-1] + 1) if sequences else 1,
            token=token,
            previous=None if current is None else current.sequence,
            created=self._context.clock(),
            not_after=not_after,
            files={
                name: FileRecord.of(data, file_mode_for(self._context, name, data))
                for name, data in stored.items()
            },
        )
        write_generation(self._context, manifest, stored, list(self._hooks))
        try:
            check_written(self._context, manifest)
            names = tuple(sorted(stored))
            publish(self._context, manifest.sequence, names, manifest.previous)
        except Exception:
            self._discard_unpublished(manifest.sequence)
            raise
        logger.info(
            "Committed generation %d of %s with token %d",
            manifest.sequence,
            self.path,
            token,
        )
        return self._after_publish(manifest)

    def _discard_unpublished(self, sequence: int) -> None:
        """Remove a generation that failed before or at publishing."""
        if pointer_sequence(self._context) == sequence:
            return
        directory = self._context.layout.generation(sequence)
        try:
            remove_tree(self._context.fs, directory, first=MANIFEST_NAME)
        except OSError as exc:
            logger.warning("Could not remove unpublished %s: %s", directory, exc)

    def _after_publish(self, manifest: Manifest) -> Generation:
        """Tidy up after the commit point; failures here are only logged."""
        names = tuple(sorted(manifest.files))
        try:
            remove_stale_links(self._context, names)
            prune(self._context, manifest)
        except OSError as exc:
            logger.warning("Could not tidy %s after publishing: %s", self.path, exc)

        generation = manifest.generation(
            self._context.layout.generation(manifest.sequence)
        )
        self._run_hooks(generation)
        return generation

    def _recover(self) -> Generation | None:
        """Run recovery, which may run pending hooks, marking this thread."""
        self._hook_thread = threading.get_ident()
        try:
            return recover(self._context, self._hooks)
        finally:
            self._hook_thread = None

    def _run_hooks(self, generation: Generation) -> None:
        self._hook_thread = threading.get_ident()
        try:
            run_pending_hooks(self._context, generation, self._hooks)
        finally:
            self._hook_thread = None

    def _rollback_target(self, current: Generation) -> Manifest:
        previous = current.previous
        while previous is not None:
            try:
                manifest, certificate = verify_generation(self._context, previous)
                check_validity_period(certificate, self._context.clock())
            except (InvalidGeneration, VerificationError) as exc:
                logger.info("Skipping generation %d in rollback: %s", previous, exc)
                try:
                    previous = load_manifest(self._context, previous).previous
                except InvalidGeneration:
                    break
                continue
            return manifest

        raise StoreError(
            f"no earlier valid generation to roll back to from generation "
            f"{current.sequence} of {self.path}: commit a new set instead"
        )

    def _rollback_locked(self, token: int) -> Generation:
        current = self._recover()
        if current is None:
            raise StoreError(
                f"nothing is published in {self.path}, so there is nothing to "
                "roll back to: commit a set first"
            )

        target = self._rollback_target(current)
        self._record_token(token)

        directory = self._context.layout.generation(target.sequence)
        if self._hooks:
            replace_marker(self._context, directory, list(self._hooks))
        names = tuple(sorted(target.files))
        publish(self._context, target.sequence, names, current.sequence)
        logger.info(
            "Rolled %s back from generation %d to %d with token %d",
            self.path,
            current.sequence,
            target.sequence,
            token,
        )
        remove_stale_links(self._context, names)
        generation = target.generation(directory)
        self._run_hooks(generation)
        return generation

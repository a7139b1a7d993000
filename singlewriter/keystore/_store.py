"""KeyStore: one certificate's key material, published as one atomic set."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime
from pathlib import Path

from singlewriter._errors import (
    ConfigError,
    SingleWriterError,
    StaleTokenError,
    StoreError,
    VerificationError,
)

from ._context import StoreContext
from ._fence import (
    check_token,
    next_sequence,
    record_token,
    recorded_token,
    reset_fence,
)
from ._fs import FileSystem, StrPath, failure, remove_tree, store_lock
from ._hooks import (
    DeployHook,
    hook_name,
    new_publication,
    read_marker,
    replace_marker,
    run_pending_hooks,
    runnable_hooks,
    running_hooks_of,
)
from ._layout import MANIFEST_NAME, StoreLayout
from ._manifest import (
    FileRecord,
    Generation,
    InvalidGeneration,
    Manifest,
    read_generation,
    read_manifest,
)
from ._options import (
    check_clock,
    check_files,
    check_keep,
    check_modes,
    encode_passphrase,
)
from ._paths import store_path, validate_name
from ._publish import (
    check_written,
    file_mode_for,
    generation_sequences,
    prune,
    publish,
    remove_stale_links,
    write_generation,
)
from ._reading import CurrentUnreadable, read_published
from ._recovery import (
    check_generation,
    load_manifest,
    needs_recovery,
    pointer_sequence,
    recover,
    verify_generation,
    warn_mode_differences,
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


class KeyStore:
    """One certificate's key material under ``path``, published as one set.

    Servers read the stable paths :meth:`live_path` returns. Each is a
    symlink through ``..current`` into an immutable generation directory, so
    opening one path always gives a file of the current complete set.
    :meth:`commit` publishes a new set with one atomic rename after writing,
    fsyncing and verifying it. A crash at any point leaves either the old or
    the new set published, never a mix, and never an empty or partial file.

    Fencing: the store records the highest lease token that has written to
    it, and keeps it until :meth:`reset_fence` lowers it. A commit or
    rollback with a lower token raises StaleTokenError and changes nothing.
    An equal token may commit again, because one lease may legitimately
    publish twice. The token check and the publish happen under an
    flock(2) on ``.lock``, which excludes other writers on this host only.

    Opening a store creates the directory if needed and, when something is
    left to repair, runs recovery under the store lock (see ``_recovery``).
    Methods are safe to call from several threads. Deploy hooks run in the
    thread that commits, after the store lock is released, so a hook may
    open and read the store, but must not commit to it, roll it back or
    reset its fence.

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
        check_modes(key_mode, file_mode, directory_mode)
        root = store_path(path)

        self._context = StoreContext(
            layout=StoreLayout(root),
            fs=filesystem if filesystem is not None else FileSystem(),
            passphrase=encode_passphrase(passphrase),
            clock=check_clock(clock),
            keep=check_keep(keep),
            key_mode=key_mode,
            file_mode=file_mode,
            directory_mode=directory_mode,
            lock_name=lock_name,
        )
        self._hooks: dict[str, DeployHook] = {}
        self._thread_lock = threading.Lock()
        self._register_hooks(hooks)

        self._create_root()
        if needs_recovery(self._context):
            with self._locked():
                self._recover()
        self._run_hooks(wait=False)

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
        if not callable(hook):
            raise ConfigError(
                f"invalid deploy hook {hook!r} for {self.path}: pass a callable "
                "that takes the published Generation"
            )
        if name is not None and (not isinstance(name, str) or not name):
            raise ConfigError(
                f"invalid deploy hook name {name!r} for {self.path}: pass a "
                "non-empty str"
            )
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
        even while another process commits. If that generation is replaced
        and deleted during the read, the read starts again with the new one.
        With a passphrase, ``privkey.pem`` is returned decrypted as
        unencrypted PKCS#8 PEM. Takes no lock.
        """
        layout = self._context.layout
        try:
            stored = read_published(layout, lambda fd: read_generation(fd, None))
        except CurrentUnreadable as exc:
            raise StoreError(
                f"the current generation of {self.path} cannot be read ({exc}): "
                "open the store again to run recovery, or commit a new set",
                lock_name=self._context.lock_name,
            ) from exc
        if stored is None:
            return None

        files = dict(stored.files)
        if KEY_NAME in files:
            files[KEY_NAME] = decrypt_private_key(files[KEY_NAME], self._passphrase)
        manifest = stored.manifest
        generation = manifest.generation(layout.generation(manifest.sequence))
        return generation, dict(sorted(files.items()))

    def current(self) -> dict[str, bytes] | None:
        """Return the published set as name to bytes, or None if none is published."""
        snapshot = self.read_current()
        return None if snapshot is None else snapshot[1]

    def current_generation(self) -> Generation | None:
        """Return the generation the pointer names, or None.

        None also means that the pointer names a damaged generation, which
        the next open repairs.
        """
        layout = self._context.layout
        try:
            manifest = read_published(layout, lambda fd: read_manifest(fd, None))
        except CurrentUnreadable:
            return None
        if manifest is None:
            return None
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
                manifest = check_generation(self._context, sequence).manifest
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

        Deploy hooks that are still pending for the current set run first,
        and the hooks of the new set run after the store lock is released,
        before commit returns.
        """
        token = check_token(token, self._context.lock_name)
        content = check_files(files, self.path)
        self._reject_inside_hook()
        self._reject_stale(token)
        self._run_hooks(wait=True)

        with self._locked():
            self._reject_stale(token)
            try:
                generation = self._commit_locked(token, content)
            except SingleWriterError as exc:
                raise self._failed("commit", token, exc) from exc
            except OSError as exc:
                error = failure("reading", self.path, exc)
                raise self._failed("commit", token, error) from exc

        self._run_hooks(wait=True)
        return generation

    def rollback(self, token: int) -> Generation:
        """Publish the generation that was current before the current one.

        Generations that no longer verify (expired or damaged) are skipped
        along the way back. Raises StoreError when there is none, and
        StaleTokenError like :meth:`commit`. Deploy hooks run for the
        generation published, after the store lock is released.
        """
        token = check_token(token, self._context.lock_name)
        self._reject_inside_hook()
        self._reject_stale(token)
        self._run_hooks(wait=True)

        with self._locked():
            self._reject_stale(token)
            try:
                generation = self._rollback_locked(token)
            except SingleWriterError as exc:
                raise self._failed("rollback", token, exc) from exc
            except OSError as exc:
                error = failure("reading", self.path, exc)
                raise self._failed("rollback", token, error) from exc

        self._run_hooks(wait=True)
        return generation

    def reset_fence(self, token: int, *, confirm: str) -> int | None:
        """Make ``token`` the highest token of the store; return the one before.

        The store keeps its highest token forever, so a store that a lock
        backend with large tokens wrote to (Redis and Consul count
        microseconds) rejects every token of a backend that counts from 1
        (file locks). This is the operator's way out. Stop every writer that
        still uses the previous backend first: afterwards the store accepts
        every token from ``token`` up, including theirs.

        ``confirm`` must be ``str(store.path)``, so that a reset names the
        store it lowers. Takes the store lock and logs WARNING. Manifests
        written before the reset no longer count towards the highest token.
        """
        token = check_token(token, self._context.lock_name)
        if confirm != str(self.path):
            raise ConfigError(
                f"reset_fence of {self.path} was not confirmed: pass "
                f"confirm={str(self.path)!r} to lower its highest token on purpose",
                lock_name=self._context.lock_name,
            )
        self._reject_inside_hook()

        with self._locked():
            try:
                previous = reset_fence(self._context, token)
            except OSError as exc:
                if isinstance(exc, StoreError):
                    raise
                raise failure("resetting the fence of", self.path, exc) from exc

        logger.warning(
            "Reset the fence of %s from highest token %s to %d: any token from %d "
            "up is accepted now, so no writer of the previous lock backend may "
            "still run",
            self.path,
            previous,
            token,
            token,
        )
        return previous

    # Internals.

    @property
    def _passphrase(self) -> bytes | None:
        return self._context.passphrase

    def _register_hooks(
        self, hooks: Mapping[str, DeployHook] | Iterable[DeployHook]
    ) -> None:
        if isinstance(hooks, Mapping):
            for name, hook in hooks.items():
                self.add_deploy_hook(hook, name=name)
            return
        if callable(hooks) or isinstance(hooks, (str, bytes)):
            hooks_type = type(hooks).__name__
            raise ConfigError(
                f"invalid hooks for {self.path}: pass a list of callables or a "
                f"mapping from names to callables, not a {hooks_type}"
            )
        try:
            registered = list(hooks)
        except TypeError:
            raise ConfigError(
                f"invalid hooks {hooks!r} for {self.path}: pass a list of "
                "callables or a mapping from names to callables"
            ) from None
        for hook in registered:
            self.add_deploy_hook(hook)

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
        with self._thread_lock, store_lock(self._context.layout.lock):
            yield

    def _reject_inside_hook(self) -> None:
        if running_hooks_of(self.path):
            raise ConfigError(
                f"a deploy hook tried to change {self.path} while the store runs "
                "its hooks: hooks must not commit, roll back or reset the fence "
                "of the same store",
                lock_name=self._context.lock_name,
            )

    def _run_hooks(self, *, wait: bool) -> None:
        """Run the pending hooks of the current generation, logging failures.

        Takes ``.hooks.lock`` and the store lock only when a hook registered
        here is pending, so a process without hooks never waits for them.
        """
        if not runnable_hooks(self._context, self._hooks):
            return
        try:
            run_pending_hooks(self._context, self._hooks, self._locked, wait=wait)
        except OSError as exc:
            logger.error(
                "Could not run the deploy hooks of %s, which stay pending: %s",
                self.path,
                exc,
            )

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
            "was changed; stop and let the current holder renew. If the lock "
            "backend changed and issues lower tokens now, see "
            "KeyStore.reset_fence",
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

    def _warn_superseded(self, current: Generation | None) -> None:
        if current is None:
            return
        pending = read_marker(current.path).names
        if pending:
            logger.warning(
                "Deploy hooks %s never ran for generation %d of %s, which this "
                "commit replaces. Hooks run only for the current generation, so "
                "they run for the new one if it lists them",
                ", ".join(pending),
                current.sequence,
                self.path,
            )

    def _commit_locked(self, token: int, files: dict[str, bytes]) -> Generation:
        stored, not_after = self._prepare(files)
        current = self._recover()
        self._warn_superseded(current)
        record_token(self._context, token)

        manifest = Manifest(
            sequence=next_sequence(self._context),
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

        return manifest.generation(self._context.layout.generation(manifest.sequence))

    def _recover(self) -> Generation | None:
        """Run recovery; the caller holds the store lock and runs hooks later."""
        return recover(self._context, list(self._hooks))

    def _rollback_target(self, current: Generation) -> Manifest:
        previous = current.previous
        while previous is not None:
            try:
                stored, certificate = verify_generation(self._context, previous)
                check_validity_period(certificate, self._context.clock())
            except (InvalidGeneration, VerificationError) as exc:
                logger.info("Skipping generation %d in rollback: %s", previous, exc)
                try:
                    previous = load_manifest(self._context, previous).previous
                except InvalidGeneration:
                    break
                continue
            warn_mode_differences(self._context, previous, stored.mode_differences)
            return stored.manifest

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
        record_token(self._context, token)

        directory = self._context.layout.generation(target.sequence)
        if self._hooks:
            replace_marker(
                self._context, directory, list(self._hooks), new_publication()
            )
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
        return target.generation(directory)

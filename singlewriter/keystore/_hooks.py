"""Deploy hooks and the durable marker that makes them survive a crash.

Rules:

* A commit writes ``.deploy-pending`` into the new generation directory
  before the manifest, listing the names of the hooks registered at that
  moment and a random publication id, so the marker becomes visible exactly
  when the generation is published. Rollback and recovery write a marker
  with a new publication id, with an atomic rename, into the generation they
  publish before they swap the pointer.
* Hooks run after the store lock is released, so a hook may open and read
  the store. They run at the end of a commit or rollback, when a store is
  opened, and before the next commit or rollback, always for the generation
  that is current at that moment.
* One process at a time runs the hooks of a store, holding an flock(2) on
  ``.hooks.lock``. For each hook it claims a pending name of the current
  generation under the store lock and runs the hook without the store lock.
  Then it takes the store lock again and removes the name from the marker,
  unless the marker carries another publication id by now. A rollback that
  publishes the same generation again in between writes a new id, so the
  hooks of the new publication stay pending.
* After a hook returns or raises an Exception, its name is removed from the
  marker and the change is fsynced. A hook is therefore never run twice once
  that removal is on disk. A process killed while the hook runs, or after it
  returns and before the removal is durable, releases ``.hooks.lock``, and
  the next process runs the hook again: at least once in that window,
  exactly once everywhere else.
* A hook that raises is logged at ERROR and not retried.
* A pending name with no hook of that name registered in this process stays
  pending, so a reader that opens the store without hooks consumes nothing.
  A generation that is replaced before its hooks ran keeps them pending and
  never runs them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ._context import StoreContext
from ._fs import create_file, file_lock, fsync_directory, remove_quietly
from ._layout import (
    DEPLOY_MARKER_NAME,
    GENERATION_TEMP_PREFIX,
    parse_generation_name,
    temp_name,
)
from ._manifest import Generation, InvalidGeneration, open_directory, read_manifest

__all__ = [
    "DeployHook",
    "Marker",
    "encode_marker",
    "hook_name",
    "new_publication",
    "read_marker",
    "replace_marker",
    "run_pending_hooks",
    "runnable_hooks",
    "running_hooks_of",
]

logger = logging.getLogger(__name__)

DeployHook = Callable[[Generation], object]
StoreLock = Callable[[], contextlib.AbstractContextManager[None]]

# The stores whose hooks the current thread is running, by (st_dev, st_ino)
# of the store directory, so that a hook that opens or commits to its own
# store is recognised whichever KeyStore object it uses.
_running = threading.local()


@dataclass(frozen=True)
class Marker:
    """The content of ``.deploy-pending``: hook names still to run.

    ``publication`` is a random id written with each publication of the
    generation. It is None in an empty marker and in markers that older
    versions wrote.
    """

    names: tuple[str, ...] = ()
    publication: str | None = None


def hook_name(hook: DeployHook) -> str:
    """Return the default name of a hook: its module and qualified name."""
    module = getattr(hook, "__module__", None) or "unknown"
    qualified = getattr(hook, "__qualname__", None) or type(hook).__qualname__
    return f"{module}.{qualified}"


def new_publication() -> str:
    """Return a fresh publication id for a marker."""
    return secrets.token_hex(8)


def encode_marker(names: list[str], publication: str | None) -> bytes:
    """Serialise the pending hook names and the publication id."""
    return json.dumps({"hooks": names, "publication": publication}).encode() + b"\n"


def read_marker(directory: Path) -> Marker:
    """Return the marker of a generation, empty when there is none."""
    try:
        raw = (directory / DEPLOY_MARKER_NAME).read_bytes()
    except FileNotFoundError:
        return Marker()

    try:
        document = json.loads(raw)
        names = document["hooks"]
        publication = document.get("publication")
    except (ValueError, KeyError, TypeError, AttributeError):
        logger.warning("Ignoring invalid deploy marker in %s", directory)
        return Marker()
    if not isinstance(names, list):
        logger.warning("Ignoring invalid deploy marker in %s", directory)
        return Marker()
    if not isinstance(publication, str):
        publication = None
    return Marker(tuple(name for name in names if isinstance(name, str)), publication)


def replace_marker(
    context: StoreContext,
    directory: Path,
    names: list[str],
    publication: str | None,
) -> None:
    """Replace the marker of a generation durably, removing it when empty."""
    fs = context.fs
    marker = directory / DEPLOY_MARKER_NAME

    if names:
        temporary = directory / temp_name(GENERATION_TEMP_PREFIX, "deploy")
        data = encode_marker(names, publication)
        create_file(fs, temporary, data, 0o644, exact_mode=False)
        try:
            fs.rename(temporary, marker)
        except OSError:
            remove_quietly(fs, temporary)
            raise
    else:
        try:
            fs.unlink(marker)
        except FileNotFoundError:
            return

    fsync_directory(fs, directory)


def _current_directory(context: StoreContext) -> tuple[int, Path] | None:
    """Return the sequence and directory the pointer names, or None."""
    try:
        target = os.readlink(context.layout.pointer)
    except OSError:
        return None
    sequence = parse_generation_name(target)
    if sequence is None:
        return None
    return sequence, context.layout.generation(sequence)


def runnable_hooks(context: StoreContext, hooks: Mapping[str, DeployHook]) -> bool:
    """Return whether the current generation lists a hook registered in ``hooks``.

    Takes no lock, so the result can be out of date by the time the caller
    acts on it. Callers use it only to skip the locks when nothing is due.
    """
    if not hooks:
        return False
    current = _current_directory(context)
    if current is None:
        return False
    return any(name in hooks for name in read_marker(current[1]).names)


def _store_identity(root: Path) -> tuple[int, int] | None:
    try:
        info = os.stat(root)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _running_stores() -> set[tuple[int, int]]:
    stores: set[tuple[int, int]] | None = getattr(_running, "stores", None)
    if stores is None:
        stores = set()
        _running.stores = stores
    return stores


def running_hooks_of(root: Path) -> bool:
    """Return whether this thread is inside a deploy hook of the store at ``root``."""
    identity = _store_identity(root)
    return identity is not None and identity in _running_stores()


@dataclass(frozen=True)
class _Claim:
    """One pending hook of the current generation, claimed by this process."""

    name: str
    generation: Generation
    publication: str | None


def _claim_next(
    context: StoreContext, hooks: Mapping[str, DeployHook]
) -> _Claim | None:
    """Return the next registered hook the current generation lists, or None.

    The caller holds the store lock and ``.hooks.lock``.
    """
    current = _current_directory(context)
    if current is None:
        return None
    sequence, directory = current

    marker = read_marker(directory)
    name = next((name for name in marker.names if name in hooks), None)
    if name is None:
        if marker.names:
            logger.debug(
                "Deploy hooks %s of generation %d are not registered here; they "
                "stay pending",
                ", ".join(marker.names),
                sequence,
            )
        return None

    try:
        fd = open_directory(directory)
    except FileNotFoundError:
        return None
    try:
        manifest = read_manifest(fd, sequence)
    except InvalidGeneration as exc:
        logger.warning(
            "Not running deploy hooks of generation %d of %s, whose manifest is "
            "invalid: %s",
            sequence,
            context.layout.root,
            exc,
        )
        return None
    finally:
        os.close(fd)
    return _Claim(name, manifest.generation(directory), marker.publication)


def _record_done(context: StoreContext, claim: _Claim) -> bool:
    """Remove a claimed name from the marker; return False when that failed.

    The caller holds the store lock. A marker rewritten for a new
    publication in the meantime is left alone, so its hooks run again.
    """
    directory = claim.generation.path
    marker = read_marker(directory)
    if marker.publication != claim.publication or claim.name not in marker.names:
        return True

    remaining = [name for name in marker.names if name != claim.name]
    try:
        replace_marker(context, directory, remaining, marker.publication)
    except OSError as exc:
        logger.error(
            "Could not record that deploy hook %s ran for generation %d of "
            "%s, so it may run again after a restart: %s",
            claim.name,
            claim.generation.sequence,
            context.layout.root,
            exc,
        )
        return False
    return True


def run_pending_hooks(
    context: StoreContext,
    hooks: Mapping[str, DeployHook],
    locked: StoreLock,
    *,
    wait: bool,
) -> None:
    """Run the registered hooks that the current generation's marker lists.

    ``locked`` takes the store lock, which is held only to claim a hook and
    to record that it ran, never while a hook runs. With ``wait=False`` the
    call returns at once if another process is running hooks of this store,
    and the pending names stay for the next open, commit or rollback. A
    call from inside a hook of the same store in this thread returns at
    once. Raises StoreError when ``.hooks.lock`` cannot be opened.
    """
    if not hooks:
        return
    identity = _store_identity(context.layout.root)
    running = _running_stores()
    if identity is None or identity in running:
        logger.debug("Not running hooks of %s from inside one", context.layout.root)
        return

    with file_lock(context.layout.hooks_lock, wait=wait) as held:
        if not held:
            logger.debug(
                "Another process is running deploy hooks of %s; the pending ones "
                "run at the next open, commit or rollback",
                context.layout.root,
            )
            return

        running.add(identity)
        try:
            _run_claimed(context, hooks, locked)
        finally:
            running.discard(identity)


def _run_claimed(
    context: StoreContext, hooks: Mapping[str, DeployHook], locked: StoreLock
) -> None:
    while True:
        with locked():
            claim = _claim_next(context, hooks)
        if claim is None:
            return

        _run_hook(claim, hooks[claim.name], context)
        with locked():
            if not _record_done(context, claim):
                return


def _run_hook(claim: _Claim, hook: DeployHook, context: StoreContext) -> None:
    sequence = claim.generation.sequence
    logger.debug("Running deploy hook %s for generation %d", claim.name, sequence)
    try:
        hook(claim.generation)
    except Exception:
        logger.exception(
            "Deploy hook %s failed for generation %d of %s; it is not run again",
            claim.name,
            sequence,
            context.layout.root,
        )

"""Recovery: bring a store back to one published, verified generation.

Recovery runs with the store lock held, when an open finds something to
repair and before each commit or rollback. Its rules, in order:

1. Remove temporary entries (``..tmp-*`` and ``.NAME.tmp-write-*`` in the
   store, ``.tmp-*`` in generation directories). Only an interrupted step
   leaves them, and no other writer can be running under the lock.
2. Keep the generation the pointer names if its files match the sha256 in
   its manifest and its key, certificate and chain verify. An expired
   certificate does not move the pointer: the clock may be wrong, and an
   older set is rarely better. A file mode that differs from the manifest
   does not move it either, because only the content decides whether a
   generation is damaged: it is logged at WARNING and left as it is.
3. Otherwise (pointer missing, dangling, or naming a damaged generation)
   publish the newest generation that verifies completely, including the
   validity period. A higher sequence number alone never wins. When none
   verifies, nothing is changed.
4. Remove generation directories without a parsable manifest, except the
   one the pointer names.
5. Repair the live symlinks of the current names and remove those of other
   names. Deploy hooks run afterwards, without the store lock (``_hooks``).

:func:`needs_recovery` applies the same checks without the lock and without
changing anything, so that an open of a store in good order takes no lock.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509

from singlewriter._errors import VerificationError

from ._context import StoreContext
from ._fs import fsync_directory, remove_quietly, remove_tree
from ._hooks import new_publication, read_marker, replace_marker
from ._layout import (
    GENERATION_TEMP_PREFIX,
    MANIFEST_NAME,
    STORE_TEMP_PREFIX,
    parse_generation_name,
)
from ._manifest import (
    Generation,
    InvalidGeneration,
    Manifest,
    ModeDifference,
    StoredGeneration,
    open_directory,
    read_generation,
    read_manifest,
)
from ._publish import (
    ensure_live_links,
    generation_sequences,
    publish,
    remove_stale_links,
)
from ._verify import check_validity_period, verify_set

__all__ = [
    "check_generation",
    "load_manifest",
    "needs_recovery",
    "pointer_sequence",
    "recover",
    "verify_generation",
    "warn_mode_differences",
]

logger = logging.getLogger(__name__)

# The temporary file atomic_write creates next to its target.
_WRITE_TEMP_PATTERN = re.compile(r"\..+\.tmp-write-\d+-[0-9a-f]{8}")


@dataclass(frozen=True)
class _Pointer:
    """The target of ``..current``: a sequence number, or why there is none."""

    sequence: int | None
    problem: str | None


def _read_pointer(context: StoreContext) -> _Pointer:
    pointer = context.layout.pointer
    try:
        target = os.readlink(pointer)
    except FileNotFoundError:
        return _Pointer(None, "missing")
    except OSError as exc:
        return _Pointer(None, f"unreadable ({exc.strerror})")

    sequence = parse_generation_name(target)
    if sequence is None:
        return _Pointer(None, f"pointing at {target!r}, not a generation")
    return _Pointer(sequence, None)


def pointer_sequence(context: StoreContext) -> int | None:
    """Return the sequence number the pointer names, or None."""
    return _read_pointer(context).sequence


def load_manifest(context: StoreContext, sequence: int) -> Manifest:
    """Read only the manifest of a generation, raising InvalidGeneration."""
    try:
        fd = open_directory(context.layout.generation(sequence))
    except FileNotFoundError:
        raise InvalidGeneration("directory is missing", incomplete=False) from None
    try:
        return read_manifest(fd, sequence)
    finally:
        os.close(fd)


def check_generation(context: StoreContext, sequence: int) -> StoredGeneration:
    """Read a generation and check its files against its manifest."""
    try:
        fd = open_directory(context.layout.generation(sequence))
    except FileNotFoundError:
        raise InvalidGeneration("directory is missing", incomplete=False) from None
    try:
        return read_generation(fd, sequence)
    finally:
        os.close(fd)


def verify_generation(
    context: StoreContext, sequence: int
) -> tuple[StoredGeneration, x509.Certificate]:
    """Check a generation's integrity and key material; return it and its leaf.

    Raises InvalidGeneration for a damaged directory, VerificationError for
    material that fails a check, and ConfigError for a missing or wrong
    passphrase. File modes and the validity period are left to the caller.
    """
    stored = check_generation(context, sequence)
    return stored, verify_set(stored.files, context.passphrase)


def warn_mode_differences(
    context: StoreContext, sequence: int, differences: Iterable[ModeDifference]
) -> None:
    """Log at WARNING that files of a generation have other modes than recorded."""
    listed = ", ".join(str(difference) for difference in differences)
    if not listed:
        return
    logger.warning(
        "Generation %d of %s has files whose mode differs from its manifest "
        "(%s). The content is intact, so the generation stays in use and the "
        "modes are left as they are. New generations get key_mode %#o and "
        "file_mode %#o; pass key_mode= or file_mode= to change them",
        sequence,
        context.layout.root,
        listed,
        context.key_mode,
        context.file_mode,
    )


def _is_leftover(name: str) -> bool:
    if name.startswith(STORE_TEMP_PREFIX):
        return True
    return _WRITE_TEMP_PATTERN.fullmatch(name) is not None


def _remove_leftovers(context: StoreContext) -> None:
    layout = context.layout
    for name in os.listdir(layout.root):
        if _is_leftover(name):
            logger.info("Removing leftover %s of an interrupted step", name)
            remove_quietly(context.fs, layout.root / name)

    for sequence in generation_sequences(layout):
        directory = layout.generation(sequence)
        for name in os.listdir(directory):
            if name.startswith(GENERATION_TEMP_PREFIX):
                remove_quietly(context.fs, directory / name)


def _remove_incomplete(context: StoreContext, protected: set[int]) -> None:
    for sequence in generation_sequences(context.layout):
        if sequence in protected:
            continue
        try:
            load_manifest(context, sequence)
        except InvalidGeneration as exc:
            if not exc.incomplete:
                continue
            directory = context.layout.generation(sequence)
            logger.info("Removing incomplete generation %s: %s", directory, exc)
            try:
                remove_tree(context.fs, directory, first=MANIFEST_NAME)
            except OSError as error:
                logger.warning("Could not remove %s: %s", directory, error)


def _warn_current(
    context: StoreContext,
    stored: StoredGeneration,
    certificate: x509.Certificate,
) -> None:
    """Log the WARNINGs about a current generation that stays published."""
    sequence = stored.manifest.sequence
    try:
        check_validity_period(certificate, context.clock())
    except VerificationError as exc:
        logger.warning(
            "Current generation %d of %s: %s", sequence, context.layout.root, exc
        )
    warn_mode_differences(context, sequence, stored.mode_differences)


def _keep_pointer(context: StoreContext, sequence: int) -> Manifest | None:
    """Return the pointer's generation if it may stay published, else None."""
    try:
        stored, certificate = verify_generation(context, sequence)
    except (InvalidGeneration, VerificationError) as exc:
        logger.warning(
            "Current generation %d of %s is damaged and will be replaced by the "
            "newest valid one: %s",
            sequence,
            context.layout.root,
            exc,
        )
        return None

    _warn_current(context, stored, certificate)
    return stored.manifest


def _newest_valid(context: StoreContext, exclude: int | None) -> Manifest | None:
    for sequence in reversed(generation_sequences(context.layout)):
        if sequence == exclude:
            continue
        try:
            stored, certificate = verify_generation(context, sequence)
            check_validity_period(certificate, context.clock())
        except (InvalidGeneration, VerificationError) as exc:
            logger.info(
                "Generation %d of %s is not eligible: %s",
                sequence,
                context.layout.root,
                exc,
            )
        else:
            warn_mode_differences(context, sequence, stored.mode_differences)
            return stored.manifest
    return None


def _republish(
    context: StoreContext,
    manifest: Manifest,
    previous: int | None,
    hook_names: Iterable[str],
) -> None:
    directory = context.layout.generation(manifest.sequence)
    pending = list(read_marker(directory).names)
    names = pending + [name for name in hook_names if name not in pending]
    if names:
        replace_marker(context, directory, names, new_publication())
    publish(context, manifest.sequence, tuple(sorted(manifest.files)), previous)


def _select_current(
    context: StoreContext, hook_names: Iterable[str]
) -> Manifest | None:
    pointer = _read_pointer(context)
    if pointer.sequence is not None:
        pointer_manifest = _keep_pointer(context, pointer.sequence)
        if pointer_manifest is not None:
            return pointer_manifest

    chosen = _newest_valid(context, exclude=pointer.sequence)
    root = context.layout.root
    if chosen is None:
        if pointer.sequence is not None or generation_sequences(context.layout):
            logger.error(
                "No valid generation in %s to publish; the pointer is left as it "
                "is. Commit a new set",
                root,
            )
        return None

    logger.warning(
        "Publishing generation %d of %s because the pointer is %s",
        chosen.sequence,
        root,
        pointer.problem or f"naming damaged generation {pointer.sequence}",
    )
    _republish(context, chosen, pointer.sequence, hook_names)
    return chosen


def recover(context: StoreContext, hook_names: Iterable[str]) -> Generation | None:
    """Apply the recovery rules and return the current generation, if any.

    ``hook_names`` are written as pending into a generation that recovery
    publishes. The caller holds the store lock and runs the hooks after
    releasing it.
    """
    _remove_leftovers(context)
    current = _select_current(context, hook_names)

    protected: set[int] = set()
    pointer = pointer_sequence(context)
    if pointer is not None:
        protected.add(pointer)
    _remove_incomplete(context, protected)

    if current is None:
        return None

    names = tuple(sorted(current.files))
    if ensure_live_links(context, names):
        fsync_directory(context.fs, context.layout.root)
    remove_stale_links(context, names)
    return current.generation(context.layout.generation(current.sequence))


def _links_in_order(context: StoreContext, names: tuple[str, ...]) -> bool:
    """Return whether every live symlink is right and none is stale."""
    layout = context.layout
    prefix = layout.live_target("")
    for entry in os.listdir(layout.root):
        if entry.startswith("."):
            continue
        live = layout.live(entry)
        try:
            is_link = stat.S_ISLNK(os.lstat(live).st_mode)
            target = os.readlink(live) if is_link else None
        except FileNotFoundError:
            return False
        if entry in names:
            if target != layout.live_target(entry):
                return False
        elif target is not None and target.startswith(prefix):
            return False
    return all(os.path.lexists(layout.live(name)) for name in names)


def needs_recovery(context: StoreContext) -> bool:
    """Return whether recovery would change anything, without the lock.

    Returns True on any doubt: leftovers of an interrupted or running step,
    an incomplete generation, a pointer that is missing while generations
    exist, a current generation that fails verification, or a live symlink
    that is wrong, missing or stale. When it returns False, the WARNINGs of
    rule 2 have been logged. A missing or wrong passphrase raises
    ConfigError, as recovery does.
    """
    try:
        inspection = _inspect(context)
    except OSError:
        # A file that vanished under the inspection belongs to a writer at
        # work or to damage. Either way recovery under the lock decides.
        return True
    if inspection is None:
        return True
    if inspection.current is not None:
        _warn_current(context, *inspection.current)
    return False


@dataclass(frozen=True)
class _Inspection:
    """A store in good order: its verified current generation and leaf, if any."""

    current: tuple[StoredGeneration, x509.Certificate] | None


def _inspect(context: StoreContext) -> _Inspection | None:
    """Return the store's state if it is in good order, None if recovery is due."""
    layout = context.layout
    if any(_is_leftover(name) for name in os.listdir(layout.root)):
        return None

    sequences = generation_sequences(layout)
    pointer = _read_pointer(context)
    if pointer.sequence is None:
        if sequences or pointer.problem != "missing":
            return None
        return _Inspection(None)

    for sequence in sequences:
        entries = os.listdir(layout.generation(sequence))
        if any(name.startswith(GENERATION_TEMP_PREFIX) for name in entries):
            return None
        if sequence == pointer.sequence:
            continue
        try:
            load_manifest(context, sequence)
        except InvalidGeneration as exc:
            if exc.incomplete:
                return None

    try:
        stored, certificate = verify_generation(context, pointer.sequence)
    except (InvalidGeneration, VerificationError):
        return None
    if not _links_in_order(context, tuple(sorted(stored.manifest.files))):
        return None
    return _Inspection((stored, certificate))

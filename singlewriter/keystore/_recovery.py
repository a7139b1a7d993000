"""Recovery: bring a store back to one published, verified generation.

Recovery runs with the store lock held, when a store is opened and before
each commit or rollback. Its rules, in order:

1. Remove temporary entries (``..tmp-*`` and ``.NAME.tmp-write-*`` in the
   store, ``.tmp-*`` in generation directories). Only an interrupted step
   leaves them, and no other writer can be running under the lock.
2. Keep the generation the pointer names if it is complete and its key,
   certificate and chain verify. An expired certificate does not move the
   pointer: the clock may be wrong, and an older set is rarely better.
3. Otherwise (pointer missing, dangling, or naming a broken generation)
   publish the newest generation that verifies completely, including the
   validity period. A higher sequence number alone never wins. When none
   verifies, nothing is changed.
4. Remove generation directories without a parsable manifest, except the
   one the pointer names.
5. Repair the live symlinks of the current names, remove those of other
   names, and run pending deploy hooks.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography import x509

from singlewriter._errors import StoreError, VerificationError

from ._context import StoreContext
from ._fs import fsync_directory, remove_quietly, remove_tree
from ._hooks import DeployHook, read_marker, replace_marker, run_pending_hooks
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
    "pointer_sequence",
    "recorded_token",
    "recover",
    "token_file_value",
    "verify_generation",
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


def check_generation(
    context: StoreContext, sequence: int
) -> tuple[Manifest, dict[str, bytes]]:
    """Read a generation and check it against its manifest."""
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
) -> tuple[Manifest, x509.Certificate]:
    """Check a generation's integrity and key material; return it and its leaf.

    Raises InvalidGeneration for a damaged directory, VerificationError for
    material that fails a check, and ConfigError for a missing or wrong
    passphrase. The validity period is left to the caller.
    """
    manifest, files = check_generation(context, sequence)
    return manifest, verify_set(files, context.passphrase)


def recorded_token(context: StoreContext) -> int | None:
    """Return the highest token in the token file and in every manifest.

    A manifest counts even when its generation was never published, so a
    lower token stays rejected after a commit died part way.
    """
    highest = token_file_value(context)
    for sequence in generation_sequences(context.layout):
        try:
            token = load_manifest(context, sequence).token
        except InvalidGeneration:
            continue
        highest = token if highest is None else max(highest, token)
    return highest


def token_file_value(context: StoreContext) -> int | None:
    """Return the integer in ``.token``, or None when there is no such file."""
    path = context.layout.token
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        return None
    try:
        return int(text.strip())
    except ValueError:
        raise StoreError(
            f"token file {path} is invalid: it must contain one integer. "
            "Restore it from the highest token your lock backend issued"
        ) from None


def _remove_leftovers(context: StoreContext) -> None:
    layout = context.layout
    for name in os.listdir(layout.root):
        if name.startswith(STORE_TEMP_PREFIX) or _WRITE_TEMP_PATTERN.fullmatch(name):
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


def _keep_pointer(context: StoreContext, sequence: int) -> Manifest | None:
    """Return the pointer's generation if it may stay published, else None."""
    root = context.layout.root
    try:
        manifest, certificate = verify_generation(context, sequence)
    except (InvalidGeneration, VerificationError) as exc:
        logger.warning(
            "Current generation %d of %s is broken and will be replaced by the "
            "newest valid one: %s",
            sequence,
            root,
            exc,
        )
        return None

    try:
        check_validity_period(certificate, context.clock())
    except VerificationError as exc:
        logger.warning("Current generation %d of %s: %s", sequence, root, exc)
    return manifest


def _newest_valid(context: StoreContext, exclude: int | None) -> Manifest | None:
    for sequence in reversed(generation_sequences(context.layout)):
        if sequence == exclude:
            continue
        try:
            manifest, certificate = verify_generation(context, sequence)
            check_validity_period(certificate, context.clock())
        except (InvalidGeneration, VerificationError) as exc:
            logger.info(
                "Generation %d of %s is not eligible: %s",
                sequence,
                context.layout.root,
                exc,
            )
        else:
            return manifest
    return None


def _republish(
    context: StoreContext,
    manifest: Manifest,
    previous: int | None,
    hooks: Mapping[str, DeployHook],
) -> None:
    directory = context.layout.generation(manifest.sequence)
    pending = read_marker(directory)
    names = pending + [name for name in hooks if name not in pending]
    if names:
        replace_marker(context, directory, names)
    publish(context, manifest.sequence, tuple(sorted(manifest.files)), previous)


def _select_current(
    context: StoreContext, hooks: Mapping[str, DeployHook]
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
        pointer.problem or f"naming broken generation {pointer.sequence}",
    )
    _republish(context, chosen, pointer.sequence, hooks)
    return chosen


def recover(
    context: StoreContext, hooks: Mapping[str, DeployHook]
) -> Generation | None:
    """Apply the recovery rules and return the current generation, if any."""
    _remove_leftovers(context)
    current = _select_current(context, hooks)

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

    generation = current.generation(context.layout.generation(current.sequence))
    run_pending_hooks(context, generation, hooks)
    return generation

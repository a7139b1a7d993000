"""Writing a generation directory, swapping the pointer, and pruning.

The commit point is the rename of a temporary symlink over ``..current``.
Everything before it happens in a directory no reader can reach, and a
failure there leaves the published set alone. Directories are never renamed,
because overlayfs without its redirect_dir feature fails with EXDEV to
rename a directory that exists in a lower layer. A symlink can always be
replaced.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Mapping
from pathlib import Path

from singlewriter._errors import ConfigError, StoreError

from ._context import StoreContext
from ._fs import (
    create_file,
    failure,
    fsync_directory,
    remove_quietly,
    remove_tree,
    replace_symlink,
)
from ._hooks import encode_marker, new_publication
from ._layout import (
    DEPLOY_MARKER_NAME,
    MANIFEST_NAME,
    StoreLayout,
    generation_name,
    parse_generation_name,
)
from ._manifest import (
    InvalidGeneration,
    Manifest,
    encode_manifest,
    open_directory,
    read_generation,
)
from ._verify import KEY_NAME, is_certificate_only_pem

__all__ = [
    "check_written",
    "ensure_live_links",
    "file_mode_for",
    "generation_sequences",
    "prune",
    "publish",
    "remove_stale_links",
    "write_generation",
]

logger = logging.getLogger(__name__)

_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def file_mode_for(context: StoreContext, name: str, data: bytes) -> int:
    """Return the mode of a new file: ``file_mode`` only for certificates.

    Only PEM made of nothing but CERTIFICATE blocks is known to hold no
    secret. Every other file, including DER, PKCS#12 and text, may contain a
    private key in some encoding, so it gets ``key_mode``.
    """
    if name != KEY_NAME and is_certificate_only_pem(data):
        return context.file_mode
    return context.key_mode


def generation_sequences(layout: StoreLayout) -> list[int]:
    """Return the sequence numbers of all generation directories, ascending."""
    sequences = []
    for name in os.listdir(layout.root):
        sequence = parse_generation_name(name)
        if sequence is not None:
            sequences.append(sequence)
    return sorted(sequences)


def _open_new_directory(context: StoreContext, sequence: int) -> int:
    """Create the generation directory and return an open descriptor of it."""
    fs = context.fs
    directory = context.layout.generation(sequence)
    try:
        fs.mkdir(directory, context.directory_mode)
    except OSError as exc:
        raise failure("creating directory", directory, exc) from exc

    fd = None
    try:
        fd = fs.open(directory, _DIRECTORY_FLAGS)
        # A directory contains no secret, so it may be widened to the configured
        # mode when the umask removed bits that servers need to traverse it.
        if stat.S_IMODE(fs.fstat(fd).st_mode) != context.directory_mode:
            fs.fchmod(fd, context.directory_mode)
    except OSError as exc:
        if fd is not None:
            with contextlib.suppress(OSError):
                fs.close(fd)
        with contextlib.suppress(OSError):
            fs.rmdir(directory)
        raise failure("opening new directory", directory, exc) from exc
    return fd


def write_generation(
    context: StoreContext,
    manifest: Manifest,
    files: Mapping[str, bytes],
    pending_hooks: list[str],
) -> None:
    """Write a complete generation directory that no reader can see yet.

    Order: every file (created with its final mode, written, fsynced), the
    deploy marker, the manifest last, then an fsync of the directory. On an
    error the partial directory is removed and StoreError is raised.
    """
    fs = context.fs
    directory = context.layout.generation(manifest.sequence)
    fd = _open_new_directory(context, manifest.sequence)
    closed = False
    try:
        for name in _write_order(files):
            mode = manifest.files[name].mode
            exact = mode == context.key_mode
            create_file(fs, directory / name, files[name], mode, exact_mode=exact)

        if pending_hooks:
            marker = directory / DEPLOY_MARKER_NAME
            data = encode_marker(pending_hooks, new_publication())
            create_file(fs, marker, data, 0o644, exact_mode=False)

        data = encode_manifest(manifest)
        create_file(fs, directory / MANIFEST_NAME, data, 0o644, exact_mode=False)

        action = "fsyncing directory"
        try:
            fs.fsync(fd)
            action = "closing directory"
            closed = True
            fs.close(fd)
        except OSError as exc:
            raise failure(action, directory, exc) from exc
    except Exception:
        if not closed:
            with contextlib.suppress(OSError):
                fs.close(fd)
        _remove_tree_quietly(context, directory)
        raise


def _write_order(files: Mapping[str, bytes]) -> list[str]:
    """Return the key first, then the other names sorted.

    The order does not matter for safety, because nothing is visible before
    the manifest, but it makes the classic failure (killed after the new
    key, before the certificate) a step that the crash tests cover.
    """
    return sorted(files, key=lambda name: (name != KEY_NAME, name))


def _remove_tree_quietly(context: StoreContext, directory: Path) -> None:
    try:
        remove_tree(context.fs, directory, first=MANIFEST_NAME)
    except OSError as exc:
        logger.warning(
            "Could not remove the unpublished directory %s: %s; the next open "
            "removes it",
            directory,
            exc,
        )


def check_written(context: StoreContext, manifest: Manifest) -> None:
    """Read the new generation back and compare it with its manifest."""
    directory = context.layout.generation(manifest.sequence)
    fd = open_directory(directory)
    try:
        written = read_generation(fd, manifest.sequence)
    except InvalidGeneration as exc:
        raise StoreError(
            f"generation {manifest.sequence} in {directory} differs from what was "
            f"written: {exc.reason}"
        ) from exc
    finally:
        os.close(fd)

    if written.manifest.files != manifest.files:
        raise StoreError(
            f"generation {manifest.sequence} in {directory} differs from what was "
            "written"
        )
    if written.mode_differences:
        differences = ", ".join(str(item) for item in written.mode_differences)
        raise StoreError(
            f"generation {manifest.sequence} in {directory} has other modes than "
            f"were written ({differences}): use a filesystem with POSIX file modes"
        )


def ensure_live_links(context: StoreContext, names: tuple[str, ...]) -> bool:
    """Create or repair the live symlink of each name; return whether any changed.

    Each link points through the pointer, so it resolves in the generation
    the pointer names. A link for a name the current set lacks dangles until
    the pointer swap, which is harmless.
    """
    layout = context.layout
    changed = False
    for name in names:
        live = layout.live(name)
        target = layout.live_target(name)
        try:
            info = os.lstat(live)
        except FileNotFoundError:
            info = None

        if info is not None and not stat.S_ISLNK(info.st_mode):
            raise ConfigError(
                f"{live} is not a symlink: the store owns this name and links it "
                "to the current generation. Move the file away and retry"
            )
        if info is not None and os.readlink(live) == target:
            continue

        replace_symlink(context.fs, target, live, "link")
        changed = True
    return changed


def publish(
    context: StoreContext, sequence: int, names: tuple[str, ...], previous: int | None
) -> None:
    """Make generation ``sequence`` the published set with one atomic rename.

    If the directory fsync after the rename fails, the pointer is set back to
    ``previous`` (or removed when there was none) and StoreError is raised,
    because the rename may not be durable and the caller sees a failed commit.
    """
    layout = context.layout
    ensure_live_links(context, names)
    # NOTE: the tests simulate process death only. That the fsyncs before
    # this rename make the new generation survive a power loss is untested.
    replace_symlink(context.fs, generation_name(sequence), layout.pointer, "current")

    try:
        fsync_directory(context.fs, layout.root)
    except StoreError:
        _restore_pointer(context, previous)
        raise


def _restore_pointer(context: StoreContext, previous: int | None) -> None:
    layout = context.layout
    try:
        if previous is None:
            context.fs.unlink(layout.pointer)
        else:
            target = generation_name(previous)
            replace_symlink(context.fs, target, layout.pointer, "current")
    except OSError as exc:
        logger.error(
            "Could not set the pointer of %s back to generation %s after a failed "
            "fsync: %s; readers see the new set, whose durability is unknown",
            layout.root,
            previous,
            exc,
        )


def remove_stale_links(context: StoreContext, names: tuple[str, ...]) -> None:
    """Remove live symlinks of names that the current generation lacks."""
    layout = context.layout
    prefix = layout.live_target("")
    for entry in os.listdir(layout.root):
        if entry in names or entry.startswith("."):
            continue
        live = layout.live(entry)
        if not live.is_symlink() or not os.readlink(live).startswith(prefix):
            continue
        remove_quietly(context.fs, live)


def prune(context: StoreContext, current: Manifest) -> None:
    """Delete generations beyond the newest ``keep``, never current or previous.

    The manifest goes first, so a deletion interrupted half way leaves an
    incomplete directory that the next open removes.
    """
    layout = context.layout
    sequences = generation_sequences(layout)
    protected = set(sequences[-context.keep :])
    protected.add(current.sequence)
    if current.previous is not None:
        protected.add(current.previous)

    for sequence in sequences:
        if sequence in protected:
            continue
        try:
            remove_tree(context.fs, layout.generation(sequence), first=MANIFEST_NAME)
        except OSError as exc:
            logger.warning(
                "Could not delete old generation %d of %s: %s",
                sequence,
                layout.root,
                exc,
            )
        else:
            logger.debug("Deleted old generation %d of %s", sequence, layout.root)

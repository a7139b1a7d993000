"""Deploy hooks and the durable marker that makes them survive a crash.

Rules:

* A commit writes ``.deploy-pending`` into the new generation directory
  before the manifest, listing the names of the hooks registered at that
  moment, so the marker becomes visible exactly when the generation is
  published. Rollback and recovery write a marker into the generation they
  publish, with an atomic rename, before they swap the pointer.
* Pending hooks run for the current generation only, with the store lock
  held, at the end of a commit or rollback, when a store is opened, and
  before the next commit or rollback.
* After a hook returns or raises an Exception, its name is removed from the
  marker and the change is fsynced. A hook is therefore never run twice once
  that removal is on disk. A process killed while the hook runs, or after it
  returns and before the removal is durable, runs it again on the next
  open: at least once in that window, exactly once everywhere else.
* A hook that raises is logged at ERROR and not retried.
* A pending name with no hook of that name registered in this process stays
  pending, so a reader that opens the store without hooks consumes nothing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

from ._context import StoreContext
from ._fs import create_file, fsync_directory, remove_quietly
from ._layout import DEPLOY_MARKER_NAME, GENERATION_TEMP_PREFIX, temp_name
from ._manifest import Generation

__all__ = [
    "DeployHook",
    "encode_marker",
    "hook_name",
    "read_marker",
    "replace_marker",
    "run_pending_hooks",
]

logger = logging.getLogger(__name__)

DeployHook = Callable[[Generation], object]


def hook_name(hook: DeployHook) -> str:
    """Return the default name of a hook: its module and qualified name."""
    module = getattr(hook, "__module__", None) or "unknown"
    qualified = getattr(hook, "__qualname__", None) or type(hook).__qualname__
    return f"{module}.{qualified}"


def encode_marker(names: list[str]) -> bytes:
    """Serialise the list of pending hook names."""
    return json.dumps({"hooks": names}).encode() + b"\n"


def read_marker(directory: Path) -> list[str]:
    """Return the pending hook names of a generation, empty without a marker."""
    try:
        raw = (directory / DEPLOY_MARKER_NAME).read_bytes()
    except FileNotFoundError:
        return []

    try:
        names = json.loads(raw)["hooks"]
    except (ValueError, KeyError, TypeError):
        logger.warning("Ignoring invalid deploy marker in %s", directory)
        return []
    if not isinstance(names, list):
        logger.warning("Ignoring invalid deploy marker in %s", directory)
        return []
    return [name for name in names if isinstance(name, str)]


def replace_marker(context: StoreContext, directory: Path, names: list[str]) -> None:
    """Replace the marker of a generation durably, removing it when empty."""
    fs = context.fs
    marker = directory / DEPLOY_MARKER_NAME

    if names:
        temporary = directory / temp_name(GENERATION_TEMP_PREFIX, "deploy")
        create_file(fs, temporary, encode_marker(names), 0o644, exact_mode=False)
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


def run_pending_hooks(
    context: StoreContext,
    generation: Generation,
    hooks: Mapping[str, DeployHook],
) -> None:
    """Run the registered hooks that the generation's marker lists as pending."""
    pending = read_marker(generation.path)
    runnable = [name for name in pending if name in hooks]
    skipped = [name for name in pending if name not in hooks]
    if skipped:
        logger.debug(
            "Deploy hooks %s of generation %d are not registered here; they "
            "stay pending",
            ", ".join(skipped),
            generation.sequence,
        )

    for name in runnable:
        _run_hook(name, hooks[name], generation, context)
        pending.remove(name)
        try:
            replace_marker(context, generation.path, pending)
        except OSError as exc:
            logger.error(
                "Could not record that deploy hook %s ran for generation %d of "
                "%s, so it may run again after a restart: %s",
                name,
                generation.sequence,
                context.layout.root,
                exc,
            )
            return


def _run_hook(
    name: str, hook: DeployHook, generation: Generation, context: StoreContext
) -> None:
    logger.debug("Running deploy hook %s for generation %d", name, generation.sequence)
    try:
        hook(generation)
    except Exception:
        logger.exception(
            "Deploy hook %s failed for generation %d of %s; it is not run again",
            name,
            generation.sequence,
            context.layout.root,
        )

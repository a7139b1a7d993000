"""Names of the entries a key store keeps in its directory.

User-visible names never start with a dot, so every entry the store owns
starts with one and cannot collide with a live name::

    STORE/
    ├── .lock                    flock(2) target, never deleted
    ├── .hooks.lock              flock(2) target of deploy hook runs
    ├── .token                   highest fencing token, replaced atomically
    ├── ..current -> ..gen-00000007
    ├── ..gen-00000007/          one immutable generation
    │   ├── privkey.pem          0600 from creation
    │   ├── cert.pem, chain.pem, fullchain.pem
    │   ├── .deploy-pending      hooks still to run, removed when done
    │   └── .manifest.json       written last: names, sha256, token, sequence
    ├── privkey.pem -> ..current/privkey.pem
    └── ..tmp-*                  leftovers of an interrupted step
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEPLOY_MARKER_NAME",
    "GENERATION_TEMP_PREFIX",
    "HOOKS_LOCK_NAME",
    "MANIFEST_NAME",
    "REQUIRED_NAMES",
    "STORE_TEMP_PREFIX",
    "StoreLayout",
    "generation_name",
    "parse_generation_name",
    "temp_name",
]

POINTER_NAME = "..current"
GENERATION_PREFIX = "..gen-"
STORE_TEMP_PREFIX = "..tmp-"
LOCK_NAME = ".lock"
HOOKS_LOCK_NAME = ".hooks.lock"
TOKEN_NAME = ".token"  # noqa: S105 (a file name, not a secret)

MANIFEST_NAME = ".manifest.json"
DEPLOY_MARKER_NAME = ".deploy-pending"
GENERATION_TEMP_PREFIX = ".tmp-"

REQUIRED_NAMES = ("cert.pem", "chain.pem", "fullchain.pem", "privkey.pem")

_GENERATION_PATTERN = re.compile(r"\.\.gen-(\d{8,})")


def generation_name(sequence: int) -> str:
    """Return the directory name of generation ``sequence``."""
    return f"{GENERATION_PREFIX}{sequence:08d}"


def parse_generation_name(name: str) -> int | None:
    """Return the sequence number in a generation directory name, or None."""
    match = _GENERATION_PATTERN.fullmatch(name)
    if match is None:
        return None
    return int(match.group(1))


def temp_name(prefix: str, purpose: str) -> str:
    """Return a fresh temporary name that recovery recognises by ``prefix``."""
    return f"{prefix}{purpose}-{os.getpid()}-{secrets.token_hex(4)}"


@dataclass(frozen=True)
class StoreLayout:
    """Paths of one store directory."""

    root: Path

    @property
    def pointer(self) -> Path:
        return self.root / POINTER_NAME

    @property
    def lock(self) -> Path:
        return self.root / LOCK_NAME

    @property
    def hooks_lock(self) -> Path:
        return self.root / HOOKS_LOCK_NAME

    @property
    def token(self) -> Path:
        return self.root / TOKEN_NAME

    def generation(self, sequence: int) -> Path:
        return self.root / generation_name(sequence)

    def live(self, name: str) -> Path:
        return self.root / name

    def store_temp(self, purpose: str) -> Path:
        return self.root / temp_name(STORE_TEMP_PREFIX, purpose)

    @staticmethod
    def live_target(name: str) -> str:
        """Return the relative target of a live symlink, through the pointer."""
        return f"{POINTER_NAME}/{name}"

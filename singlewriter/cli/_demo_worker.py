"""One renewer of ``singlewriter demo``, run as its own process.

It renews through ``singlewriter.acme.renew`` like ``singlewriter renew``
does, and reports what happens as JSON lines on stdout: ``acquired`` with
the lease's token, ``committing`` right before the store commit, then
``result`` or ``error``. Before committing it saves the files it is about
to commit, so that the demo can replay them as a stale writer. Then it
waits until the demo creates the "go" file, which gives the demo a holder
to SIGKILL in the middle of a renewal.

Usage: python -m singlewriter.cli._demo_worker CONFIG_JSON
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from singlewriter import Lease, Terminated, raise_on_signals
from singlewriter.backends.file import FileLock
from singlewriter.keystore import Generation, KeyStore

from ._logging import configure

# How long a renewer waits for the go file before committing anyway.
GO_TIMEOUT = 60.0


def emit(**event: Any) -> None:
    """Write one event as a JSON line to stdout."""
    print(json.dumps(event), flush=True)


class ReportingLock(FileLock):
    """A FileLock that reports each acquired token."""

    def acquire(self, timeout: float | None = None, blocking: bool = True) -> Lease:
        lease = super().acquire(timeout=timeout, blocking=blocking)
        emit(event="acquired", token=lease.token)
        return lease


class PausingStore(KeyStore):
    """A KeyStore that saves the set it is given and waits before committing."""

    def __init__(self, path: str, *, go_file: str, pending_dir: str) -> None:
        super().__init__(path)
        self.go_file = Path(go_file)
        self.pending_dir = Path(pending_dir)

    def commit(self, token: int, files: Mapping[str, bytes]) -> Generation:
        directory = self.pending_dir / f"token-{token}"
        directory.mkdir(mode=0o700, parents=True)
        for name, data in files.items():
            fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
        emit(event="committing", token=token)

        deadline = time.monotonic() + GO_TIMEOUT
        while not self.go_file.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        return super().commit(token, files)


def main(argv: list[str]) -> int:
    """Run one renewal with the JSON configuration in ``argv[1]``."""
    config = json.loads(argv[1])
    configure("info")
    logging.getLogger("singlewriter").info("demo renewer %s started", config["index"])
    raise_on_signals()

    acme = importlib.import_module("singlewriter.acme")
    lock = ReportingLock(config["lock_dir"], config["name"])
    store = PausingStore(
        config["store"], go_file=config["go_file"], pending_dir=config["pending_dir"]
    )
    challenge = acme.HTTP01Standalone(config["http01_port"], config["address"])
    try:
        result = acme.renew(
            config["domains"],
            lock=lock,
            store=store,
            directory_url=config["directory_url"],
            account=config["account"],
            challenge=challenge,
            ca_bundle=config["ca_bundle"],
            lock_timeout=config["lock_timeout"],
            on_step=lambda step: emit(event="step", step=step),
        )
    except Terminated:
        raise
    except Exception as exc:
        emit(event="error", error=type(exc).__name__, message=str(exc))
        return 1

    generation = getattr(result.generation, "sequence", result.generation)
    emit(
        event="result",
        renewed=bool(result.renewed),
        reason=str(result.reason),
        token=result.token,
        generation=generation,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

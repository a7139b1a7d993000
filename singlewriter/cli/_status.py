"""``singlewriter status``: the lock holder and the store's generations."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from datetime import timezone
from pathlib import Path
from typing import Any

from singlewriter import ConfigError, lock_from_url
from singlewriter.keystore import Generation, KeyStore

from . import _exit
from ._inspect import LockState, describe_lock
from ._options import CommandParser, Options, print_line

__all__ = ["add_parser", "run"]

EPILOG = """\
exit status:
  0   everything asked for was read
  1   the lock backend could not be read
  2   invalid command line or environment variable
  78  invalid configuration (lock URL, store path)
Reading the lock takes no lock and never delays a holder or a waiter. Reading
the store opens it, which runs its recovery under the store lock: status needs
write access to the store, may finish or undo an interrupted commit, and waits
while another process holds the store lock or runs a deploy hook."""


def add_parser(subparsers: argparse._SubParsersAction[CommandParser]) -> Options:
    """Add the ``status`` command and return its options."""
    parser = subparsers.add_parser(
        "status",
        help="show the lock holder and token, and the store's generations",
        description=(
            "Show who holds the lock and with which token, where the backend"
            " can tell, and the generations in the key store. Give --lock and"
            " --name, --store, or all three."
        ),
        epilog=EPILOG,
    )
    options = Options(parser)
    options.add("--lock", metavar="URL", help="lock URL, as for renew")
    options.add("--name", metavar="NAME", help="lock name, as for renew")
    options.add("--store", type=Path, metavar="DIR", help="key store directory")
    options.add("--json", flag=True, help="print one JSON object instead of text")
    return options


def run(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """Print the lock and store state; return 0, or 1 if the lock was unreadable."""
    if args.lock is None and args.store is None:
        raise ConfigError("status needs --lock and --name, --store, or both")
    if args.lock is not None and args.name is None:
        raise ConfigError("status needs --name with --lock")

    lock_state = None
    if args.lock is not None:
        lock_state = describe_lock(lock_from_url(args.lock, args.name))
    store_state = _store_state(args.store) if args.store is not None else None

    if args.json:
        document: dict[str, Any] = {
            "lock": lock_state.as_dict() if lock_state else None,
            "store": store_state,
        }
        print_line(json.dumps(document, sort_keys=True))
    else:
        _print_text(lock_state, store_state)

    if lock_state is not None and lock_state.held is None and lock_state.detail:
        return _exit.FAILURE
    return _exit.OK


def _store_state(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise ConfigError(f"store {path} does not exist or is not a directory")
    # TODO: read the pointer and manifests without opening a KeyStore, so
    # that status stays read-only. Opening it runs recovery under the store
    # lock, which writes and waits for a running deploy hook (see EPILOG).
    store = KeyStore(path)
    current = store.current_generation()
    return {
        "path": str(store.path),
        "highest_token": store.highest_token,
        "current": None if current is None else current.sequence,
        "generations": [_generation(item) for item in store.generations()],
    }


def _generation(generation: Generation) -> dict[str, Any]:
    return {
        "sequence": generation.sequence,
        "token": generation.token,
        "created": _iso(generation.created),
        "not_after": _iso(generation.not_after),
        "previous": generation.previous,
    }


def _print_text(lock: LockState | None, store: dict[str, Any] | None) -> None:
    if lock is not None:
        print_line(lock.summary())
    if store is None:
        return
    generations = store["generations"]
    print_line(
        f"store {store['path']}: {len(generations)} generations, highest token"
        f" {store['highest_token']}"
    )
    for item in reversed(generations):
        marker = "  (current)" if item["sequence"] == store["current"] else ""
        print_line(
            f"  generation {item['sequence']}: token {item['token']}, created"
            f" {item['created']}, expires {item['not_after']}{marker}"
        )


def _iso(moment: Any) -> str:
    return str(moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))

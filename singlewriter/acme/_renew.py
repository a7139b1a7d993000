"""``renew()``: the reference certificate renewal under a fencing lock.

``renew()`` checks every argument before it touches anything, opens the
lock and the store, takes the lock (with SIGTERM and SIGHUP raising
Terminated from then on), hands over to ``_run.Renewal`` and releases the
lock on every way out.
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from importlib import metadata
from pathlib import Path

import acme

from singlewriter._errors import ConfigError
from singlewriter._lock import Lock
from singlewriter._urls import lock_from_url
from singlewriter.keystore import DeployHook, KeyStore

from ._account import AccountStore
from ._challenges import Challenge
from ._domains import default_lock_name
from ._interrupt import terminate_on_signals
from ._options import Options, StepCallback, utc_now
from ._private import make_private_directory
from ._result import RenewalResult
from ._run import Renewal
from ._state import LineageState, lineage_directory

__all__ = ["DEFAULT_USER_AGENT", "LETSENCRYPT_DIRECTORY_URL", "renew"]

#: Let's Encrypt's production directory. Nothing uses it unless passed.
LETSENCRYPT_DIRECTORY_URL = "https://acme-v02.api.letsencrypt.org/directory"


def _user_agent() -> str:
    version = getattr(importlib.import_module("singlewriter"), "__version__", None)
    if version is None:
        try:
            version = metadata.version("singlewriter")
        except metadata.PackageNotFoundError:
            version = "0"
    try:
        acme_version = metadata.version("acme")
    except metadata.PackageNotFoundError:
        acme_version = getattr(acme, "__version__", "0")
    return f"singlewriter/{version} acme-python/{acme_version}"


DEFAULT_USER_AGENT = _user_agent()


def renew(
    domains: Sequence[str],
    *,
    lock: Lock | str,
    store: KeyStore | str | os.PathLike[str],
    directory_url: str,
    account: str | os.PathLike[str] | AccountStore,
    challenge: Challenge,
    key_type: str = "ec-p256",
    email: str | None = None,
    ca_bundle: str | None = None,
    renew_fraction: float = 1 / 3,
    lock_name: str | None = None,
    lock_timeout: float | None = None,
    ttl: float = 60.0,
    force: bool = False,
    clock: Callable[[], datetime] = utc_now,
    user_agent: str = DEFAULT_USER_AGENT,
    state_dir: str | os.PathLike[str] | None = None,
    deploy_hooks: Iterable[DeployHook] = (),
    profile: str | None = None,
    use_ari: bool = True,
    check_interval: float | None = None,
    poll_timeout: float = 180.0,
    network_timeout: float = 30.0,
    handle_signals: bool = True,
    sleep: Callable[[float], None] = time.sleep,
    on_step: StepCallback | None = None,
) -> RenewalResult:
    """Renew the certificate for ``domains`` in ``store`` if it is due.

    ``lock`` is a Lock or a lock URL (``singlewriter.lock_from_url``) for
    the lock named ``lock_name``, by default the first domain without any
    ``*.``. ``ttl`` (seconds) applies to a lock built from a URL.
    ``lock_timeout`` (seconds, None for no limit) bounds the wait for it.
    ``store`` is a KeyStore or its directory; ``deploy_hooks`` are
    registered on a store opened from a directory. ``account`` is the ACME
    account directory (see AccountStore), and ``state_dir`` contains the order
    in flight, failures and ARI responses (default ``ACCOUNT/state``).

    Registering an account agrees to the CA's terms of service. ``email``
    is the account contact. ``ca_bundle`` is a PEM file of the CAs trusted
    for the ACME server's TLS, replacing the system store.

    A certificate is due when the store has none, it misses a name, its key
    does not match or is not of ``key_type``, or it expired. With
    ``use_ari`` it is due once the time chosen in the CA's renewal window
    has come, or comes within ``check_interval`` (how often, in seconds,
    the caller runs). Without a window it is due when at most
    ``renew_fraction`` of its lifetime is left. ``force`` renews anyway
    and ignores the failure backoff.

    ``poll_timeout`` bounds the wait for validation and issuance, and
    ``network_timeout`` each HTTP request, in seconds. With
    ``handle_signals`` (main thread only) SIGTERM and SIGHUP raise
    ``singlewriter.Terminated`` (exit status 143 for SIGTERM) outside the
    commit, and wait until a commit in progress finished. ``on_step`` is
    called with the name of each step reached (see STEPS).

    Raises ConfigError for invalid arguments, LockTimeout, LockLost,
    StaleTokenError, StoreError, RenewalBackoff, ChallengeError, ACMEError
    and its other subclasses. The lock is released before any of them
    propagates, and an order in flight is kept for the next run to resume.
    """
    options = Options.build(
        domains=domains,
        directory_url=directory_url,
        challenge=challenge,
        key_type=key_type,
        email=email,
        ca_bundle=ca_bundle,
        renew_fraction=renew_fraction,
        force=force,
        clock=clock,
        user_agent=user_agent,
        profile=profile,
        use_ari=use_ari,
        check_interval=check_interval,
        poll_timeout=poll_timeout,
        network_timeout=network_timeout,
        sleep=sleep,
        monotonic=time.monotonic,
        on_step=on_step,
    )
    name = lock_name if lock_name is not None else default_lock_name(options.domains)
    accounts = _open_accounts(account)
    state_root = Path(state_dir) if state_dir is not None else accounts.path / "state"
    make_private_directory(accounts.path, "ACME account directory")
    make_private_directory(state_root, "ACME state directory")
    lock_object = _open_lock(lock, lock_name, name, ttl)
    key_store = _open_store(store, deploy_hooks, lock_object.name)
    # NOTE: KeyStore has no public accessor for its passphrase yet.
    passphrase: bytes | None = getattr(key_store, "_passphrase", None)
    state = LineageState(
        lineage_directory(state_root, options.directory_url, options.domains),
        passphrase=passphrase,
    )

    with terminate_on_signals(handle_signals) as guard:
        lease = lock_object.acquire(timeout=lock_timeout)
        try:
            options.step("lock-acquired")
            run = Renewal(options, lease, key_store, accounts, state, guard)
            try:
                return run.run()
            finally:
                run.close()
        finally:
            lease.release()


def _open_accounts(account: object) -> AccountStore:
    if isinstance(account, AccountStore):
        return account
    if isinstance(account, (str, os.PathLike)):
        return AccountStore(account)
    raise ConfigError(
        f"account={account!r} is invalid: pass the ACME account directory or an"
        " AccountStore"
    )


def _open_lock(lock: Lock | str, lock_name: str | None, name: str, ttl: float) -> Lock:
    if isinstance(lock, Lock):
        if lock_name is not None and lock_name != lock.name:
            raise ConfigError(
                f"lock_name={lock_name!r} differs from the name {lock.name!r} of the"
                " lock passed; pass one of them"
            )
        return lock
    if isinstance(lock, str):
        return lock_from_url(lock, name, ttl=ttl)
    raise ConfigError(
        f"lock={lock!r} is invalid: pass a singlewriter.Lock or a lock URL such as"
        " 'file:///var/lib/singlewriter/locks'"
    )


def _open_store(
    store: KeyStore | str | os.PathLike[str],
    hooks: Iterable[DeployHook],
    lock_name: str,
) -> KeyStore:
    hooks = tuple(hooks)
    if isinstance(store, KeyStore):
        if hooks:
            raise ConfigError(
                f"deploy_hooks were passed with the open store {store!r}; register"
                " them with KeyStore.add_deploy_hook() instead"
            )
        return store
    if isinstance(store, (str, os.PathLike)):
        return KeyStore(store, hooks=hooks, lock_name=lock_name)
    raise ConfigError(
        f"store={store!r} is invalid: pass a KeyStore or a directory path"
    )

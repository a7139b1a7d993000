"""DNS-01 (RFC 8555 section 8.4) through a user hook: a callable or a command."""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Literal

from singlewriter._errors import ConfigError

from ._challenges import Challenge, ChallengeItem, DNSRecord
from ._errors import ChallengeError

__all__ = ["Action", "DNS01Hook", "DNSHookCallable"]

log = logging.getLogger(__name__)

Action = Literal["present", "cleanup"]

DNSHookCallable = Callable[[Action, DNSRecord], object]


class DNS01Hook(Challenge):
    """Answer DNS-01 by calling ``hook`` to publish and remove TXT records.

    ``hook`` is a callable ``hook(action, record)`` with ``action`` either
    "present" or "cleanup" and ``record`` a DNSRecord. It can also be a
    command (a list of arguments, run without a shell), which gets the record
    in its environment: SINGLEWRITER_ACME_ACTION, SINGLEWRITER_ACME_DOMAIN,
    SINGLEWRITER_ACME_RECORD_NAME (``_acme-challenge.DOMAIN``, RFC 8555
    section 8.4) and SINGLEWRITER_ACME_RECORD_VALUE. A command that exits
    non-zero, or runs longer than ``timeout`` seconds, fails the challenge.

    ``propagation_wait`` is how many seconds to wait after the last record
    was published before asking the CA to validate, for DNS providers whose
    secondaries lag behind.
    """

    challenge_type = "dns-01"

    def __init__(
        self,
        hook: DNSHookCallable | Sequence[str],
        propagation_wait: float = 0.0,
        *,
        timeout: float = 120.0,
    ) -> None:
        if isinstance(hook, str):
            raise ConfigError(
                f"DNS-01 hook {hook!r} is a string; pass a callable, or the command"
                " as a list of arguments such as ['/usr/local/bin/dns-hook']"
            )
        if not callable(hook) and not (hook and all(isinstance(a, str) for a in hook)):
            raise ConfigError(
                f"DNS-01 hook {hook!r} is invalid: pass a callable or a non-empty"
                " list of command arguments"
            )
        if propagation_wait < 0 or timeout <= 0:
            raise ConfigError(
                f"propagation_wait={propagation_wait!r} and timeout={timeout!r} must"
                " be seconds, propagation_wait >= 0 and timeout > 0"
            )
        self.hook = hook
        self.propagation_wait = float(propagation_wait)
        self.timeout = float(timeout)

    def __repr__(self) -> str:
        return f"DNS01Hook({self.hook!r}, propagation_wait={self.propagation_wait})"

    @staticmethod
    def record_for(item: ChallengeItem) -> DNSRecord:
        return DNSRecord(
            domain=item.domain,
            name=f"_acme-challenge.{item.domain}",
            value=item.validation,
        )

    def present(self, item: ChallengeItem) -> None:
        self._run("present", self.record_for(item))

    def wait_ready(
        self, items: Sequence[ChallengeItem], sleep: Callable[[float], None]
    ) -> None:
        if items and self.propagation_wait > 0:
            log.info(
                "waiting %.1f s for DNS-01 records to propagate", self.propagation_wait
            )
            sleep(self.propagation_wait)

    def cleanup(self, item: ChallengeItem) -> None:
        try:
            self._run("cleanup", self.record_for(item))
        except ChallengeError as exc:
            log.warning("DNS-01 cleanup for %s failed: %s", item.domain, exc)

    def _run(self, action: Action, record: DNSRecord) -> None:
        if callable(self.hook):
            try:
                self.hook(action, record)
            except Exception as exc:
                raise ChallengeError(
                    f"the DNS-01 hook failed to {action} the TXT record {record.name}:"
                    f" {exc}",
                    domains=(record.domain,),
                ) from exc
            return
        self._run_command(list(self.hook), action, record)

    def _run_command(self, argv: list[str], action: Action, record: DNSRecord) -> None:
        environment = dict(os.environ)
        environment.update(
            SINGLEWRITER_ACME_ACTION=action,
            SINGLEWRITER_ACME_DOMAIN=record.domain,
            SINGLEWRITER_ACME_RECORD_NAME=record.name,
            SINGLEWRITER_ACME_RECORD_VALUE=record.value,
        )
        started = time.monotonic()
        try:
            completed = subprocess.run(
                argv,
                env=environment,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=self.timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ChallengeError(
                f"the DNS-01 hook {argv[0]!r} could not {action} the TXT record"
                f" {record.name}: {exc}",
                domains=(record.domain,),
            ) from exc

        log.debug(
            "DNS-01 hook %s %s exited %d after %.2f s",
            action,
            record.name,
            completed.returncode,
            time.monotonic() - started,
        )
        if completed.returncode != 0:
            output = completed.stderr.decode(errors="replace").strip()[-500:]
            raise ChallengeError(
                f"the DNS-01 hook {argv[0]!r} exited with status"
                f" {completed.returncode} on {action} of {record.name}: {output}",
                domains=(record.domain,),
            )

"""Running the user's --deploy-hook command after a new certificate is live."""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
from collections.abc import Mapping

from singlewriter.keystore import Generation

__all__ = ["HOOK_NAME", "CommandHook"]

log = logging.getLogger("singlewriter.cli")


class CommandHook:
    """A deploy hook that runs one command, split like a shell command line.

    The command runs without a shell; wrap it as ``sh -c '...'`` for shell
    syntax. It gets SINGLEWRITER_STORE, SINGLEWRITER_GENERATION and
    SINGLEWRITER_TOKEN (the token that committed the generation) in its
    environment. A non-zero status or a timeout raises, which the store
    logs at ERROR; the hook is not retried.
    """

    def __init__(
        self,
        command: str,
        store: str,
        timeout: float,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.argv = shlex.split(command)
        if not self.argv:
            raise ValueError(
                "--deploy-hook is empty; give a command such as 'nginx -s reload'"
            )
        self.store = store
        self.timeout = timeout
        self.environ = dict(environ if environ is not None else os.environ)

    def __call__(self, generation: Generation) -> None:
        env = dict(self.environ)
        env.update(
            SINGLEWRITER_STORE=self.store,
            SINGLEWRITER_GENERATION=str(generation.sequence),
            SINGLEWRITER_TOKEN=str(generation.token),
        )
        log.info(
            "running deploy hook %s for generation %d",
            self.argv[0],
            generation.sequence,
        )
        completed = subprocess.run(
            self.argv,
            env=env,
            stdin=subprocess.DEVNULL,
            timeout=self.timeout,
            check=False,
        )
        if completed.returncode != 0:
            raise RuntimeError(
                f"deploy hook {self.argv[0]} exited with status"
                f" {completed.returncode} for generation {generation.sequence}"
            )
        log.info(
            "deploy hook %s finished for generation %d",
            self.argv[0],
            generation.sequence,
        )


#: The name the KeyStore registers the hook under: its module and qualified
#: class name. A process that opens the store after a crash runs a hook
#: that is still pending only under the same name, so renaming or moving
#: CommandHook leaves markers written before the change pending forever.
HOOK_NAME = f"{CommandHook.__module__}.{CommandHook.__qualname__}"

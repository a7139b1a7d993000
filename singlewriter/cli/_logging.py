"""Logging setup for the commands, with secrets removed from every line.

Log records of the ``singlewriter`` logger tree go to stderr. The formatter
redacts the finished text, tracebacks included, so a password in a lock
URL, a token in a query string or a PEM private key never reaches a log,
whichever module wrote the message.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import TextIO

__all__ = ["LEVELS", "RedactingFormatter", "configure", "redact", "traceback_of"]

LEVELS = ("debug", "info", "warning", "error")

# scheme://user:password@host -> scheme://user:***@host
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^@\s/]*@")

# ?password=...&token=... in URLs and key=value text.
_SECRET_PARAMETER = re.compile(
    r"(?P<head>\b(?:password|passwd|pass|secret|token|access_token|api_key"
    r"|apikey|auth|authorization)=)[^&\s]+",
    re.IGNORECASE,
)

_PRIVATE_KEY = re.compile(
    r"-----BEGIN (?P<kind>[A-Z ]*)PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----",
    re.DOTALL,
)


def redact(text: str) -> str:
    """Return ``text`` with URL passwords, secret parameters and PEM keys masked."""
    text = _URL_PASSWORD.sub(r"\g<head>***@", text)
    text = _SECRET_PARAMETER.sub(r"\g<head>***", text)
    return _PRIVATE_KEY.sub(r"-----BEGIN \g<kind>PRIVATE KEY----- *** (redacted)", text)


def traceback_of(logger: logging.Logger, exc: BaseException) -> BaseException | None:
    """Return ``exc`` for ``exc_info`` at --log-level debug, else None.

    At the default level an error is one line; its traceback is only for
    debugging.
    """
    return exc if logger.isEnabledFor(logging.DEBUG) else None


class RedactingFormatter(logging.Formatter):
    """A Formatter that passes its whole output through :func:`redact`."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def configure(level: str, stream: TextIO | None = None) -> logging.Handler:
    """Send ``singlewriter`` log records at ``level`` or above to ``stream``.

    Return the handler; calling again replaces the handler set before, so
    tests that run several commands in one process get one copy per line.
    """
    logger = logging.getLogger("singlewriter")
    for handler in list(logger.handlers):
        if getattr(handler, "_singlewriter_cli", False):
            logger.removeHandler(handler)

    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(
        RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    handler._singlewriter_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    return handler

"""Error messages of the ACME client reworded for the command line.

``singlewriter.acme`` advises Python callers (``HTTP01Webroot``,
``ca_bundle=``). A command-line user needs the flag with the same effect,
so the CLI rewrites that advice before it prints or logs a message.
"""

from __future__ import annotations

import errno
import socket

__all__ = ["for_command_line"]

# Python-API advice in singlewriter.acme messages and the flag that
# replaces it, checked in the order given.
_FLAG_ADVICE = (
    ("HTTP01Webroot or DNS01Hook", "--webroot or --dns-hook"),
    ("pass DNS01Hook(...)", "use --dns-hook"),
    (
        "HTTP01Standalone(), HTTP01Webroot(path) or DNS01Hook(hook)",
        "--webroot or --dns-hook",
    ),
    ("Pass ca_bundle=", "Pass --ca-bundle"),
    ("ca_bundle=", "--ca-bundle "),
)

# The HTTP-01 responder's advice when it cannot listen, which fits only a
# port in use or a port that needs privileges.
_BIND_ADVICE = (
    "Free the port, run with the right to bind it, or use --webroot or --dns-hook."
)


def for_command_line(message: str, exc: BaseException | None = None) -> str:
    """Return ``message`` with Python-API advice replaced by CLI flags.

    ``exc`` is the exception the message came from. When the HTTP-01
    responder failed to listen, its cause selects advice that fits the
    error: a port in use, a port that needs privileges, or an address
    that this host does not have or that does not resolve.
    """
    for python_advice, flag_advice in _FLAG_ADVICE:
        message = message.replace(python_advice, flag_advice)
    if _BIND_ADVICE in message and exc is not None:
        message = message.replace(_BIND_ADVICE, _bind_advice(exc.__cause__))
    return message


def _bind_advice(cause: BaseException | None) -> str:
    if isinstance(cause, socket.gaierror) or (
        isinstance(cause, OSError) and cause.errno == errno.EADDRNOTAVAIL
    ):
        return (
            "Give an address of this host with --http01-address, or use"
            " --webroot or --dns-hook."
        )
    if isinstance(cause, OSError) and cause.errno == errno.EACCES:
        return (
            "Run with the right to bind the port (CAP_NET_BIND_SERVICE below"
            " 1024), choose another --http01-port, or use --webroot or --dns-hook."
        )
    if isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE:
        return (
            "Stop the program that uses the port, choose another --http01-port,"
            " or use --webroot or --dns-hook."
        )
    return _BIND_ADVICE

"""Command-line options that can also be set from SINGLEWRITER_* variables.

Rules:

- Option ``--foo-bar`` is also read from ``SINGLEWRITER_FOO_BAR``.
- A value given on the command line wins over the environment, and the
  environment wins over the built-in default.
- A repeatable option (``--domain``) reads a list separated by commas or
  whitespace from its variable. A flag reads 1/0, true/false, yes/no, on/off.
- Values from the environment go through the same conversion and choices
  as values on the command line, and an invalid one is a usage error that
  names the variable.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from . import _exit

__all__ = [
    "ENVIRONMENT_EPILOG",
    "CommandParser",
    "Options",
    "days",
    "ip_address",
    "port",
    "positive_seconds",
    "seconds",
]

ENV_PREFIX = "SINGLEWRITER_"

ENVIRONMENT_EPILOG = """\
environment:
  Every option can also be set with an environment variable: --foo-bar is
  SINGLEWRITER_FOO_BAR (for example --lock is SINGLEWRITER_LOCK). The
  command line wins over the environment. Repeatable options such as
  --domain take a list separated by commas or spaces; flags take 1/0,
  true/false, yes/no or on/off. A variable such as SINGLEWRITER_TTL sets
  that option for every command that has it, each with its own limits."""

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line with a set status.

    ``usage_status`` is 2 like argparse's, except for ``check``, where
    Docker reserves 2 and every failure must read as unhealthy (1).
    """

    usage_status = _exit.USAGE

    def error(self, message: str) -> NoReturn:
        self.exit(self.usage_status, f"{self.prog}: error: {message}\n")


@dataclass(frozen=True)
class _Option:
    flag: str
    dest: str
    env: str
    convert: Callable[[str], Any] | None
    default: Any
    required: bool
    multiple: bool
    is_flag: bool
    choices: Sequence[str] | None


class Options:
    """The options of one command and the environment variables behind them."""

    def __init__(self, parser: CommandParser) -> None:
        self.parser = parser
        self._options: list[_Option] = []

    def add(
        self,
        *flags: str,
        help: str,
        type: Callable[[str], Any] | None = None,
        default: Any = None,
        required: bool = False,
        multiple: bool = False,
        flag: bool = False,
        choices: Sequence[str] | None = None,
        metavar: str | None = None,
        show_default: str | None = None,
    ) -> None:
        """Add an option; ``help`` gets the default and variable appended.

        ``show_default`` replaces the printed default, for defaults that
        need words, such as "wait without limit".
        """
        long_flag = next(f for f in flags if f.startswith("--"))
        dest = long_flag[2:].replace("-", "_")
        env = ENV_PREFIX + dest.upper()
        option = _Option(
            long_flag, dest, env, type, default, required, multiple, flag, choices
        )
        self._options.append(option)

        kwargs: dict[str, Any] = {"dest": dest, "default": None}
        if flag:
            kwargs.update(action="store_const", const=True)
        else:
            kwargs.update(
                action="append" if multiple else "store",
                type=type,
                choices=choices,
                metavar=metavar,
            )
        self.parser.add_argument(
            *flags, help=_help_text(help, option, show_default), **kwargs
        )

    def resolve(
        self, namespace: argparse.Namespace, environ: Mapping[str, str]
    ) -> None:
        """Fill options missing from the command line from ``environ`` or defaults.

        Exit with a usage error when a variable is invalid or a required
        option is missing from both.
        """
        for option in self._options:
            if getattr(namespace, option.dest) is not None:
                continue

            raw = environ.get(option.env)
            if raw is not None and (raw.strip() or option.is_flag):
                value = self._from_environment(option, raw)
            elif option.required:
                self.parser.error(
                    f"{option.flag} is required: pass it or set {option.env}"
                )
            else:
                value = option.default
            setattr(namespace, option.dest, value)

    def _from_environment(self, option: _Option, raw: str) -> Any:
        if option.is_flag:
            return self._parse_flag(option, raw)
        if option.multiple:
            items = [item for item in re.split(r"[\s,]+", raw) if item]
            return [self._convert(option, item) for item in items]
        return self._convert(option, raw)

    def _parse_flag(self, option: _Option, raw: str) -> bool:
        text = raw.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        self.parser.error(
            f"{option.env}={raw!r} is invalid: use 1/0, true/false, yes/no or on/off"
        )

    def _convert(self, option: _Option, raw: str) -> Any:
        try:
            value = option.convert(raw) if option.convert is not None else raw
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
            self.parser.error(f"{option.env}={raw!r} is invalid: {exc}")
        if option.choices is not None and value not in option.choices:
            self.parser.error(
                f"{option.env}={raw!r} is invalid: use one of"
                f" {', '.join(option.choices)}"
            )
        return value


def _help_text(text: str, option: _Option, show_default: str | None) -> str:
    if show_default is not None:
        default = f"default: {show_default}; "
    elif option.required:
        default = "required; "
    elif option.default is None or option.is_flag:
        default = ""
    else:
        default = f"default: {option.default}; "
    return f"{text} ({default}env {option.env})"


def seconds(text: str) -> float:
    """Parse a number of seconds that is 0 or more."""
    value = _finite(text, "seconds")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative; use seconds >= 0")
    return value


def positive_seconds(text: str) -> float:
    """Parse a number of seconds greater than 0."""
    value = _finite(text, "seconds")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not above 0; use seconds > 0")
    return value


def days(text: str) -> float:
    """Parse a number of days, fractions allowed, 0 or more."""
    value = _finite(text, "days")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative; use days >= 0")
    return value


def fraction(text: str) -> float:
    """Parse a number greater than 0 and less than 1."""
    value = _finite(text, "a fraction")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is out of range; use a number between 0 and 1, such as 0.33"
        )
    return value


def port(text: str) -> int:
    """Parse a TCP port number from 1 to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range; use 1 to 65535")
    return value


def ip_address(text: str) -> str:
    """Parse an IPv4 or IPv6 address to bind, such as 0.0.0.0 or ::."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an IP address; give one such as 127.0.0.1, 0.0.0.0 or ::"
        ) from None


def _finite(text: str, unit: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of {unit}"
        ) from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number of {unit}")
    return value


def environment() -> Mapping[str, str]:
    """Return the process environment; a seam for tests."""
    return os.environ


def print_line(text: str, *, error: bool = False) -> None:
    """Print one line to stdout, or stderr with ``error``, and flush it."""
    stream = sys.stderr if error else sys.stdout
    print(text, file=stream, flush=True)

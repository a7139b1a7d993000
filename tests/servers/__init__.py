"""Launchers for the real servers that the test suite runs on 127.0.0.1.

Build the Go servers first with `bash tests/servers/build.sh`. A launcher
raises ServerUnavailable, naming that command, when its binary is missing.
"""

from ._common import ServerUnavailable, cache_dir, find_binary, free_port

__all__ = ["ServerUnavailable", "cache_dir", "find_binary", "free_port"]

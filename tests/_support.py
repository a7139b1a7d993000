"""Helpers for tests that drive lock holders in other processes."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def unique_name(prefix: str = "lock") -> str:
    """Return a lock name no other test uses, so tests can share a server."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class Worker:
    """A ``tests._worker`` process holding or contending for one lock."""

    def __init__(self, url: str, name: str, ttl: float) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests._worker", url, name, str(ttl)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._events: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        ready = self.next_event(timeout=30)
        assert ready["event"] == "ready", ready

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._events.put(json.loads(line))

    @property
    def pid(self) -> int:
        return self.process.pid

    def send(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def request(self, command: str, timeout: float = 30) -> dict[str, Any]:
        """Send ``command`` and return the next event it produces."""
        self.send(command)
        return self.next_event(timeout)

    def next_event(self, timeout: float = 30) -> dict[str, Any]:
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"worker {self.pid} sent nothing for {timeout} s;"
                f" exit status {self.process.poll()}, stderr:\n{self.stderr()}"
            ) from None

    def stderr(self) -> str:
        if self.process.poll() is None or self.process.stderr is None:
            return "(still running)"
        return self.process.stderr.read()

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float = 30) -> int:
        return self.process.wait(timeout=timeout)

    def close(self) -> None:
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGCONT)
            self.process.kill()
            self.process.wait(timeout=30)
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()

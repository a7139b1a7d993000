"""Consul fixtures for the contract suite (placeholder until the backend lands)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import unavailable


@pytest.fixture
def consul_backend() -> Callable[[Path], str]:
    unavailable("consul", "the Consul backend is not written yet")
    raise AssertionError("unreachable")

"""Kubernetes fixtures for the contract suite (placeholder until the backend lands)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import unavailable


@pytest.fixture
def kubernetes_backend() -> Callable[[Path], str]:
    unavailable("kubernetes", "the Kubernetes backend is not written yet")
    raise AssertionError("unreachable")

"""Fixtures for the patching tests (the tiny model itself comes from tests/conftest.py)."""

from __future__ import annotations

from typing import Any

import pytest
from patching_helpers import copy_model, different_length_pair, same_length_pair

from entitylens.patching import PatchPair


@pytest.fixture(scope="session")
def pair(tiny_model: Any) -> PatchPair:
    return same_length_pair(tiny_model)


@pytest.fixture(scope="session")
def diff_pair(tiny_model: Any) -> PatchPair:
    return different_length_pair(tiny_model)


@pytest.fixture(scope="session")
def copy_bridge() -> Any:
    return copy_model()

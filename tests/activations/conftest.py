"""Fixtures for the activation-caching tests."""

from __future__ import annotations

from typing import Any

import pytest
from activations_helpers import sample_rows

from entitylens.task.types import BoxRow


@pytest.fixture(scope="session")
def rows() -> list[BoxRow]:
    return sample_rows()


@pytest.fixture(scope="session")
def tiny_gpt2() -> Any:
    """``tiny:gpt2``: a bridge whose tokenizer does not prepend BOS (learned positions, LayerNorm)."""
    from entitylens.models import load_model

    return load_model("tiny:gpt2")

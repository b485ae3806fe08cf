"""Fixtures of the testbed tests: a short end-to-end training through the CLI, and the shipped stem."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from testbed_helpers import SMOKE_ARM_STEPS, SMOKE_STEM_STEPS, shipped


@pytest.fixture(scope="session")
def smoke_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stem (24 steps) and a code arm (6 steps) trained through ``entitylens testbed train``."""
    from entitylens.cli import main
    from entitylens.progress import set_quiet

    root = tmp_path_factory.mktemp("testbed-smoke")
    try:
        common = ["--out", str(root), "--eval-states", "9", "--quiet"]
        assert main(["testbed", "train", "--stage", "stem", "--steps", str(SMOKE_STEM_STEPS), *common]) == 0
        assert main(["testbed", "train", "--stage", "code", "--steps", str(SMOKE_ARM_STEPS), *common]) == 0
    finally:
        set_quiet(False)
    return root


@pytest.fixture(scope="session")
def shipped_stem() -> Any:
    """The shipped stem as a bridge (skipped if the checkpoints are not shipped)."""
    if not shipped("stem"):
        pytest.skip("the testbed checkpoints are not shipped in this checkout")
    from entitylens.models.testbed.checkpoints import load_testbed

    return load_testbed("testbed:stem")

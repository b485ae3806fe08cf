"""Helpers shared by the testbed tests (imported by module name, like ``activations_helpers``)."""

from __future__ import annotations

from entitylens.models.testbed.checkpoints import checkpoint_dir

SMOKE_STEM_STEPS = 24
SMOKE_ARM_STEPS = 6


def shipped(stage: str) -> bool:
    """Whether the checkpoint of ``stage`` is shipped in this checkout."""
    return (checkpoint_dir(stage) / "meta.json").is_file()

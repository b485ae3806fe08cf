"""Choosing the engine: the fast one where it can run the model and reproduces the bridge, else hooks.

:func:`make_runner` builds the engine a ``method`` asks for, falling back to the hooks engine (with a warning,
:func:`fallback_message`) when the fast one cannot run the model; :func:`verify_twin` checks that the fast
engine's twin reproduces the bridge's logits before its numbers are trusted.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

from entitylens.patching.engine_fast import TwinRunner, Unsupported
from entitylens.patching.engine_hooks import HookRunner

__all__ = ["fallback_message", "make_runner", "verify_twin"]


def fallback_message(reason: Exception) -> str:
    """The warning shown when the fast engine cannot run and the hooks engine takes over."""
    return f"fast patching unavailable ({reason}); using the bridge-hooks engine (same numbers, slower)"


def make_runner(model: Any, method: str) -> HookRunner | TwinRunner:
    """The engine for ``method``: the fast one when it can run ``model`` (else hooks, with a warning)."""
    if method == "hooks":
        return HookRunner(model)
    try:
        return TwinRunner(model)
    except Unsupported as e:
        warnings.warn(fallback_message(e), stacklevel=3)
        return HookRunner(model)


def verify_twin(runner: TwinRunner, tokens: Tensor, answer_pos: int) -> bool:
    """Check that the twin reproduces the bridge's answer logits (relative error; looser for 16-bit floats)."""
    dtype = next(runner.twin.parameters()).dtype
    tol = 2e-3 if torch.finfo(dtype).bits >= 32 else 3e-2
    err = runner.verify(tokens, answer_pos, lambda: runner.answer_logits(tokens, answer_pos))
    if not math.isfinite(err) or err > tol:
        warnings.warn(
            f"the fast engine's model does not reproduce the bridge (relative logit error {err:.2e});"
            f" using the bridge-hooks engine",
            stacklevel=3,
        )
        return False
    return True

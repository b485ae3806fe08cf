"""Activation patching, attribution patching and cross-model patching (see docs/patching.md).

- :class:`PatchPair` -- one clean/corrupted prompt pair (token ids, answers, role positions).
- :func:`patch_grid` -- exact patching over (layer x role | position | head) grids; ``method="fast"`` reuses
  the corrupted run causally on the plain HF model, ``method="hooks"`` is the bridge-hook reference.
- :func:`attribution_grid` -- attribution patching (gradient x activation difference) over the same grids;
  :func:`agreement` -- how well it tracks exact patching.
- :func:`cross_model_patch` -- patch model A's activations into model B on the same prompts.
- :mod:`entitylens.patching.metric` -- logit difference, normalisation, probability, top-1.
"""

from entitylens.patching.attribution import agreement, attribution_grid
from entitylens.patching.cross_model import check_compatible, cross_model_patch
from entitylens.patching.exact import (
    COMPONENTS,
    GRIDS,
    PatchPair,
    PatchResult,
    hook_name,
    patch_grid,
    tokenizer_fingerprint,
)
from entitylens.patching.metric import answer_metrics, answer_probability, logit_diff, normalise, top1_correct

__all__ = [
    "COMPONENTS",
    "GRIDS",
    "PatchPair",
    "PatchResult",
    "agreement",
    "answer_metrics",
    "answer_probability",
    "attribution_grid",
    "check_compatible",
    "cross_model_patch",
    "hook_name",
    "logit_diff",
    "normalise",
    "patch_grid",
    "tokenizer_fingerprint",
    "top1_correct",
]

"""Activation patching, attribution patching and cross-model patching (see docs/patching.md).

- :class:`PatchPair` -- one clean/corrupted prompt pair (token ids, answers, role positions).
- :func:`patch_grid` -- exact patching over (layer x role | position | head) grids; ``method="fast"`` reuses
  the corrupted run causally on the plain HF model, ``method="hooks"`` is the bridge-hook reference.
- :func:`attribution_grid` -- attribution patching (gradient x activation difference) over the same grids;
  :func:`agreement` -- how well it tracks exact patching.
- :func:`cross_model_patch` -- patch model A's activations into model B on the same prompts.
- :mod:`entitylens.patching.metric` -- logit difference, normalisation, probability, top-1.
- :class:`TextPair`, :func:`build_pairs`, :func:`write_pairs` / :func:`read_pairs` -- clean/corrupted text pairs
  from boxes datasets (kinds :data:`PAIR_KINDS`); :func:`to_patch_pairs` tokenises them for a model, aligning
  token roles by name.
- :func:`run_patching`, :func:`run_attribution`, :func:`run_cross` -- grids straight from text pairs;
  :func:`write_patch_outputs` -- ``patch.csv``, heatmaps, safetensors, ``agreement.json``, ``run.json``.
- :class:`PatchConfig` + :func:`run_patch_job` -- the one patch job (pairs in, a checked run directory out)
  that ``entitylens patch run`` / ``patch cross``, the patch study and the demo all run.
- :class:`Site`, :func:`patch_sites` -- multi-site patching (circuits); :func:`path_patch` -- path patching
  (sender x receiver grids through one receiver only).
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
from entitylens.patching.job import PatchConfig, PatchJob, run_patch_job
from entitylens.patching.metric import answer_metrics, answer_probability, logit_diff, normalise, top1_correct
from entitylens.patching.pairs import (
    ALIAS_ROLES,
    DEFAULT_ROLES,
    PAIR_KINDS,
    TextPair,
    build_pairs,
    default_roles,
    read_any_pairs,
    read_pairs,
    read_patch_pairs,
    to_patch_pairs,
    write_pairs,
    write_patch_pairs,
)
from entitylens.patching.paths import PathResult, path_patch
from entitylens.patching.run import (
    result_table,
    run_attribution,
    run_cross,
    run_patching,
    write_patch_outputs,
)
from entitylens.patching.sites import Site, SiteResult, parse_sites, patch_sites

__all__ = [
    "ALIAS_ROLES",
    "COMPONENTS",
    "DEFAULT_ROLES",
    "GRIDS",
    "PatchConfig",
    "PatchJob",
    "PatchPair",
    "PAIR_KINDS",
    "PatchResult",
    "TextPair",
    "agreement",
    "answer_metrics",
    "answer_probability",
    "attribution_grid",
    "build_pairs",
    "check_compatible",
    "cross_model_patch",
    "default_roles",
    "hook_name",
    "logit_diff",
    "normalise",
    "patch_grid",
    "read_any_pairs",
    "read_pairs",
    "read_patch_pairs",
    "result_table",
    "run_attribution",
    "run_cross",
    "run_patch_job",
    "run_patching",
    "to_patch_pairs",
    "tokenizer_fingerprint",
    "top1_correct",
    "write_pairs",
    "write_patch_outputs",
    "write_patch_pairs",
    "PathResult",
    "Site",
    "SiteResult",
    "parse_sites",
    "patch_sites",
    "path_patch",
]

"""The one patch job: pairs in, a checked run directory out (``patch run``, ``patch cross``, studies, the demo).

:func:`run_patch_job` does, in this order and once each: build the run's identity (model and tokenizer
fingerprints, pairs hash; source and target for cross-model runs) and refuse a directory holding another
run (:func:`~entitylens.patching.outputs.check_run_dir`); tokenise the pairs and choose the grid's roles
(:func:`~entitylens.patching.run.prepare_pairs`); reuse a finished identical result when asked; run exact
(or cross-model) patching resumably, and attribution patching when configured; write ``patch.csv`` /
``cross.csv``, heatmaps, safetensors, ``agreement.json``, ``run.json`` (one entry per component, with the
job's settings) and the tokenised pairs. :class:`PatchConfig` holds every setting and checks them up front.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from entitylens.activations.identity import model_fingerprint
from entitylens.errors import EntitylensError
from entitylens.patching.grid import check_component_grid
from entitylens.patching.outputs import check_run_dir, read_manifest, write_patch_outputs
from entitylens.patching.pair_io import write_patch_pairs
from entitylens.patching.run import (
    default_grid,
    patch_prepared,
    prepare_pairs,
    run_attribution_prepared,
    run_cross_prepared,
)
from entitylens.patching.text_pair import TextPair
from entitylens.patching.types import COMPONENTS, PatchPair, PatchResult, tokenizer_fingerprint

__all__ = ["PARTIAL_DIR", "PatchConfig", "PatchJob", "resolve_all_roles", "run_patch_job"]

PARTIAL_DIR = ".partial"
"""Finished chunks of an interrupted patching run live in ``<out>/.partial/`` until the run completes."""


@dataclass(frozen=True)
class PatchConfig:
    """What a patch job computes (everything but the model, the pairs and the output directory).

    Attributes:
        component: Patched activation: ``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_out``, ``mlp_out`` or
            ``head_z``.
        grid: ``layer_role`` or ``layer_head`` (``None``: ``layer_head`` for ``head_z``, else ``layer_role``).
        roles: Grid columns / patched positions (``None``: the default roles every pair has; ``("all",)``: every
            role all pairs share).
        layers: Grid rows (``None``: all).
        method: ``fast`` (causal reuse) or ``hooks`` (the bridge reference).
        batch_cells: Most cells per forward.
        attribution: Also run attribution patching on the same grid and report its agreement (exact only).
        k: Top-k size of the agreement.
        vmax: Heatmap colour limit ``[-vmax, vmax]`` (``None``: the largest absolute value).
        side: Cross-model runs: which prompt of each pair runs, ``clean`` or ``corrupted``.
    """

    component: str = "resid_pre"
    grid: str | None = None
    roles: tuple[str, ...] | None = None
    layers: tuple[int, ...] | None = None
    method: str = "fast"
    batch_cells: int = 32
    attribution: bool = False
    k: int = 10
    vmax: float | None = 1.0
    side: str = "clean"

    def __post_init__(self) -> None:
        if self.component not in COMPONENTS:
            raise EntitylensError(
                f"unknown component {self.component!r} (--component); use one of {', '.join(COMPONENTS)}"
            )
        if self.grid not in (None, "layer_role", "layer_head"):
            raise EntitylensError(f"unknown grid {self.grid!r} (--grid); use layer_role or layer_head")
        if self.method not in ("fast", "hooks"):
            raise EntitylensError(f"unknown method {self.method!r} (--method); use fast or hooks")
        check_component_grid(self.component, self.resolved_grid, self.method)
        if self.batch_cells < 1 or self.k < 1:
            raise EntitylensError(f"--batch-cells {self.batch_cells} and --k {self.k} must be at least 1")
        if self.side not in ("clean", "corrupted"):
            raise EntitylensError(f"--side {self.side!r} must be clean or corrupted")
        if self.vmax is not None and not self.vmax > 0:
            raise EntitylensError(f"vmax={self.vmax} must be positive, or None for the largest absolute value")
        if self.roles is not None:
            object.__setattr__(self, "roles", tuple(self.roles))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))

    @property
    def resolved_grid(self) -> str:
        """The grid, with the component's default filled in."""
        return self.grid or default_grid(self.component)

    def settings(self) -> dict[str, Any]:
        """What determines the numbers (recorded in ``run.json``; an equal record lets a result be reused)."""
        return {
            "component": self.component,
            "grid": self.resolved_grid,
            "roles": None if self.roles is None else list(self.roles),
            "layers": None if self.layers is None else list(self.layers),
            "method": self.method,
            "attribution": self.attribution,
        }


@dataclass(frozen=True)
class PatchJob:
    """What a patch job produced.

    Attributes:
        out: The run directory.
        result: Exact (``activation``) or ``cross_model`` result.
        attribution: The attribution result (``None`` unless configured).
        pairs: The tokenised pairs patched.
        roles: The grid's columns (``None``: every position).
        files: Name -> path of every file written (empty when reused).
        seconds: Wall-clock seconds of the patching itself (0 when reused).
        reused: Whether an identical earlier result was loaded instead of computed.
    """

    out: Path
    result: PatchResult
    attribution: PatchResult | None
    pairs: list[PatchPair]
    roles: list[str] | None
    files: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0
    reused: bool = False


def resolve_all_roles(roles: Sequence[str] | None, pairs: Sequence[Any]) -> list[str] | None:
    """``("all",)`` -> every role all pairs share (``last`` at the end); other values unchanged.

    Args:
        roles: The configured roles.
        pairs: Text pairs or tokenised pairs.

    Returns:
        The roles, or ``None`` (the default roles).
    """
    if roles is None or list(roles) != ["all"]:
        return None if roles is None else list(roles)
    if isinstance(pairs[0], TextPair):
        sets = [set(p.roles) | {"last"} for p in pairs]
        first = list(pairs[0].roles) + ([] if "last" in pairs[0].roles else ["last"])
    else:
        sets = [set(p.clean_roles) & set(p.corrupted_roles) for p in pairs]
        first = list(pairs[0].clean_roles)
    return [r for r in first if r != "last" and all(r in s for s in sets)] + ["last"]


def _identity(model: Any, source: Any, pairs_sha256: str, side: str) -> dict[str, Any]:
    if source is None:
        return {
            "model_fingerprint": model_fingerprint(model),
            "tokenizer_fingerprint": tokenizer_fingerprint(model.tokenizer),
            "pairs_sha256": pairs_sha256,
        }
    return {
        "source_fingerprint": model_fingerprint(source),
        "target_fingerprint": model_fingerprint(model),
        "tokenizer_fingerprint": tokenizer_fingerprint(model.tokenizer),
        "pairs_sha256": pairs_sha256,
        "side": side,
    }


def _reusable(out: Path, config: PatchConfig, cross: bool) -> tuple[PatchResult, PatchResult | None] | None:
    """The earlier result in ``out`` computed with the same settings, when its files are all there."""
    c = config.component
    stem = "cross" if cross else "patch"
    entry = ((read_manifest(out) or {}).get("results") or {}).get(f"{stem}/{c}") or {}
    exact = out / (f"cross_{c}.safetensors" if cross else f"result_{c}.safetensors")
    attr = out / f"attribution_{c}.safetensors"
    if entry.get("job") != config.settings() or not exact.is_file():
        return None
    if config.attribution and not attr.is_file():
        return None
    return PatchResult.load(exact), (PatchResult.load(attr) if config.attribution else None)


def _announcement(model: Any, plist: Sequence[PatchPair], cols: Sequence[str] | None, config: PatchConfig) -> str:
    """One line saying up front how much work the job is."""
    n_layers = int(model.cfg.n_layers) if config.layers is None else len(config.layers)
    n_cols = "every position" if cols is None else f"{len(cols)} columns"
    return (f"patching {len(plist)} pairs x {n_layers} layers x {n_cols} ({config.component}, "
            f"{config.resolved_grid}) with the {config.method} engine")  # fmt: skip


def run_patch_job(
    model: Any,
    pairs: Sequence[TextPair] | Sequence[PatchPair],
    out: str | Path,
    config: PatchConfig,
    *,
    pairs_sha256: str,
    label: str,
    info: Mapping[str, Any] | None = None,
    source: Any = None,
    overwrite: bool = False,
    reuse: bool = False,
    say: Callable[[str], None] | None = None,
) -> PatchJob:
    """Patch ``pairs`` on ``model`` (or ``source`` into ``model``) into the run directory ``out``.

    Args:
        model: The patched ``TransformerBridge`` (model B of a cross-model run).
        pairs: Text pairs (tokenised here) or tokenised pairs.
        out: The run directory.
        config: What to compute.
        pairs_sha256: Hash of the pairs file (part of the run's identity).
        label: Model label in titles and comparisons.
        info: Extra fields recorded with the result in ``run.json`` (model specs, pairs path).
        source: Model A of a cross-model run (``None``: exact patching of ``model``).
        overwrite: Replace a run of another identity in ``out`` instead of refusing.
        reuse: Load an earlier result of the same settings from ``out`` instead of recomputing it.
        say: Where the one-line announcement of the work goes (``None``: nowhere).

    Returns:
        The :class:`PatchJob`.

    Raises:
        EntitylensError: Bad settings, pairs that do not fit the model, or ``out`` holding another run.
    """
    out = Path(out)
    cross = source is not None
    if cross and config.attribution:
        raise EntitylensError("attribution patching applies to exact patching, not cross-model runs; drop it")
    identity = _identity(model, source, pairs_sha256, config.side)
    check_run_dir(out, identity, overwrite)
    grid = config.resolved_grid
    plist, cols = prepare_pairs(model, pairs, grid, resolve_all_roles(config.roles, pairs))
    if reuse and (earlier := _reusable(out, config, cross)) is not None:
        return PatchJob(out, earlier[0], earlier[1], plist, cols, reused=True)
    if say is not None:
        say(_announcement(model, plist, cols, config))
    partial = out / PARTIAL_DIR / f"{'cross' if cross else 'patch'}_{config.component}"
    result, attribution, timing = _compute(model, source, plist, cols, config, partial)
    record = {
        **dict(info or {}),
        "label": label,
        "roles": cols if cols is not None else "all positions",
        "method": config.method,
        "n_layers": int(model.cfg.n_layers),
        "job": config.settings(),
    }
    files = write_patch_outputs(
        out, result, attribution=attribution, k=config.k, label=label, identity=identity, info=record,
        overwrite=overwrite, vmax=config.vmax, timing=timing,
    )  # fmt: skip
    if not cross:
        write_patch_pairs(out / "pairs_tokens.jsonl", plist)
    shutil.rmtree(partial, ignore_errors=True)
    with contextlib.suppress(OSError):  # other components' partial results may still be there
        (out / PARTIAL_DIR).rmdir()
    return PatchJob(out, result, attribution, plist, cols, files, timing["seconds"])


def _compute(
    model: Any, source: Any, plist: list[PatchPair], cols: list[str] | None, config: PatchConfig, partial: Path
) -> tuple[PatchResult, PatchResult | None, dict[str, float]]:
    """Run the patching (and attribution) a job asks for; returns the results and their wall times."""
    grid = config.resolved_grid
    t0 = time.perf_counter()
    kw: dict[str, Any] = {
        "layers": config.layers, "method": config.method, "batch_cells": config.batch_cells, "partial_dir": partial
    }
    if source is not None:
        result = run_cross_prepared(source, model, plist, cols, config.component, grid, side=config.side, **kw)
    else:
        result = patch_prepared(model, plist, cols, config.component, grid, **kw)
    timing = {"seconds": time.perf_counter() - t0}
    attribution = None
    if config.attribution:
        t1 = time.perf_counter()
        attribution = run_attribution_prepared(model, plist, cols, config.component, grid, layers=config.layers)
        timing["attribution_seconds"] = time.perf_counter() - t1
    return result, attribution, timing

"""The patch study (``entitylens study patch``): activation patching grids of a (base, variant) pair, side by side.

Layout of ``OUT``::

    pairs.jsonl                      clean/corrupted text pairs (in the study's protocol)
    patch/{base,variant}/            patch.csv, patch_<c>.png, result_<c>.safetensors, run.json
                                     (+ attribution_<c>.*, agreement.json with attribution)
    compare/compare_<c>.png          both heatmaps side by side on one colour scale (+ compare.csv)
    compare-attribution/             the same for the attribution estimates
    study.json                       what ran (its identity: the pair of models and the pairs file)

Each model is patched by the one patch job (:func:`entitylens.patching.job.run_patch_job`), which reuses a
finished result of the same model, pairs and settings.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from entitylens._io import RunDir, sha256_file, sha256_json, write_json
from entitylens.errors import EntitylensError
from entitylens.models import load_model
from entitylens.patching.attribution import agreement_line
from entitylens.patching.compare import compare_patch_runs
from entitylens.patching.job import PatchConfig, run_patch_job
from entitylens.patching.outputs import top_cells_summary
from entitylens.patching.pair_build import build_pairs, compact_pairs
from entitylens.patching.pair_io import read_pairs, write_pairs
from entitylens.patching.run import prepare_pairs
from entitylens.patching.text_pair import TextPair
from entitylens.patching.types import PatchPair
from entitylens.pipelines.estimate import Confirm, GpuEstimate
from entitylens.pipelines.study import Say, StudyConfig, arm_label, jsonable, read_json, study_estimate, study_states

__all__ = ["PAIR_KINDS", "PatchStudyConfig", "PatchStudyResult", "patch_tokens", "run_patch_study"]

PAIR_KINDS: tuple[str, ...] = ("op_object", "op_box", "init_object", "drop_op")
"""Corruptions a patch study builds its pairs with."""


@dataclass(frozen=True)
class PatchStudyConfig(StudyConfig):
    """What :func:`run_patch_study` runs (the :class:`~entitylens.pipelines.study.StudyConfig` fields, then these).

    ``states=None`` means ``4 * pairs`` states to draw pairs from; ``prefix`` goes before both prompts of every
    ``ks`` pair.

    Attributes:
        kind: Corruption: op_object, op_box, init_object or drop_op.
        pairs: Most clean/corrupted pairs.
        component: resid_pre, resid_mid, resid_post, attn_out, mlp_out or head_z.
        grid: layer_role or layer_head (default: layer_head for head_z, else layer_role).
        roles: Grid columns (default: the roles every pair has).
        layers: Grid rows (default all).
        method: fast (causal reuse) or hooks (bridge reference).
        batch_cells: Most cells per forward.
        attribution: Also run attribution patching and its agreement with exact patching.
        k: Top-k size of the attribution agreement.
    """

    kind: str = "op_object"
    pairs: int = 24
    component: str = "resid_pre"
    grid: str | None = None
    roles: tuple[str, ...] | None = None
    layers: tuple[int, ...] | None = None
    method: str = "fast"
    batch_cells: int = 32
    attribution: bool = False
    k: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kind not in PAIR_KINDS:
            raise EntitylensError(f"unknown --kind {self.kind!r}; use {', '.join(PAIR_KINDS)}")
        if self.pairs < 1:
            raise EntitylensError(f"--pairs {self.pairs} must be at least 1")
        patch = self.patch_config()  # checks component, grid, method, batch_cells and k
        object.__setattr__(self, "roles", patch.roles)  # normalised (tuples) by PatchConfig
        object.__setattr__(self, "layers", patch.layers)

    def patch_config(self) -> PatchConfig:
        """The :class:`~entitylens.patching.job.PatchConfig` both models are patched with."""
        return PatchConfig(
            component=self.component, grid=self.grid, roles=self.roles, layers=self.layers, method=self.method,
            batch_cells=self.batch_cells, attribution=self.attribution, k=self.k,
        )  # fmt: skip


@dataclass(frozen=True)
class PatchStudyResult:
    """Paths and results a patch study produced.

    Attributes:
        out: The study directory.
        pairs_file: The text pairs both models were patched on.
        run_dirs: Arm -> patching run directory.
        results: Arm -> exact patching result.
        attributions: Arm -> attribution result (empty without ``attribution``).
        compare_dir: Directory of the side-by-side heatmap (``compare_<component>.png``, ``compare.csv``).
        reused: Arms whose results were reused from an earlier run.
        estimate: The GPU-time estimate.
    """

    out: Path
    pairs_file: Path
    run_dirs: dict[str, Path]
    results: dict[str, Any]
    attributions: dict[str, Any]
    compare_dir: Path
    reused: tuple[str, ...]
    estimate: GpuEstimate | None = None


def patch_tokens(pairs: list[PatchPair], n_layers: int, n_cells: int, attribution: bool) -> float:
    """Token-passes of patching tokenised ``pairs``.

    Exact patching: the clean and corrupted baselines, then at most one corrupted forward per cell (an upper
    bound: the hooks engine's cost; the fast engine skips no-op cells and recomputes only the tail).
    Attribution adds a clean forward, a corrupted forward and a backward (2x a forward).
    """
    total = 0.0
    for p in pairs:
        clean, corr = len(p.clean_tokens), len(p.corrupted_tokens)
        total += clean + corr + n_layers * n_cells * corr
        if attribution:
            total += clean + 3 * corr
    return total


def _text_pairs(cfg: PatchStudyConfig) -> tuple[list[TextPair], int]:
    """The study's text pairs (compact when the protocol is) and the number of states they came from."""
    n_states = cfg.states if cfg.states is not None else 4 * cfg.pairs
    states = study_states(cfg.data, cfg.seed, n_states, cfg.resolved_protocol)
    text_pairs = build_pairs(states, cfg.kind, seed=cfg.seed, max_pairs=cfg.pairs, prefix=cfg.prefix)
    if cfg.resolved_protocol == "compact":
        text_pairs = compact_pairs(text_pairs)
        if not text_pairs:
            raise EntitylensError(
                f"no {cfg.kind} pair has distinguishable compact answers; raise --states or use another --kind"
            )
    return text_pairs, len(states)


def _write_pairs_if_changed(path: Path, pairs: list[TextPair]) -> bool:
    """Write the pairs unless ``path`` already holds exactly them (keeps resumed runs' inputs untouched)."""
    if path.is_file():
        try:
            if [p.to_json() for p in read_pairs(path)] == [p.to_json() for p in pairs]:
                return False
        except EntitylensError:
            pass
    write_pairs(path, pairs)
    return True


def _estimate(cfg: PatchStudyConfig, model: Any, text_pairs: list[TextPair]) -> GpuEstimate:
    plist, cols = prepare_pairs(model, text_pairs, cfg.patch_config().resolved_grid, cfg.roles)
    n_layers = len(cfg.layers) if cfg.layers is not None else int(model.cfg.n_layers)
    if cols is not None:
        n_cells = len(cols)
    elif cfg.patch_config().resolved_grid == "layer_head":
        n_cells = int(model.cfg.n_heads)
    else:
        n_cells = max(len(p.corrupted_tokens) for p in plist)
    note = ("patching is an upper bound (one forward per cell, as the hooks engine); the fast engine skips no-op "
            "cells and recomputes only the changed tail")  # fmt: skip
    tokens = patch_tokens(plist, n_layers, n_cells, cfg.attribution)
    return study_estimate(cfg, model, tokens, f"a patch study of {len(plist)} pairs", note)


def run_patch_study(config: PatchStudyConfig, *, confirm: Confirm | None = None, say: Say = print) -> PatchStudyResult:
    """Build clean/corrupted pairs, patch both models on them, and draw the heatmaps side by side.

    Steps: states -> ``pairs.jsonl`` (``build_pairs``; rendered in the compact protocol for the testbed) -> for
    each model, the patch job (``patch/<arm>/``; reused when ``run.json`` shows the same model, tokenizer, pairs
    and settings) with, when configured, attribution patching and its agreement with exact patching ->
    ``compare/compare_<component>.png`` (one colour scale) and ``compare/compare.csv``.

    Args:
        config: The study configuration.
        confirm: Called with a question after the GPU-time estimate (large models only); returning False stops.
            ``None``: never ask.
        say: Where progress lines go.

    Returns:
        The :class:`PatchStudyResult`.

    Raises:
        EntitylensError: Bad specs or data, no pair could be built, an earlier study of other models or pairs in
            ``out`` (without ``overwrite``), or a stop at the estimate.
    """
    cfg = config
    cfg.check()
    text_pairs, n_states = _text_pairs(cfg)
    pairs_file = cfg.out / "pairs.jsonl"
    identity = {"study": "patch_base_vs_variant", "base": cfg.base, "variant": cfg.variant,
                "pairs": sha256_json([p.to_json() for p in text_pairs])}  # fmt: skip
    is_study = lambda rec: rec.get("study") == identity["study"]  # noqa: E731
    study_dir = RunDir(cfg.out, "study.json", "a patch study", is_mine=is_study)
    study_dir.check(identity, overwrite=cfg.overwrite)
    say(f"patch study: base {cfg.base} vs variant {cfg.variant}; {len(text_pairs)} {cfg.kind} pairs "
        f"({cfg.resolved_protocol} prompts) from {n_states} states; {cfg.component} "
        f"{cfg.patch_config().resolved_grid}; output {cfg.out}")  # fmt: skip
    wrote = _write_pairs_if_changed(pairs_file, text_pairs)
    say(f"{'wrote' if wrote else 'reusing'} {pairs_file}")
    pairs_sha = sha256_file(pairs_file)
    estimate: GpuEstimate | None = None
    jobs = {}
    for arm, spec in cfg.specs.items():
        t0 = time.perf_counter()
        say(f"[{arm}] loading {spec}")
        model = load_model(spec, device=cfg.device, dtype=cfg.dtype)
        if estimate is None:
            estimate = _estimate(cfg, model, text_pairs)
            estimate.confirm(confirm, say)
        jobs[arm] = job = run_patch_job(
            model, text_pairs, cfg.out / "patch" / arm, cfg.patch_config(), pairs_sha256=pairs_sha,
            label=arm_label(arm, spec), info={"model": spec, "pairs": str(pairs_file)}, overwrite=cfg.overwrite,
            reuse=True, say=say,
        )  # fmt: skip
        if job.reused:
            say(f"[{arm}] patching: reusing {job.out} (same model, pairs and settings)")
        say(f"[{arm}] cells restoring most of the clean answer (normalised, 1 = clean):")
        say(top_cells_summary(job.result))
        if cfg.attribution:
            agree = (read_json(job.out / "agreement.json") or {}).get(cfg.component) or {}
            say(f"[{arm}] attribution vs exact: {agreement_line(agree.get('pair_mean') or {})}")
        say(f"[{arm}] done in {time.perf_counter() - t0:.1f} s")
        del model
    return _compare(cfg, jobs, pairs_file, pairs_sha, len(text_pairs), n_states, identity, estimate, say)


def _compare(
    cfg: PatchStudyConfig,
    jobs: dict[str, Any],
    pairs_file: Path,
    pairs_sha: str,
    n_pairs: int,
    n_states: int,
    identity: dict[str, Any],
    estimate: GpuEstimate | None,
    say: Say,
) -> PatchStudyResult:
    """Draw both arms' heatmaps side by side (exact, and attribution when run) and write ``study.json``."""
    run_dirs = {arm: job.out for arm, job in jobs.items()}
    labels = [arm_label("base", cfg.base), arm_label("variant", cfg.variant)]
    compare_dir = cfg.out / "compare"
    kinds = [("activation", compare_dir)]
    if cfg.attribution:
        kinds.append(("attribution", cfg.out / "compare-attribution"))
    for kind, d in kinds:
        written, _ = compare_patch_runs(run_dirs["base"], run_dirs["variant"], d, kind=kind,
                                        components=[cfg.component], labels=labels, vmax=1.0, say=say,
                                        depth="auto")  # models of different depth: by relative depth  # fmt: skip
        say("wrote " + ", ".join(str(p) for p in written))
    write_json(cfg.out / "study.json", jsonable({
        "study": "patch_base_vs_variant", "identity": identity, "config": {**asdict(cfg), "out": str(cfg.out)},
        "protocol": cfg.resolved_protocol,
        "data": {"path": str(cfg.data)} if cfg.data is not None else {"seed": cfg.seed, "states": n_states},
        "pairs": {"file": str(pairs_file), "sha256": pairs_sha, "n": n_pairs},
        "estimate": estimate.to_json() if estimate else None,
        "outputs": {"runs": {k: str(v) for k, v in run_dirs.items()}, "compare": str(compare_dir)},
    }))  # fmt: skip
    return PatchStudyResult(
        out=cfg.out, pairs_file=pairs_file, run_dirs=run_dirs, results={a: j.result for a, j in jobs.items()},
        attributions={a: j.attribution for a, j in jobs.items() if j.attribution is not None},
        compare_dir=compare_dir, reused=tuple(a for a, j in jobs.items() if j.reused), estimate=estimate,
    )  # fmt: skip

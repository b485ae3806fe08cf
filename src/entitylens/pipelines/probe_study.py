"""The probe study (``entitylens study probe``): linear probes by layer on a (base, variant) pair, side by side.

Layout of ``OUT``::

    cache/{base,variant}[-random]/   activation caches (entitylens.activations; resumable shards)
    probe/{base,variant}/            probe.csv, probe_by_layer.png, meta.json (its identity: cache + configuration)
    compare/probe_compare.png        both models' probes by layer on one figure
    compare/probe_diff.csv           per (layer, role, metric): base, variant, variant - base
    summary.csv                      best layer and exact-set accuracy per model and role
    study.json                       what ran (specs, protocol, data, estimate)
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from entitylens._io import RunDir, sha256_file, write_json
from entitylens.activations import CacheConfig, cache_activations
from entitylens.errors import EntitylensError
from entitylens.frames import frame, records, write_csv
from entitylens.models import load_model
from entitylens.pipelines.estimate import Confirm, GpuEstimate
from entitylens.pipelines.study import (
    Say,
    StudyConfig,
    arm_label,
    jsonable,
    study_estimate,
    study_prompts,
    study_states,
)
from entitylens.probing.linear import ProbeConfig
from entitylens.probing.outputs import check_probe_dir, compare_probe_runs, probe_identity, read_probe_table
from entitylens.probing.outputs import write_probe_outputs as write_probe
from entitylens.probing.run import ProbeRunConfig, reinitialize_weights, run_probes

__all__ = ["DIFF_COLUMNS", "SUMMARY_COLUMNS", "ProbeStudyConfig", "ProbeStudyResult", "probe_diff_table",
           "run_probe_study"]  # fmt: skip

SUMMARY_COLUMNS = ("arm", "model", "role", "best_layer", "exact_match", "ci_low", "ci_high", "selectivity")
"""Columns of ``summary.csv``."""

DIFF_COLUMNS = ("layer", "role", "metric", "base", "variant", "variant_minus_base")
"""Columns of ``compare/probe_diff.csv``."""


@dataclass(frozen=True)
class ProbeStudyConfig(StudyConfig):
    """What :func:`run_probe_study` runs (the :class:`~entitylens.pipelines.study.StudyConfig` fields, then these).

    ``states=None`` means 240 generated states, or all of ``data``.

    Attributes:
        hooks: Cached hooks (the probes read the first).
        roles: Token roles cached and probed (default query_box,last; for compact prompts, whose last token is
            the query box, query_box,query_box_desc).
        target: Probe target: box_contents (the queried box's object set) or object_in_box.
        limit: Cache only the first N rows.
        batch_size: Prompts per forward while caching.
        cache_dtype: Storage dtype of the caches.
        random_control: Also probe a randomly re-initialised copy of each model (over_random rows).
        probe_seed: Seed of the probes' split, folds and control labels.
        folds: Cross-validation folds of the probes.
        bootstrap: State resamples for the probes' intervals (0 = none).
    """

    hooks: tuple[str, ...] = ("resid_post",)
    roles: tuple[str, ...] | None = None
    target: str = "box_contents"
    limit: int | None = None
    batch_size: int = 8
    cache_dtype: str = "float32"
    random_control: bool = False
    probe_seed: int = 0
    folds: int = 5
    bootstrap: int = 200

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("hooks", "roles"):
            v = getattr(self, name)
            if v is None and name == "roles":
                continue
            v = tuple(x.strip() for x in v.split(",")) if isinstance(v, str) else tuple(v)
            if not v or not all(v):
                example = "resid_post" if name == "hooks" else "query_box,last"
                raise EntitylensError(f"--{name} is empty; pass e.g. --{name} {example}")
            object.__setattr__(self, name, v)
        if self.batch_size < 1:
            raise EntitylensError(f"--batch-size {self.batch_size} must be at least 1")
        if self.limit is not None and self.limit < 1:
            raise EntitylensError(f"--limit {self.limit} must be at least 1; pass a positive number of rows")

    def study_roles(self) -> tuple[str, ...]:
        """The roles cached and probed (``roles``, or the protocol's default)."""
        if self.roles is not None:
            return self.roles
        return ("query_box", "query_box_desc") if self.resolved_protocol == "compact" else ("query_box", "last")

    def probe_run_config(self) -> ProbeRunConfig:
        """The :class:`~entitylens.probing.run.ProbeRunConfig` both models are probed with."""
        return ProbeRunConfig(target=self.target, roles=self.study_roles(), hook=self.hooks[0],
                              bootstrap=self.bootstrap, probe=ProbeConfig(seed=self.probe_seed, folds=self.folds))


@dataclass(frozen=True)
class ProbeStudyResult:
    """Paths and numbers a probe study produced.

    Attributes:
        out: The study directory.
        probe_dirs: Arm -> probe output directory.
        cache_dirs: Arm -> activation cache directory (``base-random`` / ``variant-random`` with the control).
        compare_png: The comparison figure.
        diff_csv: Per-layer differences (variant - base).
        summary: The ``summary.csv`` table.
        reused: Arms whose probe outputs were reused from an earlier run.
        estimate: The GPU-time estimate.
    """

    out: Path
    probe_dirs: dict[str, Path]
    cache_dirs: dict[str, Path]
    compare_png: Path
    diff_csv: Path
    summary: pd.DataFrame
    reused: tuple[str, ...]
    estimate: GpuEstimate | None = None


def probe_diff_table(base_dir: str | os.PathLike[str], variant_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """Per (layer, role, metric) present in both probe runs: base value, variant value, variant - base."""
    tb, tv = read_probe_table(base_dir), read_probe_table(variant_dir)
    vals = {(r["layer"], r["role"], r["metric"]): r["value"] for r in records(tv)}
    rows = []
    for r in records(tb):
        key = (r["layer"], r["role"], r["metric"])
        if key in vals:
            rows.append({"layer": key[0], "role": key[1], "metric": key[2], "base": r["value"],
                         "variant": vals[key], "variant_minus_base": vals[key] - r["value"]})  # fmt: skip
    if not rows:
        raise EntitylensError(f"{base_dir} and {variant_dir} share no (layer, role, metric); probe the same roles")
    return frame(rows, DIFF_COLUMNS)


def _summary_rows(arm: str, spec: str, table: pd.DataFrame) -> list[dict[str, Any]]:
    rows = []
    recs = records(table)
    for role in dict.fromkeys(r["role"] for r in recs):
        em = [r for r in recs if r["role"] == role and r["metric"] == "exact_match"]
        best = max(em, key=lambda r: (r["value"], -r["layer"]))
        sel = next((r["value"] for r in recs if r["role"] == role and r["metric"] == "selectivity"
                    and r["layer"] == best["layer"]), None)  # fmt: skip
        rows.append({"arm": arm, "model": spec, "role": role, "best_layer": best["layer"],
                     "exact_match": best["value"], "ci_low": best["ci_low"], "ci_high": best["ci_high"],
                     "selectivity": sel})  # fmt: skip
    return rows


def _data_source(cfg: ProbeStudyConfig, protocol: str, n_states: int, n_rows: int) -> dict[str, Any]:
    source: dict[str, Any] = {"protocol": protocol, "n_states": n_states, "n_rows": n_rows}
    if cfg.data is not None:
        source.update(path=str(cfg.data), sha256=sha256_file(cfg.data))
    else:
        source.update(seed=cfg.seed, generator="testbed.eval_states" if protocol == "compact" else "task.generate")
    return source


def _cache_arm(
    cfg: ProbeStudyConfig, arm: str, model: Any, prompts: list[Any], source: dict[str, Any], say: Say
) -> tuple[Any, Path | None]:
    """Cache one arm (and its random-init copy with the control); returns the index and the random cache."""
    spec = cfg.specs[arm]
    cache_cfg = CacheConfig(hooks=cfg.hooks, roles=cfg.study_roles(), batch_size=cfg.batch_size,
                            dtype=cfg.cache_dtype)  # fmt: skip
    cache_dir = cfg.out / "cache" / arm
    say(f"[{arm}] caching {len(prompts)} rows to {cache_dir}")
    index = cache_activations(model, prompts, cache_cfg, cache_dir, model_spec=spec, dataset_source=source,
                              overwrite=cfg.overwrite)  # fmt: skip
    say(f"[{arm}] cache: {index.computed} shards computed, {index.reused} reused")
    if not cfg.random_control:
        return index, None
    random_dir = cfg.out / "cache" / f"{arm}-random"
    reinitialize_weights(model, seed=cfg.probe_seed)
    rindex = cache_activations(model, prompts, cache_cfg, random_dir, dataset_source=source,
                               model_spec=f"{spec}#random-init-{cfg.probe_seed}", overwrite=cfg.overwrite)  # fmt: skip
    say(f"[{arm}] random-init cache: {rindex.computed} shards computed, {rindex.reused} reused")
    return index, random_dir


def _probe_arm(cfg: ProbeStudyConfig, arm: str, cache_dir: Path, random_dir: Path | None, say: Say) -> bool:
    """Probe one arm into ``probe/<arm>``; returns whether an identical earlier run was reused."""
    probe_cfg = cfg.probe_run_config()
    probe_dir = cfg.out / "probe" / arm
    identity = probe_identity(cache_dir, probe_cfg, random_dir)
    # The caches' checks guard the model and the data; probes derived from them are replaced when settings change.
    if check_probe_dir(probe_dir, identity, overwrite=True) and (probe_dir / "probe.csv").is_file():
        say(f"[{arm}] probes: reusing {probe_dir} (same cache and configuration)")
        return True
    say(f"[{arm}] probing {len(cfg.study_roles())} role(s)")
    run = run_probes(cache_dir, probe_cfg, random_cache=random_dir)
    write_probe(probe_dir, run, title=f"{arm_label(arm, cfg.specs[arm])}: {run.target.name} probes by layer")
    return False


def run_probe_study(config: ProbeStudyConfig, *, confirm: Confirm | None = None, say: Say = print) -> ProbeStudyResult:
    """Cache both models on the same prompts, probe every layer of each, and compare them.

    Steps (each reused when an earlier run already finished it with the same inputs): cache the base
    (``cache/base``; and a randomly re-initialised copy, ``cache/base-random``, with ``random_control``),
    probe it (``probe/base``), the same for the variant, then draw both on one figure
    (``compare/probe_compare.png``), write the per-layer differences (``compare/probe_diff.csv``) and the
    best layer per model and role (``summary.csv``).

    Args:
        config: The study configuration.
        confirm: Called with a question after the GPU-time estimate (large models only); returning False stops
            the study. ``None``: never ask.
        say: Where progress lines go (default ``print``).

    Returns:
        The :class:`ProbeStudyResult`.

    Raises:
        EntitylensError: Bad specs or data, an incompatible earlier run in ``out`` (without ``overwrite``), or a
            stop at the estimate.
    """
    cfg = config
    cfg.check()
    protocol = cfg.resolved_protocol
    states = study_states(cfg.data, cfg.seed, cfg.states, protocol)
    prompts = study_prompts(states, protocol, cfg.limit, cfg.prefix)
    source = _data_source(cfg, protocol, len(states), len(prompts))
    identity = {"study": "probe_base_vs_variant", "base": cfg.base, "variant": cfg.variant, "data": source}
    is_study = lambda rec: rec.get("study") == identity["study"]  # noqa: E731
    study_dir = RunDir(cfg.out, "study.json", "a probe study", is_mine=is_study)
    study_dir.check(identity, overwrite=cfg.overwrite)
    say(f"probe study: base {cfg.base} vs variant {cfg.variant}; {len(prompts)} rows from {len(states)} states "
        f"({protocol} prompts); roles {', '.join(cfg.study_roles())}; output {cfg.out}")  # fmt: skip
    cfg.out.mkdir(parents=True, exist_ok=True)
    estimate: GpuEstimate | None = None
    probe_dirs: dict[str, Path] = {}
    cache_dirs: dict[str, Path] = {}
    reused: list[str] = []
    for arm, spec in cfg.specs.items():
        t0 = time.perf_counter()
        say(f"[{arm}] loading {spec}")
        model = load_model(spec, device=cfg.device, dtype=cfg.dtype)
        if estimate is None:
            passes = 2 if cfg.random_control else 1
            tokens = float(sum(len(model.tokenizer(p.text)["input_ids"]) for p in prompts)) * passes
            note = "one forward per prompt" + (" (twice: trained and random-init weights)" if passes == 2 else "")
            estimate = study_estimate(cfg, model, tokens, f"a probe study of {len(prompts)} rows", note)
            estimate.confirm(confirm, say)
        index, random_dir = _cache_arm(cfg, arm, model, prompts, source, say)
        del model
        cache_dirs[arm] = cfg.out / "cache" / arm
        if random_dir is not None:
            cache_dirs[f"{arm}-random"] = random_dir
        if _probe_arm(cfg, arm, cache_dirs[arm], random_dir, say):
            reused.append(arm)
        probe_dirs[arm] = cfg.out / "probe" / arm
        say(f"[{arm}] done in {time.perf_counter() - t0:.1f} s")
    return _compare(cfg, probe_dirs, cache_dirs, identity, estimate, tuple(reused), say)


def _compare(
    cfg: ProbeStudyConfig,
    probe_dirs: dict[str, Path],
    cache_dirs: dict[str, Path],
    identity: dict[str, Any],
    estimate: GpuEstimate | None,
    reused: tuple[str, ...],
    say: Say,
) -> ProbeStudyResult:
    """Draw both arms on one figure, write the differences, the summary and ``study.json``."""
    compare_dir = cfg.out / "compare"
    pngs = compare_probe_runs(probe_dirs["base"], probe_dirs["variant"], compare_dir,
                              labels=(arm_label("base", cfg.base), arm_label("variant", cfg.variant)),
                              depth="auto")  # models of different depth line up by relative depth  # fmt: skip
    diff_csv = compare_dir / "probe_diff.csv"
    write_csv(probe_diff_table(probe_dirs["base"], probe_dirs["variant"]), diff_csv)
    rows = [r for arm, spec in cfg.specs.items() for r in _summary_rows(arm, spec, read_probe_table(probe_dirs[arm]))]
    summary = frame(rows, SUMMARY_COLUMNS)
    write_csv(summary, cfg.out / "summary.csv")
    write_json(cfg.out / "study.json", jsonable({
        "study": "probe_base_vs_variant", "identity": identity,
        "config": {**asdict(cfg), "out": str(cfg.out)}, "protocol": cfg.resolved_protocol, "data": identity["data"],
        "estimate": estimate.to_json() if estimate else None,
        "outputs": {"probe": {k: str(v) for k, v in probe_dirs.items()},
                    "compare": [str(p) for p in pngs], "diff": str(diff_csv), "summary": str(cfg.out / "summary.csv")},
    }))  # fmt: skip
    say("best exact-set accuracy per model and role (95% Wilson interval):")
    for r in rows:
        sel = "" if r["selectivity"] is None else f", selectivity {r['selectivity']:+.3f}"
        ci = "" if r["ci_low"] is None else f" [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
        say(f"  {r['arm']:<7} {r['model']:<24} {r['role']:<12} layer {r['best_layer']:>3}: {r['exact_match']:.3f}"
            f"{ci}{sel}")  # fmt: skip
    say(f"wrote {pngs[0]}, {diff_csv}, {cfg.out / 'summary.csv'}")
    return ProbeStudyResult(out=cfg.out, probe_dirs=probe_dirs, cache_dirs=cache_dirs, compare_png=pngs[0],
                            diff_csv=diff_csv, summary=summary, reused=reused, estimate=estimate)  # fmt: skip

"""A probe run's output directory: writing ``probe.csv``/figures/``meta.json``, reading them back, comparing runs.

:func:`write_probe_outputs` writes what :func:`~entitylens.probing.run.run_probes` produced;
:func:`probe_identity` and :func:`check_probe_dir` guard a directory before any work;
:func:`read_probe_table` and :func:`best_against_baselines` read a run back and summarise it;
:func:`compare_probe_runs` draws two runs (base vs variant) on one figure. See ``docs/probing.md``
("From a cache: targets, CLI, outputs").
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from entitylens._io import RunDir, atomic_write, prepare_output_dir, write_json
from entitylens.errors import EntitylensError
from entitylens.frames import frame, read_csv, write_csv
from entitylens.models.loading import model_label
from entitylens.plots import plot_probe_by_layer, plot_probe_compare
from entitylens.probing.rows import BASELINES, PROBE_COLUMNS
from entitylens.probing.run import ProbeRun, ProbeRunConfig

__all__ = [
    "PROBE_FILES",
    "PROBE_WEIGHTS",
    "STATE_SPLIT_WARNING",
    "best_against_baselines",
    "check_probe_dir",
    "compare_probe_runs",
    "read_probe_weights",
    "probe_identity",
    "read_probe_table",
    "write_probe_outputs",
]

STATE_SPLIT_WARNING = (
    "split by state: test states can be prefixes of scenarios whose other prefixes are in training, so a probe "
    "may look answers up from sibling states (compare with baseline_sibling_lookup); use --split scenario"
)
"""Recorded in ``meta.json`` (and printed by ``entitylens probe``) for a run split by state."""

PROBE_FILES: tuple[str, ...] = ("probe.csv", "probe_by_layer.png", "probe_by_layer.pdf", "probe_weights.safetensors",
                                 "meta.json")
"""What a probe run writes into its output directory."""


def _identity(cache_fp: Any, config: ProbeRunConfig, random_fp: Any = None) -> dict[str, Any]:
    identity = {"cache_fingerprint": cache_fp, "config": config.to_json()}
    if random_fp is not None:
        identity["random_cache_fingerprint"] = random_fp
    return identity


def probe_identity(
    cache_dir: str | os.PathLike[str], config: ProbeRunConfig, random_cache: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """What must match for a probe run to resume or replace an earlier one in the same directory.

    Args:
        cache_dir: The activation cache probed (its ``meta.json`` fingerprint is read when present).
        config: The run's configuration.
        random_cache: The random-model cache, when the run has one.

    Returns:
        ``{"cache_fingerprint": ..., "config": ...}`` (plus ``random_cache_fingerprint``), as recorded under
        ``identity`` in ``meta.json``.
    """

    def fingerprint(d: str | os.PathLike[str]) -> Any:
        try:
            return json.loads((Path(d) / "meta.json").read_text(encoding="utf-8")).get("fingerprint")
        except (OSError, ValueError):
            return None

    return _identity(fingerprint(cache_dir), config, None if random_cache is None else fingerprint(random_cache))


def check_probe_dir(out: str | os.PathLike[str], identity: Mapping[str, Any], overwrite: bool = False) -> bool:
    """Check a probe output directory before any work: writable, and not holding something else.

    The directory's contract is :class:`~entitylens._io.RunDir`'s. Refused even with ``overwrite``: a
    directory whose ``meta.json`` is not a probe run's (an activation cache, say). Refused without it: a probe
    run of another cache or configuration.

    Args:
        out: The output directory.
        identity: :func:`probe_identity` of the run about to start.
        overwrite: Replace an earlier probe run of another configuration.

    Returns:
        Whether ``out`` already holds a probe run of this identity.

    Raises:
        EntitylensError: As above, or the directory cannot be written.
    """
    out = prepare_output_dir(out)
    is_probe = lambda rec: "target" in rec and "config" in rec  # noqa: E731
    return RunDir(out, "meta.json", "a probe run", is_mine=is_probe).check(identity, overwrite=overwrite)


def write_probe_outputs(
    out_dir: str | os.PathLike[str], run: ProbeRun, *, title: str | None = None, label: str | None = None
) -> list[Path]:
    """Write ``probe.csv``, ``probe_by_layer.png`` and ``meta.json`` (each atomically).

    Args:
        out_dir: Output directory (created).
        run: The :class:`ProbeRun` from :func:`run_probes`.
        title: Figure title (default: the model's label and the target).
        label: The model's label in this run's figure and in comparisons (default: the cache's label, i.e.
            :func:`entitylens.models.model_label` of the cached model's spec).

    Returns:
        The written paths.
    """
    out = prepare_output_dir(out_dir)
    csv_path = out / "probe.csv"
    write_csv(run.table, csv_path)
    model = label or _cache_label(run.cache_meta)
    fig_title = title or f"{model or 'model'}: {run.target.name} probes"
    pngs = plot_probe_by_layer(run.table, out / "probe_by_layer", title=fig_title)
    meta = {
        "label": model,
        "split": run.config.split,
        "warning": STATE_SPLIT_WARNING if run.config.split == "state" else None,
        "identity": _identity(run.cache_meta.get("fingerprint"), run.config,
                              None if run.random_cache_meta is None else run.random_cache_meta.get("fingerprint")),
        "target": run.target.name,
        "target_names": list(run.target.target_names),
        "n_rows": len(run.target.rows),
        "n_train": len(run.split.train),
        "n_test": len(run.split.test),
        "n_test_states": len(set(run.target.groups[i] for i in run.split.test.tolist())),
        "n_test_scenarios": len(set(run.target.scenarios[i] for i in run.split.test.tolist())),
        "n_train_scenarios": len(set(run.target.scenarios[i] for i in run.split.train.tolist())),
        "heldout_objects": [run.target.vocabulary[i] for i in run.split.heldout_objects],
        "dropped_states": list(run.target.dropped_states),
        "layers": list(run.layers),
        "random_model": bool(run.random_model),
        "config": run.config.to_json(),
        "seed": run.config.probe.seed,
        "cache": {"model": run.cache_meta.get("model"), "dataset_sha256": run.cache_meta.get("dataset_sha256"),
                  "dataset_source": run.cache_meta.get("dataset_source"), "config": run.cache_meta.get("config")},
    }
    weights = write_probe_weights(out / PROBE_WEIGHTS, run)
    write_json(out / "meta.json", meta)
    return [csv_path, *pngs, weights, out / "meta.json"]


PROBE_WEIGHTS = "probe_weights.safetensors"
"""The task probes' weights in a probe run directory (:func:`write_probe_weights`)."""


def write_probe_weights(path: Path, run: ProbeRun) -> Path:
    """Write every role's task probes as raw-space weights (what interventions read).

    ``{role}/coef`` ``[layer, d, column]`` and ``{role}/intercept`` ``[layer, column]`` (float32), so
    ``h @ coef + intercept`` is the logit on the cached activation ``h``; the metadata name the target, hook,
    layers and columns.

    Args:
        path: The file to write (atomically).
        run: The probe run.

    Returns:
        ``path``.
    """
    from safetensors.torch import save

    tensors = {}
    for role, res in sorted(run.results.items()):
        tensors[f"{role}/coef"] = res.coef_raw.float().contiguous()
        tensors[f"{role}/intercept"] = res.intercept_raw.float().contiguous()
    meta = {"format": "entitylens.probe_weights/1", "target": run.target.name, "hook": run.config.hook,
            "layers": json.dumps(list(run.layers)), "columns": json.dumps(list(run.target.target_names)),
            "roles": json.dumps(sorted(run.results))}
    with atomic_write(path, "wb") as f:
        f.write(save(tensors, metadata=meta))
    return path


def read_probe_table(run_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a run's ``probe.csv`` with numeric columns parsed (blank intervals become NaN).

    Args:
        run_dir: Output directory of an ``entitylens probe`` run.

    Returns:
        The table, a DataFrame (columns :data:`~entitylens.probing.rows.PROBE_COLUMNS`).

    Raises:
        EntitylensError: No ``probe.csv`` there, or not a probe table.
    """
    path = Path(run_dir) / "probe.csv"
    if not path.exists():
        raise EntitylensError(f"{path} does not exist; pass a directory written by `entitylens probe --out`")
    t = read_csv(path)
    if tuple(t.columns) != PROBE_COLUMNS:
        raise EntitylensError(f"{path} is not a probe table (columns {list(t.columns)}); pass an `entitylens probe` "
                              "output directory")

    def num(v: str) -> float | None:
        return None if v == "" else float(v)

    rows = [{"layer": int(r["layer"]), "role": r["role"], "metric": r["metric"], "value": float(r["value"]),
             "ci_low": num(r["ci_low"]), "ci_high": num(r["ci_high"]), "n": int(r["n"])}
            for r in t.to_dict("records")]  # fmt: skip
    return frame(rows, PROBE_COLUMNS)


def best_against_baselines(table: pd.DataFrame) -> dict[str, Any]:
    """The best layer x role by exact-set accuracy, its interval, and the baselines of its role.

    Args:
        table: A probe table (:attr:`~entitylens.probing.run.ProbeRun.table` or :func:`read_probe_table`).

    Returns:
        ``value``, ``ci_low``, ``ci_high``, ``layer``, ``role``, one entry per :data:`BASELINES`, the
        ``best_baseline`` and ``beats_baselines`` (the interval's lower end above every baseline).
    """
    rows = table[table["metric"] == "exact_match"].to_dict("records")
    if not rows:
        raise EntitylensError("the probe table has no exact_match rows; run entitylens probe first")
    best = max(rows, key=lambda r: (float(r["value"]), -int(r["layer"])))
    out: dict[str, Any] = {k: best[k] for k in ("value", "ci_low", "ci_high", "layer", "role")}
    for name in BASELINES:
        vals = table.loc[(table["metric"] == name) & (table["role"] == best["role"]), "value"]
        out[name] = float(vals.iloc[0]) if len(vals) else float("nan")
    out["best_baseline"] = max(out[name] for name in BASELINES)
    low = float(best["value"]) if pd.isna(best["ci_low"]) else float(best["ci_low"])
    out["beats_baselines"] = low > out["best_baseline"]
    return out


def _cache_label(cache_meta: Mapping[str, Any]) -> str | None:
    """The model label of a cache's ``meta.json`` (recorded, or derived from the recorded spec)."""
    model = cache_meta.get("model") or {}
    if model.get("label"):
        return str(model["label"])
    return model_label(str(model["spec"])) if model.get("spec") else None


def _label(run_dir: Path) -> str:
    meta = run_dir / "meta.json"
    if meta.exists():
        try:
            doc = json.loads(meta.read_text(encoding="utf-8"))
            found = doc.get("label") or _cache_label(doc["cache"])
            if found:
                return str(found)
        except (KeyError, TypeError, ValueError):
            pass
    return run_dir.name


def compare_probe_runs(
    base: str | os.PathLike[str],
    variant: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    metric: str = "exact_match",
    labels: tuple[str, str] | None = None,
    depth: str = "layer",
) -> list[Path]:
    """Draw two probe runs (base vs variant) on one figure, ``probe_compare.png``.

    Args:
        base: Output directory of the base model's ``entitylens probe`` run.
        variant: Output directory of the variant's run.
        out_dir: Where to write ``probe_compare.png``.
        metric: Metric to draw (a value of the ``metric`` column), with its band; the runs' majority and
            sibling-lookup baselines are drawn thin for exact-match metrics, and selectivity gets its own
            row of panels when both runs have it.
        labels: Legend names (default: the runs' model labels).
        depth: ``"layer"`` (default; refused for models of different depth), ``"auto"`` (``"layer"`` for equal
            depths, else ``"relative"``; the studies use it) or ``"relative"``: the x axis is
            ``layer / (layers - 1)`` so models of different depth line up by relative position.

    Returns:
        The written paths.
    """
    a, b = Path(base), Path(variant)
    ta, tb = read_probe_table(a), read_probe_table(b)
    for p, t in ((a, ta), (b, tb)):
        if not (t["metric"] == metric).any():
            have = sorted(set(t["metric"]))
            raise EntitylensError(f"{p}/probe.csv has no metric {metric!r}; use one of {', '.join(have)}")
    names = labels or (_label(a), _label(b))
    if names[0] == names[1]:
        names = (f"{names[0]} ({a.name})", f"{names[1]} ({b.name})")
    if depth not in ("layer", "relative", "auto"):
        raise EntitylensError(f"unknown --depth {depth!r}; use layer or relative")
    da, db = _probe_depth(a), _probe_depth(b)
    if depth == "auto":
        depth = "layer" if da == db else "relative"
    scales: dict[str, float] | None = None
    if da != db and depth == "layer":
        raise EntitylensError(
            f"{names[0]} has {da} layers and {names[1]} {db}: layer numbers do not line up across depths; pass "
            "--depth relative (layer / (layers - 1))"
        )
    if depth == "relative":
        scales = {names[0]: 1.0 / max(1, da - 1), names[1]: 1.0 / max(1, db - 1)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return plot_probe_compare({names[0]: ta, names[1]: tb}, out / "probe_compare", metric=metric, x_scales=scales)


def _probe_depth(run_dir: Path) -> int:
    """Layers of the model behind a probe run (its cache's ``n_layers``; else the largest probed layer + 1)."""
    try:
        doc = json.loads((run_dir / "meta.json").read_text(encoding="utf-8"))
        n = doc["cache"]["model"]["n_layers"]
        if n:
            return int(n)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    layers = read_probe_table(run_dir)["layer"]
    return int(layers.max()) + 1 if len(layers) else 0


def read_probe_weights(run_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a probe run's weights.

    Args:
        run_dir: Output directory of an ``entitylens probe`` run.

    Returns:
        ``(tensors, info)``: ``{role}/coef`` and ``{role}/intercept`` tensors, and the ``target``, ``hook``,
        ``layers``, ``columns`` and ``roles``.

    Raises:
        EntitylensError: The directory has no weights (a run from before they were saved).
    """
    from safetensors import safe_open

    path = Path(run_dir) / PROBE_WEIGHTS
    if not path.is_file():
        raise EntitylensError(f"{path} does not exist; rerun `entitylens probe` (this version saves the probes' "
                              "weights) and pass its --out")
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        raw = f.metadata() or {}
    info: dict[str, Any] = {"target": raw.get("target"), "hook": raw.get("hook")}
    for key in ("layers", "columns", "roles"):
        info[key] = json.loads(raw.get(key, "[]"))
    return tensors, info

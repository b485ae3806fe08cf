"""The tables and figure of an evaluation run: ``summary.csv``, ``comparison.csv``, ``accuracy_by_numops``.

* :func:`summary_table` -- per model and numops bucket: accuracy with its 95% interval (rows clustered by
  state, :data:`entitylens.stats.INTERVAL_METHOD`), truncations, and the paper's number where known;
* :func:`compare` -- per (base, variant) pair and bucket: the difference with its cluster-bootstrap interval
  and the exact paired randomization test over states (the row-level McNemar test kept as a labelled
  secondary column);
* :func:`write_outputs` -- the canonical ``predictions.jsonl``, both tables and the figure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from entitylens._io import atomic_write
from entitylens.behavior.baselines import BASELINES
from entitylens.behavior.evaluate import PREDICTIONS_FILE, EvalResult
from entitylens.errors import EntitylensError
from entitylens.frames import frame, write_csv
from entitylens.models.registry import PAPER_RANDOM_BASELINE, REGISTRY
from entitylens.plots import CurvePoint, plot_accuracy_by_numops
from entitylens.stats import INTERVAL_METHOD, PAIRED_TEST, ROW_TEST, paired_state_test
from entitylens.task.score import Accuracy

SUMMARY_COLUMNS = (
    "model", "spec", "bucket", "n", "correct", "accuracy", "ci_low", "ci_high", "truncated", "paper_accuracy",
)  # fmt: skip
COMPARISON_COLUMNS = (
    "base", "variant", "bucket", "n", "n_states", "base_accuracy", "variant_accuracy", "difference",
    "ci_low", "ci_high", "p_value", "test", "base_only", "variant_only", "p_value_rows", "test_rows",
)  # fmt: skip
TEST_NAME = PAIRED_TEST


def paper_curve(spec: str) -> tuple[float | None, tuple[float, ...] | None]:
    """The paper's overall accuracy and per-numops curve of a registry model (or the random baseline)."""
    if spec == "random":
        return PAPER_RANDOM_BASELINE[0] / 100, tuple(x / 100 for x in PAPER_RANDOM_BASELINE[1])
    entry = REGISTRY.get(spec)
    if entry is None or entry.paper_overall is None or entry.paper_by_numops is None:
        return None, None
    return entry.paper_overall / 100, tuple(x / 100 for x in entry.paper_by_numops)


def summary_table(results: Sequence[EvalResult], specs: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Per model: accuracy by numops bucket, overall and state accuracy, truncations, the paper's figure.

    Returns a DataFrame with columns :data:`SUMMARY_COLUMNS` (missing numbers are NaN).
    """
    rows: list[dict[str, Any]] = []
    specs = specs or {}
    for res in results:
        spec = specs.get(res.model, res.model)
        report = res.report()
        paper_overall, paper_numops = paper_curve(spec)
        trunc_by_bucket: dict[int, int] = {}
        for p in res.predictions:
            k = min(p.numops, res.config.max_numops)
            trunc_by_bucket[k] = trunc_by_bucket.get(k, 0) + int(p.truncated)

        def row(bucket: str, acc: Accuracy, truncated: int, paper: float | None, res=res, spec=spec) -> dict:
            return {
                "model": res.model, "spec": spec, "bucket": bucket, "n": acc.n, "correct": acc.correct,
                "accuracy": acc.accuracy, "ci_low": acc.low, "ci_high": acc.high, "truncated": truncated,
                "paper_accuracy": paper,
            }  # fmt: skip

        for k, acc in report.by_numops.items():
            paper = paper_numops[k] if paper_numops is not None and k < len(paper_numops) else None
            rows.append(row(report.numops_label(k), acc, trunc_by_bucket.get(k, 0), paper))
        rows.append(row("overall", report.overall, sum(trunc_by_bucket.values()), paper_overall))
        rows.append(row("state", report.state, res.truncated_states, None))
    return frame(rows, SUMMARY_COLUMNS)


def compare(results: Sequence[EvalResult], pairs: Sequence[tuple[str, str]] | None = None) -> pd.DataFrame:
    """Paired base-vs-variant comparison per numops bucket, with the state as the unit of inference.

    Per bucket (and overall): both accuracies, the difference with its 95% cluster-bootstrap interval over
    states, the exact paired randomization test over states (``p_value``), and -- secondary, labelled --
    the row-level exact McNemar test (``p_value_rows``), which treats the 7 boxes of a statement as
    independent and so overstates the evidence.

    Args:
        results: Evaluation results (same states for every model).
        pairs: (base label, variant label) pairs; default: the first result is the base of every other.

    Returns:
        A DataFrame (columns :data:`COMPARISON_COLUMNS`), one row per pair and bucket (``0 .. max_numops``
        then ``overall``).

    """
    by_model = {r.model: r for r in results}
    if pairs is None:
        pairs = [(results[0].model, r.model) for r in results[1:]]
    rows: list[dict[str, Any]] = []
    for base, variant in pairs:
        for name in (base, variant):
            if name not in by_model:
                raise EntitylensError(f"pair ({base}, {variant}): no results for {name!r}; evaluate it first")
        a = {(p.state_id, p.box): p for p in by_model[base].predictions}
        b = {(p.state_id, p.box): p for p in by_model[variant].predictions}
        if a.keys() != b.keys():
            raise EntitylensError(
                f"{base} and {variant} were evaluated on different items; compare runs on the same dataset"
            )
        cap = by_model[base].config.max_numops
        keys = sorted(a)
        buckets: dict[str, list[tuple[str, int]]] = {}
        for key in keys:
            k = min(a[key].numops, cap)
            buckets.setdefault(str(k) if k < cap else f"{cap}+", []).append(key)
        ordered = sorted(buckets, key=lambda s: int(s.rstrip("+"))) + ["overall"]
        buckets["overall"] = keys
        for bucket in ordered:
            items = buckets[bucket]
            xs = [a[k].correct for k in items]
            ys = [b[k].correct for k in items]
            t = paired_state_test(xs, ys, [k[0] for k in items])
            rows.append({
                "base": base, "variant": variant, "bucket": bucket, "n": len(items), "n_states": t.n_clusters,
                "base_accuracy": t.base_accuracy, "variant_accuracy": t.variant_accuracy, "difference": t.difference,
                "ci_low": t.ci_low, "ci_high": t.ci_high, "p_value": t.p_value, "test": TEST_NAME,
                "base_only": t.base_only, "variant_only": t.variant_only, "p_value_rows": t.p_value_rows,
                "test_rows": ROW_TEST,
            })  # fmt: skip
    return frame(rows, COMPARISON_COLUMNS)


def curves(results: Sequence[EvalResult]) -> dict[str, list[CurvePoint]]:
    """Accuracy-by-numops curves (with 95% bands, :data:`entitylens.stats.INTERVAL_METHOD`) per model."""
    out: dict[str, list[CurvePoint]] = {}
    for res in results:
        report = res.report()
        out[res.model] = [
            CurvePoint(k, a.accuracy, a.low, a.high, a.n) for k, a in report.by_numops.items() if a.n > 0
        ]
    return out


def write_outputs(
    out: Path,
    results: Sequence[EvalResult],
    pairs: Sequence[tuple[str, str]],
    specs: Mapping[str, str],
) -> dict[str, Path]:
    """Write canonical predictions, ``summary.csv``, ``comparison.csv`` and the figure."""
    with atomic_write(out / PREDICTIONS_FILE) as f:
        for res in results:
            for p in res.predictions:
                f.write(p.to_json() + "\n")
    write_csv(summary_table(results, specs), out / "summary.csv")
    written = {"predictions": out / PREDICTIONS_FILE, "summary": out / "summary.csv"}
    if pairs:
        write_csv(compare(results, pairs), out / "comparison.csv")
        written["comparison"] = out / "comparison.csv"
    baselines = [r.model for r in results if specs.get(r.model, r.model) in BASELINES]
    models = [r.model for r in results if r.model not in baselines]
    # A panel per compared pair that holds a model; baselines are reference lines in every panel.
    panels = [list(p) for p in pairs if not set(p) <= set(baselines)] or [models or baselines]
    all_curves = curves(results)
    refs = {b: all_curves[b] for b in baselines if models}
    paper = {}
    for r in results:
        _, curve = paper_curve(specs.get(r.model, r.model))
        if curve is not None:
            paper[r.model] = curve
    cap = results[0].config.max_numops if results else 7
    figs = plot_accuracy_by_numops(
        all_curves, panels, out / "accuracy_by_numops", paper=paper or None, references=refs or None,
        interval=f"95% {INTERVAL_METHOD}", bucket_labels={cap: f"{cap}+"},
    )  # fmt: skip
    written["figure"] = figs[0]
    return written

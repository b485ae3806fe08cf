"""Run directories: several models on one dataset, resumable, shardable, with summaries and figures.

A run directory holds

* ``run.json`` — the config: dataset path and SHA-256, models (spec, label, dtype), the prediction-relevant
  :class:`~entitylens.behavior.evaluate.EvalConfig` fields, the shard, the entitylens version. Rerunning
  into the directory with a different config is refused (use a new ``--out``).
* ``predictions.jsonl`` — one row per (model, state, box); appended per batch, rewritten in canonical
  order when the run completes.
* ``summary.csv`` — model × numops bucket → accuracy, n, 95% interval (Wilson on the effective n, rows
  clustered by state: :data:`entitylens.stats.INTERVAL_METHOD`), truncated rows, the paper's
  figure for registry models; plus ``overall`` and ``state`` rows.
* ``comparison.csv`` — per (base, variant) pair and bucket: both accuracies, the difference with its 95%
  cluster-bootstrap interval over states, and the p-value of the exact paired randomization test over states
  (the state is the unit: its 7 answers come from one generation); the row-level exact McNemar p-value is a
  labelled secondary column (:mod:`entitylens.stats`).
* ``accuracy_by_numops.png`` / ``.pdf`` — one panel per pair.

``shard="i/n"`` evaluates the states whose dataset index is ``i`` mod ``n``; :func:`merge_runs` combines
all ``n`` shards (refusing overlaps and gaps) into one run directory with the same outputs.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from entitylens import __version__
from entitylens._io import (
    atomic_write,
    check_output_apart,
    clean_stale_temps,
    sha256_file,
    sha256_json,
    write_json,
)
from entitylens.behavior.baselines import BASELINES
from entitylens.behavior.evaluate import (
    PREDICTIONS_FILE,
    EvalConfig,
    EvalResult,
    Prediction,
    Predictor,
    evaluate,
    read_predictions_log,
)
from entitylens.errors import EntitylensError
from entitylens.plots import CurvePoint, plot_accuracy_by_numops
from entitylens.stats import INTERVAL_METHOD, PAIRED_TEST, ROW_TEST, paired_state_test
from entitylens.table import Table
from entitylens.task.score import Accuracy
from entitylens.task.types import State

RUN_FILE = "run.json"
SUMMARY_COLUMNS = (
    "model", "spec", "bucket", "n", "correct", "accuracy", "ci_low", "ci_high", "truncated", "paper_accuracy",
)  # fmt: skip
COMPARISON_COLUMNS = (
    "base", "variant", "bucket", "n", "n_states", "base_accuracy", "variant_accuracy", "difference",
    "ci_low", "ci_high", "p_value", "test", "base_only", "variant_only", "p_value_rows", "test_rows",
)  # fmt: skip
TEST_NAME = PAIRED_TEST


@dataclass(frozen=True)
class ModelRun:
    """A model to evaluate in a run.

    Attributes:
        spec: What to load (registry key, hub id, path, ``tiny:...``) or a baseline (``random``...).
        label: Its name in the outputs.

    """

    spec: str
    label: str


def parse_shard(shard: str | None) -> tuple[int, int] | None:
    """Parse ``"i/n"`` (0-based ``i < n``) or None."""
    if shard is None:
        return None
    try:
        i, n = (int(x) for x in shard.split("/"))
    except ValueError:
        raise EntitylensError(f"--shard {shard!r} is not of the form i/n (e.g. 0/4)") from None
    if not (n >= 1 and 0 <= i < n):
        raise EntitylensError(f"--shard {shard!r}: need 0 <= i < n (e.g. 0/4 ... 3/4)")
    return i, n


def shard_states(states: Sequence[State], shard: tuple[int, int] | None) -> list[State]:
    """The states of one shard: dataset indices congruent to ``i`` mod ``n`` (deterministic)."""
    if shard is None:
        return list(states)
    i, n = shard
    return [s for j, s in enumerate(states) if j % n == i]


def default_label(spec: str) -> str:
    """Output label for a spec: :func:`entitylens.models.model_label` (one label everywhere)."""
    from entitylens.models.loading import model_label

    return model_label(spec)


def _paper_curve(spec: str) -> tuple[float | None, tuple[float, ...] | None]:
    from entitylens.models.registry import PAPER_RANDOM_BASELINE, REGISTRY

    if spec == "random":
        return PAPER_RANDOM_BASELINE[0] / 100, tuple(x / 100 for x in PAPER_RANDOM_BASELINE[1])
    entry = REGISTRY.get(spec)
    if entry is None or entry.paper_overall is None or entry.paper_by_numops is None:
        return None, None
    return entry.paper_overall / 100, tuple(x / 100 for x in entry.paper_by_numops)


# ----------------------------------------------------------------------------------------------- config


def run_record(
    dataset: Mapping[str, Any],
    models: Sequence[Mapping[str, Any]],
    eval_fields: Mapping[str, Any],
    dtype: str,
    shard: tuple[int, int] | None,
    pairs: Sequence[tuple[str, str]],
) -> dict[str, Any]:
    """The ``run.json`` record of a run from its parts (shared by ``entitylens eval`` and the testbed).

    Args:
        dataset: What was evaluated (``path``, ``sha256``, ``num_states``, ...).
        models: One record per model (``spec``, ``label``, ...).
        eval_fields: The prediction-relevant evaluation settings.
        dtype: Weight dtype.
        shard: ``(i, n)`` or None.
        pairs: Compared (base, variant) label pairs.

    Returns:
        The record (everything that must match to resume into a directory).
    """
    return {
        "entitylens_version": __version__,
        "dataset": dict(dataset),
        "models": [dict(m) for m in models],
        "dtype": dtype,
        "eval": dict(eval_fields),
        "shard": None if shard is None else list(shard),
        "pairs": [list(p) for p in pairs],
    }


def run_config(
    dataset: str | os.PathLike[str],
    models: Sequence[ModelRun],
    config: EvalConfig,
    dtype: str,
    shard: tuple[int, int] | None,
    pairs: Sequence[tuple[str, str]],
    state_ids: Sequence[str],
) -> dict[str, Any]:
    """The ``run.json`` record of an evaluation of a dataset file (see :func:`run_record`).

    Each model's record says whether its prompts go through its chat template (``chat``: what is applied,
    from ``config.chat`` and the model's own metadata), so ``"auto"`` never hides the decision.
    """
    return run_record(
        {"path": str(dataset), "sha256": sha256_file(dataset), "states_sha256": sha256_json(list(state_ids)),
         "num_states": len(state_ids)},
        [model_record(m, config) for m in models],
        config.prediction_fields(), dtype, shard, pairs,
    )  # fmt: skip


def model_record(model: ModelRun, config: EvalConfig) -> dict[str, Any]:
    """A model's ``run.json`` record: spec, label and (for real models) the chat form applied."""
    rec: dict[str, Any] = {"spec": model.spec, "label": model.label}
    if model.spec not in BASELINES:
        if config.chat == "auto":
            from entitylens.models.loading import resolve_spec

            rec["chat"] = resolve_spec(model.spec).chat
        else:
            rec["chat"] = config.chat == "always"
    return rec


_MATCH_KEYS = ("entitylens_version", "models", "dtype", "eval", "shard")


def check_or_write_config(out: Path, record: Mapping[str, Any]) -> None:
    """Write ``run.json``, or check it matches an existing one (resume) and refuse otherwise."""
    path = out / RUN_FILE
    if path.exists():
        old = json.loads(path.read_text())
        diffs = [k for k in _MATCH_KEYS if old.get(k) != record.get(k)]
        if old.get("dataset", {}).get("sha256") != record["dataset"]["sha256"]:
            diffs.insert(0, "dataset")
        if diffs:
            raise EntitylensError(
                f"{out} holds a run with a different config ({', '.join(diffs)} differ); "
                "use a new --out directory (nothing in it was changed)"
            )
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_json(path, record)
    except OSError as e:
        raise EntitylensError(f"output directory {out} is not writable ({e.strerror}); choose another --out") from e


# ------------------------------------------------------------------------------------------ aggregation


def summary_table(results: Sequence[EvalResult], specs: Mapping[str, str] | None = None) -> Table:
    """Per model: accuracy by numops bucket, overall and state accuracy, truncations, the paper's figure."""
    rows: list[dict[str, Any]] = []
    specs = specs or {}
    for res in results:
        spec = specs.get(res.model, res.model)
        report = res.report()
        paper_overall, paper_numops = _paper_curve(spec)
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
    return Table(SUMMARY_COLUMNS, tuple(rows))


def compare(results: Sequence[EvalResult], pairs: Sequence[tuple[str, str]] | None = None) -> Table:
    """Paired base-vs-variant comparison per numops bucket, with the state as the unit of inference.

    Per bucket (and overall): both accuracies, the difference with its 95% cluster-bootstrap interval over
    states, the exact paired randomization test over states (``p_value``), and -- secondary, labelled --
    the row-level exact McNemar test (``p_value_rows``), which treats the 7 boxes of a statement as
    independent and so overstates the evidence.

    Args:
        results: Evaluation results (same states for every model).
        pairs: (base label, variant label) pairs; default: the first result is the base of every other.

    Returns:
        One row per pair and bucket (``0 .. max_numops`` then ``overall``).

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
    return Table(COMPARISON_COLUMNS, tuple(rows))


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
    summary_table(results, specs).to_csv(out / "summary.csv")
    written = {"predictions": out / PREDICTIONS_FILE, "summary": out / "summary.csv"}
    if pairs:
        compare(results, pairs).to_csv(out / "comparison.csv")
        written["comparison"] = out / "comparison.csv"
    baselines = [r.model for r in results if specs.get(r.model, r.model) in BASELINES]
    models = [r.model for r in results if r.model not in baselines]
    # A panel per compared pair that holds a model; baselines are reference lines in every panel.
    panels = [list(p) for p in pairs if not set(p) <= set(baselines)] or [models or baselines]
    all_curves = curves(results)
    refs = {b: all_curves[b] for b in baselines if models}
    paper = {}
    for r in results:
        _, curve = _paper_curve(specs.get(r.model, r.model))
        if curve is not None:
            paper[r.model] = curve
    cap = results[0].config.max_numops if results else 7
    figs = plot_accuracy_by_numops(
        all_curves, panels, out / "accuracy_by_numops", paper=paper or None, references=refs or None,
        interval=f"95% {INTERVAL_METHOD}", bucket_labels={cap: f"{cap}+"},
    )  # fmt: skip
    written["figure"] = figs[0]
    return written


# ------------------------------------------------------------------------------------------------ runs


def read_dataset(path: str | os.PathLike[str]) -> list[State]:
    """Read a K&S T5 JSONL dataset to evaluate, refusing a missing or empty file with a one-line fix.

    Args:
        path: The dataset file.

    Returns:
        Its states, in file order.

    Raises:
        EntitylensError: The file does not exist, has no rows, or a malformed row.
    """
    from entitylens.task.io import read_ks_jsonl

    dataset = Path(path)
    if not dataset.is_file():
        raise EntitylensError(f"dataset {dataset} does not exist; create one with `entitylens data generate`")
    states = read_ks_jsonl(dataset)
    if not states:
        raise EntitylensError(f"dataset {dataset} has no rows; generate one with `entitylens data generate`")
    return states


def select_states(states: Sequence[State], shard: str | None, limit: int | None) -> list[State]:
    """The states a run evaluates: shard ``i/n`` of the dataset, then its first ``limit``; never none.

    Raises:
        EntitylensError: A bad shard or limit, or a selection with no states (saying which option emptied it).
    """
    shard_t = parse_shard(shard)
    selected = shard_states(states, shard_t)
    if not selected:
        i, n = shard_t  # type: ignore[misc]
        raise EntitylensError(
            f"--shard {i}/{n} selects no state: the dataset has {len(states)} states, so use at most "
            f"{len(states)} shards"
        )
    if limit is not None:
        if limit < 1:
            raise EntitylensError(f"--limit {limit} selects no state; pass --limit N with N >= 1 (or drop it)")
        selected = selected[:limit]
    return selected


def run_eval(
    models: Sequence[ModelRun],
    dataset: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: EvalConfig | None = None,
    *,
    pairs: Sequence[tuple[str, str]] | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    shard: str | None = None,
    limit: int | None = None,
    device_map: str | None = None,
) -> list[EvalResult]:
    """Evaluate several models on a dataset file into a run directory (resumable).

    Args:
        models: Models to evaluate, in order.
        dataset: A K&S T5 JSONL file.
        out: Run directory.
        config: Evaluation config.
        pairs: (base, variant) label pairs to compare; default: the first model vs each other one.
        device: Device for loaded models.
        dtype: Weight dtype for loaded models.
        shard: ``"i/n"`` to evaluate one shard.
        limit: Evaluate only the first ``limit`` states (after sharding) — for smoke tests.
        device_map: Hugging Face ``device_map`` for loaded models (e.g. ``"auto"`` to spread a 70B model
            over several GPUs); overrides ``device``. Placement does not change predictions, so it is not
            part of the run's identity.

    Returns:
        One result per model.

    """
    config = config or EvalConfig()
    out = Path(out)
    dataset = Path(dataset)
    states = select_states(read_dataset(dataset), shard, limit)
    shard_t = parse_shard(shard)
    labels = [m.label for m in models]
    if len(set(labels)) != len(labels):
        raise EntitylensError(f"model labels must be unique, got {labels}; pass each model once")
    if pairs is None:
        pairs = [(labels[0], lab) for lab in labels[1:]]
    for base, variant in pairs:
        if base not in labels or variant not in labels:
            raise EntitylensError(f"pair {base}:{variant} names a model that is not in --models {labels}")
    record = run_config(dataset, models, config, dtype, shard_t, pairs, [s.state_id for s in states])
    created = claim_run_dir(out, record)
    results = []
    try:
        for m in models:
            predictor = None if m.spec in BASELINES else _lazy_model_predictor(m.spec, device, dtype, config,
                                                                                      device_map=device_map)
            model = m.spec if m.spec in BASELINES else None
            results.append(evaluate(model, states, config, label=m.label, run_dir=out, predictor=predictor))
    except BaseException:
        release_run_dir(out, created)
        raise
    write_outputs(out, results, pairs, {m.label: m.spec for m in models})
    return results


def claim_run_dir(out: Path, record: Mapping[str, Any]) -> bool:
    """:func:`check_or_write_config`, returning whether this call created ``run.json`` (a new run)."""
    created = not (out / RUN_FILE).exists()
    check_or_write_config(out, record)
    clean_stale_temps(out)
    return created


def release_run_dir(out: Path, created: bool) -> None:
    """Undo :func:`claim_run_dir` for a run that failed before writing any prediction.

    A run that stops on a bad spec, a missing checkpoint or out-of-memory before its first batch must not
    keep its config: otherwise rerunning with the fix into the same ``--out`` is refused. Once a batch is
    written, the config stays (the run resumes).
    """
    log = out / PREDICTIONS_FILE
    if created and (not log.exists() or log.stat().st_size == 0):
        (out / RUN_FILE).unlink(missing_ok=True)
        log.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            out.rmdir()  # only when empty


def lazy_predictor(make: Callable[[], Predictor]) -> Predictor:
    """A predictor that builds the real one on first use, so a resumed, finished model is never loaded.

    Args:
        make: Builds the real predictor (loads the model).

    Returns:
        The lazy predictor.
    """
    cache: dict[str, Predictor] = {}

    def predict(batch: Sequence[State]) -> list[tuple[str, bool]]:
        if "predictor" not in cache:
            cache["predictor"] = make()
        return cache["predictor"](batch)

    return predict


def _lazy_model_predictor(spec: str, device: str, dtype: str, config: EvalConfig, device_map: str | None = None) -> Any:
    """A lazy predictor for a model spec (see :func:`lazy_predictor`)."""
    from entitylens.behavior.evaluate import model_predictor
    from entitylens.models import load_model

    return lazy_predictor(
        lambda: model_predictor(load_model(spec, device=device, dtype=dtype, device_map=device_map), config)
    )


def load_run(run_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], list[EvalResult]]:
    """Read a finished run directory: its config and one result per model (rows in file order)."""
    run_dir = Path(run_dir)
    if not (run_dir / RUN_FILE).is_file():
        raise EntitylensError(f"{run_dir} is not a run directory (no {RUN_FILE}); pass the --out of `entitylens eval`")
    try:
        record = json.loads((run_dir / RUN_FILE).read_text())
        config = EvalConfig(**record["eval"])
        labels = [m["label"] for m in record["models"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EntitylensError(
            f"{run_dir}/{RUN_FILE} is not a readable run record ({type(e).__name__}); rerun the evaluation into a "
            "new --out"
        ) from None
    by_model: dict[str, list[Prediction]] = {label: [] for label in labels}
    log = run_dir / PREDICTIONS_FILE
    if log.exists():
        rows, _ = read_predictions_log(log)  # a torn last line (kill -9 mid-append) is left out, as resume does
        for p in rows:
            if p.model not in by_model:
                raise EntitylensError(
                    f"{log} holds rows of model {p.model!r}, which {run_dir}/{RUN_FILE} does not list; combine "
                    "finished runs with `entitylens compare`, never by concatenating files"
                )
            by_model[p.model].append(p)
    return record, [EvalResult(m, tuple(rows), config) for m, rows in by_model.items()]


def combine_runs(
    dirs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    pairs: Sequence[tuple[str, str]] | None = None,
) -> list[EvalResult]:
    """Combine finished runs of *different* models on the same dataset and protocol into one run directory.

    What ``entitylens compare`` does: e.g. a base model evaluated on one machine and its code model on
    another. The runs must be complete, unsharded (merge shards first), on the same dataset (same file
    hash and states) with the same prediction-relevant settings; their model labels must differ.

    Args:
        dirs: Finished run directories.
        out: Directory for the combined run (a new one, or one holding this very combination).
        pairs: (base, variant) label pairs to compare; default: the first model vs every other.

    Returns:
        One result per model, in the order of ``dirs``.

    Raises:
        EntitylensError: Fewer than two runs, a shard or an unfinished run, another dataset or protocol,
            repeated labels, a pair naming an unknown label, or an output that is an input or holds
            another run.
    """
    if len(dirs) < 2:
        raise EntitylensError("compare needs at least two run directories (each the --out of `entitylens eval`)")
    check_output_apart(out, [("run", d) for d in dirs])
    loaded = [(Path(d), *load_run(d)) for d in dirs]
    first_dir, first, _ = loaded[0]
    models: list[dict[str, Any]] = []
    results: list[EvalResult] = []
    for d, rec, res in loaded:
        if rec.get("shard") is not None:
            raise EntitylensError(f"{d} is one shard of a run; `entitylens merge` its shards first, then compare")
        for key in ("eval", "dtype"):
            if rec.get(key) != first.get(key):
                raise EntitylensError(
                    f"{d} was run with a different {key} than {first_dir}; compare runs of one protocol and dtype"
                )
        same_data = all(
            rec["dataset"].get(k) == first["dataset"].get(k) for k in ("sha256", "states_sha256", "num_states")
        )
        if not same_data:
            raise EntitylensError(f"{d} evaluated other states than {first_dir}; compare runs on the same dataset")
        want = rec["dataset"].get("num_states")
        for r in res:
            if r.num_states != want:
                raise EntitylensError(f"{d}: {r.model} finished {r.num_states} of {want} states; finish it first")
        models.extend(rec["models"])
        results.extend(res)
    labels = [m["label"] for m in models]
    if len(set(labels)) != len(labels):
        raise EntitylensError(f"the runs share a model label ({labels}); each model may appear in one run only")
    pair_list = [tuple(p) for p in pairs] if pairs else [(labels[0], lab) for lab in labels[1:]]
    for base, variant in pair_list:
        if base not in labels or variant not in labels:
            raise EntitylensError(f"pair {base}:{variant} names a model that is not in the runs ({labels})")
    record = {
        **first,
        "models": models,
        "pairs": [list(p) for p in pair_list],
        "combined_from": [str(d) for d, _, _ in loaded],
    }
    out = Path(out)
    _claim_merged(out, record)
    write_outputs(out, results, pair_list, {m["label"]: m["spec"] for m in models})  # type: ignore[arg-type]
    return results


def _claim_merged(out: Path, record: Mapping[str, Any]) -> None:
    """Write a combined run's ``run.json``, refusing a directory that holds a different run (nothing changed)."""
    path = out / RUN_FILE
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = None
        keys = ("models", "dtype", "eval", "dataset", "pairs", "shard")
        if old is None or any(old.get(k) != record.get(k) for k in keys):
            raise EntitylensError(
                f"{out} holds another run; merge into a new --out directory (nothing in it was changed)"
            )
    elif out.exists() and any(out.iterdir()):
        raise EntitylensError(f"{out} is not empty and holds no run; merge into a new --out (nothing was changed)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EntitylensError(f"cannot create --out {out} ({e.strerror}); choose a writable directory") from None
    write_json(path, record)


def merge_runs(dirs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str]) -> list[EvalResult]:
    """Combine the shards ``0/n .. n-1/n`` of one evaluation into a complete run directory.

    Refuses shards with different configs, overlapping or missing shards, and incomplete shards.

    Args:
        dirs: The shard run directories.
        out: Directory for the merged run.

    Returns:
        One merged result per model.

    """
    if not dirs:
        raise EntitylensError("merge needs shard directories; pass the --out of each `entitylens eval --shard i/n`")
    check_output_apart(out, [("shard", d) for d in dirs])
    loaded = [(Path(d), *load_run(d)) for d in dirs]
    first = loaded[0][1]
    shards: dict[int, tuple[Path, list[EvalResult]]] = {}
    n = None
    for d, rec, results in loaded:
        for k in ("entitylens_version", "models", "dtype", "eval", "pairs"):
            if rec.get(k) != first.get(k):
                raise EntitylensError(f"{d} was run with a different {k} than {loaded[0][0]}; merge shards of one run")
        if rec["dataset"]["sha256"] != first["dataset"]["sha256"]:
            raise EntitylensError(f"{d} evaluated a different dataset than {loaded[0][0]}; merge shards of one run")
        if rec.get("shard") is None:
            raise EntitylensError(f"{d} is not a shard (run without --shard); nothing to merge")
        i, n_i = rec["shard"]
        n = n_i if n is None else n
        if n_i != n:
            raise EntitylensError(f"{d} is shard {i}/{n_i} but others are out of {n}; merge shards of one split")
        if i in shards:
            raise EntitylensError(f"shard {i}/{n} given twice ({shards[i][0]} and {d}); pass each shard once")
        want = rec["dataset"].get("num_states")
        for res in results:
            if res.num_states != want:
                raise EntitylensError(
                    f"{d}: {res.model} finished {res.num_states} of {want} states; rerun that shard to finish it"
                )
        shards[i] = (d, results)
    assert n is not None
    missing = sorted(set(range(n)) - set(shards))
    if missing:
        raise EntitylensError(f"missing shard(s) {', '.join(f'{i}/{n}' for i in missing)}; run them, then merge")
    labels = [m["label"] for m in first["models"]]
    config = EvalConfig(**first["eval"])
    merged = []
    for label in labels:
        # Shard i holds dataset indices i, i+n, i+2n ...: interleave states back into dataset order.
        per_shard = []
        for i in range(n):
            res = next(r for r in shards[i][1] if r.model == label)
            states: dict[str, list[Prediction]] = {}
            for p in res.predictions:
                states.setdefault(p.state_id, []).append(p)
            per_shard.append(list(states.values()))
        rows: list[Prediction] = []
        for j in range(max(len(s) for s in per_shard)):
            for i in range(n):
                if j < len(per_shard[i]):
                    rows.extend(per_shard[i][j])
        merged.append(EvalResult(label, tuple(rows), config))
    out = Path(out)
    record = dict(first)
    record["shard"] = None
    state_ids = list(dict.fromkeys(p.state_id for p in merged[0].predictions)) if merged else []
    record["dataset"] = {**first["dataset"], "num_states": len(state_ids), "states_sha256": sha256_json(state_ids)}
    record["merged_from"] = [str(shards[i][0]) for i in range(n)]
    _claim_merged(out, record)
    pairs = [tuple(p) for p in first.get("pairs", [])]
    write_outputs(out, merged, pairs, {m["label"]: m["spec"] for m in first["models"]})  # type: ignore[arg-type]
    return merged

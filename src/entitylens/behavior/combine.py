"""Combining run directories, and reading one back.

:func:`merge_runs` joins the shards of one evaluation; :func:`combine_runs` joins finished runs of *different*
models on the same dataset and protocol; :func:`load_run` reads a run directory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from entitylens._io import check_output_apart, sha256_json, write_json
from entitylens.behavior.evaluate import PREDICTIONS_FILE, EvalConfig, EvalResult, Prediction, read_predictions_log
from entitylens.behavior.runs import RUN_FILE
from entitylens.behavior.tables import write_outputs
from entitylens.errors import EntitylensError


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

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
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from entitylens import __version__
from entitylens._io import (
    RunDir,
    clean_stale_temps,
    sha256_file,
    sha256_json,
    write_json,
)
from entitylens.behavior.baselines import BASELINES
from entitylens.behavior.evaluate import (
    COMPACT_PROTOCOL,
    PREDICTIONS_FILE,
    EvalConfig,
    EvalResult,
    Predictor,
    evaluate,
    model_predictor,
)
from entitylens.behavior.tables import write_outputs
from entitylens.errors import EntitylensError
from entitylens.models.registry import EXPERIMENTS
from entitylens.task.io import read_ks_jsonl
from entitylens.task.types import State

RUN_FILE = "run.json"
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
    from entitylens.models.loading import model_label  # torch: the weight-free baselines never import it

    return model_label(spec)


# ----------------------------------------------------------------------------------------------- config


def models_and_pairs(
    experiment: str | None = None,
    specs: Sequence[str] | None = None,
    pairs: Sequence[str] | None = None,
) -> tuple[list[ModelRun], list[tuple[str, str]] | None]:
    """The models to evaluate and the pairs to compare, from an experiment name or explicit specs.

    Args:
        experiment: ``code``, ``math`` or ``alignment``: every model of the experiment's registry pairs,
            each once, in pair order; the pairs are the experiment's. Ignored when ``specs`` is given.
        specs: Model specs (first = base); labels from :func:`entitylens.behavior.runs.default_label`.
        pairs: ``BASE:VARIANT`` label pairs overriding the default pairs.

    Returns:
        ``(models, pairs)``; ``pairs`` is None when neither an experiment nor ``pairs`` fixes them (then the
        first model is compared with each other one).

    Raises:
        EntitylensError: Neither experiment nor specs, an unknown experiment, a malformed pair, or a pair
            naming a model that is not evaluated.

    """
    out_pairs: list[tuple[str, str]] | None
    if specs:
        spec_list = list(specs)
        out_pairs = None
    elif experiment is not None:
        if experiment not in EXPERIMENTS:
            raise EntitylensError(f"unknown experiment {experiment!r}; use one of {', '.join(EXPERIMENTS)}")
        out_pairs = [(a, b) for a, b in EXPERIMENTS[experiment]]
        spec_list = []
        for base, variant in out_pairs:
            for s in (base, variant):
                if s not in spec_list:
                    spec_list.append(s)
    else:
        raise EntitylensError("no models given; pass --models SPEC ... or --experiment code|math|alignment")
    models = [ModelRun(spec=s, label=default_label(s)) for s in spec_list]
    if pairs:
        out_pairs = []
        for item in pairs:
            if ":" not in item:
                raise EntitylensError(
                    f"--pairs {item!r} is not BASE:VARIANT (model labels, e.g. llama2-7b:codellama-7b)"
                )
            base, variant = item.split(":", 1)
            out_pairs.append((base, variant))
    return models, out_pairs


def check_model_pairs(models: Sequence[ModelRun], pairs: Sequence[tuple[str, str]]) -> None:
    """Refuse repeated model labels and a pair naming a model that is not evaluated."""
    labels = [m.label for m in models]
    if len(set(labels)) != len(labels):
        raise EntitylensError(f"model labels must be unique, got {labels}; pass each model once")
    for base, variant in pairs:
        if base not in labels or variant not in labels:
            raise EntitylensError(f"pair {base}:{variant} names a model that is not in --models {labels}")


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
    record = run_record(
        {"path": str(dataset), "sha256": sha256_file(dataset), "states_sha256": sha256_json(list(state_ids)),
         "num_states": len(state_ids)},
        [model_record(m, config) for m in models],
        config.prediction_fields(), dtype, shard, pairs,
    )  # fmt: skip
    record["engine"] = config.engine  # recorded, not matched: the engines' predictions are the same protocol's
    return record


def model_record(model: ModelRun, config: EvalConfig) -> dict[str, Any]:
    """A model's ``run.json`` record: spec, label and (for real models) the chat form applied."""
    rec: dict[str, Any] = {"spec": model.spec, "label": model.label}
    if model.spec not in BASELINES:
        if config.protocol == COMPACT_PROTOCOL:
            rec["chat"] = False  # the compact protocol has no chat form
        elif config.chat == "auto":
            from entitylens.models.loading import resolve_spec  # torch, as above

            rec["chat"] = resolve_spec(model.spec).chat
        else:
            rec["chat"] = config.chat == "always"
    return rec


_MATCH_KEYS = ("entitylens_version", "models", "dtype", "eval", "shard")


def eval_identity(record: Mapping[str, Any]) -> dict[str, Any]:
    """What must match for a run to resume into a directory: the dataset's hash and the prediction settings.

    Computed from a ``run.json`` record's fields (so records written before the ``identity`` key resume too).
    """
    return {"dataset_sha256": (record.get("dataset") or {}).get("sha256"), **{k: record.get(k) for k in _MATCH_KEYS}}


def check_or_write_config(out: Path, record: Mapping[str, Any]) -> None:
    """Write ``run.json``, or check it matches an existing one (resume) and refuse otherwise.

    The directory's contract is :class:`~entitylens._io.RunDir`'s: the record carries its ``identity``
    (:func:`eval_identity`); another identity is refused (a new ``--out`` is the way out: results of several
    models accumulate in one directory, so it is never overwritten).
    """
    record = {**record, "identity": eval_identity(record)}
    is_eval = lambda rec: "eval" in rec and "dataset" in rec  # noqa: E731
    run_dir = RunDir(out, RUN_FILE, "an evaluation run", is_mine=is_eval, identity_of=eval_identity,
                     fix="use a new --out directory")  # fmt: skip
    if run_dir.check(record["identity"]):
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / RUN_FILE, record)
    except OSError as e:
        raise EntitylensError(f"output directory {out} is not writable ({e.strerror}); choose another --out") from e


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
    vllm_options: Any = None,
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
        vllm_options: :class:`~entitylens.behavior.vllm_engine.VLLMOptions` of ``config.engine="vllm"``
            (placement and memory: not part of the run's identity either).

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
            predictor = None if m.spec in BASELINES else _lazy_model_predictor(
                m.spec, device, dtype, config, device_map=device_map, vllm_options=vllm_options)
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


def _lazy_model_predictor(spec: str, device: str, dtype: str, config: EvalConfig, device_map: str | None = None,
                          vllm_options: Any = None) -> Any:
    """A lazy predictor for a model spec on the config's engine (see :func:`lazy_predictor`)."""
    if config.engine == "vllm":
        from entitylens.behavior.vllm_engine import require_vllm, vllm_predictor

        require_vllm()  # before any state: a missing engine is a one-line error, not a half-started run
        return lazy_predictor(lambda: vllm_predictor(spec, config, dtype, vllm_options))
    from entitylens.models import load_model  # torch, as above

    return lazy_predictor(
        lambda: model_predictor(load_model(spec, device=device, dtype=dtype, device_map=device_map), config)
    )
